"""
The paper's benchmarks (Table 2) for any checkpoint this repo writes, through lm-evaluation-harness.

  python harness.py --model out --out ift.json                # ARC, MMLU, TruthfulQA, WinoGrande, GSM8K
  python harness.py table base.json sft.json ift.json         # the paper's table, markdown
  python harness.py --model out --tasks chain_gen,chain_mc    # the bundled offline tasks (tasks/), no internet

--tasks paper (the default) runs the Open LLM Leaderboard settings the paper reports, under the model's chat
template (few-shot examples as earlier user/assistant turns), and each column takes one number from lm-eval:

  column      lm-eval task     shots  metric (lm-eval's key)
  ARC         arc_challenge    25     acc_norm
  MMLU        mmlu             5      acc: the 57 subjects' mean weighted by subject size
  TruthfulQA  truthfulqa_mc2   0      mc2 (lm-eval names it acc)
  WinoGrande  winogrande       5      acc
  GSM8K       gsm8k            5      exact_match under the strict-match filter (the number after "#### ")

lm-eval downloads these data sets from the Hugging Face hub, so --tasks paper needs internet. lm-eval is an
optional dependency (pip install lm-eval; tested with 0.4.13): it is imported inside functions only, and nothing
on the training path imports this file. A separate script, not an eval.py flag: eval.py is our own decoding and
scoring, this file drives someone else's; each stays readable alone.
"""
import argparse
import json
import os
import sys
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
TASKS_DIR = os.path.join(HERE, "tasks")  # the bundled offline tasks: YAML over tasks/chain.jsonl


@dataclass(frozen=True)
class Column:
    name: str    # the paper's column
    task: str    # lm-eval's task or group
    shots: int   # few-shot examples
    metric: str  # lm-eval's result key, "metric,filter"


PAPER = [
    Column("ARC", "arc_challenge", 25, "acc_norm,none"),
    Column("MMLU", "mmlu", 5, "acc,none"),
    Column("TruthfulQA", "truthfulqa_mc2", 0, "acc,none"),  # process_results_mc2 returns mc2 under "acc"
    Column("WinoGrande", "winogrande", 5, "acc,none"),
    Column("GSM8K", "gsm8k", 5, "exact_match,strict-match"),
]
PAPER_SHOTS = {c.task: c.shots for c in PAPER}
INSTALL = "harness.py needs lm-evaluation-harness: pip install lm-eval"


# -----------------------------------------------------------------------------
# the bundled task: a few rows of data/chain_test.jsonl, offline

def local_rows(rows: list) -> list:
    """Chat rows of make_data.py -> the rows of tasks/chain.jsonl: the question, the reference solution and its
    final answer, and four choices for chain_mc: the answer and three wrong ones built from it (a number +1, -1,
    +10; letters with the first, the last, or every letter shifted by one), the answer at position row % 4."""
    def shift(c):
        return chr((ord(c) - ord("a") + 1) % 26 + ord("a"))

    out = []
    for i, r in enumerate(rows):
        answer = r["answer"]
        if r["family"] == "arith":
            wrong = [str(int(answer) + d) for d in (1, -1, 10)]
        else:
            s = answer.split()
            wrong = [" ".join([shift(s[0])] + s[1:]), " ".join(s[:-1] + [shift(s[-1])]),
                     " ".join(shift(c) for c in s)]
        label = i % 4
        choices = wrong[:label] + [answer] + wrong[label:]
        assert len(set(choices)) == 4, f"row {i}: choices collide: {choices}"
        out.append(dict(question=r["messages"][-2]["content"], solution=r["messages"][-1]["content"],
                        answer=answer, choices=choices, label=label, family=r["family"], steps=r["steps"]))
    return out


