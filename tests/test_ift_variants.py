"""The released code's other IFT modes (issue 12): guess modes and propagation variants, each against a float64
loop written from its definition, and train.py's flags for them."""
import json
import math
import re

import pytest
import torch

import ift
import train
from ift import IGNORE
from model import ModelConfig, Transformer

ITEMS, SIDES, NORMS = ("loss", "mask", "logps"), ("left", "right"), ("L1", "L2", "softmax", "log")
VARIANTS = [(i, s, n) for i in ITEMS for s in SIDES for n in NORMS]


# ------------------------------------------------------------------------------------------------
# the definitions, one python loop at a time, in float64

def ref_weights(nll, mask, gamma, item, side, norm):
    """w (B, T) from the released code's definitions, position by position; l = nll = -logp keeps its graph."""
    B, T = mask.shape
    zero = nll.new_zeros(())
    if gamma == 0:
        return torch.stack([torch.stack([zero + 1 if mask[b, t] else zero for t in range(T)]) for b in range(B)])
    raw = []  # G (left) or P (right), row by row
    for b in range(B):
        m = [bool(mask[b, t]) for t in range(T)]
        n = sum(m)
        c = [(zero + 1 if item == "mask" else nll[b, t] / n if item == "loss" else nll[b, t]) if m[t] else zero
             for t in range(T)]
        if side == "left":  # discounted suffix sums
            raw.append([sum(gamma ** (i - t) * c[i] for i in range(t, T)) if m[t] else zero for t in range(T)])
        else:  # discounted prefix sums
            raw.append([sum(gamma ** (t - i) * c[i] for i in range(t + 1)) if m[t] else zero + 1e6
                        for t in range(T)])
    if side == "right":  # shifted by the smallest nonzero entry of the whole batch (none: no shift)
        nonzero = [x for row in raw for x in row if x != 0]
        shift = min(nonzero) if nonzero else zero
        raw = [[x + shift for x in row] for row in raw]

    def inv(x):
        return 1 / x if x > 0 else zero

    def softmax(row):
        e = [torch.exp(x) for x in row]
        return [x / sum(e) for x in e]

    w = []
    for b in range(B):
        row = raw[b]
        if side == "left":
            v = {"L1": row, "L2": [x ** 2 for x in row], "softmax": softmax(row),
                 "log": [torch.log(x + 1) for x in row]}[norm]
        else:
            v = {"L1": [inv(x) for x in row], "L2": [inv(x ** 2) for x in row],
                 "softmax": softmax([inv(x) for x in row]), "log": [inv(torch.log(x + 1)) for x in row]}[norm]
        v = [v[t] if mask[b, t] else zero for t in range(T)]
        S, n = sum(v), int(mask[b].sum())
        w.append(torch.stack([x * n / S if S > 0 else zero for x in v]))
    return torch.stack(w)


def ref_loss(nll, mask, gamma, variant):
    """mean over sequences with n > 0 of sum_t m[t] l[t] w[t] / n."""
    w = ref_weights(nll, mask, gamma, *variant)
    per_seq = [sum(nll[b, t] * w[b, t] for t in range(mask.shape[1]) if mask[b, t]) / int(mask[b].sum())
               for b in range(mask.shape[0]) if mask[b].any()]
    return sum(per_seq) / len(per_seq)


