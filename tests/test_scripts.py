"""The experiment scripts the README quotes: frozen_lake.py reproduces its table, compare.py runs end to end."""
import json
import os
import re

import pytest
import torch

import compare
import frozen_lake
from errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_frozen_lake_table() -> dict:
    """{row: (all mean, all std, non-terminal mean, non-terminal std)} from the README's Frozen Lake table."""
    text = open(os.path.join(ROOT, "README.md")).read()
    text = text[text.index("## Frozen Lake"):]
    text = text[:text.index("\n## ")]
    rows = {}
    for name, cells in re.findall(r"^\| (start|IFT|SFT|ORPO|DPO) \|(.*)\|$", text, re.M):
        rows[name] = tuple(float(x) for x in re.findall(r"\d+\.\d+", cells))
    return rows


def test_frozen_lake_reproduces_the_readme_table(tmp_path):
    """float64 (and a target fit that stops before Adam turns chaotic) keeps the digits off the CPU: in float32 they
    followed the vector kernels (one AMD EPYC: ORPO 0.15051 +- 0.00608 with ATEN_CPU_CAPABILITY=default, 0.15114 +-
    0.00323 with avx2); in float64 the default, AVX2 and AVX-512 kernels print one table (raw values within 3e-14)."""
    threads = torch.get_num_threads()  # frozen_lake.main sets one thread for its tiny matmuls
    try:
        dist = frozen_lake.main(["--out", str(tmp_path / "fl.png")])
    finally:
        torch.set_num_threads(threads)
    table = readme_frozen_lake_table()
    assert set(table) == {"start", "IFT", "SFT", "ORPO", "DPO"}
    start = dist["SFT"][:, 0].mean(0)
    assert table["start"] == tuple(round(float(v), 4) for v in start)
    for m in ("IFT", "SFT", "ORPO", "DPO"):
        (a, b), (sa, sb) = dist[m][:, -1].mean(0), dist[m][:, -1].std(0)
        assert table[m] == tuple(round(float(v), 4) for v in (a, sa, b, sb)), m
    assert (tmp_path / "fl.png").stat().st_size > 0


