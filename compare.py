"""
Does IFT beat SFT on generation? Fine-tune the same model with both methods on the same data, same steps,
same seeds, and score every run on held-out generation (exact match of the final answer) and held-out loss,
at several points along training.

    python compare.py                                  # SmolLM2-135M on the bundled chain task, CPU
    python compare.py --seeds 1 2 3 --steps 120 --eval_at 40 80 120 --limit 200

Each run trains with train.py in stages (--stop_at k, then --resume: tests show this gives exactly the
uninterrupted run) and eval.py scores the checkpoint after each stage. Writes runs/compare/results.json and
assets/compare.png, and prints the table.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

import eval as evaluation

HERE = os.path.dirname(os.path.abspath(__file__))


def run_stage(method, seed, steps, stop, out_dir, extra):
    cmd = [sys.executable, os.path.join(HERE, "train.py"), "--method", method, "--seed", str(seed),
           "--max_steps", str(steps), "--stop_at", str(stop), "--out_dir", out_dir, "--eval_every", "0",
           "--sample_every", "0", *extra]
    if os.path.exists(os.path.join(out_dir, "checkpoint")):
        cmd.append("--resume")
    t0 = time.time()
    subprocess.run(cmd, check=True)
    return time.time() - t0


def score(path, rows, args):
    model, tok = evaluation.load_checkpoint(path, args.device)
    res = evaluation.evaluate(model, tok, rows, args.max_new_tokens, args.batch_size, progress=True)
    return {"exact_match": res["exact_match"], "loss": res["loss"], "by_group": res["by_group"]}


def mean_std(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def parse_args(argv=None):
    """(this script's arguments, the rest: passed on to train.py, e.g. --lam, --gamma, --lr)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--init", default=os.path.join(HERE, "checkpoints", "SmolLM2-135M-Instruct"))
    ap.add_argument("--data", default=os.path.join(HERE, "data", "chain_test.jsonl"), help="held-out rows")
    ap.add_argument("--methods", nargs="+", default=["sft", "ift"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--eval_at", nargs="+", type=int, default=[50, 100], help="steps to score (last = --steps)")
    ap.add_argument("--limit", type=int, default=100, help="held-out rows scored (0: all)")
    ap.add_argument("--max_new_tokens", type=int, default=64)
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--out_dir", default=os.path.join(HERE, "runs", "compare"))
    ap.add_argument("--device", default="auto", help="for training and scoring: auto (cuda when there is one), "
                    "cuda or cpu")
    ap.add_argument("--plot", default=os.path.join(HERE, "assets", "compare.png"))
    args, train_args = ap.parse_known_args(argv)
    if sorted(args.eval_at)[-1] != args.steps:
        ap.error("the last --eval_at step must equal --steps")
    return args, train_args


def main(argv=None):
    args, train_args = parse_args(argv)
    rows = evaluation.load_rows(args.data)[: args.limit or None]
    os.makedirs(args.out_dir, exist_ok=True)
    results_path = os.path.join(args.out_dir, "results.json")
    results = json.load(open(results_path)) if os.path.exists(results_path) else {}  # finished runs are kept
    torch.set_num_threads(os.cpu_count() or 1)
    if "base" not in results:
        results["base"] = score(args.init, rows, args)
    for seed in args.seeds:
        for method in args.methods:
            key = f"{method}-seed{seed}"
            if results.get(key, {}).get("done"):
                continue
            out = os.path.join(args.out_dir, key)
            run = results.setdefault(key, {"curve": [], "train_seconds": 0.0})
            for stop in sorted(args.eval_at):
                if any(p["step"] == stop for p in run["curve"]):
                    continue
                run["train_seconds"] += run_stage(method, seed, args.steps, stop, out,
                                                  ["--init", args.init, "--device", args.device, *train_args])
                run["curve"].append(dict(step=stop, **score(os.path.join(out, "checkpoint"), rows, args)))
                json.dump(results, open(results_path, "w"), indent=2)
            run["done"] = True
            json.dump(results, open(results_path, "w"), indent=2)
    report(results, args)


def report(results, args):
    base = results["base"]
    print(f"\nheld-out: {args.data} ({args.limit or 'all'} rows), {args.steps} steps, seeds {args.seeds}")
    print(f"{'model':<8}{'exact match %':>20}{'held-out loss':>22}{'train min':>12}")
    print(f"{'base':<8}{base['exact_match']:>20.1f}{base['loss']:>22.4f}{'':>12}")
    for method in args.methods:
        finals = [results[f"{method}-seed{s}"]["curve"][-1] for s in args.seeds]
        em, em_sd = mean_std([f["exact_match"] for f in finals])
        lo, lo_sd = mean_std([f["loss"] for f in finals])
        mins = statistics.mean(results[f"{method}-seed{s}"]["train_seconds"] for s in args.seeds) / 60
        print(f"{method.upper():<8}{f'{em:.1f} ± {em_sd:.1f}':>20}{f'{lo:.4f} ± {lo_sd:.4f}':>22}{mins:>12.1f}")
    plot(results, args)


def plot(results, args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method, color in zip(args.methods, ["tab:blue", "tab:red", "tab:green"]):
        for ax, metric in zip(axes, ["loss", "exact_match"]):
            steps = [0] + sorted(args.eval_at)
            per_seed = [[results["base"][metric]] + [p[metric] for p in results[f"{method}-seed{s}"]["curve"]]
                        for s in args.seeds]
            mean = [statistics.mean(v) for v in zip(*per_seed)]
            sd = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in zip(*per_seed)]
            ax.plot(steps, mean, "o-", color=color, label=method.upper())
            ax.fill_between(steps, [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)],
                            color=color, alpha=0.2)
    axes[0].set(xlabel="optimizer step", ylabel="held-out answer loss (NLL / token)", title="held-out loss")
    axes[1].set(xlabel="optimizer step", ylabel="exact match (%)", title="greedy generation, exact match")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"SFT vs IFT, {os.path.basename(args.init)}, seeds {args.seeds} (mean ± std)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(args.plot), exist_ok=True)
    fig.savefig(args.plot, dpi=130)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