def batch(dtype=torch.float64, seed=0):
    """nll (B, T) with grad and its mask: padding, a hole (two learned turns), an empty row, a full row."""
    mask = torch.tensor([[0, 0, 1, 1, 1, 0, 1, 1, 0],   # prompt, answer, hole, answer, padding
                         [0, 0, 0, 0, 0, 0, 0, 0, 0],   # no answer token: dropped from the mean
                         [1, 1, 1, 1, 1, 1, 1, 1, 1],   # answer everywhere
                         [0, 0, 0, 0, 1, 1, 1, 0, 0]], dtype=torch.bool)
    nll = torch.rand(mask.shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 3 + 0.05
    return (nll * mask).requires_grad_(), mask


# ------------------------------------------------------------------------------------------------
# propagation variants

@pytest.mark.parametrize("variant", VARIANTS, ids="-".join)
def test_variant_matches_its_definition(variant):
    """Weights, loss and the loss's gradient (through the weights: not detached), at gamma 0.5, 0.95 and 1."""
    for gamma in (0.5, 0.95, 1.0):
        nll, mask = batch(seed=int(gamma * 100))
        w = ift.propagation_variant(nll, mask, gamma, *variant)
        torch.testing.assert_close(w, ref_weights(nll, mask, gamma, *variant), rtol=1e-10, atol=1e-12)
        got, want = ift.ift_reduce(nll, mask, gamma, variant), ref_loss(nll, mask, gamma, variant)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        g_got, = torch.autograd.grad(got, nll)
        g_want, = torch.autograd.grad(want, nll)
        torch.testing.assert_close(g_got, g_want, rtol=1e-9, atol=1e-12)
        n = mask.sum(1)
        assert (w[~mask] == 0).all() and torch.allclose(w.sum(1), n.double())  # average 1 over answer tokens
        # the variant really re-weights, and its weights are part of the graph unless they ignore the loss
        assert not torch.allclose(w, mask.double())
        assert (w.grad_fn is not None) == (variant[0] != "mask")


def test_default_variant_is_propagation_weights_bit_for_bit():
    for gamma in (0.5, 0.95, 1.0):
        for dtype in (torch.float32, torch.float64):
            nll, mask = batch(dtype)
            w = ift.propagation_variant(nll, mask, gamma, "loss", "left", "L1")
            assert torch.equal(w, ift.propagation_weights(nll, mask, gamma))


def test_right_side_weights_depend_on_the_other_sequences():
    """The released code's quirk, kept: the shift is the smallest nonzero P of the whole batch."""
    nll, mask = batch()
    alone = ift.propagation_variant(nll[:1], mask[:1], 0.95, "loss", "right", "L1")
    together = ift.propagation_variant(nll, mask, 0.95, "loss", "right", "L1")[:1]
    assert not torch.allclose(alone, together)
    left = ift.propagation_variant(nll, mask, 0.95, "loss", "left", "L1")[:1]  # the left side is per sequence
    torch.testing.assert_close(left, ift.propagation_variant(nll[:1], mask[:1], 0.95, "loss", "left", "L1"))


@pytest.mark.parametrize("variant", VARIANTS, ids="-".join)
def test_gamma0_is_sft_whatever_the_variant(variant):
    nll, mask = batch(torch.float32)
    assert torch.equal(ift.ift_reduce(nll, mask, 0.0, variant), ift.sft_reduce(nll, mask))
    assert torch.equal(ift.propagation_variant(nll, mask, 0.0, *variant), mask.float())


def test_empty_and_zero_loss_rows_give_finite_weights_and_gradients():
    """An empty answer gives w = 0; a row with zero loss everywhere gives w = 0 wherever the sharpened weights
    sum to 0 there (left side, loss or logps, L1/L2/log), else what its definition says; never NaN. Also a batch
    where P has no nonzero entry at all, and an all-empty batch."""
    nll, mask = batch()
    with torch.no_grad():
        nll[3] = 0  # zero loss everywhere on row 3
    full = torch.ones(1, 5, dtype=torch.bool)  # answer everywhere and zero loss: P = 0 everywhere
    cases = [(nll, mask), (torch.zeros(1, 5, dtype=torch.float64, requires_grad=True), full),
             (torch.rand(2, 5, dtype=torch.float64, requires_grad=True), torch.zeros(2, 5, dtype=torch.bool))]
    for variant in VARIANTS:
        for x, m in cases:
            w = ift.propagation_variant(x, m, 0.95, *variant)
            loss = ift.ift_reduce(x, m, 0.95, variant)
            g, = torch.autograd.grad(loss, x)
            assert torch.isfinite(w).all() and torch.isfinite(loss) and torch.isfinite(g).all(), variant
            assert (w[~m.any(1)] == 0).all()
            torch.testing.assert_close(w, ref_weights(x, m, 0.95, *variant), rtol=1e-10, atol=1e-12)
        w = ift.propagation_variant(nll, mask, 0.95, *variant)
        if variant[0] != "mask" and variant[1:] in {("left", "L1"), ("left", "L2"), ("left", "log")}:
            assert (w[3] == 0).all()
    assert ift.ift_reduce(*cases[2], 0.95, ("logps", "right", "softmax")).item() == 0


# ------------------------------------------------------------------------------------------------
# guess modes

def tiny_model(vocab=50, seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                   intermediate_size=48))


