"""
Does IFT beat SFT and the preference methods on generation? Fine-tune the same model with each method on the
same prompts, steps, seeds, learning rate and data order per seed, and score every run on held-out generation
(exact match of the final answer) and held-out loss, at several points along training.

    python compare.py --methods sft ift                # SmolLM2-135M on the bundled chain task, CPU
    python compare.py --methods sft ift dpo orpo simpo tdpo --seeds 1 2 --steps 60 --eval_at 30 60

SFT and IFT learn the chosen answer (the row's "messages"); DPO, ORPO, SimPO and TDPO take it as chosen and the
row's "rejected" answer as rejected (make_data.py writes both). Nothing method-specific is passed: each method
runs with train.py's defaults for its own constants (the paper's betas); flags this script does not know go
to train.py for every method alike (e.g. --lr, --batch_size, --lam). Each run trains with train.py in stages
(--stop_at k, then --resume: tests show this gives exactly the uninterrupted run) and eval.py scores the
checkpoint after each stage. results.json keeps every finished stage, so a stopped comparison continues where
it was, and it records the settings: a rerun with other settings stops rather than mixing runs. Writes
runs/compare/results.json and assets/compare.png, and prints the table.
"""
import json
import os
import signal
import statistics
import subprocess
import sys
import time

import torch

import errors
import eval as evaluation
from convert_gguf import ensure_default

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ("sft", "ift", "dpo", "orpo", "simpo", "tdpo")
COLORS = dict(sft="tab:blue", ift="tab:red", dpo="tab:green", orpo="tab:orange", simpo="tab:purple",
              tdpo="tab:brown")
LABELS = dict(sft="SFT", ift="IFT", dpo="DPO", orpo="ORPO", simpo="SimPO", tdpo="TDPO")


def checkpoint_step(out_dir: str) -> int:
    """The step of the latest checkpoint in a run's out_dir (train.py's own choice of the two), 0 for none."""
    for name in ("checkpoint", "checkpoint.old"):
        path = os.path.join(out_dir, name, "train_config.json")
        if os.path.exists(path) and os.path.exists(os.path.join(out_dir, name, "resume.pt")):
            with open(path) as f:
                return json.load(f)["step"]
    return 0


def run_stage(method, seed, steps, stop, out_dir, extra) -> float:
    """Train (or continue) one run up to step stop; seconds taken. A run already there (it was stopped while
    being scored) is not trained again: train.py would go on past the stop."""
    at = checkpoint_step(out_dir)
    if at == stop:
        return 0.0
    if at > stop:
        raise errors.UserError(f"{out_dir} holds a checkpoint at step {at}, past the stage {stop} not yet scored; "
                               "remove the directory to run it again")
    cmd = [sys.executable, os.path.join(HERE, "train.py"), "--method", method, "--seed", str(seed),
           "--max_steps", str(steps), "--stop_at", str(stop), "--out_dir", out_dir, "--eval_every", "0",
           "--sample_every", "0", *extra, *(["--resume"] if at else [])]
    t0 = time.time()
    if run_child(cmd, f"train.py --method {method} --seed {seed}", os.path.dirname(out_dir)) != 0:
        raise errors.UserError(f"train.py --method {method} --seed {seed} failed before step {stop} (its message "
                               f"is above); finished runs are kept in {os.path.dirname(out_dir)}/results.json")
    return time.time() - t0


def run_child(cmd: list, what: str, out_dir: str, grace_s: float = 2.0) -> int:
    """Run cmd to its end; its exit code. On Ctrl-C or SIGTERM here, the child stops the way it stops for one
    (train.py finishes a checkpoint it is writing and says where it stopped), never killed: a Ctrl-C at the
    terminal reaches it directly; a signal sent to this process only is passed on after grace_s. Then this
    process stops with one line (errors.run: exit 130)."""
    proc = subprocess.Popen(cmd)
    try:
        return proc.wait()
    except (KeyboardInterrupt, errors.Interrupted) as e:
        sig = signal.SIGINT if isinstance(e, KeyboardInterrupt) else signal.SIGTERM
        deadline, sent = time.monotonic() + grace_s, False
        while proc.poll() is None:
            try:
                if not sent and time.monotonic() > deadline:
                    proc.send_signal(sig)
                    sent = True
                proc.wait(timeout=0.1)
            except subprocess.TimeoutExpired:
                pass
            except (KeyboardInterrupt, errors.Interrupted):  # pressed again: the child has it, let it finish
                pass
        stop = KeyboardInterrupt if sig == signal.SIGINT else errors.Interrupted
        raise stop(f"interrupted during {what} (it stopped with exit code {proc.returncode}); finished stages are "
                   f"kept in {out_dir}/results.json: run the same command again to continue") from None


