"""
The paper's benchmarks (Table 2) for any checkpoint this repo writes, through lm-evaluation-harness.

  python harness.py --model out --out ift.json                  # the six columns, data from the hub
  python harness.py --model out --data_dir hfdata --out ift.json   # the same on local copies of the data sets
  python harness.py table base.json sft.json ift.json           # the paper's table, markdown
  python harness.py --model out --tasks chain_gen,chain_mc      # the bundled offline tasks (tasks/), no internet

--tasks paper (the default) runs the Open LLM Leaderboard settings the paper reports, under the model's chat
template (few-shot examples as earlier user/assistant turns), and each column takes one number from lm-eval:

  column      lm-eval task     shots  metric (lm-eval's key)
  ARC         arc_challenge    25     acc_norm
  MMLU        mmlu             5      acc: the 57 subjects' mean weighted by subject size
  TruthfulQA  truthfulqa_mc2   0      mc2 (lm-eval names it acc)
  WinoGrande  winogrande       5      acc
  GSM8K       gsm8k            5      exact_match under the strict-match filter (the number after "#### ")
  ARC-Gen     arc_gen (ours)   0      exact_match of the option letter read from a greedy answer (tasks/arc_gen.py)

The Average is the five leaderboard columns' mean; ARC-Gen stays out of it, as in the paper.

Data: lm-eval's task configs read their data sets from the Hugging Face hub. Before the model loads, every
task's data is loaded; a task whose data cannot be loaded (no internet, say) stops the run with one line. With
--data_dir DIR the same task configs read local copies instead, one folder per data set id and config name,
the files in the data set's own format (the hub's parquet files as they are):

  DIR/<data set id>/<config name>/<split>-*.parquet
  e.g. DIR/allenai/ai2_arc/ARC-Challenge/test-00000-of-00001.parquet

  column        data set id            config name                     splits read
  ARC, ARC-Gen  allenai/ai2_arc        ARC-Challenge                   train, validation, test (ARC-Gen: test)
  MMLU          cais/mmlu              each subject (abstract_algebra, anatomy, ..., world_religions: 57)  dev, test
  TruthfulQA    truthfulqa/truthful_qa multiple_choice                 validation
  WinoGrande    allenai/winogrande     winogrande_xl                   train, validation
  GSM8K         openai/gsm8k           main                            train, test

A split's files are <split>-*.<ext> (as the hub names its shards: test-00000-of-00001.parquet), <split>.<ext> or
<split>/*.<ext>, with <ext> parquet, jsonl, json or csv, one format per config. A data set without config names
keeps its files in DIR/<id>/ or DIR/<id>/data/. With --data_dir every task reads its data from DIR, never from
the hub (nothing falls back to it).

lm-eval is an optional dependency (pip install lm-eval; tested with 0.4.13): it is imported inside functions
only, and nothing on the training path imports this file. A separate script, not an eval.py flag: eval.py is our
own decoding and scoring, this file drives someone else's; each stays readable alone.
"""
import argparse
import glob
import json
import os
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: idle threads sleep, not spin (docs/performance.md)
import re
import sys
from dataclasses import dataclass

import errors

HERE = os.path.dirname(os.path.abspath(__file__))
TASKS_DIR = os.path.join(HERE, "tasks")  # our tasks: the bundled offline ones (chain_*) and arc_gen


@dataclass(frozen=True)
class Column:
    name: str    # the paper's column
    task: str    # lm-eval's task or group
    shots: int   # few-shot examples
    metric: str  # lm-eval's result key, "metric,filter"
    average: bool = True  # one of the Average's columns