def tokens(B=3, T=10, V=50):
    idx = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
    targets = torch.full((B, T), IGNORE)
    targets[0, 2:8], targets[1, 0:9], targets[2, 5:6] = idx[0, 3:9], idx[1, 1:10], idx[2, 6:7]
    return idx, targets


def test_topk_guesses_the_kth_most_likely_token():
    model = tiny_model()
    idx, targets = tokens()
    mask = targets != IGNORE
    with torch.no_grad():
        logits = model(idx)[mask]  # (N, V)
    greedy, first = ift.infer_one_step_ahead(model, idx, targets, chunk=4)
    top1, first1 = ift.infer_one_step_ahead(model, idx, targets, chunk=4, guess=ift.guess_picker("topk", k=1))
    assert torch.equal(top1, greedy) and torch.equal(first1, first)
    for k in (2, 3):
        g, _ = ift.infer_one_step_ahead(model, idx, targets, chunk=4, guess=ift.guess_picker("topk", k=k))
        picked = logits.gather(1, g[mask][:, None])
        assert ((logits > picked).sum(1) == k - 1).all()  # exactly k - 1 tokens are more likely
        assert (g[~mask] == IGNORE).all()


def test_sampled_guesses_are_reproducible_and_depend_on_the_seed():
    model = tiny_model()
    idx, targets = tokens()
    mask = targets != IGNORE

    def sampled(key):
        return ift.infer_one_step_ahead(model, idx, targets, chunk=4, guess=ift.guess_picker("sample", key=key))[0]

    a = sampled((1337, 5, 0))
    assert torch.equal(a, sampled((1337, 5, 0))) and (a[~mask] == IGNORE).all()
    for other in ((1338, 5, 0), (1337, 6, 0), (1337, 5, 1)):  # seed, step, micro-batch of the step
        assert not torch.equal(a, sampled(other))
    greedy = ift.infer_one_step_ahead(model, idx, targets, chunk=4)[0]
    assert not torch.equal(a, greedy)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_sample_draws_from_softmax_of_logits_over_temperature(temperature):
    z = torch.tensor([2.0, 1.0, 0.0, -1.0]).repeat(20000, 1)  # (N, 4): one draw per row
    pick = ift.guess_picker("sample", temperature=temperature, key=(0,))
    counts = torch.bincount(pick(z), minlength=4).double() / len(z)
    p = torch.tensor([math.exp(v / temperature) for v in (2.0, 1.0, 0.0, -1.0)], dtype=torch.float64)
    p /= p.sum()
    # 5 standard errors of a frequency over 20000 draws: a false alarm about once in 10^6 runs (the draws are
    # fixed by the seed anyway); the temperatures' distributions differ by far more
    assert ((counts - p).abs() <= 5 * (p * (1 - p) / len(z)).sqrt()).all(), (counts, p)
    # a token of probability 0 is never drawn
    never = pick(torch.tensor([0.0, -math.inf, 1.0, -math.inf]).repeat(1000, 1))
    assert set(never.tolist()) == {0, 2}


def test_ift_forward_with_other_modes_matches_the_outside_computation():
    """ift_forward(guess=topk k=2, propagation=logps/right/softmax) against guesses from full logits, the blend
    from the embedding matrix, full second-pass logits and the float64 loop."""
    model = tiny_model()
    idx, targets = tokens()
    mask = targets != IGNORE
    lam, gamma, variant = 0.5, 0.95, ("logps", "right", "softmax")
    with torch.no_grad():
        g = model(idx).topk(2, -1).indices[..., 1]
    xh = ift.guess_inputs(idx, targets, g)
    E = model.embed_tokens.weight
    logits = model(embed=lambda _: (1 - lam) * E[idx] + lam * E[xh]).double()
    nll = -logits.log_softmax(-1).gather(2, targets.clamp(min=0)[..., None])[..., 0] * mask  # (B, T) float64
    want = ref_loss(nll, mask, gamma, variant)
    got = ift.ift_forward(model, idx, targets, lam, gamma, chunk=4, guess=ift.guess_picker("topk", k=2),
                          propagation=variant)[0]
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, ift.ift_forward(model, idx, targets, lam, gamma, chunk=4)[0])


