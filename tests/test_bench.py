"""bench.py: runs end to end on a tiny random model and prints its five ratio lines; its CPU memory measure
sees known allocations. Nothing here times anything."""
import re

import pytest
import torch

import bench

LINES = [r"ift/sft step time: \d+\.\d\dx", r"ift/sft peak memory: \d+\.\d\dx",
         r"ift/sft peak memory, forward \+ backward \(the update's temporaries left out\): \d+\.\d\dx",
         r"loss peak memory vs log_softmax\+gather: \d+\.\d\dx", r"train tokens/s vs transformers: \d+\.\d\dx",
         r"decode tokens/s vs transformers: \d+\.\d\dx"]


@pytest.mark.parametrize("extra", [["--compile_decode", "--profile", "3"],
                                   ["--dtype", "bf16", "--peak_tflops", "0.5", "--bandwidth", "20"]])
def test_bench_prints_the_five_ratios(extra, capsys, compile_counter):
    bench.main(["--init", "tiny", "--device", "cpu", "--batch_size", "2", "--seq_len", "24", "--warmup", "1",
                "--steps", "1", "--new_tokens", "3", "--loss_vocab", "2048", *extra])
    out = capsys.readouterr().out.splitlines()
    for pattern in LINES:
        found = sum(bool(re.fullmatch(pattern, line)) for line in out)
        assert found == 1, f"no line {pattern!r} in:\n" + "\n".join(out)
    text = "\n".join(out)
    assert "TorchDispatchMode" in text  # the output says how memory was measured
    assert re.search(r"^ift/sft floor on this machine, .*: \d+\.\d\dx \(guess pass \d+\.\d ms\)$", text, re.M)
    decoders = ["ours eager", "ours compiled", "transformers"] if "--compile_decode" in extra else \
        ["ours eager", "transformers"]  # compiled decoding is the default on CUDA only
    assert [line.split(":")[0] for line in out if re.match(r"decode [^:]*: 2 x 3 new tokens from a 8-token prompt, "
            r"[\d.]+ ms, [\d.]+ tokens/s; [\d.]+ ms per step after the prefill \([\d.]+ tokens/s\)$", line)] == \
        [f"decode {k}" for k in decoders]
    if "--compile_decode" in extra:  # fp32: the same weights take the same greedy path (bf16 could part near-ties)
        assert "decode: greedy tokens identical at 100.0% of positions, ours eager vs transformers" in text
        assert "decode: greedy tokens identical at 100.0% of positions, ours compiled vs ours eager" in text
        assert compile_counter.frame_count == 1  # timed at 3 tokens, at 1, and profiled: one graph
        # the profiler tables: our two training steps, transformers', one decoding step eager and compiled
        for name in ["sft step", "ift step", "transformers sft step", "decode step (eager)", "decode step (compiled)"]:
            at = out.index(next(line for line in out if line.startswith(f"profile {name}: top 3 aten ops")))
            assert out[at + 1].split() == ["ms", "share", "calls", "kernel"]
            assert all(re.match(r"\s+[\d.]+\s+[\d.]+%\s+\d+  \S", line) for line in out[at + 2:at + 5])
        for call in ["training step (sft, forward + backward)", "prefill", "prefill left-padded", "decode step",
                     "decode step left-padded", "decode step over the static cache (the compiled step's inputs)"]:
            assert re.search(rf"^sdpa kernels, {re.escape(call)}: flash_attention_for_cpu", text, re.M), call
    else:  # the GPU-only lines, on CPU through the flags: MFU per method and the decoding roofline
        assert all(re.search(r", MFU \d+\.\d%", line) for line in out if line.startswith(("sft:", "ift:")))
        roof = next(line for line in out if line.startswith("decode roofline: "))
        gb = bench.decode_bytes(bench.Transformer(bench.TINY).bfloat16()) / 1e9
        assert re.fullmatch(rf"decode roofline: {gb:.3f} GB of weights per step at 20 GB/s -> \d+ tokens/s; steps "
                            r"after the prefill reach ours eager [\d.]+%, transformers [\d.]+% of it", roof)


def test_live_bytes_sees_a_known_allocation():
    with bench.LiveBytes() as live:
        a = torch.ones(16 * 2**20)  # 64 MB of float32
        b = a[1:].view(-1, 1)       # views and in-place ops allocate nothing
        b.mul_(2)
        del a, b                    # freed: the next allocation reuses the budget
        c = torch.zeros(8 * 2**20)  # 32 MB
        after_free = live.now
    assert abs(live.peak - 64 * 2**20) < 2**20
    assert abs(after_free - 32 * 2**20) < 2**20
    del c