PAPER = [
    Column("ARC", "arc_challenge", 25, "acc_norm,none"),
    Column("MMLU", "mmlu", 5, "acc,none"),
    Column("TruthfulQA", "truthfulqa_mc2", 0, "acc,none"),  # process_results_mc2 returns mc2 under "acc"
    Column("WinoGrande", "winogrande", 5, "acc,none"),
    Column("GSM8K", "gsm8k", 5, "exact_match,strict-match"),
    Column("ARC-Gen", "arc_gen", 0, "exact_match,none", average=False),  # ours: tasks/arc_gen.yaml
]
PAPER_SHOTS = {c.task: c.shots for c in PAPER}
# the paper's own Table 2 numbers, in percent, by the base model its rows start from: only those this repository
# states (the base model's Open LLM Leaderboard average)
PAPER_ROWS = {"Mistral-7B-v0.1": {"Average": 54.79}}
# where each paper task's YAML lives under lm_eval/tasks/: indexing only these folders takes a second, all of
# lm-eval's ~15k task files take 10-20 s
LM_EVAL_DIRS = {"arc_challenge": "arc", "mmlu": "mmlu/default", "truthfulqa_mc2": "truthfulqa",
                "winogrande": "winogrande", "gsm8k": "gsm8k"}
DATA_FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}  # datasets' builder by file
INSTALL = "harness.py needs lm-evaluation-harness: pip install lm-eval"


# -----------------------------------------------------------------------------
# our tasks (tasks/): the bundled chain task's rows, a few of data/chain_test.jsonl, offline; arc_gen

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
    """Our task tasks/NAME.yaml as lm-eval's config dict, a bundled data file made absolute: datasets reads a
    relative data_files path from the working directory, not from the YAML's folder."""
    from lm_eval.tasks._yaml_loader import load_yaml  # lm-eval's reader: it resolves !function beside the YAML
    cfg = load_yaml(os.path.join(TASKS_DIR, name + ".yaml"))
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if files:
        cfg["dataset_kwargs"]["data_files"] = {split: os.path.join(TASKS_DIR, p) for split, p in files.items()}
    return cfg


def local_task_names() -> list:
    return sorted(f[:-5] for f in os.listdir(TASKS_DIR) if f.endswith(".yaml"))


# -----------------------------------------------------------------------------
# opening each task's data, from the hub or from --data_dir, before the model loads

def task_splits(cfg: dict) -> list:
    """The splits a task config names, in order, each once."""
    keys = ("training_split", "validation_split", "test_split", "fewshot_split")
    return list(dict.fromkeys(cfg[k] for k in keys if cfg.get(k)))


def local_copy(task: str, data_dir: str, path: str, name: str | None, splits: list) -> dict:
    """The task config fields that read hub data set `path` (config `name`) from its copy under data_dir (the
    layout of the module docstring): dataset_path the datasets builder of the files' format, no dataset_name,
    data_files per split. A missing folder or split is the user's to fix: one line."""
    root = os.path.join(os.path.abspath(data_dir), *path.split("/"))
    folders = [os.path.join(root, name)] if name else [root, os.path.join(root, "data")]
    what = f"{task}: the local copy of {path}" + (f" ({name})" if name else "")
    if not os.path.isdir(folders[0]):
        raise errors.UserError(f"{what}: {folders[0]} does not exist (--data_dir {data_dir}: the layout is "
                               f"DIR/<data set id>/<config name>/<split>-*.parquet, see python harness.py --help)")
    files = {}
    for split in splits:
        found = sorted(f for folder in folders for pattern in (f"{split}.*", f"{split}-*", f"{split}/*")
                       for f in glob.glob(os.path.join(glob.escape(folder), pattern))
                       if os.path.isfile(f) and os.path.splitext(f)[1] in DATA_FORMATS)
        if not found:
            raise errors.UserError(f"{what}: no {split!r} split in {folders[0]} ({split}-*.parquet as the hub "
                                   f"names it, or {split}.jsonl, {split}.json, {split}.csv)")
        files[split] = found
    formats = sorted({DATA_FORMATS[os.path.splitext(f)[1]] for fs in files.values() for f in fs})
    if len(formats) > 1:
        raise errors.UserError(f"{what}: files of more than one format ({', '.join(formats)}) in {folders[0]}")
    return dict(dataset_path=formats[0], dataset_name=None, dataset_kwargs={"data_files": files})


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300]}" if text else type(e).__name__


