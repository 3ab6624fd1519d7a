"""
The preference baselines of the paper's comparisons (Hua et al. 2025, Table 2 and App. B.1), one function per
formula, on the model, data order and loop train.py gives SFT and IFT (`--method dpo|tdpo|orpo|simpo`).

    DPO   Rafailov et al., "Direct Preference Optimization: Your Language Model is Secretly a Reward Model",
          NeurIPS 2023, arXiv 2305.18290, Eq. 7.
    TDPO  Zeng et al., "Token-level Direct Preference Optimization", ICML 2024, arXiv 2404.11999: the TDPO2
          objective (the sequential KL of the rejected answer against a stop-gradient one of the chosen).
    ORPO  Hong et al., "ORPO: Monolithic Preference Optimization without Reference Model", EMNLP 2024,
          arXiv 2403.07691, Eq. 6-7 (odds of the length-normalized likelihood).
    SimPO Meng et al., "SimPO: Simple Preference Optimization with a Reference-Free Reward", NeurIPS 2024,
          arXiv 2405.14734, Eq. 6.

A micro-batch of B pairs is 2B sequences, the B chosen rows then the B rejected rows (right-padded by
data.collate), through one policy forward. The losses read per-sequence statistics of the answer tokens only:
summed log-probs l (B,), answer-token counts n (B,) and, for TDPO, the summed token-level KL. They come from
chunked heads on the final hidden states (model.Transformer.forward's head= hook): only answer positions reach
the output projection, a chunk at a time, so no (2B, T, V) tensor is made, with or without a reference model.

Empty answers (no answer token left, e.g. truncated away): a pair with an empty side is dropped from the mean,
as ift.sft_reduce drops empty sequences; a batch of only such pairs gives a zero loss with zero gradients.
"""
import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

import ift
from ift import CHUNK, IGNORE

PAIR_METHODS = ("dpo", "tdpo", "orpo", "simpo")
REFERENCE_METHODS = ("dpo", "tdpo")  # the two that need a frozen reference model (the initial weights)
# the IFT paper's settings (App. B.1): beta per method; SimPO's margin gamma = 0.8 * beta; TDPO's alpha 0.5
PAPER_BETA = {"dpo": 0.1, "tdpo": 0.1, "orpo": 0.25, "simpo": 2.0}
PAPER_SIMPO_GAMMA_RATIO = 0.8
PAPER_TDPO_ALPHA = 0.5


# -------------------------------------------------------------------------------------------------
# per-sequence answer statistics

def answer_logps(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, T, V), targets (B, T) -> summed answer log-probs l (B,) float32 and answer-token counts n (B,)."""
    return sequence_logps(ift.token_nll(logits, targets), targets)


def sequence_logps(nll: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL (B, T), 0 where ignored -> summed log-probs l (B,) and answer-token counts n (B,)."""
    return -nll.sum(1), (targets != IGNORE).sum(1)


def nonempty_pairs(n: torch.Tensor) -> torch.Tensor:
    """n (2B,) answer tokens of the chosen rows then the rejected rows -> keep (B,): both sides have one."""
    B = n.size(0) // 2
    return (n[:B] > 0) & (n[B:] > 0)


