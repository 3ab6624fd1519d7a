"""
Intuitive Fine-Tuning (IFT) next to plain SFT, in one file that reads like the paper.

    Hua et al., "Intuitive Fine-Tuning: Towards Simplifying Alignment into a Single Process",
    ACL 2025, arXiv 2405.11870. Section, equation and Algorithm 1 line numbers refer to it.

SFT trains every answer token on the ground-truth prefix. IFT adds two things:
1. a temporal residual connection (Eq. 17, Alg. 1 lines 2-13): a first pass without gradient lets
   the model guess each answer token one step ahead; the second, trained pass reads a blend of
   the true token's embedding and the guess's, (1 - lam) * E(x) + lam * E(xh);
2. dynamic relation propagation (Sec. 4.2, Alg. 1 lines 14-18): each token's loss is weighted by
   the discounted loss of everything after it, so early tokens answer for the whole future.
lam = 0 removes 1, gamma = 0 removes 2; with both, IFT is SFT to the last bit (tests check it).

Where the released training code differs from the typeset paper we follow the code, since it
produced the paper's tables; each such place says so. Targets use -100 (IGNORE) for positions
that are not learned; targets[:, t] is what position t predicts.
"""
import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE = -100
# answer positions per output-projection chunk: one (CHUNK, V) float32 block at a time (156 MB at V = 152k),
# whatever the batch; fewer rows per matmul cost no measurable time (bench.py)
CHUNK = 256


# -------------------------------------------------------------------------------------------------
# per-token losses and the two reductions (one implementation of each formula, shared by the
# logits API and the hidden-state API below)

def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits (B, T, V), targets (B, T) -> l (B, T) float32, l[t] = -log p(y[t]), 0 where ignored."""
    B, T, V = logits.shape
    nll = F.cross_entropy(logits.reshape(B * T, V).float(), targets.reshape(B * T),
                          ignore_index=IGNORE, reduction="none")
    return nll.view(B, T)


def n_empty(targets: torch.Tensor) -> int:
    """Sequences with no answer token: the reductions drop them from the batch mean."""
    return int(((targets != IGNORE).sum(1) == 0).sum())


def _mean_over_sequences(per_seq: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    # per_seq (B,), n (B,) answer tokens; empty sequences are left out. An all-empty batch gives
    # 0 * (the graph), a zero loss that still backprops (zero gradients, no NaN)
    keep = n > 0
    return (per_seq * keep).sum() / keep.sum().clamp(min=1)


def sft_reduce(nll: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SFT: L_seq = sum_t m[t] l[t] / n, then the mean over sequences (the reference code averages
    per sequence first, not over all tokens of the batch at once)."""
    n = mask.sum(1)  # (B,)
    per_seq = torch.where(mask, nll, 0).sum(1) / n.clamp(min=1)
    return _mean_over_sequences(per_seq, n)


def discount_matrix(T: int, gamma: float, dtype=torch.float32, device=None) -> torch.Tensor:
    """D (T, T) with D[i, t] = gamma^(i - t) for i >= t, else 0: (u @ D)[t] = sum_{i>=t} gamma^(i-t) u[i].
    Exponents are never negative, so gamma^k underflows quietly to 0 for far tokens; the tempting
    closed form gamma^-t * revcumsum(gamma^i u[i]) overflows instead (0.95^-4096 ~ 1e91 > float32 max).
    Memory is T^2 floats (4 MB at T=1024, 64 MB at 4096) and the matmul costs B*T^2 flops,
    negligible next to the model's forward."""
    ar = torch.arange(T, device=device, dtype=dtype)
    k = ar[:, None] - ar[None, :]  # (T, T) i - t
    return torch.where(k >= 0, gamma ** k.clamp(min=0), 0)


