"""train.py --pack: examples laid end to end give the unpadded batch's logits, losses, gradients and weights, for
every method; and each thing that must restart at an example boundary is shown to matter (mutants fail)."""
import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import baselines
import ift
import model as model_py
import train
from conftest import HostSyncs, write_jsonl
from data import collate
from model import ModelConfig, Transformer
from packing import collate_packed

LENGTHS = (7, 3, 12, 9, 5, 11)  # tokens per example; 12 > the window below


def tiny(window=5, bias=False, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=64,
                      sliding_window=window, qkv_bias=bias)
    return Transformer(cfg).float()


def examples(lengths=LENGTHS, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        mask = np.zeros(n, bool)
        mask[n // 2:] = True  # the second half is the answer
        out.append((rng.integers(0, 50, n).astype(np.int32), mask))
    return out


def loss_and_grads(model, fn):
    model.zero_grad()
    loss = fn()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def worst_difference(model, loss_fn, ex, pack=collate_packed):
    """Largest relative difference between the unpacked and the packed run of loss_fn, in the loss and in each
    parameter's gradient."""
    x, y = collate(ex)
    px, py, packing = pack(ex)
    a, ga = loss_and_grads(model, lambda: loss_fn(model, x, y, None))
    b, gb = loss_and_grads(model, lambda: loss_fn(model, px, py, packing))
    diffs = [((a - b).abs() / a.abs()).item()]
    diffs += [((u - v).abs().max() / u.abs().max().clamp(min=1e-12)).item() for u, v in zip(ga, gb)]
    return max(diffs)


def guesses_sampled(model, x, y, packing):
    guess = ift.guess_picker("sample", key=(0, 1, 2))  # a fresh generator per call: the same draws both times
    return ift.ift_forward(model, x, y, 0.2, 0.95, guess=guess, packing=packing)[0]


LOSSES = {
    "sft": lambda m, x, y, p: ift.sft_forward(m, x, y, chunk=4, packing=p),
    "ift": lambda m, x, y, p: ift.ift_forward(m, x, y, 0.2, 0.95, chunk=4, packing=p)[0],
    # a right-side variant: its shift is the smallest value of the whole batch, so examples depend on each other
    "ift right softmax": lambda m, x, y, p: ift.ift_forward(m, x, y, 0.2, 0.95, packing=p,
                                                            propagation=("loss", "right", "softmax"))[0],
    "ift mask left L2": lambda m, x, y, p: ift.ift_forward(m, x, y, 0.5, 0.9, packing=p,
                                                           propagation=("mask", "left", "L2"))[0],
    "ift sampled guesses": guesses_sampled,
}
PAIRS = ("dpo", "tdpo", "orpo", "simpo")


@pytest.mark.parametrize("name", list(LOSSES) + list(PAIRS))
def test_packed_loss_and_gradients_equal_the_unpacked_ones(name):
    model = tiny()
    ref = tiny(seed=1).requires_grad_(False)
    fn = LOSSES.get(name) or (lambda m, x, y, p: baselines.pair_forward(m, ref, x, y, name, chunk=4, packing=p)[0])
    assert worst_difference(model, fn, examples()) <= 1e-5


@pytest.mark.parametrize("window", [5, None])
def test_examples_of_one_length_take_the_batched_path_and_still_equal(window, monkeypatch):
    """All examples of one length run as the rows of one attention call per layer (model.attend_packed), the
    window inside each, nothing across a boundary: the loss and gradients are still the unpacked ones."""
    model = tiny(window=window)
    ex = examples(lengths=(9, 9, 9, 9))  # 8 input positions each, more than the window of 5
    assert worst_difference(model, LOSSES["ift"], ex) <= 1e-5
    calls = []
    monkeypatch.setattr(model_py, "attend", lambda *a, **k: calls.append(a[0].shape) or model_py.F.
                        scaled_dot_product_attention(*a[:3], attn_mask=a[3], is_causal=k["causal"], enable_gqa=True))
    px, _, packing = collate_packed(ex)
    with torch.no_grad():
        model(px, packing=packing)
    assert calls == [(4, 4, 8, 8)] * 2  # one call per layer, the 4 examples as rows: (N, heads, n, head_dim)


def documented_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, window_size=(-1, -1),
                           enable_gqa=False):
    """torch.nn.attention.varlen.varlen_attn as its documentation (torch 2.12) describes it, on any device:
    query (Tq, Hq, D), key and value (Tk, Hkv, D), sequences at the cumulative offsets cu_seq_*, each query i
    seeing the keys i - left .. i + right of its own sequence (-1: no bound), Hq a multiple of Hkv with gqa."""
    left, right = window_size
    assert key.size(1) == query.size(1) or enable_gqa
    out = []
    for i in range(len(cu_seq_q) - 1):
        q, k, v = (t[int(c[i]):int(c[i + 1])].transpose(0, 1) for t, c in
                   ((query, cu_seq_q), (key, cu_seq_k), (value, cu_seq_k)))
        k, v = (t.repeat_interleave(q.size(0) // t.size(0), 0) for t in (k, v))
        d = torch.arange(q.size(1))[:, None] - torch.arange(k.size(1))[None]  # query minus key position
        allowed = ((d <= left) | (left < 0)) & ((-d <= right) | (right < 0))
        scores = (q @ k.transpose(1, 2) / q.size(-1) ** 0.5).masked_fill(~allowed, float("-inf"))
        out.append((scores.softmax(-1) @ v).transpose(0, 1))
    return torch.cat(out)


@pytest.mark.parametrize("window", [5, None])
def test_the_varlen_call_gives_the_unpacked_loss(window, monkeypatch):
    """The varlen flash path (CUDA, bf16, torch >= 2.12) cannot run here: its arguments (layout, offsets, the
    window as (left, 0), GQA) are checked against a reference written from varlen_attn's documentation."""
    monkeypatch.setattr(model_py, "varlen_attn", documented_varlen_attn)
    monkeypatch.setattr(model_py, "varlen_ok", lambda q: True)
    assert worst_difference(tiny(window=window), LOSSES["ift"], examples()) <= 1e-5


def test_packed_logits_equal_each_example_alone_with_bias_and_no_window():
    model = tiny(window=None, bias=True)
    ex = examples()
    px, _, packing = collate_packed(ex)
    with torch.no_grad():
        packed = model(px, packing=packing)[0]  # (L, V)
        start = 0
        for ids, _ in ex:
            n = len(ids) - 1
            alone = model(torch.from_numpy(ids[:-1].astype(np.int64))[None])[0]
            assert torch.allclose(packed[start:start + n], alone, rtol=1e-5, atol=1e-5)
            start += n


# ---- mutants: each boundary rule, broken on purpose, breaks the equality above

def leaky_attention(q, k, v, packing):  # causal over the whole row: examples see the ones before them
    return model_py.attend(q, k, v, None, causal=True)


def positions_running_on(ex):  # positions 0 .. L-1 along the row, not restarting per example
    x, y, packing = collate_packed(ex)
    return x, y, dataclasses.replace(packing, positions=torch.arange(x.size(1)))


def propagation_on_the_row(unpack: bool):
    """IFT at lam 0 (so only the reduction matters); packed, its reduction runs on the padded batch (unpack), or,
    the mutant, on the packed row as if it were one sequence, its discounted sums crossing every boundary."""
    def fn(m, x, y, p):
        if p is None:
            return ift.ift_forward(m, x, y, 0.0, 0.95)[0]
        nll = m(x, head=lambda h, lm_head: ift.token_nll(lm_head(h), y), packing=p)
        if unpack:
            nll, y = p.unpack(nll), p.targets
        return ift.ift_reduce(nll, y != ift.IGNORE, 0.95)
    return fn


@pytest.mark.parametrize("mutant", ["attention leaks", "positions run on", "propagation runs on"])
def test_each_boundary_rule_is_needed(mutant, monkeypatch):
    fn, pack = LOSSES["ift"], collate_packed
    if mutant == "attention leaks":
        monkeypatch.setattr(model_py, "attend_packed", leaky_attention)
    elif mutant == "positions run on":
        pack = positions_running_on
    else:
        fn = propagation_on_the_row(unpack=False)
        assert worst_difference(tiny(), propagation_on_the_row(unpack=True), examples()) <= 1e-5  # the baseline
    assert worst_difference(tiny(), fn, examples(), pack) > 1e-3


def test_packed_loss_path_never_waits_for_the_device():
    model = tiny()
    px, py, packing = collate_packed(examples())
    answer = ift.answer_index(py)
    with HostSyncs() as syncs:
        loss = ift.ift_forward(model, px, py, 0.2, 0.95, answer=answer, packing=packing)[0]
        loss.backward()
    assert syncs.seen == [], syncs.seen


# ---- train.py --pack end to end

def varied_rows(n, seed=0):
    """Chat rows whose answers run from a few tokens to a few dozen: real padding in every batch."""
    g = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        words = " ".join(str(int(v)) for v in g.integers(0, 100, int(g.integers(1, 25))))
        rows.append({"messages": [{"role": "user", "content": f"Repeat: {words}"},
                                  {"role": "assistant", "content": words}]})
    return rows


@pytest.fixture(scope="module")
def varied_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("varied")
    return write_jsonl(d / "train.jsonl", varied_rows(24)), write_jsonl(d / "eval.jsonl", varied_rows(6, seed=1))


def run(init, data, out, *extra):
    train.main(["--init", init, "--data", data[0], "--eval_data", data[1], "--out_dir", str(out), "--device", "cpu",
                "--batch_size", "4", "--grad_accum", "2", "--max_steps", "3", "--lr", "1e-3", "--optimizer", "adamw",
                "--eval_every", "0", "--sample_every", "0", "--seed", "0", *extra])
    return load_file(os.path.join(out, "model.safetensors"))


@pytest.mark.parametrize("method", ["ift", "dpo"])
def test_three_packed_steps_end_with_the_unpacked_weights(method, tiny_dir, varied_file, tmp_path):
    extra = ["--method", method]
    if method == "dpo":  # pairs: the rejected answer is the chosen one reversed
        rows = [json.loads(line) for line in open(varied_file[0])]
        for r in rows:
            r["rejected"] = " ".join(reversed(r["messages"][-1]["content"].split())) + " no"
        extra += ["--data", write_jsonl(tmp_path / "pairs.jsonl", rows)]
    padded = run(tiny_dir, varied_file, tmp_path / "padded", *extra)
    packed = run(tiny_dir, varied_file, tmp_path / "packed", *extra, "--pack")
    start = load_file(os.path.join(tiny_dir, "model.safetensors"))
    for k in padded:
        moved = (padded[k] - start[k]).abs().max()
        assert moved > 0 or k.endswith("norm.weight")  # training did change the weights
        # relative in norm: AdamW divides each update by its gradient's running size, so an element whose gradient
        # is ~0 can move by float32 rounding alone (seen: 1e-6 on weights of 0.07 for dpo); the tensor does not
        assert (padded[k] - packed[k]).norm() <= 1e-5 * padded[k].norm(), k
    record = json.load(open(tmp_path / "packed" / "train_config.json"))
    assert record["pack"] is True


def test_log_shows_tokens_and_the_padding_skipped(tiny_dir, varied_file, tmp_path, capsys):
    run(tiny_dir, varied_file, tmp_path / "a", "--method", "sft", "--pack", "--max_steps", "1", "--eval_every", "1")
    line = [s for s in capsys.readouterr().out.splitlines() if s.startswith("step 1: ")][0]
    values = dict(pair.split(" ") for pair in line.removeprefix("step 1: ").split(", "))
    assert 0.1 < float(values["pad_skipped"]) < 1 and float(values["tok/s"]) > 0


def test_packed_eval_loss_equals_the_unpadded_one(tiny_dir, varied_file):
    from data import tokenize_sources
    held = tokenize_sources(varied_file[1], tiny_dir, 256, log=lambda *a: None)
    model = Transformer.from_pretrained(tiny_dir)
    losses = []
    for pack in (False, True):
        cfg = train.TrainConfig(batch_size=4, pack=pack)
        losses.append(train.eval_loss(model, held, cfg, torch.device("cpu"), train.nullcontext(), 0, 1))
    assert abs(losses[0] - losses[1]) <= 1e-5 * abs(losses[0]), losses


def test_packed_compiled_blocks_give_the_eager_loss(tiny_dir):
    model = Transformer.from_pretrained(tiny_dir)
    px, py, packing = collate_packed(examples())
    with torch.no_grad():
        eager = ift.sft_forward(model, px, py, packing=packing)
        model.compile_blocks()
        compiled = ift.sft_forward(model, px, py, packing=packing)
    assert torch.allclose(eager, compiled, rtol=1e-5), (eager, compiled)
