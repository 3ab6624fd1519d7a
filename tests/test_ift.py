"""ift.py against a slow loop-by-loop float64 reading of the spec; its exact reductions; its memory."""
import copy
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import ift
from conftest import HostSyncs
from ift import IGNORE
from model import ModelConfig, Transformer


def tiny_model(vocab=50, dim=32, tie=False, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, dim=dim, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=48,
                      tie_word_embeddings=tie)
    return Transformer(cfg)


def random_batch(B=5, T=12, V=50, seed=0, empty_row=1):
    """idx, targets with random prompt lengths, answer lengths, padding, a multi-turn row with a hole in
    its mask, and one row (empty_row) with no answer token at all."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, V, (B, T), generator=g)
    targets = torch.full((B, T), IGNORE)
    for b in range(B):
        p = int(torch.randint(1, T // 2, (), generator=g))            # prompt positions
        a = int(torch.randint(1, T - p, (), generator=g))             # answer tokens, then padding
        targets[b, p - 1:p - 1 + a] = idx[b, p:p + a]                 # y[t] = x[t+1] on the answer
    targets[0, 2:4] = IGNORE if T > 8 else targets[0, 2:4]            # a hole: two learned turns
    if empty_row is not None:
        targets[empty_row] = IGNORE
    return idx, targets


# ------------------------------------------------------------------------------------------------
# the spec, one python loop at a time, in float64

def ref_losses(logits, targets, gamma):
    """(SFT, IFT) straight from docs/algorithm.md: loops over sequences and positions."""
    sft, ift_ = [], []
    for b in range(logits.shape[0]):
        pos = [t for t in range(logits.shape[1]) if targets[b, t] != IGNORE]
        n = len(pos)
        if n == 0:
            continue  # dropped, not divided by zero
        l = {t: torch.logsumexp(logits[b, t], 0) - logits[b, t, targets[b, t]] for t in pos}
        sft.append(sum(l[t] for t in pos) / n)
        if gamma == 0:
            w = {t: 1.0 for t in pos}  # the spec: gamma = 0 means no propagation, w = 1
        else:
            u = {t: l[t] / n for t in pos}
            G = {t: sum(gamma ** (i - t) * u[i] for i in pos if i >= t) for t in pos}
            S = sum(G[j] for j in pos)
            w = {t: G[t] * n / S for t in pos}
        ift_.append(sum(l[t] * w[t] for t in pos) / n)
    return sum(sft) / len(sft), sum(ift_) / len(ift_)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 0.95, 1.0])
def test_losses_match_loop_reference(gamma):
    V = 7
    idx, targets = random_batch(B=6, T=11, V=V, seed=int(gamma * 100))
    base = torch.randn(6, 11, V, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2
    ref = base.clone().requires_grad_()
    ref_sft, ref_ift = ref_losses(ref, targets, gamma)
    g_ref_sft, = torch.autograd.grad(ref_sft, ref, retain_graph=True)
    g_ref_ift, = torch.autograd.grad(ref_ift, ref)
    z = base.float().requires_grad_()
    sft, ift_ = ift.sft_loss(z, targets), ift.ift_loss(z, targets, gamma)
    g_sft, = torch.autograd.grad(sft, z, retain_graph=True)
    g_ift, = torch.autograd.grad(ift_, z)
    torch.testing.assert_close(sft.double(), ref_sft, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ift_.double(), ref_ift, rtol=1e-6, atol=1e-6)
    # gradients w.r.t. logits include the part through the (not detached) weights w
    torch.testing.assert_close(g_sft.double(), g_ref_sft, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g_ift.double(), g_ref_ift, rtol=1e-5, atol=1e-7)
    assert ift.n_empty(targets) == sum(bool((row == IGNORE).all()) for row in targets) >= 1
    if gamma > 0:  # propagation really re-weights (else this test could pass with w = 1 everywhere)
        assert not torch.allclose(ift_, sft)


def test_weights_average_one_and_are_not_detached():
    idx, targets = random_batch(B=4, T=10, seed=3)
    nll = torch.rand(4, 10, dtype=torch.float64, requires_grad=True)
    mask = targets != IGNORE
    w = ift.propagation_weights(nll, mask, 0.9)
    n = mask.sum(1)
    torch.testing.assert_close(w.sum(1)[n > 0], n[n > 0].double())
    assert (w[~mask] == 0).all() and w.grad_fn is not None
    # gamma = 1: G is a plain reverse cumsum of u
    w1 = ift.propagation_weights(nll, mask, 1.0)
    u = torch.where(mask, nll, 0) / n.clamp(min=1)[:, None]
    G = u.flip(1).cumsum(1).flip(1)
    expect = mask * G * n[:, None] / (mask * G).sum(1, keepdim=True).clamp(min=1e-30)
    torch.testing.assert_close(w1, expect)


def test_long_sequence_propagation_is_stable():
    """T = 3000: gamma^T underflows; the weights must still match a float64 reverse scan, with no inf/NaN."""
    T, gamma = 3000, 0.95
    g = torch.Generator().manual_seed(0)
    nll = torch.rand(2, T, generator=g) * 3
    mask = torch.zeros(2, T, dtype=torch.bool)
    mask[0, 100:] = True
    mask[1, 5:2500] = True
    w = ift.propagation_weights(nll, mask, gamma)
    assert torch.isfinite(w).all()
    u = torch.where(mask, nll.double(), 0) / mask.sum(1, keepdim=True)
    G, acc = torch.zeros_like(u), torch.zeros(2, dtype=torch.float64)
    for t in reversed(range(T)):  # G[t] = u[t] + gamma * G[t+1]
        acc = u[:, t] + gamma * acc
        G[:, t] = acc
    expect = mask * G * mask.sum(1, keepdim=True) / (mask * G).sum(1, keepdim=True)
    torch.testing.assert_close(w.double(), expect, rtol=1e-4, atol=1e-6)


def test_empty_sequences_and_empty_batch_give_no_nan():
    model = tiny_model()
    idx, targets = random_batch(B=3, T=10)
    loss, first, dropped = ift.ift_forward(model, idx, targets, 0.2, 0.95)
    loss.backward()
    assert dropped == 1 and torch.isfinite(loss) and torch.isfinite(first)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    model.zero_grad()
    empty = torch.full_like(targets, IGNORE)
    loss, first, dropped = ift.ift_forward(model, idx, empty, 0.2, 0.95)
    loss.backward()
    assert dropped == 3 and loss.item() == 0 and first.item() == 0
    assert all(p.grad is not None and (p.grad == 0).all() for p in model.parameters())
    z = torch.randn(3, 10, 50, requires_grad=True)
    for loss in (ift.sft_loss(z, empty), ift.ift_loss(z, empty, 0.95)):
        g, = torch.autograd.grad(loss, z)
        assert loss.item() == 0 and (g == 0).all()


# ------------------------------------------------------------------------------------------------
# hidden-state path (model's head= hook, chunked) == logits path

@pytest.mark.parametrize("gamma,chunk", [(0.0, 1), (0.95, 3), (1.0, 1000)])
def test_chunked_hidden_state_path_matches_logits_path(gamma, chunk):
    model = tiny_model()
    idx, targets = random_batch(B=4, T=12)
    mask = targets != IGNORE
    ref = ift.ift_loss(model(idx), targets, gamma)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    nll = model(idx, head=partial(ift.chunked_nll, targets=targets, chunk=chunk))
    out = ift.ift_reduce(nll, mask, gamma)
    grads = torch.autograd.grad(out, list(model.parameters()))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    sft = ift.sft_forward(model, idx, targets, chunk=chunk)
    torch.testing.assert_close(sft, ift.sft_loss(model(idx), targets))
    # the first pass: greedy guesses at answer positions and the detached SFT loss, chunked the same way
    g, first = ift.infer_one_step_ahead(model, idx, targets, chunk=chunk)
    with torch.no_grad():
        logits = model(idx)
    assert torch.equal(g[mask], logits.argmax(-1)[mask]) and (g[~mask] == IGNORE).all()
    torch.testing.assert_close(first, ift.token_nll(logits, targets))


def head_grads(nll_fn, h, W, targets, autocast=None):
    """A weighted sum of the per-token losses and its gradients w.r.t. h (B, T, dim) and W (V, dim)."""
    h, W = h.detach().requires_grad_(), W.detach().requires_grad_()
    head = torch.nn.Linear(W.size(1), W.size(0), bias=False)
    head.weight = torch.nn.Parameter(W)
    with autocast or torch.autocast("cpu", enabled=False):
        nll = nll_fn(h, head, targets)
    weights = torch.linspace(0.5, 2, nll.numel()).view(nll.shape)  # so each position's gradient differs
    (nll * weights).sum().backward()
    return nll.detach(), h.grad, head.weight.grad


@pytest.mark.parametrize("V,chunk", [(37, 1), (37, 4), (37, 1000), (40, 3), (5, 2)])
def test_chunked_head_matches_unchunked(V, chunk):
    """_ChunkedNLL's written-out backward (vocabulary slices that do not divide V, blocks of rows that do not
    divide the answer count) against autograd through the full logits: fp32, then bf16 autocast, where it must
    be no further from the float64 gradient of the same bf16-rounded inputs than autograd is."""
    g = torch.Generator().manual_seed(V + chunk)
    h, W = torch.randn(4, 30, 16, generator=g), torch.randn(V, 16, generator=g) * 0.5
    idx, targets = random_batch(B=4, T=30, V=V, seed=chunk)
    blocks = -(-int((targets != IGNORE).sum()) // (chunk * V // -(-V // ift.SLICES)))  # of rows, in backward
    assert blocks > 1 or chunk == 1000
    full = partial(lambda h, head, y: ift.token_nll(head(h), y))
    ours = partial(ift.chunked_nll, chunk=chunk)
    want, got = head_grads(full, h, W, targets), head_grads(ours, h, W, targets)
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # bf16 autocast: the float64 gradient of the logits the bf16 matmul sees is the yardstick
    exact = head_grads(full, h.bfloat16().double(), W.bfloat16().double(), targets)
    bf16 = torch.autocast("cpu", dtype=torch.bfloat16)
    want, got = head_grads(full, h, W, targets, bf16), head_grads(ours, h, W, targets, bf16)
    assert torch.equal(got[0], want[0])  # forward: the same bf16 matmul per row, the same float32 loss
    for a, b, e in zip(got[1:], want[1:], exact[1:]):
        assert a.dtype == torch.float32
        err, autograd_err = (a.double() - e).norm(), (b.double() - e).norm()
        assert err <= 1.5 * autograd_err + 1e-6 * e.norm() and err < 1e-2 * e.norm()


@pytest.mark.parametrize("method", ["sft", "ift"])
def test_loss_path_waits_for_no_gpu(method):
    """With the answer index built beside the batch (ift.answer_index on the CPU), a whole training step's loss,
    guesses and backward run no op that makes the CPU wait for a GPU; the loss and every gradient are bitwise
    those of the default call, which builds the index itself (and so does wait: the detector sees it)."""
    idx, targets = random_batch(B=4, T=12)
    answer = ift.answer_index(targets)
    assert torch.equal(answer, (targets != IGNORE).flatten().nonzero().squeeze(1))
    out = {}
    for given in (None, answer):
        model = tiny_model()
        with HostSyncs() as mode:
            if method == "sft":
                loss = ift.sft_forward(model, idx, targets, chunk=5, answer=given)
            else:
                loss, first, dropped = ift.ift_forward(model, idx, targets, 0.2, 0.95, chunk=5, answer=given)
            loss.backward()
        out[given is None] = (mode.seen, [loss] + [p.grad for p in model.parameters()])
    assert out[False][0] == [] and out[True][0]
    assert all(torch.equal(a, b) for a, b in zip(out[False][1], out[True][1]))


def test_chunked_head_empty_batch():
    h, W = torch.randn(2, 6, 8), torch.randn(11, 8)
    empty = torch.full((2, 6), IGNORE)
    for autocast in (None, torch.autocast("cpu", dtype=torch.bfloat16)):
        nll, gh, gw = head_grads(ift.chunked_nll, h, W, empty, autocast)
        assert nll.shape == (2, 6) and (nll == 0).all() and (gh == 0).all() and (gw == 0).all()


# ------------------------------------------------------------------------------------------------
# lam = 0, gamma = 0: IFT is SFT to the last bit

@pytest.mark.parametrize("tie", [False, True])
def test_ift_lam0_gamma0_step_is_bitwise_sft_step(tie):
    idx, targets = random_batch(B=4, T=12)
    grads, losses = [], []
    for method in ("sft", "ift"):
        model = tiny_model(tie=tie)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        if method == "sft":
            loss = ift.sft_forward(model, idx, targets, chunk=5)
        else:
            loss, first, _ = ift.ift_forward(model, idx, targets, lam=0.0, gamma=0.0, chunk=5)
            assert torch.equal(first, loss.detach())  # pass 1 is the same SFT forward, without grad
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        opt.step()
        losses.append(loss.detach())
        grads[-1] += [p.detach().clone() for p in model.parameters()]  # weights after the step
    assert torch.equal(losses[0], losses[1])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    # and the test can fail: any lam or gamma > 0 changes the step
    for lam, gamma in ((0.2, 0.0), (0.0, 0.95)):
        loss = ift.ift_forward(tiny_model(tie=tie), idx, targets, lam=lam, gamma=gamma, chunk=5)[0]
        assert not torch.equal(loss.detach(), losses[0])


# ------------------------------------------------------------------------------------------------
# temporal residual inputs

def test_guess_inputs_by_hand():
    # row 0: prompt 10 11 12, answer 13 14, padding 0 0 -> targets at positions 2, 3 (predicting 13, 14)
    # row 1: prompt 20, answer 21 22 23 24 25 26 (no padding); row 2: no answer at all
    idx = torch.tensor([[10, 11, 12, 13, 14, 0, 0],
                        [20, 21, 22, 23, 24, 25, 26],
                        [30, 31, 32, 33, 34, 35, 36]])
    I = IGNORE
    targets = torch.tensor([[I, I, 13, 14, I, I, I],
                            [21, 22, 23, 24, 25, 26, I],
                            [I, I, I, I, I, I, I]])
    guesses = torch.tensor([[90, 91, 92, 93, 94, 95, 96],
                            [80, 81, 82, 83, 84, 85, 86],
                            [70, 71, 72, 73, 74, 75, 76]])
    xh = ift.guess_inputs(idx, targets, guesses)
    # the first answer token (13) is replaced by the guess from the last prompt position (92)
    assert xh.tolist() == [[10, 11, 12, 92, 93, 0, 0],
                           [20, 80, 81, 82, 83, 84, 85],
                           [30, 31, 32, 33, 34, 35, 36]]
    # guesses at ignored positions are never read (the chunked pass leaves IGNORE there)
    masked = torch.where(targets != IGNORE, guesses, IGNORE)
    assert torch.equal(ift.guess_inputs(idx, targets, masked), xh)


@pytest.mark.parametrize("lam", [0.2, 0.7, 1.0])
def test_ift_forward_blends_true_and_guessed_embeddings(lam):
    """ift_forward at lam > 0 against the spec computed outside it: guesses from full logits, xh by the spec's
    rule in a loop, e = (1 - lam) E(x) + lam E(xh) from the embedding matrix, full logits, the float64 loop."""
    model = tiny_model()
    idx, targets = random_batch()
    with torch.no_grad():
        g = model(idx).argmax(-1)
    xh = idx.clone()
    for b in range(idx.shape[0]):
        for t in range(1, idx.shape[1]):
            if targets[b, t - 1] != IGNORE:  # x[t] is an answer token: the guess made at t - 1
                xh[b, t] = g[b, t - 1]
    assert not torch.equal(xh, idx)
    E = model.embed_tokens.weight
    e = (1 - lam) * E[idx] + lam * E[xh]
    want = ref_losses(model(embed=lambda _: e).double(), targets, 0.95)[1]
    got = ift.ift_forward(model, idx, targets, lam, 0.95)[0]
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# pass 1: no graph, no (B, T, V) tensor

class LargestTensor(TorchDispatchMode):
    """Records the largest floating-point tensor any op produces while active."""

    def __init__(self):
        super().__init__()
        self.max_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.max_bytes = max(self.max_bytes, t.numel() * t.element_size())
        return out


def test_first_pass_builds_no_graph():
    model = tiny_model()
    idx, targets = random_batch(B=3, T=10)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        g, first = ift.infer_one_step_ahead(model, idx, targets)
        assert saved == []
        assert not g.requires_grad and g.grad_fn is None and first.grad_fn is None
        ift.sft_forward(model, idx, targets)  # the hook does see a pass with grad
    assert saved


def test_no_vocab_sized_float_tensor():
    V, B, T, chunk = 100_000, 4, 64, 16
    model = tiny_model(vocab=V, dim=8)
    idx, targets = random_batch(B=B, T=T, V=V, empty_row=None)
    full = B * T * V * 4  # bytes of the float32 logits that must never exist
    assert (targets != IGNORE).sum() > 4 * chunk  # several chunks
    with LargestTensor() as mode:
        ift.infer_one_step_ahead(model, idx, targets, chunk=chunk)
    assert mode.max_bytes <= chunk * V * 4 < full / 8
    # pass 2 and its backward: one (chunk, V) block at a time too, and nothing vocab-sized saved per position
    saved = []
    with LargestTensor() as mode, torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t):
        loss, _, _ = ift.ift_forward(model, idx, targets, 0.2, 0.95, chunk=chunk)
        loss.backward()
    assert mode.max_bytes <= chunk * V * 4 and sum(saved) < full / 8
    # sanity: the plain logits path does make it
    with LargestTensor() as mode, torch.no_grad():
        model(idx)
    assert mode.max_bytes >= full


# ------------------------------------------------------------------------------------------------
# lambda schedule

def test_lambda_schedule():
    assert ift.lam_at(0, 0.2) == ift.lam_at(999, 0.2) == 0.2
    lin = partial(ift.lam_at, lam=0.3, schedule="linear", lam_min=0.1, warmup=10)
    assert lin(0) == pytest.approx(0.1) and lin(5) == pytest.approx(0.2)
    assert lin(10) == lin(500) == 0.3
    noisy = [ift.lam_at(s, 0.2, sigma=0.5, seed=7) for s in range(500)]
    assert noisy == [ift.lam_at(s, 0.2, sigma=0.5, seed=7) for s in range(500)]  # reproducible
    torch.manual_seed(123)  # and independent of the global RNG
    assert noisy[17] == ift.lam_at(17, 0.2, sigma=0.5, seed=7)
    assert noisy != [ift.lam_at(s, 0.2, sigma=0.5, seed=8) for s in range(500)]
    assert all(0 <= x <= 1 for x in noisy) and len(set(noisy)) > 400
    mean = sum(noisy) / len(noisy)
    std = (sum((x - mean) ** 2 for x in noisy) / len(noisy)) ** 0.5
    assert abs(mean - 0.2) < 0.02 and abs(std - 0.1) < 0.02  # lam * sigma = 0.1
    big = [ift.lam_at(s, 0.9, sigma=0.5) for s in range(200)]
    assert max(big) == 1.0 and min(big) >= 0  # clamped


def ift_step_grads(model, idx, targets, autocast=None):
    """IFT loss and the gradient of every parameter, flattened into one vector."""
    model.zero_grad(set_to_none=True)
    with autocast or torch.autocast("cpu", enabled=False):
        loss = ift.ift_forward(model, idx, targets, 0.2, 0.95)[0]
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])


def test_compiled_blocks_and_bf16_autocast_give_the_eager_fp32_step():
    """train.py's --compile (each block compiled, heads eager) and --dtype bf16 (autocast) on the CPU path."""
    model = tiny_model(vocab=64, dim=64)
    idx, targets = random_batch(B=4, T=16, V=64)
    loss, grad = ift_step_grads(model, idx, targets)
    half_loss, half_grad = ift_step_grads(model, idx, targets, torch.autocast("cpu", dtype=torch.bfloat16))
    assert abs(half_loss - loss) < 2e-2 * loss
    assert F.cosine_similarity(half_grad, grad, dim=0) > 0.99
    compiled = copy.deepcopy(model)
    compiled.compile_blocks()
    for T in (16, 13):  # a second sequence length: recompiled as dynamic, still the same numbers
        want = ift_step_grads(model, idx[:, :T], targets[:, :T])
        got = ift_step_grads(compiled, idx[:, :T], targets[:, :T])
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-6)