def propagation_weights(nll: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Dynamic relation propagation weights (Sec. 4.2, Alg. 1 lines 14-18), nll, mask (B, T) -> w (B, T):
        u[t] = m[t] l[t] / n,  G[t] = sum_{i>=t} gamma^(i-t) u[i],  w[t] = m[t] G[t] n / sum_j m[j] G[j].
    The weights average 1 over answer tokens and are NOT detached: the accumulated coefficients are
    part of the objective (the authors' reading), so gradient flows through w too. This is the
    released code's default ("loss" propagation, "left" side, "L1" norm); the paper's typeset double
    sum (Eq. 21) is a simplification of it."""
    m = mask.to(nll.dtype)
    n = m.sum(1, keepdim=True)  # (B, 1)
    u = torch.where(mask, nll, 0) / n.clamp(min=1)  # (B, T)
    with torch.autocast(nll.device.type, enabled=False):  # a bf16 matmul would blur the weights
        G = u @ discount_matrix(nll.size(1), gamma, nll.dtype, nll.device)  # (B, T) discounted suffix sums
    S = (m * G).sum(1, keepdim=True)  # (B, 1)
    # S = 0 only for empty sequences (or zero loss everywhere): give w = 0 there, not 0/0
    return m * G * n / torch.where(S > 0, S, 1)


def ift_reduce(nll: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """IFT: L_seq = sum_t m[t] l[t] w[t] / n, then the mean over sequences.
    gamma = 0 means no propagation, w = 1 (the released code special-cases it the same way; the
    formula itself would give w proportional to l), so IFT's reduction is SFT's, bit for bit."""
    if gamma == 0:
        return sft_reduce(nll, mask)
    w = propagation_weights(nll, mask, gamma)
    n = mask.sum(1)
    per_seq = (torch.where(mask, nll, 0) * w).sum(1) / n.clamp(min=1)
    return _mean_over_sequences(per_seq, n)


def sft_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over sequences of the per-sequence mean answer-token NLL. logits (B, T, V), targets (B, T)."""
    return sft_reduce(token_nll(logits, targets), targets != IGNORE)


def ift_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float) -> torch.Tensor:
    """The IFT objective on the second pass's logits (B, T, V): SFT's average, propagation-weighted."""
    return ift_reduce(token_nll(logits, targets), targets != IGNORE, gamma)


# -------------------------------------------------------------------------------------------------
# the same from final hidden states, through the model's head= hook: only answer positions reach
# the output projection, a chunk at a time, so no (B, T, V) tensor is ever made

def _chunk_nll(lm_head: nn.Module, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(lm_head(h).float(), y, reduction="none")  # (c, V) logits live only in here


class _ChunkedNLL(torch.autograd.Function):
    """l = cross_entropy(hs @ W.T, ys) for hs (N, dim), W (V, dim), ys (N,), a chunk of rows at a time, with
    the backward written out: d l[i] / d logits[i] = softmax(logits[i]) - onehot(ys[i]). Backward recomputes a
    chunk's logits, turns them into that gradient in place and accumulates W's gradient in one buffer, so it
    holds one (chunk, V) float32 block and one W-sized gradient; autograd through checkpointed chunks held
    three blocks (log_softmax, its gradient, the logits' gradient) and a second W-sized buffer to accumulate
    into. Under autocast the matmuls run in the autocast dtype, as autograd's would."""

    @staticmethod
    def forward(ctx, hs, weight, ys, chunk):
        parts, ctx.dtype = [], weight.dtype
        for hc, yc in zip(hs.split(chunk), ys.split(chunk)):
            z = F.linear(hc, weight)  # (c, V); the same op as lm_head(hc), so the same bits as chunked_guess's
            ctx.dtype = z.dtype       # the autocast dtype when autocast is on
            parts.append(F.cross_entropy(z.float(), yc, reduction="none"))
        ctx.save_for_backward(hs, weight, ys)
        ctx.chunk = chunk
        return torch.cat(parts) if parts else hs.new_zeros(0, dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad):  # grad (N,): d loss / d l
        hs, weight, ys = ctx.saved_tensors
        w = weight.to(ctx.dtype)
        grad_h = torch.empty_like(hs) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        for i in range(0, hs.size(0), ctx.chunk):
            hc = hs[i:i + ctx.chunk].to(ctx.dtype)
            yc, gc = ys[i:i + ctx.chunk], grad[i:i + ctx.chunk]
            z = F.linear(hc, w).float()  # (c, V) recomputed logits, then in place: softmax, - onehot, * grad
            z.sub_(z.logsumexp(-1, keepdim=True)).exp_()
            z[torch.arange(len(yc), device=z.device), yc] -= 1
            z = z.mul_(gc[:, None]).to(ctx.dtype)
            if grad_h is not None:
                grad_h[i:i + ctx.chunk] = z @ w
            if grad_w is not None:  # in place: no second W-sized buffer (under autocast, a half-size one)
                grad_w.addmm_(z.t(), hc) if z.dtype == grad_w.dtype else grad_w.add_(z.t() @ hc)
        return grad_h, grad_w, None, None


def chunked_nll(h: torch.Tensor, lm_head: nn.Module, targets: torch.Tensor,
                chunk: int = CHUNK) -> torch.Tensor:
    """h (B, T, dim) final-norm hidden states -> l (B, T) float32, 0 where ignored; same values as
    token_nll(lm_head(h), targets). No chunk's logits stay saved for backward: they are recomputed there
    (one extra output projection), by _ChunkedNLL for a plain bias-free linear head, else by checkpointing."""
    mask = targets != IGNORE
    hs, ys = h[mask], targets[mask]  # (N, dim), (N,): answer positions only
    if torch.is_grad_enabled() and isinstance(lm_head, nn.Linear) and lm_head.bias is None:
        nll = _ChunkedNLL.apply(hs, lm_head.weight, ys, chunk)
        return h.new_zeros(targets.shape, dtype=torch.float32).masked_scatter(mask, nll)
    parts = []
    for hc, yc in zip(hs.split(chunk), ys.split(chunk)):  # an empty batch still gives one empty chunk
        if torch.is_grad_enabled():
            parts.append(checkpoint(_chunk_nll, lm_head, hc, yc, use_reentrant=False))
        else:
            parts.append(_chunk_nll(lm_head, hc, yc))
    return h.new_zeros(targets.shape, dtype=torch.float32).masked_scatter(mask, torch.cat(parts))


@torch.no_grad()
def chunked_guess(h: torch.Tensor, lm_head: nn.Module, targets: torch.Tensor,
                  chunk: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy guesses and their (detached) NLL from one chunked projection: h (B, T, dim) ->
    g (B, T) argmax ids at answer positions (IGNORE elsewhere: never read), l (B, T) float32."""
    mask = targets != IGNORE
    hs, ys = h[mask], targets[mask]
    guesses, nlls = [], []
    for hc, yc in zip(hs.split(chunk), ys.split(chunk)):
        z = lm_head(hc).float()  # (c, V)
        guesses.append(z.argmax(-1))
        nlls.append(F.cross_entropy(z, yc, reduction="none"))
    g = torch.full_like(targets, IGNORE).masked_scatter(mask, torch.cat(guesses))
    return g, h.new_zeros(targets.shape, dtype=torch.float32).masked_scatter(mask, torch.cat(nlls))


# -------------------------------------------------------------------------------------------------
# SFT and IFT, one micro-batch each: IFT = SFT's pass with a guessing pass before it and a
# propagation-weighted average after it

def sft_forward(model: nn.Module, idx: torch.Tensor, targets: torch.Tensor,
                chunk: int = CHUNK) -> torch.Tensor:
    """SFT loss of model on idx (B, T) with targets (B, T)."""
    nll = model(idx, head=partial(chunked_nll, targets=targets, chunk=chunk))  # (B, T)
    return sft_reduce(nll, targets != IGNORE)


@torch.no_grad()
def infer_one_step_ahead(model: nn.Module, idx: torch.Tensor, targets: torch.Tensor,
                         chunk: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """IFT step 1, inference one step ahead (Alg. 1 lines 2-6): z = f(E(x)) on the ground-truth
    prefix without gradient, g[t] = argmax z[t] (greedy, the released code's default; it also
    offers sampling). Keeps only g and the detached NLL (the SFT loss, for logging), never logits."""
    return model(idx, head=partial(chunked_guess, targets=targets, chunk=chunk))


def guess_inputs(idx: torch.Tensor, targets: torch.Tensor, guesses: torch.Tensor) -> torch.Tensor:
    """The second token sequence of the temporal residual connection (Eq. 17, Alg. 1 lines 7-10):
    xh[0] = x[0]; for t >= 1, xh[t] = g[t-1] where m[t-1] = 1 (x[t] is an answer token), else x[t].
    So the first answer token is replaced by the guess from the last prompt position, and prompt,
    template and padding tokens stay. idx, targets, guesses (B, T) -> xh (B, T)."""
    answer = targets[:, :-1] != IGNORE  # (B, T-1): m[t-1] for t = 1..T-1
    return torch.cat([idx[:, :1], torch.where(answer, guesses[:, :-1], idx[:, 1:])], dim=1)


def ift_forward(model: nn.Module, idx: torch.Tensor, targets: torch.Tensor, lam: float, gamma: float,
                chunk: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor, int]:
    """IFT loss of model on idx (B, T) with targets (B, T) -> (loss, first-pass SFT loss (detached,
    for logging), number of sequences dropped for having no answer token)."""
    mask = targets != IGNORE
    # step 1: inference one step ahead (Alg. 1 lines 2-6), no graph, only argmax ids are kept
    guesses, first_nll = infer_one_step_ahead(model, idx, targets, chunk)
    # step 2: temporal residual connection (Eq. 17, Alg. 1 lines 7-13): blend the true tokens'
    # embeddings with the guesses'. The released code embeds both with a frozen copy of E refreshed
    # after each optimizer step (so E gets no gradient through e); we use the live table, the natural
    # reading of Alg. 1: same loss value, and gradient reaches both embedded rows. With lam = 0,
    # (1 - 0) * E(x) + 0 * E(xh) is E(x) exactly, the same input as sft_forward's.
    xh = guess_inputs(idx, targets, guesses)  # (B, T)

    def blend(E):  # (B, T, dim); the model applies it to its own table inside forward (gathered under FSDP)
        return (1 - lam) * E(idx) + lam * E(xh)

    nll = model(embed=blend, head=partial(chunked_nll, targets=targets, chunk=chunk))  # (B, T), with grad
    # step 3: dynamic relation propagation (Sec. 4.2, Alg. 1 lines 14-18), then the mean over sequences
    return ift_reduce(nll, mask, gamma), sft_reduce(first_nll, mask), n_empty(targets)


# -------------------------------------------------------------------------------------------------
# lambda schedule

def lam_at(step: int, lam: float, schedule: str = "constant", lam_min: float = 0.0, warmup: int = 0,
           sigma: float = 0.0, seed: int = 0) -> float:
    """lam for optimizer step `step`: constant, or "linear" from lam_min to lam over the first `warmup`
    steps then flat; with sigma > 0 the noisy lambda of Table 7, clamp(lam * (1 + sigma * eps), 0, 1),
    eps ~ N(0, 1). eps comes from its own generator seeded by (seed, step): independent of all other
    randomness, the same on every DDP rank and after a resume. (The released code draws the whole
    noise list up front from the global RNG; same distribution.)"""
    if schedule == "linear" and step < warmup:
        lam = lam_min + (lam - lam_min) * step / warmup
    elif schedule not in ("constant", "linear"):
        raise ValueError(f"unknown lambda schedule {schedule!r}")
    if sigma > 0:
        # the CPU generator keeps only 32 bits of its seed, so mix seed and step into 32 bits
        gen = torch.Generator().manual_seed((seed * 0x9E3779B1 + step) % 2**32)
        eps = torch.randn((), generator=gen, dtype=torch.float64).item()
        lam = lam * (1 + sigma * eps)
    return min(max(lam, 0.0), 1.0)


# -------------------------------------------------------------------------------------------------
# the preference baselines of the paper's comparisons, on per-sequence answer log-probs

def answer_logps(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, T, V), targets (B, T) -> summed (B,) and per-token averaged (B,) answer log-probs."""
    mask = targets != IGNORE
    total = -token_nll(logits, targets).sum(1)  # ignored positions hold 0
    return total, total / mask.sum(1).clamp(min=1)


def dpo_loss(lc: torch.Tensor, lr: torch.Tensor, refc: torch.Tensor, refr: torch.Tensor,
             beta: float = 0.1) -> torch.Tensor:
    """DPO: -log sigmoid(beta * ((lc - lr) - (refc - refr))) on summed log-probs of the chosen and
    rejected answers under the policy (lc, lr) and a frozen reference (refc, refr); mean over (B,)."""
    return -F.logsigmoid(beta * ((lc - lr) - (refc - refr))).mean()


def log1mexp(a: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(a)) for a < 0, accurate at both ends (Maechler 2012): expm1 near 0, log1p far.
    Each branch only sees inputs where it is finite: the branch torch.where drops gets no NaN gradient."""
    near = a > -math.log(2)
    far = torch.log1p(-torch.exp(a.clamp(max=-math.log(2))))
    return torch.where(near, torch.log(-torch.expm1(a)), far)


def orpo_loss(ac: torch.Tensor, ar: torch.Tensor, beta: float = 0.25) -> torch.Tensor:
    """ORPO on per-token average log-probs ac, ar (B,) of the chosen / rejected answers:
        log_odds = (ac - ar) - (log(1 - exp(ac)) - log(1 - exp(ar)))
        loss = -ac - beta * log sigmoid(log_odds), mean over (B,)."""
    log_odds = (ac - ar) - (log1mexp(ac) - log1mexp(ar))
    return (-ac - beta * F.logsigmoid(log_odds)).mean()
