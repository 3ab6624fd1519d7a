"""train.py --method dpo|tdpo|orpo|simpo end to end on a tiny model; the pair data schemas; the frozen reference."""
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import baselines
from errors import UserError
from conftest import ROOT, pair_rows, write_jsonl
import train
from data import DataError, to_pair, tokenize_pairs, tokenize_sources
from model import Transformer

USER = {"role": "user", "content": "What is 2 + 2?"}
GOOD, BAD = {"role": "assistant", "content": "4"}, {"role": "assistant", "content": "5"}


def args(init, data, out, *extra):
    return ["--init", init, "--data", data[0], "--eval_data", data[1], "--out_dir", str(out), "--device", "cpu",
            "--batch_size", "2", "--grad_accum", "2", "--max_steps", "3", "--lr", "1e-3", "--optimizer", "adamw",
            "--eval_every", "0", "--sample_every", "0", "--seed", "0", *extra]


# ------------------------------------------------------------------------------------------------
# data

def test_pair_schemas_become_two_conversations_with_one_prompt():
    chosen, rejected = [USER, GOOD], [USER, BAD]
    # UltraFeedback-binarized: whole conversations, or answer strings
    assert to_pair({"prompt": USER["content"], "chosen": chosen, "rejected": rejected}, "r") == (chosen, rejected)
    assert to_pair({"prompt": USER["content"], "chosen": "4", "rejected": "5"}, "r") == (chosen, rejected)
    # the bundled task: the chosen conversation plus the rejected answer (or conversation)
    assert to_pair({"messages": chosen, "rejected": "5"}, "r") == (chosen, rejected)
    assert to_pair({"messages": chosen, "rejected": rejected}, "r") == (chosen, rejected)
    with pytest.raises(DataError, match="^f.jsonl row 3: row has no 'rejected' field"):
        to_pair({"messages": chosen}, "f.jsonl row 3")
    other = [{"role": "user", "content": "What is 3 + 3?"}, BAD]
    with pytest.raises(DataError, match="row 4: the chosen and rejected conversations differ before the final"):
        to_pair({"prompt": "x", "chosen": chosen, "rejected": other}, "row 4")
    with pytest.raises(DataError, match=r"row 5 \(rejected\): the last message must be the assistant"):
        to_pair({"messages": chosen, "rejected": [USER]}, "row 5")


def test_ultrafeedback_file_tokenizes_to_pairs_whose_chosen_side_is_the_sft_example(tmp_path, tiny_dir):
    rows = [{"prompt": "What is 2 + 2?", "chosen": [USER, GOOD], "rejected": [USER, BAD], "score_chosen": 8.0},
            {"prompt": "Name a colour.", "chosen": "Blue, like the sky.", "rejected": "No."}]
    path = write_jsonl(tmp_path / "uf.jsonl", rows)
    pairs = tokenize_pairs(path, tiny_dir, 64, log=print)
    sft = tokenize_sources(path, tiny_dir, 64, log=print)
    assert len(pairs) == 2
    for (chosen, rejected), example in zip(pairs, sft):
        assert all((a == b).all() for a, b in zip(chosen, example))  # SFT/IFT train on exactly the chosen side
        start = int(rejected[1].argmax())  # first answer token: everything before it is the shared prompt
        assert start == int(chosen[1].argmax()) and (rejected[0][:start] == chosen[0][:start]).all()
        assert not (rejected[0][start:start + 2] == chosen[0][start:start + 2]).all()


@pytest.mark.parametrize("case", ["no_rejected", "other_prompt"])
def test_bad_pair_rows_stop_naming_file_and_row_before_the_model_loads(case, tiny_dir, pairs_file, tmp_path,
                                                                       monkeypatch):
    rows = pair_rows(3)
    if case == "no_rejected":
        del rows[1]["rejected"]
        message = "bad.jsonl row 2: row has no 'rejected' field"
    else:
        rows[1]["rejected"] = [{"role": "user", "content": "something else"}, BAD]
        message = "bad.jsonl row 2: the chosen and rejected conversations differ"
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    monkeypatch.setattr(train.Transformer, "from_pretrained", classmethod(
        lambda *a, **k: pytest.fail("the model was loaded before the data was checked")))
    with pytest.raises(UserError) as e:
        train.main(args(tiny_dir, (data, pairs_file[1]), tmp_path / "out", "--method", "dpo"))
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_paper_preset_trains_the_baselines_on_ultrafeedback_pairs_alone():
    from presets import PRESETS
    uf = "HuggingFaceH4/ultrafeedback_binarized:train_prefs@60000"
    for method in baselines.PAIR_METHODS:
        cfg = train.parse_args(["--preset", "paper", "--method", method])
        assert cfg.data == uf and cfg.init == PRESETS["paper"]["init"] and cfg.method == method
    assert train.parse_args(["--preset", "paper", "--method", "sft"]).data == PRESETS["paper"]["data"]
    assert train.parse_args(["--preset", "paper"]).data == PRESETS["paper"]["data"]  # ift, the preset's own
    assert train.parse_args(["--preset", "paper", "--method", "dpo", "--data", "x.jsonl"]).data == "x.jsonl"
    assert train.parse_args(["--method", "dpo"]).data == train.TrainConfig().data  # other presets: unchanged


# ------------------------------------------------------------------------------------------------
# training