def score(path, rows, args):
    t0 = time.time()
    model, tok = evaluation.load_checkpoint(path, args.device)
    res = evaluation.evaluate(model, tok, rows, args.max_new_tokens, args.eval_batch_size, progress=True)
    return {"exact_match": res["exact_match"], "loss": res["loss"], "by_group": res["by_group"],
            "eval_seconds": time.time() - t0}


def mean_std(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def parse_args(argv=None):
    """(this script's arguments, the rest: passed on to train.py, e.g. --lam, --gamma, --lr)."""
    ap = errors.ArgumentParser(description=__doc__, formatter_class=errors.HelpFormatter)
    ap.add_argument("--init", default=os.path.join(HERE, "checkpoints", "SmolLM2-135M-Instruct"),
                    help="the model every method starts from (a checkpoint directory)")
    ap.add_argument("--data", default=os.path.join(HERE, "data", "chain_test.jsonl"), help="held-out rows")
    ap.add_argument("--train_data", default=os.path.join(HERE, "data", "chain_train.jsonl"),
                    help="training rows, train.py's --data (pair methods need a 'rejected' answer per row)")
    ap.add_argument("--methods", nargs="+", default=["sft", "ift"], choices=METHODS, metavar="METHOD",
                    help=f"any of {' '.join(METHODS)}")
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2], help="one run per method and seed (>= 0)")
    ap.add_argument("--steps", type=int, default=100, help="optimizer steps of every run (>= 1)")
    ap.add_argument("--eval_at", nargs="+", type=int, default=[50, 100],
                    help="steps to score, each in [1, --steps] (the last = --steps)")
    ap.add_argument("--limit", type=int, default=100, help="held-out rows scored (0: all)")
    ap.add_argument("--max_new_tokens", type=int, default=64,
                    help="greedy tokens per held-out prompt when scoring (>= 0; within the model's context)")
    ap.add_argument("--eval_batch_size", type=int, default=16, help="prompts per generation batch when scoring "
                    "(>= 1; --batch_size goes to train.py)")
    ap.add_argument("--out_dir", default=os.path.join(HERE, "runs", "compare"),
                    help="runs and results.json (kept: a rerun continues it)")
    ap.add_argument("--device", default="auto", help="for training and scoring: auto (cuda when there is one), "
                    "cuda or cpu")
    ap.add_argument("--plot", default=os.path.join(HERE, "assets", "compare.png"), help="the plot written at the end")
    args, train_args = ap.parse_known_args(argv)
    if args.steps < 1:
        ap.error(f"--steps {args.steps}: must be >= 1")
    if any(not 1 <= s <= args.steps for s in args.eval_at):
        ap.error(f"--eval_at {' '.join(map(str, args.eval_at))}: every step must be in [1, --steps]")
    if sorted(args.eval_at)[-1] != args.steps:
        ap.error("the last --eval_at step must equal --steps")
    if len(set(args.methods)) < len(args.methods) or len(set(args.seeds)) < len(args.seeds):
        ap.error("--methods and --seeds must not repeat")
    if any(s < 0 for s in args.seeds):
        ap.error(f"--seeds {' '.join(map(str, args.seeds))}: must be >= 0")
    if args.limit < 0:
        ap.error(f"--limit {args.limit}: must be >= 0 (0: all rows)")
    if args.max_new_tokens < 0:
        ap.error(f"--max_new_tokens {args.max_new_tokens}: must be >= 0")
    if args.eval_batch_size < 1:
        ap.error(f"--eval_batch_size {args.eval_batch_size}: must be >= 1")
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        ap.error(f"--out_dir {args.out_dir}: is a file, not a directory")
    if os.path.isdir(args.plot):
        ap.error(f"--plot {args.plot}: is a directory; give a file name")
    return args, train_args


def settings(args, train_args) -> dict:
    """What every run in one results.json must share; methods and seeds may be added to a finished comparison."""
    return dict(init=os.path.abspath(args.init), data=os.path.abspath(args.data),
                train_data=os.path.abspath(args.train_data), steps=args.steps, eval_at=sorted(args.eval_at),
                limit=args.limit, max_new_tokens=args.max_new_tokens, train_args=train_args)


def load_results(path: str, want: dict) -> dict:
    """Finished runs from an earlier call with the same settings; only the settings when there is none."""
    if not os.path.exists(path):
        return {"settings": want}
    with open(path) as f:
        results = json.load(f)
    have = results.get("settings")
    diff = [k for k in want if (have or {}).get(k) != want[k]]
    if diff:
        raise errors.UserError(f"{path} holds runs made with other settings ({', '.join(diff)}"
                               f"{'' if have else '; no settings recorded'}); pass another --out_dir or remove it")
    return results