def test_live_bytes_counts_autograd_and_ignores_old_tensors():
    w = torch.randn(1024, 1024, requires_grad=True)  # 4 MB allocated before: not counted
    x = torch.randn(2048, 1024)                      # 8 MB
    peak = bench.peak_memory(lambda: (x @ w).relu().sum().backward(), torch.device("cpu"))
    # forward: x @ w (8 MB) and relu's output (8 MB, saved for backward); backward: their gradients and w.grad
    assert 16 * 2**20 <= peak <= 40 * 2**20
    assert w.grad is not None


def test_make_batch_is_realistic():
    idx, targets = bench.make_batch(3, 30, 100, "cpu")
    answer = targets != -100
    assert answer[:, :9].sum() == 0 and answer[:, 9:29].all() and not answer[:, 29].any()
    assert torch.equal(targets[:, 9:29], idx[:, 10:30])  # position t predicts token t + 1


@pytest.mark.parametrize("name,published", [("llama-3.2-1b", 1_235_814_400), ("qwen2-1.5b", 1_543_714_304)])
def test_random_shapes_are_the_public_models(name, published):
    """The shapes bench.py builds with random weights have the parameter count of the real checkpoints, in our
    model and in transformers' reading of the same config (both built on the meta device: no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = bench.SHAPES[name]
    with torch.device("meta"):
        ours = bench.Transformer(cfg)
        hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg.to_hf()))
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in hf.parameters()) == published


def test_loss_sweep_prints_one_line_per_size(capsys, monkeypatch):
    argv = ["--loss_sweep", "--device", "cpu", "--loss_vocab", "8192", "--loss_dim", "256"]
    bench.main(argv + ["--loss_sizes", "1x8,2x24"])
    out = capsys.readouterr().out
    assert "bf16 autocast" in out and "TorchDispatchMode" in out
    rows = re.findall(r"^loss memory (\d+) x (\d+): ours ([\d.]+) MB, log_softmax\+gather ([\d.]+) MB, (\d+\.\d\d)x$",
                      out, re.M)
    assert [(int(b), int(t)) for b, t, *_ in rows] == [(1, 8), (2, 24)]
    for *_, ours, ref, ratio in rows:
        assert 0 < float(ours) < float(ref) and abs(float(ours) / float(ref) - float(ratio)) < 0.01
    # a reference that would not fit in free memory is skipped, ours still measured
    monkeypatch.setattr(bench, "free_bytes", lambda device: 2**20)
    bench.main(argv + ["--loss_sizes", "1x8"])
    assert re.search(r"^loss memory 1 x 8: ours [\d.]+ MB, log_softmax\+gather not run \(needs about [\d.]+ GB, "
                     r"0\.0 GB free\)$", capsys.readouterr().out, re.M)
    with pytest.raises(SystemExit):
        bench.parse_args(["--loss_sizes", "4by1024"])


@pytest.mark.parametrize("B,T,dim,most", [(1, 16, 256, 0.8), (4, 256, 32, 0.25)])
def test_loss_memory_never_above_log_softmax(B, T, dim, most):
    """The chunked head under bf16 autocast against log_softmax + gather, small: where the head's gradient
    dominates (few positions, a wide head: the reference holds 1.5 W-sized buffers, ours 1 and a slice) and
    where the logits do."""
    _, targets = bench.make_batch(B, T, 8192, "cpu")
    ours, ref = bench.loss_memory(8192, dim, (B, T), targets, torch.device("cpu"),
                                  torch.autocast("cpu", dtype=torch.bfloat16))
    assert ours <= most * ref


def test_help_gives_every_flag_a_meaning_and_its_default(capsys):
    assert all(a.help for a in bench.arg_parser()._actions)
    with pytest.raises(SystemExit):
        bench.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for shown in ["--dtype {auto,fp32,bf16}", "(default: auto)", "--seq_len SEQ_LEN tokens per row, >= 3",
                  "(default: 256)", "(default: 1x128,1x512,4x1024,8x2048)", "{sft,ift,dpo,tdpo,orpo,simpo}"]:
        assert shown in text, shown
