"""baselines.py against slow float64 loops written from each paper's formula: DPO, TDPO, ORPO, SimPO, through the
chunked heads, with answers of different lengths and an empty one."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import baselines
import ift
from conftest import HostSyncs
from ift import IGNORE

V, DIM = 7, 4


class Heads(nn.Module):
    """A stand-in for model.Transformer: fixed final hidden states h (2B, T, dim) and an output projection, both
    trainable; forward(idx, head=...) applies the head as the real model does."""

    def __init__(self, h, weight):
        super().__init__()
        self.h = nn.Parameter(h)
        self.lm_head = nn.Linear(DIM, V, bias=False, dtype=h.dtype)
        self.lm_head.weight = nn.Parameter(weight)

    def forward(self, idx, *, head, packing=None):
        return head(self.h, self.lm_head)


def pair_batch(B=3, T=7, seed=0, empty=(1,)):
    """targets (2B, T), chosen rows then rejected rows: random prompt and answer lengths (so padding differs),
    and no answer token at all in the rows listed in empty."""
    g = torch.Generator().manual_seed(seed)
    targets = torch.full((2 * B, T), IGNORE)
    for b in range(2 * B):
        p = int(torch.randint(1, 3, (), generator=g))      # prompt positions
        a = int(torch.randint(1, T - p + 1, (), generator=g))  # answer tokens, then padding
        targets[b, p - 1:p - 1 + a] = torch.randint(0, V, (a,), generator=g)
    for b in empty:
        targets[b] = IGNORE
    return targets


def models(targets, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (targets.shape[0], targets.shape[1], DIM)
    policy = Heads(torch.randn(shape, generator=g, dtype=torch.float64),
                   torch.randn(V, DIM, generator=g, dtype=torch.float64))
    ref = Heads(torch.randn(shape, generator=g, dtype=torch.float64),
                torch.randn(V, DIM, generator=g, dtype=torch.float64)).requires_grad_(False)
    return policy, ref


# ------------------------------------------------------------------------------------------------
# the formulas, one python loop at a time, in float64

def slow_sequences(policy, ref, targets):
    """Per sequence, loop by loop over answer tokens and the vocabulary: (summed answer log-prob under the
    policy, the same under the reference, answer tokens n, SeqKL = sum_t KL(pi_ref(.|t) || pi(.|t)))."""
    out = []
    for b in range(targets.shape[0]):
        lp, ref_lp, n, kl = 0.0, 0.0, 0, 0.0
        for t in range(targets.shape[1]):
            y = int(targets[b, t])
            if y == IGNORE:
                continue
            z = policy.lm_head.weight @ policy.h[b, t]  # (V,) logits
            zr = ref.lm_head.weight @ ref.h[b, t]
            lse = torch.log(sum(torch.exp(z[v]) for v in range(V)))
            lse_r = torch.log(sum(torch.exp(zr[v]) for v in range(V)))
            lp = lp + z[y] - lse
            ref_lp = ref_lp + zr[y] - lse_r
            kl = kl + sum(torch.exp(zr[v] - lse_r) * ((zr[v] - lse_r) - (z[v] - lse)) for v in range(V))
            n += 1
        out.append((lp, ref_lp, n, kl))
    return out


def log_sigmoid(x):
    return -torch.log(1 + torch.exp(-x))


def slow_loss(method, policy, ref, targets, beta, alpha=0.5, gamma=1.6):
    seqs = slow_sequences(policy, ref, targets)
    B = len(seqs) // 2
    losses = []
    for (lc, refc, nc, klc), (lr, refr, nr, klr) in zip(seqs[:B], seqs[B:]):
        if nc == 0 or nr == 0:
            continue  # a pair with an empty side is dropped from the mean
        if method == "dpo":
            losses.append(-log_sigmoid(beta * ((lc - refc) - (lr - refr))))
        elif method == "tdpo":  # TDPO2: the chosen answer's SeqKL under a stop-gradient
            u = beta * ((lc - refc) - (lr - refr))
            delta = beta * klr - (beta * klc).detach()
            losses.append(-log_sigmoid(u - alpha * delta))
        elif method == "orpo":
            ac, ar = lc / nc, lr / nr
            log_odds = (ac - ar) - (torch.log(1 - torch.exp(ac)) - torch.log(1 - torch.exp(ar)))
            losses.append(-ac - beta * log_sigmoid(log_odds))
        elif method == "simpo":
            losses.append(-log_sigmoid(beta / nc * lc - beta / nr * lr - gamma))
    return sum(losses) / len(losses)


def grads(loss, model):
    loss.backward()
    out = [p.grad.clone() for p in (model.h, model.lm_head.weight)]
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("method", baselines.PAIR_METHODS)
def test_pair_losses_and_gradients_equal_the_formula_loops(method):
    """Values and gradients of pair_forward (chunked heads, a chunk of 2 rows) against the float64 loops, on
    answers of different lengths with one pair whose chosen answer is empty. The heads compute in float32."""
    targets = pair_batch()
    policy, ref = models(targets)
    beta = baselines.PAPER_BETA[method]
    loss, stats = baselines.pair_forward(policy, ref, torch.zeros_like(targets), targets, method, chunk=2)
    slow = slow_loss(method, policy, ref, targets, beta)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(slow.item(), rel=1e-5)
    for got, want in zip(grads(loss, policy), grads(slow, policy)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert stats[2].item() == 2  # 3 pairs, one dropped


@pytest.mark.parametrize("method", baselines.PAIR_METHODS)
def test_pair_path_waits_for_no_gpu(method):
    """With the answer index built beside the batch (train.py builds it on the CPU), the loss of every pair
    method, its reference pass and its backward run no op that makes the CPU wait for a GPU; loss, stats and
    gradients are bitwise those of the default call, which builds the index itself (the detector sees that)."""
    targets = pair_batch()
    out = {}
    for given in (None, ift.answer_index(targets)):
        policy, ref = models(targets)
        with HostSyncs() as mode:
            loss, stats = baselines.pair_forward(policy, ref, torch.zeros_like(targets), targets, method, chunk=2,
                                                 answer=given)
            loss.backward()
        out[given is None] = mode.seen, [loss, stats, policy.h.grad, policy.lm_head.weight.grad]
    assert out[False][0] == [] and out[True][0]
    assert all(torch.equal(a, b) for a, b in zip(out[False][1], out[True][1]))


@pytest.mark.parametrize("method", baselines.PAIR_METHODS)
def test_batch_of_only_empty_pairs_gives_zero_loss_and_zero_gradients(method):
    targets = pair_batch(B=2, empty=(0, 3))  # each pair has one empty side
    policy, ref = models(targets)
    loss, stats = baselines.pair_forward(policy, ref, torch.zeros_like(targets), targets, method, chunk=2)
    g = grads(loss, policy)
    assert loss.item() == 0 and all(torch.equal(x, torch.zeros_like(x)) for x in g) and stats.tolist() == [0, 0, 0]


@pytest.mark.parametrize("method", baselines.PAIR_METHODS)
def test_bf16_autocast_gives_the_float32_loss_and_gradients(method):
    """train.py's --dtype bf16 (autocast; on CUDA the reference is bf16 too): the heads keep float32 outputs."""
    targets = pair_batch(B=4, T=12, empty=())
    policy, ref = models(targets)
    policy, ref = policy.float(), ref.float()
    idx = torch.zeros_like(targets)
    loss, _ = baselines.pair_forward(policy, ref, idx, targets, method, chunk=5)
    full = torch.cat([g.flatten() for g in grads(loss, policy)])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half_loss, stats = baselines.pair_forward(policy, ref.bfloat16(), idx, targets, method, chunk=5)
    half = torch.cat([g.flatten() for g in grads(half_loss, policy)])
    assert half_loss.dtype == stats.dtype == torch.float32
    assert abs(half_loss.item() - loss.item()) < 2e-2 * abs(loss.item())
    assert F.cosine_similarity(half, full, dim=0) > 0.99