def save_results(path: str, results: dict):
    tmp = path + ".tmp"  # written whole, then renamed: a crash never leaves a half-written file
    with open(tmp, "w") as f:
        json.dump(results, f, indent=2)
    os.replace(tmp, path)


def main(argv=None):
    args, train_args = parse_args(argv)
    rows = evaluation.load_rows(args.data)[: args.limit or None]
    # the base model, and every held-out row against its context, before any training
    init = ensure_default(args.init)
    evaluation.check_checkpoint(init)
    evaluation.pick_device(args.device)
    evaluation.check_context(init, [("held-out", rows, args.data)], args.max_new_tokens)
    os.makedirs(args.out_dir, exist_ok=True)
    results_path = os.path.join(args.out_dir, "results.json")
    results = load_results(results_path, settings(args, train_args))  # finished runs are kept
    torch.set_num_threads(os.cpu_count() or 1)
    if "base" not in results:
        results["base"] = score(args.init, rows, args)
        save_results(results_path, results)
    n_runs = len(args.seeds) * len(args.methods)
    for r, (seed, method) in enumerate((s, m) for s in args.seeds for m in args.methods):
        key = f"{method}-seed{seed}"
        if results.get(key, {}).get("done"):
            continue
        out = os.path.join(args.out_dir, key)
        run = results.setdefault(key, {"curve": [], "train_seconds": 0.0})
        for stop in sorted(args.eval_at):
            if any(p["step"] == stop for p in run["curve"]):
                continue
            print(f"[run {r + 1}/{n_runs}] {key}: training to step {stop} of {args.steps}, then scoring", flush=True)
            run["train_seconds"] += run_stage(method, seed, args.steps, stop, out,
                                              ["--init", args.init, "--data", args.train_data,
                                               "--device", args.device, *train_args])
            run["curve"].append(dict(step=stop, **score(os.path.join(out, "checkpoint"), rows, args)))
            run["curve"].sort(key=lambda p: p["step"])
            save_results(results_path, results)
        run["done"] = True
        save_results(results_path, results)
    report(results, args)


def report(results, args):
    """One row for the base model, then one per method and scored step: mean ± std over seeds of exact match and
    held-out loss, exact match per seed, and on the last step the mean train minutes of a run."""
    base = results["base"]
    print(f"\nheld-out: {args.data} ({args.limit or 'all'} rows), {args.steps} steps, seeds {args.seeds}")
    print(f"{'model':<8}{'step':>6}{'exact match %':>16}{'held-out loss':>20}{'train min':>11}   exact match per seed")
    print(f"{'base':<8}{0:>6}{base['exact_match']:>16.1f}{base['loss']:>20.4f}")
    for method in args.methods:
        runs = [results[f"{method}-seed{s}"] for s in args.seeds]
        for step in sorted(args.eval_at):
            points = [next(p for p in run["curve"] if p["step"] == step) for run in runs]
            em, em_sd = mean_std([p["exact_match"] for p in points])
            lo, lo_sd = mean_std([p["loss"] for p in points])
            mins = f"{statistics.mean(run['train_seconds'] for run in runs) / 60:.1f}" if step == args.steps else ""
            per_seed = ", ".join(f"{p['exact_match']:.1f}" for p in points)
            print(f"{LABELS[method]:<8}{step:>6}{f'{em:.1f} ± {em_sd:.1f}':>16}{f'{lo:.4f} ± {lo_sd:.4f}':>20}"
                  f"{mins:>11}   {per_seed}")
    plot(results, args)


def plot(results, args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    steps = [0] + sorted(args.eval_at)
    for method in args.methods:
        color = COLORS[method]
        for ax, metric in zip(axes, ["loss", "exact_match"]):
            per_seed = [[results["base"][metric]] + [next(p[metric] for p in results[f"{method}-seed{s}"]["curve"]
                                                          if p["step"] == step) for step in steps[1:]]
                        for s in args.seeds]
            mean = [statistics.mean(v) for v in zip(*per_seed)]
            sd = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in zip(*per_seed)]
            ax.plot(steps, mean, "o-", color=color, label=LABELS[method])
            ax.fill_between(steps, [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)],
                            color=color, alpha=0.2)
    axes[0].set(xlabel="optimizer step", ylabel="held-out answer loss (NLL / token)", title="held-out loss")
    axes[1].set(xlabel="optimizer step", ylabel="exact match (%)", title="greedy generation, exact match")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{' vs '.join(LABELS[m] for m in args.methods)}, {os.path.basename(args.init)}, "
                 f"seeds {args.seeds} (mean ± std)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(args.plot), exist_ok=True)
    fig.savefig(args.plot, dpi=130)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    errors.run(main)