def write_local_task(src: str = os.path.join(HERE, "data", "chain_test.jsonl"), n: int = 8):
    """Writes tasks/chain.jsonl from the first n rows of src (run once; the file ships with the repo)."""
    with open(src) as f:
        rows = [json.loads(line) for line in f if line.strip()][:n]
    with open(os.path.join(TASKS_DIR, "chain.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in local_rows(rows))


def local_task(name: str) -> dict:
    """The bundled task tasks/NAME.yaml as lm-eval's config dict, its data file made absolute: datasets reads a
    relative data_files path from the working directory, not from the YAML's folder."""
    from lm_eval.tasks._yaml_loader import load_yaml  # lm-eval's reader: it resolves !function beside the YAML
    cfg = load_yaml(os.path.join(TASKS_DIR, name + ".yaml"))
    files = cfg["dataset_kwargs"]["data_files"]
    cfg["dataset_kwargs"]["data_files"] = {split: os.path.join(TASKS_DIR, p) for split, p in files.items()}
    return cfg


def local_task_names() -> list:
    return sorted(f[:-5] for f in os.listdir(TASKS_DIR) if f.endswith(".yaml"))


# -----------------------------------------------------------------------------
# running lm-eval

def task_groups(names: list) -> dict:
    """Task names ("paper" = the five) -> {few-shot count: [lm-eval task specs]}. lm-eval takes one few-shot
    count per call, so each count is one call; tasks outside the paper's keep their own YAML's count (None)."""
    groups = {}
    for name in names:
        for task in [c.task for c in PAPER] if name == "paper" else [name]:
            spec = local_task(task) if task in local_task_names() else task
            groups.setdefault(PAPER_SHOTS.get(task), []).append(spec)
    return groups


def has_chat_template(path: str) -> bool:
    if os.path.isfile(os.path.join(path, "chat_template.jinja")):
        return True
    conf = os.path.join(path, "tokenizer_config.json")
    if not os.path.isfile(conf):
        return False
    with open(conf) as f:
        return bool(json.load(f).get("chat_template"))


def run(model: str, tasks: list, batch_size: int = 8, device: str = "auto", dtype: str = "auto",
        limit: int | None = None, chat_template: bool = True) -> dict:
    """Score the HF checkpoint directory `model` on `tasks` with lm-eval's "hf" model (transformers), the chat
    template applied. Returns lm-eval's results of all calls merged ("results", "n-shot", "configs", ...,
    "samples": per task the prompts and responses), with "paper": {column: score} for the columns it has."""
    import datasets
    import lm_eval
    import torch
    from lm_eval.tasks import TaskManager

    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False  # else each "json" load pings S3 to count it: none offline

    from model import decoding_dtype, pick_device
    dev = pick_device(device)
    if dtype == "auto":
        dtype = str(decoding_dtype(dev)).removeprefix("torch.")  # as eval.py: bf16 on CUDA, float32 on CPU
    # an absolute path: lm-eval asks the hub for the sha of `pretrained` when it looks like a repo id ("out")
    model_args = dict(pretrained=os.path.abspath(model), dtype=dtype)
    groups = task_groups(tasks)
    # indexing lm-eval's ~15k built-in task files takes seconds: only when a task is not ours
    builtin = [s for specs in groups.values() for s in specs if isinstance(s, str)]
    manager = TaskManager(include_defaults=bool(builtin))
    for name in builtin:  # before the (slow) model load
        if name not in manager.all_tasks:
            raise ValueError(f"--tasks: {name!r} is neither an lm-eval task nor one of ours ({TASKS_DIR})")
    # the "hf" model, loaded once for every call (what simple_evaluate(model="hf", model_args=...) does inside)
    lm = lm_eval.api.registry.get_model("hf").create_from_arg_obj(
        model_args, {"batch_size": batch_size, "device": str(dev)})
    out = dict(model=os.path.abspath(model), name=os.path.basename(os.path.normpath(model)), model_args=model_args,
               lm_eval_version=lm_eval.__version__, torch_version=torch.__version__, device=str(dev),
               apply_chat_template=chat_template, fewshot_as_multiturn=chat_template, limit=limit)
    for shots, specs in groups.items():
        res = lm_eval.simple_evaluate(model=lm, tasks=specs, num_fewshot=shots, limit=limit,
                                      apply_chat_template=chat_template, fewshot_as_multiturn=chat_template,
                                      task_manager=manager, log_samples=True)
        for key in ("results", "groups", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better",
                    "n-samples", "samples"):
            out.setdefault(key, {}).update(res.get(key) or {})
    out["paper"] = {c.name: v for c, v in zip(PAPER, paper_scores(out)) if v is not None}
    return out


# -----------------------------------------------------------------------------
# the paper's table

def paper_scores(result: dict) -> list:
    """Each paper column's number from one result file (lm-eval's layout, ours or lm_eval's CLI's): a fraction
    in [0, 1], or None when the file lacks that task or metric."""
    scores = []
    for c in PAPER:
        v = (result.get("results", {}).get(c.task) or {}).get(c.metric)
        scores.append(None if v is None or isinstance(v, str) else float(v))  # "N/A" when a group has no value
    return scores


def table(files: list) -> str:
    """Markdown: one row per result file, the paper's five columns in percent and their average (only when all
    five are there). A cell whose few-shot count is not the paper's, or a file run with --limit, is marked."""
    head = "| model | " + " | ".join(c.name for c in PAPER) + " | Average |"
    lines = [head, "|" + "---|" * (len(PAPER) + 2)]
    notes = set()
    for path in files:
        with open(path) as f:
            try:
                result = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not a JSON result file ({e})") from e
        if not isinstance(result, dict) or "results" not in result:
            raise ValueError(f"{path}: no 'results' (not an lm-eval result file)")
        name = result.get("name") or os.path.splitext(os.path.basename(path))[0]
        if result.get("limit"):
            name += f" (limit {result['limit']})"
            notes.add("(limit N): run with --limit N, only the first N rows of each task; not comparable")
        cells = []
        for c, v in zip(PAPER, paper_scores(result)):
            shots = result.get("n-shot", {}).get(c.task)
            if v is None:
                cells.append("-")
                continue
            cell = f"{100 * v:.2f}"
            if shots is not None and int(shots) != c.shots:
                cell += f" ({shots}-shot)"
                notes.add("(k-shot): not the paper's few-shot count")
            cells.append(cell)
        scores = paper_scores(result)
        avg = f"{100 * sum(scores) / len(scores):.2f}" if None not in scores else "-"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {avg} |")
    lines.append("")
    lines.append("Metrics (lm-eval): " + "; ".join(f"{c.name} {c.task} {c.shots}-shot {c.metric.replace(',', ' ')}"
                                                    for c in PAPER) + ".")
    lines += sorted(notes)
    return "\n".join(lines)


# -----------------------------------------------------------------------------

def table_main(argv: list):
    p = argparse.ArgumentParser(prog="harness.py table", description="the paper's table from result files")
    p.add_argument("files", nargs="+", help="result JSON files of harness.py (or lm_eval --output_path)")
    args = p.parse_args(argv)
    try:
        print(table(args.files))
    except (OSError, ValueError) as e:
        sys.exit(f"harness.py table: {e}")


def main(argv: list | None = None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["table"]:
        return table_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", required=True, help="an HF checkpoint directory (train.py's out_dir, a base model)")
    p.add_argument("--tasks", default="paper",
                   help="comma-separated: paper (the five), lm-eval task names, or ours: " + ",".join(
                       local_task_names()))
    p.add_argument("--out", default="", help="result JSON (default: harness-<model dir name>.json)")
    p.add_argument("--batch_size", default="8", help="an int or auto (lm-eval finds the largest that fits)")
    p.add_argument("--device", default="auto", help="auto (cuda when there is one), cuda or cpu")
    p.add_argument("--dtype", default="auto", help="auto (bfloat16 on cuda, float32 on cpu), bfloat16, float32")
    p.add_argument("--limit", type=int, default=None, help="first N rows of each task, for quick checks")
    p.add_argument("--no_chat_template", action="store_true", help="plain prompts (the paper used the template)")
    p.add_argument("--log_samples", action="store_true", help="keep every prompt and response in the JSON")
    args = p.parse_args(argv)

    try:
        import lm_eval  # noqa: F401
    except ImportError:
        sys.exit(INSTALL)
    from eval import check_checkpoint
    try:
        check_checkpoint(args.model)
    except FileNotFoundError as e:
        sys.exit(f"harness.py: {e}")
    if not args.no_chat_template and not has_chat_template(args.model):
        sys.exit(f"harness.py: {args.model!r} has no chat template (tokenizer_config.json chat_template or "
                 f"chat_template.jinja); give --no_chat_template to score plain prompts")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    batch_size = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
    try:
        res = run(args.model, tasks, batch_size, args.device, args.dtype, args.limit, not args.no_chat_template)
    except (KeyError, ValueError) as e:  # an unknown task name, a device torch does not see
        sys.exit(f"harness.py: {e}")
    samples = res.pop("samples")
    if args.log_samples:
        res["samples"] = samples
    out = args.out or f"harness-{res['name']}.json"
    with open(out, "w") as f:
        json.dump(res, f, indent=1, default=str)  # default=str: lm-eval's configs hold functions
    for task, metrics in res["results"].items():
        print(task, {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float) and "stderr" not in k})
    if res["paper"]:
        print("paper columns:", {k: round(100 * v, 2) for k, v in res["paper"].items()})
    print(f"wrote {out}; the table: python harness.py table {out}")
    return res


if __name__ == "__main__":
    main()