def compare_args(tiny_dir, tmp_path, methods, steps=1, eval_at=(1,)):
    rows = [{"messages": [{"role": "user", "content": f"What is {a} + 1?"},
                          {"role": "assistant", "content": f"{a} + 1 = {a + 1}\n#### {a + 1}"}],
             "answer": str(a + 1), "rejected": f"{a} + 1 = {a + 2}\n#### {a + 2}"} for a in range(6)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ["--init", tiny_dir, "--data", str(data), "--train_data", str(data), "--methods", *methods,
            "--seeds", "1", "--steps", str(steps), "--eval_at", *map(str, eval_at), "--limit", "3",
            "--max_new_tokens", "4", "--out_dir", str(tmp_path / "runs"), "--plot", str(tmp_path / "c.png"),
            "--device", "cpu",
            # the rest goes to train.py, for every method alike
            "--eval_data", str(data), "--batch_size", "2", "--optimizer", "adamw", "--max_length", "64"]


def test_compare_runs_the_methods_and_reports(tiny_dir, tmp_path, capsys, monkeypatch):
    methods = ["sft", "ift", "dpo"]  # SFT, IFT and a pair method with a reference model, through train.py
    compare.main(compare_args(tiny_dir, tmp_path, methods))
    results = json.load(open(tmp_path / "runs" / "results.json"))
    assert set(results) == {"settings", "base", "sft-seed1", "ift-seed1", "dpo-seed1"}
    for m in methods:
        run = results[f"{m}-seed1"]
        assert run["done"] and [p["step"] for p in run["curve"]] == [1] and run["train_seconds"] > 0
        assert 0 <= run["curve"][0]["exact_match"] <= 100 and run["curve"][0]["loss"] > 0
        config = json.load(open(tmp_path / "runs" / f"{m}-seed1" / "checkpoint" / "train_config.json"))
        assert (config["method"], config["seed"], config["step"]) == (m, 1, 1)
        assert config["data"] == str(tmp_path / "rows.jsonl") and config["lr"] == 2e-5  # same for all
        assert config["batch_size"] == 2  # compare.py's own flags stop here; the rest reach train.py
    printed = capsys.readouterr().out
    for label in ["base"] + [compare.LABELS[m] for m in methods]:
        assert re.search(rf"^{label}\s+(0|1)\s", printed, re.M), label
    assert (tmp_path / "c.png").stat().st_size > 0
    # a second call keeps the finished runs: it trains nothing and prints the same table
    monkeypatch.setattr(compare, "run_stage", lambda *a: pytest.fail("a finished run was trained again"))
    monkeypatch.setattr(compare, "score", lambda *a: pytest.fail("a finished run was scored again"))
    compare.main(compare_args(tiny_dir, tmp_path, methods[:2]))
    assert json.load(open(tmp_path / "runs" / "results.json")) == results
    assert re.search(r"^SFT\s", capsys.readouterr().out, re.M)
    # other settings in the same out_dir stop with one line instead of mixing runs
    with pytest.raises(UserError, match="other settings \\(steps, eval_at\\)"):
        compare.main(compare_args(tiny_dir, tmp_path, methods, steps=2, eval_at=(1, 2)))


def test_compare_runs_lora_through_train_and_scores_the_adapter_folders(tiny_dir, tmp_path):
    """--lora reaches train.py like any other flag; each stage's checkpoint is then an adapter folder, which the
    scoring loads as its base with the adapters merged: a LoRA comparison of IFT and DPO (the reference is the
    base with its adapters off) runs end to end."""
    import lora
    compare.main(compare_args(tiny_dir, tmp_path, ["ift", "dpo"]) + ["--lora", "4"])
    results = json.load(open(tmp_path / "runs" / "results.json"))
    for m in ("ift", "dpo"):
        run = results[f"{m}-seed1"]
        assert run["done"] and run["curve"][0]["loss"] > 0
        config = json.load(open(tmp_path / "runs" / f"{m}-seed1" / lora.CONFIG))
        assert config["r"] == 4 and config["base_model_name_or_path"] == tiny_dir
    assert results["ift-seed1"]["curve"][0]["loss"] != results["base"]["loss"]  # the adapters took part


def test_compare_refuses_an_unknown_method(capsys):
    with pytest.raises(SystemExit):
        compare.parse_args(["--methods", "sft", "ppo"])
    assert "invalid choice: 'ppo'" in capsys.readouterr().err


def test_compare_stage_already_trained_is_scored_not_trained_again(tmp_path, monkeypatch):
    """A comparison stopped after a stage's checkpoint but before its score: rerun, the stage is only scored
    (train.py with --resume would go on past --stop_at); a checkpoint past the stage stops with one line."""
    ckpt = tmp_path / "run" / "checkpoint"
    ckpt.mkdir(parents=True)
    (ckpt / "resume.pt").write_bytes(b"")
    (ckpt / "train_config.json").write_text(json.dumps({"step": 30}))
    monkeypatch.setattr(compare.subprocess, "run", lambda *a, **k: pytest.fail("train.py was started"))
    assert compare.run_stage("sft", 1, 60, 30, str(tmp_path / "run"), []) == 0.0
    with pytest.raises(UserError, match="checkpoint at step 30, past the stage 20"):
        compare.run_stage("sft", 1, 60, 20, str(tmp_path / "run"), [])
    # a train.py that fails: one line that points at its message and at the runs kept
    monkeypatch.setattr(compare, "run_child", lambda *a, **k: 1)
    with pytest.raises(UserError, match=r"train.py --method sft --seed 1 failed before step 40 .*results.json"):
        compare.run_stage("sft", 1, 60, 40, str(tmp_path / "run"), [])
