"""The experiment scripts the README quotes: frozen_lake.py reproduces its table, compare.py runs end to end."""
import json
import os
import re

import torch

import compare
import frozen_lake

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


def test_compare_runs_both_methods_and_reports(tiny_dir, tmp_path, capsys):
    rows = [{"messages": [{"role": "user", "content": f"What is {a} + 1?"},
                          {"role": "assistant", "content": f"{a} + 1 = {a + 1}\n#### {a + 1}"}],
             "answer": str(a + 1)} for a in range(6)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "runs"
    compare.main(["--init", tiny_dir, "--data", str(data), "--seeds", "1", "--steps", "1", "--eval_at", "1",
                  "--limit", "3", "--max_new_tokens", "4", "--out_dir", str(out), "--plot", str(tmp_path / "c.png"),
                  "--device", "cpu",
                  # the rest goes to train.py
                  "--eval_data", str(data), "--batch_size", "2", "--optimizer", "adamw", "--max_length", "64"])
    results = json.load(open(out / "results.json"))
    assert set(results) == {"base", "sft-seed1", "ift-seed1"}
    for key in ("sft-seed1", "ift-seed1"):
        assert results[key]["done"] and [p["step"] for p in results[key]["curve"]] == [1]
        assert 0 <= results[key]["curve"][0]["exact_match"] <= 100 and results[key]["curve"][0]["loss"] > 0
    printed = capsys.readouterr().out
    assert re.search(r"^SFT\s", printed, re.M) and re.search(r"^IFT\s", printed, re.M)
    assert (tmp_path / "c.png").stat().st_size > 0