def test_tdpo_with_alpha_0_is_dpo():
    targets = pair_batch(empty=())
    policy, ref = models(targets)
    idx = torch.zeros_like(targets)
    dpo, _ = baselines.pair_forward(policy, ref, idx, targets, "dpo")
    tdpo, _ = baselines.pair_forward(policy, ref, idx, targets, "tdpo", alpha=0.0)
    assert tdpo.item() == pytest.approx(dpo.item(), rel=1e-6)
    tdpo, _ = baselines.pair_forward(policy, ref, idx, targets, "tdpo")  # and alpha 0.5 is not
    assert abs(tdpo.item() - dpo.item()) > 1e-4


def test_a_policy_equal_to_its_reference_has_zero_margin_and_kl():
    targets = pair_batch(empty=())
    policy, _ = models(targets)
    ref = Heads(policy.h.detach().clone(), policy.lm_head.weight.detach().clone()).requires_grad_(False)
    loss, stats = baselines.pair_forward(policy, ref, torch.zeros_like(targets), targets, "tdpo")
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6) and abs(stats[0].item()) < 1e-5


# ------------------------------------------------------------------------------------------------
# the loss functions alone, on per-sequence statistics

def test_dpo_orpo_simpo_on_sequence_statistics_against_math():
    g = torch.Generator().manual_seed(0)
    lc, lr, refc, refr = (-torch.rand(5, generator=g, dtype=torch.float64) * 20 for _ in range(4))
    beta = 0.1
    expect = sum(-math.log(1 / (1 + math.exp(-beta * ((a - c) - (b - d)))))
                 for a, b, c, d in zip(lc.tolist(), lr.tolist(), refc.tolist(), refr.tolist())) / 5
    assert baselines.dpo_loss(lc, lr, refc, refr, beta)[0].item() == pytest.approx(expect, rel=1e-12)
    # ORPO near both ends of log(1 - exp(a)): averages of -1e-7 and -40
    ac = torch.tensor([-0.05, -0.7, -2.0, -1e-7, -40.0], dtype=torch.float64, requires_grad=True)
    ar = torch.tensor([-0.9, -0.6, -3.0, -0.5, -1e-6], dtype=torch.float64)
    expect = 0.0
    for a, r in zip(ac.tolist(), ar.tolist()):
        odds = (a - r) - (math.log(-math.expm1(a)) - math.log(-math.expm1(r)))
        expect += (-a - 0.25 * math.log(1 / (1 + math.exp(-odds)))) / 5
    loss, _ = baselines.orpo_loss(ac, ar, 0.25)
    assert loss.item() == pytest.approx(expect, rel=1e-10)
    loss.backward()
    assert torch.isfinite(ac.grad).all()
    expect = sum(-math.log(1 / (1 + math.exp(-(2.0 * a - 2.0 * r - 1.6)))) for a, r in zip(ac.tolist(), ar.tolist()))
    assert baselines.simpo_loss(ac, ar, 2.0, 1.6)[0].item() == pytest.approx(expect / 5, rel=1e-12)