# ------------------------------------------------------------------------------------------------
# train.py flags

def test_flags_parse_and_bad_values_stop_in_one_line(capsys):
    cfg = train.parse_args(["--guess", "sample", "--guess_temperature", "1.5", "--propagation", "mask",
                            "--propagation_side", "right", "--propagation_norm", "softmax", "--guess_k", "3"])
    assert (cfg.guess, cfg.guess_temperature, cfg.guess_k) == ("sample", 1.5, 3)
    assert (cfg.propagation, cfg.propagation_side, cfg.propagation_norm) == ("mask", "right", "softmax")
    default = train.TrainConfig()
    assert (default.guess, default.propagation, default.propagation_side, default.propagation_norm) == (
        "greedy", "loss", "left", "L1")
    # a bad choice is refused by argparse's choices or by train.py's own check; either way one line that names
    # the flag and lists the allowed values
    for flags, allowed in [(["--guess", "nucleus"], "sample"), (["--propagation", "logp"], "logps"),
                           (["--propagation_side", "middle"], "right"), (["--propagation_norm", "L3"], "softmax")]:
        with pytest.raises(SystemExit):
            train.parse_args(flags)
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert re.search(rf"(argument {flags[0]}: invalid choice: '{flags[1]}'|{flags[0]} must be one of)", err) \
            and allowed in err, (flags, err)
    for flags, message in [(["--guess_k", "0"], "--guess_k must be >= 1"),
                           (["--guess_temperature", "0"], "--guess_temperature > 0")]:
        with pytest.raises(SystemExit):
            train.parse_args(flags)
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert message in err, (flags, err)


def write_rows(path, n, seed):
    g = torch.Generator().manual_seed(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = (int(v) for v in torch.randint(1, 50, (2,), generator=g))
            f.write(json.dumps({"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                                             {"role": "assistant", "content": f"{a} + {b} = {a + b}."}]}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def run_args(tiny_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("variants_data")
    data, held = write_rows(d / "train.jsonl", 16, 0), write_rows(d / "eval.jsonl", 4, 1)

    def make(out, *extra):
        return ["--init", tiny_dir, "--data", data, "--eval_data", held, "--out_dir", str(out), "--device", "cpu",
                "--batch_size", "2", "--grad_accum", "2", "--max_steps", "2", "--lr", "1e-3", "--optimizer",
                "adamw", "--eval_every", "0", "--sample_every", "0", "--seed", "0", *extra]
    return make


def weights(out):
    from safetensors.torch import load_file
    return load_file(str(out / "model.safetensors"))


OTHER_MODES = ["--guess", "sample", "--guess_temperature", "1.3", "--propagation", "logps",
               "--propagation_side", "right", "--propagation_norm", "softmax"]


def test_lam0_gamma0_with_other_modes_equals_sft(run_args, tmp_path):
    train.main(run_args(tmp_path / "sft", "--method", "sft"))
    train.main(run_args(tmp_path / "ift", "--method", "ift", "--lam", "0", "--gamma", "0", *OTHER_MODES))
    a, b = weights(tmp_path / "sft"), weights(tmp_path / "ift")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_other_modes_train_reach_ift_forward_and_resume_exactly(run_args, tmp_path, capsys, monkeypatch):
    seen = []
    forward = ift.ift_forward

    def recording(*a, guess=None, propagation=None, **kw):
        seen.append((guess, propagation))
        return forward(*a, guess=guess, propagation=propagation, **kw)

    monkeypatch.setattr(ift, "ift_forward", recording)
    train.main(run_args(tmp_path / "full", *OTHER_MODES, "--eval_every", "1"))
    assert len(seen) == 4 and all(p == ("logps", "right", "softmax") for _, p in seen)
    assert all(g.func is ift.sample_at_temperature and g.keywords["temperature"] == 1.3 for g, _ in seen)
    logs = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    losses = [float(line.split("loss ")[1].split(",")[0]) for line in logs if "loss " in line]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses), logs
    # a run cut after step 1 and resumed draws the same sampled guesses: the same final weights, bit for bit
    cut = run_args(tmp_path / "cut", *OTHER_MODES, "--stop_at", "1", "--save_every", "1")
    train.main(cut)
    train.main(cut + ["--resume"])
    a, b = weights(tmp_path / "full"), weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)