def open_data(cfg: dict, data_dir: str | None) -> dict:
    """Loads a task's data set as lm-eval will (datasets.load_dataset: lm-eval's own load then reads datasets'
    cache), or stops with one line naming the task, the data set and what to do. Returns the config fields that
    point the task at data_dir's copy (nothing without data_dir, or for a task whose data is not a hub data set:
    ours read bundled files)."""
    import datasets
    task, path, name = cfg.get("task"), cfg.get("dataset_path"), cfg.get("dataset_name")
    if path is None or cfg.get("custom_dataset") is not None:
        return {}
    local = {}
    if data_dir and "/" in path and not os.path.exists(path):  # a hub id, not a local folder
        local = local_copy(task, data_dir, path, name, task_splits(cfg))
    kwargs = dict((local or cfg).get("dataset_kwargs") or {})
    kwargs.pop("trust_remote_code", None)  # as lm-eval does: datasets 4 has no dataset scripts
    try:
        datasets.load_dataset(local.get("dataset_path", path), local.get("dataset_name", name), **kwargs)
    except Exception as e:  # any way of failing to load it: the hub unreachable, a missing repo, a bad file
        source = f"data set {path}" + (f" ({name})" if name else "")
        if local:
            raise errors.UserError(f"{task}: cannot open the local copy of {source} under {data_dir} "
                                   f"({first_line(e)})") from None
        raise errors.UserError(f"{task}: cannot open {source} from the Hugging Face hub ({first_line(e)}); go "
                               f"online, or run on local copies with --data_dir DIR (python harness.py --help "
                               f"shows the layout)") from None
    return local


def task_manager(builtin: list, data_dir: str | None):
    """lm-eval's TaskManager over the folders of the lm-eval tasks asked for (all of lm-eval's when one is not
    a paper task), whose every task opens its data first (open_data) and reads data_dir's copy when given.

    The hook is lm-eval 0.4.13's TaskManager._factory, whose _build_task reads each task's config through
    _load_full_config (groups such as MMLU build their subtasks the same way): private, so tests/test_harness.py
    runs it against the installed lm-eval."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._factory import TaskFactory

    class Opening(TaskFactory):
        def _load_full_config(self, entry, overrides=None):  # a task's (or group's) config, before it is built
            cfg = super()._load_full_config(entry, overrides)
            return cfg | open_data(cfg, data_dir) if "task" in cfg and "group" not in cfg else cfg

    root = os.path.join(os.path.dirname(lm_eval.__file__), "tasks")
    if all(t in LM_EVAL_DIRS for t in builtin):
        paths = [os.path.join(root, LM_EVAL_DIRS[t]) for t in builtin]
        manager = TaskManager(include_path=paths or None, include_defaults=False)
    else:
        manager = TaskManager()
    manager._factory = Opening(meta=manager.metadata)
    return manager


def task_list(names: list) -> list:
    """Task names ("paper" = the six columns) -> [(name, spec for lm-eval, few-shot count)], each name once:
    ours are config dicts, lm-eval's names; tasks outside the paper's keep their own YAML's count (None)."""
    jobs = {}
    for name in names:
        for task in [c.task for c in PAPER] if name == "paper" else [name]:
            spec = local_task(task) if task in local_task_names() else task
            jobs.setdefault(task, (task, spec, PAPER_SHOTS.get(task)))
    return list(jobs.values())


def open_tasks(jobs: list, data_dir: str | None = None) -> tuple:
    """(manager, [(name, lm-eval Task or Group, shots)]): every task built, so every data set opened."""
    builtin = [spec for _, spec, _ in jobs if isinstance(spec, str)]
    manager = task_manager(builtin, data_dir)
    for name in builtin:
        if name not in manager.all_tasks:
            raise errors.UserError(f"--tasks: {name!r} is neither an lm-eval task nor one of ours ({TASKS_DIR})")
    built = []
    for name, spec, shots in jobs:
        try:
            loaded = manager.load([spec])
        except errors.UserError as e:  # a group's subtask names itself: say which group
            raise errors.UserError(str(e) if str(e).startswith(f"{name}:") else f"{name}'s subtask {e}") from None
        built.append((name, loaded["groups"].get(name) or loaded["tasks"][name], shots))
    return manager, built