def run_and_check(argv, method, tiny_dir, capsys, monkeypatch):
    """train.main(argv), then: the log has a finite loss, margin and accuracy; the weights changed; out_dir and its
    checkpoint hold the policy's tensors only (no copy of the reference) and reload; the reference (DPO, TDPO)
    had no gradients and still holds the initial weights after training."""
    seen = {}
    pair_forward = baselines.pair_forward

    def spy(model, ref, idx, targets, *a, **k):
        seen["ref"], seen["batch"] = ref, seen.get("batch", (idx, targets))
        return pair_forward(model, ref, idx, targets, *a, **k)

    monkeypatch.setattr(baselines, "pair_forward", spy)
    train.main(argv)
    monkeypatch.setattr(baselines, "pair_forward", pair_forward)
    flag = {name: value for name, value in zip(argv, argv[1:])}  # the last occurrence of a flag wins, as in argparse
    out, steps = flag["--out_dir"], flag["--max_steps"]
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith(f"step {steps}: ")][0]
    values = dict(pair.split(" ") for pair in line.removeprefix(f"step {steps}: ").split(", "))
    assert {"loss", "margin", "acc", "eval"} <= set(values)
    assert all(torch.isfinite(torch.tensor(float(v))) for v in values.values())
    init, trained = load_file(os.path.join(tiny_dir, "model.safetensors")), load_file(f"{out}/model.safetensors")
    assert set(trained) == set(init)  # the policy's tensors only: no reference copy in the output
    assert not all(torch.equal(init[k], trained[k]) for k in init)  # it trained
    assert set(load_file(f"{out}/checkpoint/model.safetensors")) == set(init)
    reloaded = Transformer.from_pretrained(out)
    assert all(torch.isfinite(p).all() for p in reloaded.parameters())
    # a micro-batch of B pairs: the B chosen rows (right sums), then the B rejected rows, in the same pair order
    from tokenizer import Tokenizer
    tok = Tokenizer.from_pretrained(tiny_dir)
    idx, targets = seen["batch"]
    sums = [re.search(r"(\d+) \+ (\d+) = (\d+)", tok.decode(row[row != -100].tolist())).groups() for row in targets]
    B = len(sums) // 2
    assert all(int(a) + int(b) == int(c) for a, b, c in sums[:B])
    assert all(int(a) + int(b) + 1 == int(c) for a, b, c in sums[B:]) and sums[:B] == [(a, b, str(int(c) - 1))
                                                                                        for a, b, c in sums[B:]]
    ref = seen["ref"]
    if method in baselines.REFERENCE_METHODS:  # the frozen initial weights, untouched by training
        assert not any(p.requires_grad for p in ref.parameters())
        state = ref.state_dict()
        assert all(torch.equal(state[k.removeprefix("model.")], v) for k, v in init.items())
    else:
        assert ref is None
    return trained


@pytest.mark.parametrize("method", ["tdpo", "orpo", "simpo"])  # dpo: in the resume test below
def test_each_method_trains_keeps_its_reference_frozen_and_saves_only_the_policy(method, tiny_dir, pairs_file,
                                                                                 tmp_path, capsys, monkeypatch):
    run_and_check(args(tiny_dir, pairs_file, tmp_path / method, "--method", method), method, tiny_dir, capsys,
                  monkeypatch)


def test_dpo_trains_and_resume_equals_the_uninterrupted_run_with_the_original_reference(
        tiny_dir, tiny_tied_dir, pairs_file, tmp_path, capsys, monkeypatch):
    full = run_and_check(args(tiny_dir, pairs_file, tmp_path / "full", "--method", "dpo", "--max_steps", "4"), "dpo",
                         tiny_dir, capsys, monkeypatch)
    cut = args(tiny_dir, pairs_file, tmp_path / "cut", "--method", "dpo", "--max_steps", "4")
    train.main(cut + ["--stop_at", "2"])
    with pytest.raises(UserError, match="rebuilds its reference model from --init"):  # another init: refused
        train.main(args(tiny_tied_dir, pairs_file, tmp_path / "cut", "--method", "dpo", "--max_steps", "4",
                        "--resume"))
    train.main(cut + ["--resume"])
    resumed = load_file(tmp_path / "cut" / "model.safetensors")
    assert all(torch.equal(full[k], resumed[k]) for k in full), "resumed run differs from the uninterrupted one"


def test_fsdp_tdpo_without_torchrun_ends_where_the_plain_run_ends(tiny_dir, pairs_file, tmp_path):
    """`python train.py --fsdp --method tdpo`, a world of one: the reference is sharded, its output projection
    gathered once for the policy's head; the weights end bit for bit where the plain run's end."""
    train.main(args(tiny_dir, pairs_file, tmp_path / "plain", "--method", "tdpo"))
    cmd = [sys.executable, os.path.join(ROOT, "train.py"),
           *args(tiny_dir, pairs_file, tmp_path / "fsdp", "--method", "tdpo", "--fsdp")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env=dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads())))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    a, b = (load_file(os.path.join(tmp_path / d, "model.safetensors")) for d in ("plain", "fsdp"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same thread count: the same float32 sums, bit for bit


def test_tdpo_projects_through_the_frozen_reference_head(tiny_dir, pairs_file, tmp_path, monkeypatch):
    """TDPO's KL head gets the reference's output projection: the initial weights at every step, never the
    policy's (trained) parameter."""
    seen, pair_forward = [], baselines.pair_forward

    def recording(model, ref, *a, ref_weight=None, **kw):
        seen.append(ref_weight.detach().clone())
        policy = getattr(model, "module", model)
        assert ref_weight.data_ptr() != policy.lm_head.weight.data_ptr()
        return pair_forward(model, ref, *a, ref_weight=ref_weight, **kw)

    monkeypatch.setattr(baselines, "pair_forward", recording)
    train.main(args(tiny_dir, pairs_file, tmp_path / "out", "--method", "tdpo"))
    initial = load_file(os.path.join(tiny_dir, "model.safetensors"))["lm_head.weight"]
    assert len(seen) == 6 and all(torch.equal(w, initial) for w in seen)  # 3 steps x 2 micro-steps