@pytest.mark.parametrize("method", baselines.PAIR_METHODS)
def test_dropped_pairs_leave_no_trace_in_value_or_gradient(method):
    """An empty side has summed log-prob 0 and average 0 (where ORPO's log(1 - exp(0)) is -inf): with keep, the
    pair is left out of the mean, and its inputs get zero gradient, not NaN."""
    g = torch.Generator().manual_seed(1)
    lc, lr, refc, refr, klc, klr = (-torch.rand(4, generator=g, dtype=torch.float64) * 5 for _ in range(6))
    lc[1] = lr[2] = lr[3] = 0.0  # pairs 1, 2, 3 have an empty side (pair 3: both sides)
    lc[3] = 0.0
    keep = torch.tensor([True, False, False, False])
    lc.requires_grad_(True)
    lr.requires_grad_(True)
    call = {"dpo": lambda c, r, k: baselines.dpo_loss(c, r, refc[:len(c)], refr[:len(c)], 0.1, k),
            "tdpo": lambda c, r, k: baselines.tdpo_loss(c, r, refc[:len(c)], refr[:len(c)], klc[:len(c)],
                                                        klr[:len(c)], 0.1, 0.5, k),
            "orpo": lambda c, r, k: baselines.orpo_loss(c, r, 0.25, k),
            "simpo": lambda c, r, k: baselines.simpo_loss(c, r, 2.0, 1.6, k)}[method]
    loss, _ = call(lc, lr, keep)
    assert loss.item() == pytest.approx(call(lc[:1], lr[:1], None)[0].item(), rel=1e-12)
    loss.backward()
    for grad in (lc.grad, lr.grad):
        assert torch.isfinite(grad).all() and (grad[1:] == 0).all() and grad[0] != 0


def test_answer_logps_sum_and_count_answer_tokens():
    targets = pair_batch(B=2, T=8, empty=(2,))
    z = torch.randn(4, 8, V, dtype=torch.float64)
    total, n = baselines.answer_logps(z, targets)
    for b in range(4):
        lp = [F.log_softmax(z[b, t], 0)[targets[b, t]].item() for t in range(8) if targets[b, t] != IGNORE]
        assert total[b].item() == pytest.approx(sum(lp), rel=1e-6, abs=1e-12) and n[b] == len(lp)


def test_bench_reports_the_step_memory_of_every_method(capsys):
    import re

    import bench
    methods = ["ift", *baselines.PAIR_METHODS]
    out = bench.main(["--init", "tiny", "--device", "cpu", "--batch_size", "2", "--seq_len", "24",
                      "--methods", *methods])
    printed = capsys.readouterr().out
    weights = sum(p.numel() * 4 for p in bench.Transformer(bench.TINY).parameters())  # float32 on CPU
    for m in ["sft", "sft 2B rows", *methods]:
        rows = 2 if m in ("sft", "ift") else 4
        assert re.search(rf"^method memory {m}: {rows} rows, step peak \d+\.\d MB \(\d+\.\d\dx sft\), reference "
                         r"weights \d+\.\d MB, together", printed, re.M), printed
        assert out[m][1] == (weights if m in baselines.REFERENCE_METHODS else 0)
        if rows == 4:  # twice the rows of sft's batch: more activations
            assert out[m][0] > out["sft"][0]