# -----------------------------------------------------------------------------
# running lm-eval

def say(line: str):
    print(line, file=sys.stderr, flush=True)  # beside lm-eval's progress bars (stderr)


def has_chat_template(path: str) -> bool:
    if os.path.isfile(os.path.join(path, "chat_template.jinja")):
        return True
    conf = os.path.join(path, "tokenizer_config.json")
    if not os.path.isfile(conf):
        return False
    with open(conf) as f:
        return bool(json.load(f).get("chat_template"))


def base_model(path: str) -> str:
    """What a checkpoint starts from: train.py's --init (its train_config.json) when it has one, else itself."""
    conf = os.path.join(path, "train_config.json")
    if os.path.isfile(conf):
        with open(conf) as f:
            init = json.load(f).get("init")
        if init:
            return str(init)
    return os.path.abspath(path)


def adapter_args(adapter_dir: str) -> dict:
    """lm-eval's "hf" model arguments for a LoRA adapter folder: its base as `pretrained`, the folder as `peft` and
    as `tokenizer` (train.py copies the tokenizer it trained with beside the adapters). Needs peft installed."""
    import hf_checkpoint
    import lora
    try:
        import peft  # noqa: F401
    except ImportError:
        raise errors.UserError(f"{adapter_dir} holds LoRA adapters, which lm-eval loads with peft (pip install peft); "
                               f"or merge them first: python lora.py merge {adapter_dir} MERGED_DIR") from None
    _, base = lora.read_adapter_config(adapter_dir)
    if not base:
        raise errors.UserError(f"{os.path.join(adapter_dir, lora.CONFIG)}: no base_model_name_or_path, so its base "
                               "model is unknown")
    return dict(pretrained=os.path.abspath(hf_checkpoint.resolve_checkpoint(base)), peft=os.path.abspath(adapter_dir),
                tokenizer=os.path.abspath(adapter_dir))


def paper_base(base: str | None) -> str | None:
    """The PAPER_ROWS key that names base (a hub id, a folder, or a hub cache folder models--org--name), if any."""
    parts = {p.lower() for part in re.split(r"[/\\]", base or "") for p in part.split("--")}
    return next((key for key in PAPER_ROWS if key.lower() in parts), None)


