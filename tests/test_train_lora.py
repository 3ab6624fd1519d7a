"""train.py --lora end to end on CPU: peft's files out (peft 0.21 loads them and gives our logits), only the
adapters train, every method runs (DPO/TDPO's reference is the base with the adapters off), resume is bit for bit
and refuses other adapter settings, DDP equals one process, the merge command, adapter dirs as --init elsewhere."""
import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file

import lora
import train
from errors import UserError
from model import Transformer
from test_train import args, torchrun

IDX = torch.arange(40).mul(37).remainder(1000).view(2, 20)


@pytest.fixture
def built(monkeypatch):
    """What train.build_model returns in the next train.main: {raw, model, ref, optimizer}, and the weights
    before training (before)."""
    seen = {}
    build = train.build_model

    def spy(*a, **k):
        out = build(*a, **k)
        seen.update(zip(("raw", "model", "ref", "optimizer"), out))
        seen["before"] = {n: p.detach().clone() for n, p in out[0].named_parameters()}
        return out
    monkeypatch.setattr(train, "build_model", spy)
    return seen


@pytest.fixture(scope="module")
def ift_run(tiny_dir, rows_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "out"
    train.main(args(tiny_dir, rows_file, out, "--method", "ift", "--lora", "4", "--lr", "1e-2"))
    return out


def logits(model, idx=IDX):
    with torch.no_grad():
        out = model(idx)
    return getattr(out, "logits", out)


def test_out_dir_holds_peft_files_that_peft_loads_with_our_logits(ift_run, tiny_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    names = set(os.listdir(ift_run))
    assert {lora.CONFIG, lora.WEIGHTS, "tokenizer.json", "train_config.json"} <= names
    assert "model.safetensors" not in names and "config.json" not in names  # the base is --init's, not copied
    config = json.load(open(ift_run / lora.CONFIG))
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (4, 8, tiny_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    theirs = PeftModel.from_pretrained(base, str(ift_run)).eval()
    ours = Transformer.from_pretrained(str(ift_run), torch.float32)  # an adapter dir: base + adapters, merged
    plain = Transformer.from_pretrained(tiny_dir, torch.float32)
    assert (logits(ours) - logits(plain)).abs().max() > 1e-3  # the adapters trained
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-5, atol=1e-5)


def test_only_the_adapters_train_and_the_base_stays_frozen(tiny_dir, rows_file, tmp_path, built):
    seen = built
    train.main(args(tiny_dir, rows_file, tmp_path / "o", "--method", "sft", "--lora", "2", "--lora_targets",
                    "q_proj,v_proj", "--lr", "1e-2"))
    raw, optimizer = seen["raw"], seen["optimizer"]
    trained = {n for n, p in raw.named_parameters() if p.requires_grad}
    assert trained == {n for n in seen["before"] if ".lora_" in n} and len(trained) == 2 * 2 * 2  # 2 layers x q, v
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == \
        {id(p) for n, p in raw.named_parameters() if n in trained}
    for n, p in raw.named_parameters():
        moved = not torch.equal(p.detach(), seen["before"][n])
        assert moved == (".lora_B." in n or ".lora_A." in n), n  # every adapter moved, nothing else did


@pytest.mark.parametrize("method", ["sft", "dpo", "tdpo", "orpo", "simpo"])
def test_every_method_trains_adapters(method, tiny_dir, rows_file, pairs_file, tmp_path, capsys):
    data = rows_file if method == "sft" else pairs_file
    train.main(args(tiny_dir, data, tmp_path / method, "--method", method, "--lora", "4", "--max_steps", "2",
                    "--grad_accum", "1", "--eval_every", "1"))
    out = capsys.readouterr().out
    assert lora.WEIGHTS in os.listdir(tmp_path / method)
    if method in ("dpo", "tdpo"):  # the reference is the base: at step 1 (B = 0) policy and reference agree
        step1 = [line for line in out.splitlines() if line.startswith("step 1: ")][0]
        values = dict(pair.split(" ") for pair in step1.removeprefix("step 1: ").split(", "))
        assert float(values["margin"]) == 0.0 and abs(float(values["loss"]) - 0.6931) < 1e-3, step1


def test_dpo_reference_is_the_base_with_adapters_off_and_no_copy(tiny_dir, pairs_file, tmp_path, built):
    seen = built
    train.main(args(tiny_dir, pairs_file, tmp_path / "o", "--method", "dpo", "--lora", "4", "--max_steps", "2",
                    "--lr", "1e-2"))
    raw, ref = seen["raw"], seen["ref"]
    assert isinstance(ref, lora.Reference) and ref.model is raw  # the policy's own weights, no second copy
    plain = Transformer.from_pretrained(tiny_dir, torch.float32)
    with torch.no_grad():
        assert torch.equal(ref(IDX), plain(IDX))  # adapters off: the base, exactly
        assert (raw(IDX) - plain(IDX)).abs().max() > 1e-4  # adapters on again afterwards, and trained


def test_resume_is_bit_for_bit_and_refuses_other_adapters(tiny_dir, rows_file, tmp_path):
    lora_args = ["--method", "ift", "--lora", "4", "--lora_dropout", "0.1", "--max_steps", "6"]
    train.main(args(tiny_dir, rows_file, tmp_path / "full", *lora_args))
    cut = args(tiny_dir, rows_file, tmp_path / "cut", *lora_args, "--save_every", "3")
    train.main(cut + ["--stop_at", "3"])
    for changed, named in [(["--lora", "8"], "--lora"), (["--lora", "0"], "--lora"),
                           (["--lora_targets", "q_proj"], "--lora_targets")]:
        with pytest.raises(UserError, match=named):
            train.main(args(tiny_dir, rows_file, tmp_path / "cut", *lora_args, "--resume", *changed))
    train.main(cut + ["--resume"])
    a, b = (load_file(os.path.join(tmp_path / d, lora.WEIGHTS)) for d in ("full", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("flags, message", [
    (["--lora_targets", "q_proj,attn"], "unknown attn .valid: q_proj, k_proj"),
    (["--lora_targets", ""], "unknown .none."),
    (["--lora", "-1"], "--lora and --lora_alpha must be >= 0"),
    (["--lora_dropout", "1"], "--lora_dropout in"),
])
def test_bad_lora_flags_are_one_argparse_line(flags, message, tiny_dir, rows_file, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(args(tiny_dir, rows_file, tmp_path / "o", "--lora", "4", *flags))
    err = capsys.readouterr().err.strip().splitlines()  # argparse: the usage, then one line
    assert e.value.code == 2 and ": error: " in err[-1] and re.search(message, err[-1]), err
    assert "Traceback" not in "\n".join(err) and not os.path.exists(tmp_path / "o")


@pytest.mark.parametrize("mode", [[], ["--fsdp"]])
def test_two_processes_equal_one_with_twice_the_accumulation(mode, tiny_dir, rows_file, tmp_path):
    """DDP, and FSDP2 with the frozen base and the adapters sharded (each rank draws the same fresh adapters and
    keeps its rows)."""
    common = ["--method", "ift", "--lora", "4", "--lr", "1e-2"]
    train.main(args(tiny_dir, rows_file, tmp_path / "one", *common, "--grad_accum", "2"))
    torchrun(2, args(tiny_dir, rows_file, tmp_path / "two", *common, "--grad_accum", "1", *mode), tmp_path)
    a, b = (load_file(os.path.join(tmp_path / d, lora.WEIGHTS)) for d in ("one", "two"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)


def test_merge_command_writes_a_plain_model_transformers_loads(ift_run, tmp_path):
    from transformers import AutoModelForCausalLM
    merged = tmp_path / "merged"
    lora.main(["merge", str(ift_run), str(merged)])
    assert "config.json" in os.listdir(merged) and lora.CONFIG not in os.listdir(merged)
    ref = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()
    ours = Transformer.from_pretrained(str(ift_run), torch.float32)
    torch.testing.assert_close(logits(ref), logits(ours), rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError, match="not an empty folder"):  # never over an existing folder's files
        lora.main(["merge", str(ift_run), str(merged)])
    with pytest.raises(UserError, match="not an adapter folder"):  # a plain model has nothing to merge
        lora.main(["merge", str(merged), str(tmp_path / "again")])


def test_an_adapter_whose_base_is_gone_is_one_clear_error(ift_run, tmp_path):
    import shutil
    moved = tmp_path / "adapter"
    shutil.copytree(ift_run, moved)
    config = json.load(open(moved / lora.CONFIG))
    config["base_model_name_or_path"] = str(tmp_path / "nowhere")
    json.dump(config, open(moved / lora.CONFIG, "w"))
    with pytest.raises(UserError, match="its base model .*nowhere"):
        Transformer.from_pretrained(str(moved))


@pytest.mark.parametrize("flags", [["--grad_checkpointing"], ["--pack"], ["--compile"]])
def test_checkpointing_packing_and_compiling_leave_the_adapters_as_they_are(flags, ift_run, tiny_dir, rows_file,
                                                                              tmp_path):
    """The same run as ift_run (4 IFT steps, --lora 4) with one flag more ends with the same adapters."""
    train.main(args(tiny_dir, rows_file, tmp_path / "o", "--method", "ift", "--lora", "4", "--lr", "1e-2", *flags))
    a, b = (load_file(os.path.join(d, lora.WEIGHTS)) for d in (ift_run, tmp_path / "o"))
    # relative in norm: AdamW turns float32 noise on ~0 gradients into ~lr-sized moves (see test_packing); the
    # compiled update rounds differently from the eager one (1 ulp per step), hence more room there
    tolerance = 1e-4 if "--compile" in flags else 1e-5
    for k in a:
        assert (a[k] - b[k]).norm() <= tolerance * a[k].norm(), k


@pytest.mark.parametrize("method", ["ift", "dpo"])
def test_bf16_keeps_the_frozen_base_in_bf16_and_the_adapters_in_float32(method, tiny_dir, rows_file, pairs_file,
                                                                         tmp_path, built):
    """What CUDA does by default (bf16 autocast), here with --dtype bf16 on the CPU: the base is never held in
    float32 for training, the adapters and their optimizer state are."""
    seen = built
    data = rows_file if method == "ift" else pairs_file
    train.main(args(tiny_dir, data, tmp_path / "o", "--method", method, "--lora", "4", "--dtype", "bf16",
                    "--max_steps", "2", "--lr", "1e-2"))
    dtypes = {n: p.dtype for n, p in seen["raw"].named_parameters()}
    assert all((d == torch.float32) == (".lora_" in n) for n, d in dtypes.items()), dtypes
    assert all(v.dtype == torch.float32 for s in seen["optimizer"].state.values() for v in s.values() if v.dim())
    saved = load_file(os.path.join(tmp_path / "o", lora.WEIGHTS))
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in saved.values())
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in saved.items())  # it trained


def test_sample_and_eval_take_the_adapter_folder_as_the_merged_model(ift_run, tmp_path, capsys):
    import eval as eval_py
    import sample
    merged = tmp_path / "merged"
    lora.main(["merge", str(ift_run), str(merged)])
    texts = []
    for init in (ift_run, merged):
        capsys.readouterr()
        sample.main(["--init", str(init), "--prompt", "What is 2 + 3?", "--max_new_tokens", "8", "--temperature",
                     "0", "--device", "cpu", "--chat"])
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0].strip()
    (model, _), (plain, _) = (eval_py.load_checkpoint(str(d), "cpu") for d in (ift_run, merged))
    torch.testing.assert_close(logits(model), logits(plain), rtol=1e-5, atol=1e-5)


def test_fsdp_dpo_resumes_bit_for_bit_with_sharded_adapters(tiny_dir, pairs_file, tmp_path):
    """Two FSDP ranks, DPO against the base with the adapters off, stopped after step 2 of 4 and resumed (each
    rank reads its rows of the saved adapters and optimizer state): the uninterrupted run's adapters."""
    run = ["--method", "dpo", "--lora", "4", "--fsdp", "--grad_accum", "1", "--save_every", "2"]
    torchrun(2, args(tiny_dir, pairs_file, tmp_path / "full", *run), tmp_path)
    torchrun(2, args(tiny_dir, pairs_file, tmp_path / "cut", *run, "--stop_at", "2"), tmp_path)
    torchrun(2, args(tiny_dir, pairs_file, tmp_path / "cut", *run, "--resume"), tmp_path)
    a, b = (load_file(os.path.join(tmp_path / d, lora.WEIGHTS)) for d in ("full", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k)  # it trained


def test_an_adapter_folder_as_init_trains_from_its_merged_model(ift_run, rows_file, tmp_path):
    """Continuing from adapters one has (ours or peft's): --init takes the folder, the base with them merged in,
    and a new --lora run trains fresh adapters on top (compare.py's --init goes through the same loader)."""
    out = tmp_path / "again"
    train.main(args(str(ift_run), rows_file, out, "--method", "sft", "--lora", "2", "--max_steps", "2"))
    assert json.load(open(out / lora.CONFIG))["base_model_name_or_path"] == str(ift_run)
    before = Transformer.from_pretrained(str(ift_run), torch.float32)
    after = Transformer.from_pretrained(str(out), torch.float32)  # its base is the adapter folder, merged
    assert (logits(after) - logits(before)).abs().max() > 0