def _pair_mean(per_pair: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    # mean over the kept pairs; torch.where (not a product) so a dropped pair's value never reaches the sum
    if keep is None:
        return per_pair.mean()
    return torch.where(keep, per_pair, 0).sum() / keep.sum().clamp(min=1)


# -------------------------------------------------------------------------------------------------
# the four objectives: each returns (loss, margin), margin (B,) detached: the argument of the pair's
# log-sigmoid before any constant, > 0 when the chosen answer wins (logged as the reward margin / accuracy)

def dpo_loss(lc: torch.Tensor, lr: torch.Tensor, refc: torch.Tensor, refr: torch.Tensor, beta: float = 0.1,
             keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO (Rafailov et al. 2023, Eq. 7) on summed answer log-probs (B,) of the chosen / rejected answers under
    the policy (lc, lr) and the frozen reference (refc, refr):
        u = beta * ((lc - refc) - (lr - refr)),  loss = -log sigmoid(u), mean over the kept pairs."""
    u = beta * ((lc - refc) - (lr - refr))  # the implicit reward of the chosen answer minus the rejected one's
    return _pair_mean(-F.logsigmoid(u), keep), u.detach()


def tdpo_loss(lc: torch.Tensor, lr: torch.Tensor, refc: torch.Tensor, refr: torch.Tensor, klc: torch.Tensor,
              klr: torch.Tensor, beta: float = 0.1, alpha: float = 0.5,
              keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """TDPO2 (Zeng et al. 2024) on DPO's inputs plus the sequential KL of each answer,
    klc, klr (B,) = SeqKL(y) = sum over answer tokens of KL(pi_ref(.|x, y<t) || pi(.|x, y<t)):
        u = beta * ((lc - refc) - (lr - refr))                     (DPO's margin)
        delta = beta * SeqKL(yr) - stopgrad(beta * SeqKL(yc))
        loss = -log sigmoid(u - alpha * delta), mean over the kept pairs.
    Our choice: TDPO2 with alpha 0.5 (the IFT paper's TDPO setting, App. B.1), not TDPO1, whose delta has no
    stop-gradient and no alpha. The KL runs from the reference to the policy, as in SeqKL's definition."""
    u = beta * ((lc - refc) - (lr - refr))
    delta = beta * klr - (beta * klc).detach()
    return _pair_mean(-F.logsigmoid(u - alpha * delta), keep), u.detach()


def log1mexp(a: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(a)) for a < 0, accurate at both ends (Maechler 2012): expm1 near 0, log1p far.
    Each branch only sees inputs where it is finite: the branch torch.where drops gets no NaN gradient."""
    near = a > -math.log(2)
    far = torch.log1p(-torch.exp(a.clamp(max=-math.log(2))))
    return torch.where(near, torch.log(-torch.expm1(a)), far)


def orpo_loss(ac: torch.Tensor, ar: torch.Tensor, beta: float = 0.25,
              keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ORPO (Hong et al. 2024, Eq. 6-7) on per-token average answer log-probs ac, ar (B,):
        log_odds = (ac - ar) - (log(1 - exp(ac)) - log(1 - exp(ar)))
        loss = -ac - beta * log sigmoid(log_odds), mean over the kept pairs.
    -ac is the SFT loss of the chosen answer (the per-token average NLL, as ift.sft_reduce)."""
    if keep is not None:  # an empty side has average 0 and log(1 - exp(0)) = -inf: give dropped pairs a finite
        ac, ar = torch.where(keep, ac, -1.0), torch.where(keep, ar, -1.0)  # stand-in, so no NaN reaches backward
    log_odds = (ac - ar) - (log1mexp(ac) - log1mexp(ar))
    return _pair_mean(-ac - beta * F.logsigmoid(log_odds), keep), log_odds.detach()


def simpo_loss(ac: torch.Tensor, ar: torch.Tensor, beta: float = 2.0, gamma: float = 1.6,
               keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SimPO (Meng et al. 2024, Eq. 6) on per-token average answer log-probs ac = lc / |yc|, ar = lr / |yr|:
        loss = -log sigmoid(beta * ac - beta * ar - gamma), mean over the kept pairs (no reference model).
    The logged margin leaves gamma out: beta * (ac - ar), the difference of SimPO's rewards."""
    margin = beta * ac - beta * ar
    return _pair_mean(-F.logsigmoid(margin - gamma), keep), margin.detach()


# -------------------------------------------------------------------------------------------------
# chunked heads: TDPO's token-level KL needs the reference's whole distribution at each answer position.
# The reference runs without gradient up to its final hidden states at answer positions (N, dim); the
# policy's head then projects both, a chunk at a time, and keeps no (N, V) block for backward

def answer_hidden(h: torch.Tensor, lm_head: nn.Module, answer: torch.Tensor) -> torch.Tensor:
    """A head that returns the final hidden states at the answer positions answer = ift.answer_index(targets),
    (N, dim), in row-major order."""
    return h.flatten(0, 1)[answer]


def _lse(z: torch.Tensor, rows: int = 32) -> torch.Tensor:
    """Log-sum-exp of each row of z (c, V), a few rows at a time: logsumexp's own temporary stays (rows, V)."""
    return torch.cat([part.logsumexp(-1) for part in z.split(rows)]) if len(z) else z.new_zeros(0)


def _nll_kl_chunk(hc, weight, yc, ref_hc, ref_weight):
    """One chunk of _ChunkedNLLKL's forward -> (nll, kl, ref nll, log-sum-exp of the policy's and of the
    reference's logits) (c,) each, and the two matmuls' dtypes. Its two (c, V) blocks die when it returns."""
    z, zr = F.linear(hc, weight), F.linear(ref_hc, ref_weight)  # (c, V) each, in the autocast dtype if any
    logp, logq = z.float(), zr.float()  # no copy when they are float32 already
    lse, ref_lse = _lse(logp), _lse(logq)
    logp.sub_(lse[:, None])
    logq.sub_(ref_lse[:, None])
    rows = torch.arange(len(yc), device=z.device)
    nll, ref_nll = -logp[rows, yc], -logq[rows, yc]
    diff = logp.neg_().add_(logq)  # log q - log p, in place of log p
    kl = logq.exp_().mul_(diff).sum(-1)  # sum_v q_v (log q_v - log p_v), in place of log q
    return (nll, kl, ref_nll, lse, ref_lse), (z.dtype, zr.dtype)


def _logits_grad(hc, w, yc, ref_hc, wr, lse, ref_lse, a, b):
    """d (a * nll + b * kl) / d z for one chunk of _ChunkedNLLKL's backward: (a + b) p - a onehot(y) - b q,
    (c, V) float32, with p and q recomputed and normalized in place by forward's log-sum-exps."""
    p = F.linear(hc, w).float().sub_(lse[:, None]).exp_()  # (c, V) the policy's softmax
    q = F.linear(ref_hc, wr).float().sub_(ref_lse[:, None]).exp_()  # the reference's
    dz = p.mul_(a + b).sub_(q.mul_(b))  # in place of p
    dz[torch.arange(len(yc), device=dz.device), yc] -= a[:, 0]
    return dz


class _ChunkedNLLKL(torch.autograd.Function):
    """Per answer position i, with p = softmax(hs[i] @ W.T) the policy's and q = softmax(ref_hs[i] @ W_ref.T)
    the reference's distribution: l[i] = -log p(ys[i]), kl[i] = KL(q || p) = sum_v q_v (log q_v - log p_v), and
    the reference's -log q(ys[i]) (no gradient), a chunk of rows at a time. Backward writes the gradient out,
    as ift._ChunkedNLL does: d l / d z = p - onehot(y), d kl / d z = p - q (q sums to 1), so with upstream
    gradients a, b: d z = (a + b) p - a onehot(y) - b q. It recomputes both chunks of logits and normalizes them
    in place with the log-sum-exps forward saved: forward and backward each hold two (chunk, V) float32 blocks
    and, besides, one W-sized gradient (checkpointed autograd chunks held twice the blocks). Under autocast the
    matmuls run in the autocast dtype, as autograd's would."""

    @staticmethod
    def forward(ctx, hs, weight, ys, ref_hs, ref_weight, chunk):
        parts, ctx.dtypes = [], (weight.dtype, ref_weight.dtype)
        for hc, yc, rc in zip(hs.split(chunk), ys.split(chunk), ref_hs.split(chunk)):
            out, ctx.dtypes = _nll_kl_chunk(hc, weight, yc, rc, ref_weight)
            parts.append(out)
        empty = hs.new_zeros(0, dtype=torch.float32)
        nll, kl, ref_nll, lse, ref_lse = (torch.cat(column) for column in zip(*parts)) if parts else [empty] * 5
        ctx.save_for_backward(hs, weight, ys, ref_hs, ref_weight, lse, ref_lse)
        ctx.chunk = chunk
        ctx.mark_non_differentiable(ref_nll)
        return nll, kl, ref_nll

    @staticmethod
    def backward(ctx, grad_nll, grad_kl, _grad_ref_nll):
        hs, weight, ys, ref_hs, ref_weight, lse, ref_lse = ctx.saved_tensors
        dtype, ref_dtype = ctx.dtypes
        w, wr = weight.to(dtype), ref_weight.to(ref_dtype)
        grad_h = torch.empty_like(hs) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        for i in range(0, hs.size(0), ctx.chunk):
            part = slice(i, i + ctx.chunk)
            hc = hs[part].to(dtype)
            dz = _logits_grad(hc, w, ys[part], ref_hs[part].to(ref_dtype), wr, lse[part], ref_lse[part],
                              grad_nll[part, None], grad_kl[part, None]).to(dtype)
            if grad_h is not None:
                grad_h[part] = dz @ w
            if grad_w is not None:
                grad_w.addmm_(dz.t(), hc) if dz.dtype == grad_w.dtype else grad_w.add_(dz.t() @ hc)
            del dz  # before the next chunk's blocks
        return grad_h, grad_w, None, None, None, None


def chunked_nll_kl(h: torch.Tensor, lm_head: nn.Linear, targets: torch.Tensor, ref_h: torch.Tensor,
                   ref_weight: torch.Tensor, answer: torch.Tensor, chunk: int = CHUNK,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """h (B, T, dim) the policy's final hidden states, ref_h (N, dim) the reference's at the N answer positions
    answer = ift.answer_index(targets) (answer_hidden's order), ref_weight (V, dim) the reference's output
    projection -> per-token NLL under the policy, KL(pi_ref || pi) and NLL under the reference (no gradient),
    each (B, T) float32, 0 where ignored."""
    hs, ys = h.flatten(0, 1)[answer], targets.flatten()[answer]  # (N, dim), (N,)
    nll, kl, ref_nll = _ChunkedNLLKL.apply(hs, lm_head.weight, ys, ref_h, ref_weight, chunk)
    return tuple(ift.place_answers(t, answer, targets) for t in (nll, kl, ref_nll))


def full_weight(w: torch.Tensor) -> torch.Tensor:
    """A parameter as one whole tensor: under FSDP2 the reference's output projection is a sharded DTensor
    outside its forward; gather it (every rank calls this) for the policy's head. Else the parameter itself.
    The reference never changes, so train.py gathers it once per run and passes it to pair_forward."""
    return w.full_tensor() if hasattr(w, "full_tensor") else w


# -------------------------------------------------------------------------------------------------
# one micro-batch of pairs

def pair_forward(model: nn.Module, ref: nn.Module | None, idx: torch.Tensor, targets: torch.Tensor, method: str,
                 beta: float = 0.0, alpha: float = PAPER_TDPO_ALPHA, gamma_ratio: float = PAPER_SIMPO_GAMMA_RATIO,
                 chunk: int = CHUNK, answer: torch.Tensor | None = None, ref_weight: torch.Tensor | None = None,
                 packing=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss of `method` on idx, targets (2B, T), the B chosen rows then the B rejected rows, with one
    policy forward (and, for DPO / TDPO, one forward of the frozen reference `ref` without gradient).
    beta 0 means the method's paper default. -> (loss, stats), stats = [sum of the kept pairs' margins,
    kept pairs the chosen answer wins (margin > 0), kept pairs] (3,) float32, for the log.
    answer = ift.answer_index(targets), built on the CPU, keeps the step free of waits for a GPU. ref_weight:
    TDPO's reference output projection as one tensor, full_weight(ref.lm_head.weight) (computed here if None).
    packing: idx, targets (1, L) are the 2B rows laid end to end (packing.py), chosen and rejected each its own
    example; the per-token statistics go back to the padded (2B, T) batch before they are paired."""
    beta = beta or PAPER_BETA[method]
    answer = ift.answer_index(targets) if answer is None else answer
    if method == "tdpo":  # one reference pass to its hidden states; the policy's head projects both
        with torch.no_grad():
            ref_h = ref(idx, head=partial(answer_hidden, answer=answer), packing=packing)  # (N, dim)
            ref_weight = full_weight(ref.lm_head.weight) if ref_weight is None else ref_weight
        nll, kl, ref_nll = model(idx, head=partial(chunked_nll_kl, targets=targets, ref_h=ref_h,
                                                   ref_weight=ref_weight, answer=answer, chunk=chunk),
                               packing=packing)
    else:
        nll = model(idx, head=partial(ift.chunked_nll, targets=targets, chunk=chunk, answer=answer),
                    packing=packing)  # (2B, T)
        if method == "dpo":
            with torch.no_grad():  # the reference contributes per-sequence sums only
                ref_nll = ref(idx, head=partial(ift.chunked_nll, targets=targets, chunk=chunk, answer=answer),
                              packing=packing)
    if packing is not None:  # back to the padded (2B, T) batch, where row b is example b
        nll, targets = packing.unpack(nll), packing.targets
        if method in REFERENCE_METHODS:
            ref_nll = packing.unpack(ref_nll)
        if method == "tdpo":
            kl = packing.unpack(kl)
    B = targets.size(0) // 2
    l, n = sequence_logps(nll, targets)  # (2B,) each
    keep = nonempty_pairs(n)
    if method in REFERENCE_METHODS:
        ref_l, _ = sequence_logps(ref_nll, targets)
    avg = l / n.clamp(min=1)  # per-token averages (2B,)
    if method == "dpo":
        loss, margin = dpo_loss(l[:B], l[B:], ref_l[:B], ref_l[B:], beta, keep)
    elif method == "tdpo":
        seq_kl = kl.sum(1)  # (2B,) SeqKL of each answer (kl is 0 where ignored)
        loss, margin = tdpo_loss(l[:B], l[B:], ref_l[:B], ref_l[B:], seq_kl[:B], seq_kl[B:], beta, alpha, keep)
    elif method == "orpo":
        loss, margin = orpo_loss(avg[:B], avg[B:], beta, keep)
    elif method == "simpo":
        loss, margin = simpo_loss(avg[:B], avg[B:], beta, gamma_ratio * beta, keep)
    else:
        raise ValueError(f"unknown preference method {method!r} (expected one of {PAIR_METHODS})")
    margin = torch.where(keep, margin.float(), 0)
    stats = torch.stack([margin.sum(), (keep & (margin > 0)).sum().float(), keep.sum().float()])
    return loss, stats