def run(model: str, tasks: list, batch_size: int = 8, device: str = "auto", dtype: str = "auto",
        limit: int | None = None, chat_template: bool = True, data_dir: str | None = None) -> dict:
    """Score the HF checkpoint directory `model` on `tasks` with lm-eval's "hf" model (transformers), the chat
    template applied, one lm-eval call per task (its progress named first). Every task's data is opened before
    the model loads (from data_dir's copies when given). Returns lm-eval's results of all calls merged
    ("results", "n-shot", "configs", ..., "samples": per task the prompts and responses), with "paper":
    {column: score} for the columns it has."""
    import datasets
    import lm_eval
    import torch

    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False  # else each "json" load pings S3 to count it: none offline

    import hf_checkpoint
    from model import decoding_dtype, pick_device
    try:
        dev = pick_device(device)
    except ValueError as e:  # a device torch does not see
        raise errors.UserError(str(e)) from None
    if dtype == "auto":
        dtype = str(decoding_dtype(dev)).removeprefix("torch.")  # as eval.py: bf16 on CUDA, float32 on CPU
    manager, built = open_tasks(task_list(tasks), data_dir)  # before the (slow) model load
    # an absolute path: lm-eval asks the hub for the sha of `pretrained` when it looks like a repo id ("out")
    model_args = dict(pretrained=os.path.abspath(model), dtype=dtype)
    if hf_checkpoint.is_adapter(model):  # train.py --lora's out_dir: lm-eval loads its base, then peft the adapters
        model_args = dict(adapter_args(model), dtype=dtype)
    # the "hf" model, loaded once for every call (what simple_evaluate(model="hf", model_args=...) does inside)
    lm = lm_eval.api.registry.get_model("hf").create_from_arg_obj(
        model_args, {"batch_size": batch_size, "device": str(dev)})
    out = dict(model=os.path.abspath(model), name=os.path.basename(os.path.normpath(model)),
               base_model=base_model(model), model_args=model_args, lm_eval_version=lm_eval.__version__,
               torch_version=torch.__version__, device=str(dev), apply_chat_template=chat_template,
               fewshot_as_multiturn=chat_template, limit=limit,
               data_dir=os.path.abspath(data_dir) if data_dir else None, tasks=[name for name, _, _ in built])
    column = {c.task: c.name for c in PAPER}
    for i, (name, task, shots) in enumerate(built, 1):
        label = f" ({column[name]})" if name in column else ""
        say(f"harness.py [{i}/{len(built)}] {name}{label}, {'its own' if shots is None else shots} shots")
        res = lm_eval.simple_evaluate(model=lm, tasks=[task], num_fewshot=shots, limit=limit,
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


def read_result(path: str) -> dict:
    try:
        with open(path) as f:
            result = json.load(f)
    except OSError as e:
        raise errors.UserError(f"{path}: cannot read it ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise errors.UserError(f"{path}: not a JSON result file ({e})") from None
    if not isinstance(result, dict) or "results" not in result:
        raise errors.UserError(f"{path}: no 'results' (not an lm-eval result file)")
    return result


def table(files: list) -> str:
    """Markdown: one row per result file (see table_of)."""
    return table_of([(os.path.splitext(os.path.basename(p))[0], read_result(p)) for p in files])


def table_of(results: list) -> str:
    """Markdown from [(fallback name, result)]: one row per result, the paper's columns in percent, the Average
    of the five leaderboard columns (only when all five are there) before ARC-Gen, then the paper's own row for
    each base model the results start from where the paper gives one. A cell whose few-shot count is not the
    paper's, or a result run with --limit, is marked."""
    averaged = [c for c in PAPER if c.average]
    order = averaged + [c for c in PAPER if not c.average]
    head = [c.name for c in averaged] + ["Average"] + [c.name for c in order[len(averaged):]]
    lines = ["| model | " + " | ".join(head) + " |", "|" + "---|" * (len(head) + 1)]
    notes, bases = set(), []
    for fallback, result in results:
        name = result.get("name") or fallback
        if result.get("limit"):
            name += f" (limit {result['limit']})"
            notes.add("(limit N): run with --limit N, only the first N rows of each task; not comparable")
        cells = {}
        scores = dict(zip([c.name for c in PAPER], paper_scores(result)))
        for c in PAPER:
            v, shots = scores[c.name], result.get("n-shot", {}).get(c.task)
            cells[c.name] = "-" if v is None else f"{100 * v:.2f}"
            if v is not None and shots is not None and int(shots) != c.shots:
                cells[c.name] += f" ({shots}-shot)"
                notes.add("(k-shot): not the paper's few-shot count")
        avg = [scores[c.name] for c in averaged]
        cells["Average"] = f"{100 * sum(avg) / len(avg):.2f}" if None not in avg else "-"
        lines.append(f"| {name} | " + " | ".join(cells[h] for h in head) + " |")
        base = paper_base(result.get("base_model"))
        if base and base not in bases:
            bases.append(base)
    for base in bases:
        row = PAPER_ROWS[base]
        lines.append(f"| paper: {base} base (Table 2) | " + " | ".join(
            f"{row[h]:.2f}" if h in row else "-" for h in head) + " |")
    lines.append("")
    metrics = "; ".join(f"{c.name} {c.task} {c.shots}-shot {c.metric.replace(',', ' ')}" for c in PAPER)
    lines.append(f"Metrics (lm-eval): {metrics}. Average: the first five; ARC-Gen is ours (tasks/arc_gen.py), "
                 f"outside it as in the paper.")
    if bases:
        notes.add("paper: the paper's own numbers for the model these runs start from; this repository holds "
                  "only its average")
    lines += sorted(notes)
    return "\n".join(lines)


def summary(res: dict) -> str:
    """The run's numbers, plain: each task's metrics (the JSON holds every subtask), then its table row."""
    lines = []
    for task in res.get("tasks") or list(res["results"]):
        metrics = res["results"].get(task) or {}
        shown = [f"{k.removesuffix(',none').replace(',', ' ')} {float(v):.4f}" for k, v in metrics.items()
                 if isinstance(v, float) and "stderr" not in k]  # np.float64 too; not sample_len (an int)
        lines.append(f"{task}: " + ", ".join(shown))
    return "\n".join(lines + ["", table_of([(res.get("name", "model"), res)])])


# -----------------------------------------------------------------------------

def table_main(argv: list):
    p = argparse.ArgumentParser(prog="harness.py table", description="The paper's table (markdown) from result "
                                "files: one row per file, the paper's own row beside it where it has one.")
    p.add_argument("files", nargs="+", help="result JSON files of harness.py (or of lm_eval --output_path)")
    print(table(p.parse_args(argv).files))


def positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return n


def batch_size_arg(text: str):
    return text if text == "auto" else positive_int(text)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="harness.py", description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", required=True,
                   help="an HF checkpoint directory (train.py's out_dir, a converted base model); required")
    p.add_argument("--tasks", default="paper",
                   help="comma-separated: paper (the six columns), lm-eval task or group names, or ours: "
                        + ", ".join(local_task_names()) + "; default: %(default)s")
    p.add_argument("--data_dir", default=None, metavar="DIR",
                   help="read every data set from local copies under DIR (layout below) instead of the hub; "
                        "default: the hub")
    p.add_argument("--out", default="", metavar="PATH",
                   help="the result JSON to write; default: harness-<model dir name>.json here")
    p.add_argument("--batch_size", default=8, type=batch_size_arg,
                   help="a positive int, or auto (lm-eval finds the largest that fits); default: %(default)s")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                   help="auto (cuda when torch sees one, else cpu), cuda or cpu; default: %(default)s")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="the weights' dtype: auto (bfloat16 on cuda, float32 on cpu), bfloat16, float16 or "
                        "float32; default: %(default)s")
    p.add_argument("--limit", type=positive_int, default=None, metavar="N",
                   help="a positive int: only the first N rows of each task (of each MMLU subject), for quick "
                        "checks; default: all rows")
    p.add_argument("--no_chat_template", action="store_true",
                   help="plain prompts, few-shot examples as one text (the paper used the chat template); "
                        "default: off")
    p.add_argument("--log_samples", action="store_true",
                   help="keep every prompt and response in the JSON; default: off")
    return p


def main(argv: list | None = None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["table"]:
        return table_main(argv[1:])
    args = parser().parse_args(argv)

    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise errors.UserError(INSTALL) from None
    from eval import check_checkpoint
    try:
        check_checkpoint(args.model)
    except FileNotFoundError as e:
        raise errors.UserError(str(e)) from None
    if not args.no_chat_template and not has_chat_template(args.model):
        raise errors.UserError(f"{args.model!r} has no chat template (tokenizer_config.json chat_template or "
                               f"chat_template.jinja); give --no_chat_template to score plain prompts")
    if args.data_dir and not os.path.isdir(args.data_dir):
        raise errors.UserError(f"--data_dir {args.data_dir}: no such directory")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    res = run(args.model, tasks, args.batch_size, args.device, args.dtype, args.limit, not args.no_chat_template,
              args.data_dir)
    samples = res.pop("samples")
    if args.log_samples:
        res["samples"] = samples
    out = args.out or f"harness-{res['name']}.json"
    with open(out, "w") as f:
        json.dump(res, f, indent=1, default=str)  # default=str: lm-eval's configs hold functions
    print(summary(res))
    print(f"wrote {out}; the table of several runs: python harness.py table {out} ...")
    res["samples"] = samples
    return res


if __name__ == "__main__":
    errors.run(main)
