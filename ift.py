"""
Intuitive Fine-Tuning (IFT) next to plain SFT, in one file that reads like the paper.

    Hua et al., "Intuitive Fine-Tuning: Towards Simplifying Alignment into a Single Process",
    ACL 2025, arXiv 2405.11870. Section, equation and Algorithm 1 line numbers refer to it.

SFT trains every answer token on the ground-truth prefix. IFT adds a temporal residual connection (Eq. 17:
the trained pass reads a blend of each true token and the model's own guess of it) and dynamic relation
propagation (Sec. 4.2: each token's loss is weighted by the discounted loss of everything after it, so early
tokens answer for the whole future). One micro-batch of IFT is five steps, numbered as in the README's
"IFT in five steps"; the comments below use the same numbers:
    1. guess        a pass without gradient on the true prefix keeps each next token's greedy guess
    2. blend        xh = the guesses where the answer tokens were; e = (1 - lam) * E(x) + lam * E(xh)
    3. second pass  the model with gradient on e gives per-token losses l[t] = -log p(y[t] | e)
    4. propagate    w[t] from the discounted suffix sums of l, not detached
    5. average      L_seq = sum_t l[t] w[t] / n, then the mean over sequences
lam = 0 removes the blend (e = E(x)), gamma = 0 removes the propagation (w = 1); with both, IFT is SFT to the
last bit (tests check it).

Reading order: the entry points (sft_forward, ift_forward) and the five steps come first. Below a rule, the
memory-saving machinery (a chunked output projection with its backward written out: same values, less memory);
below another, the released code's other modes (guess pickers, 24 propagation variants, lambda schedules).

Where the released training code differs from the typeset paper we follow the code, since it
produced the paper's tables; each such place says so. Targets use -100 (IGNORE) for positions
that are not learned; targets[:, t] is what position t predicts.
"""
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE = -100
# answer positions per output-projection chunk: one (CHUNK, V) float32 block at a time (156 MB at V = 152k),
# whatever the batch; fewer rows per matmul cost no measurable time (bench.py)
CHUNK = 256
# the loss's backward walks the output projection W (V, dim) in this many row slices: it holds one slice in the
# autocast dtype (never all of W) and each block of logits against it may span CHUNK * SLICES answer positions
SLICES = 16


# -------------------------------------------------------------------------------------------------
# the entry points: SFT and IFT, one micro-batch each. IFT = SFT's pass with a guessing pass before it
# and a propagation-weighted average after it

def sft_forward(model: nn.Module, idx: torch.Tensor, targets: torch.Tensor,
                chunk: int = CHUNK, answer: torch.Tensor | None = None, packing=None) -> torch.Tensor:
    """SFT loss of model on idx (B, T) with targets (B, T); answer = answer_index(targets), optional (chunked_nll).
    packing: idx, targets (1, L) are examples laid end to end (packing.py); the loss is the unpacked batch's."""
    nll = model(idx, head=partial(chunked_nll, targets=targets, chunk=chunk, answer=answer), packing=packing)
    if packing is not None:  # back to the padded (B, T) batch: every reduction below is per example
        nll, targets = packing.unpack(nll), packing.targets
    return sft_reduce(nll, targets != IGNORE)


def ift_forward(model: nn.Module, idx: torch.Tensor, targets: torch.Tensor, lam: float, gamma: float,
                chunk: int = CHUNK, guess=None, propagation: tuple[str, str, str] = ("loss", "left", "L1"),
                answer: torch.Tensor | None = None, packing=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IFT loss of model on idx (B, T) with targets (B, T) -> (loss, first-pass SFT loss (detached,
    for logging), number of sequences dropped for having no answer token (n_empty)). guess and propagation pick
    the released code's other modes (guess_picker, propagation_variant); the defaults are the paper's.
    answer = answer_index(targets) built on the CPU keeps the step free of waits for a GPU (chunked_nll).
    packing: idx, targets (1, L) are examples laid end to end (packing.py); steps 1-3 run on that row, steps 4
    and 5 on the padded batch it came from, so the loss is the unpacked batch's."""
    # step 1, guess (Alg. 1 lines 2-6): no graph, only the argmax ids (B, T) are kept, never logits
    guesses, first_nll = infer_one_step_ahead(model, idx, targets, chunk, guess=guess, answer=answer,
                                              packing=packing)
    # step 2, blend (Eq. 17, Alg. 1 lines 7-10): the guesses where the answer tokens were, then the two
    # embeddings mixed. The released code embeds both with a frozen copy of E refreshed after each optimizer
    # step (so E gets no gradient through e); we use the live table, the natural reading of Alg. 1: same loss
    # value, and gradient reaches both embedded rows. With lam = 0, (1 - 0) * E(x) + 0 * E(xh) is E(x)
    # exactly, the same input as sft_forward's.
    xh = guess_inputs(idx, targets, guesses)  # (B, T)
    if packing is not None:  # an example's first token stays itself: the guess before it is the previous example's
        xh = torch.where(packing.positions == 0, idx, xh)

    def blend(E):  # (B, T, dim); the model applies it to its own table inside forward (gathered under FSDP)
        return (1 - lam) * E(idx) + lam * E(xh)

    # step 3, second pass (Alg. 1 lines 11-13): with gradient, l (B, T) from the answer positions only
    nll = model(embed=blend, head=partial(chunked_nll, targets=targets, chunk=chunk, answer=answer), packing=packing)
    if packing is not None:  # back to the padded (B, T) batch: steps 4 and 5 run along each example
        nll, first_nll, targets = packing.unpack(nll), packing.unpack(first_nll), packing.targets
    mask = targets != IGNORE
    # step 4, propagate (Sec. 4.2, Alg. 1 lines 14-18), and step 5, average: both inside ift_reduce
    return ift_reduce(nll, mask, gamma, propagation), sft_reduce(first_nll, mask), n_empty(targets)


# -------------------------------------------------------------------------------------------------
# step 1, guess (Alg. 1 lines 2-6)

@torch.no_grad()
def infer_one_step_ahead(model: nn.Module, idx: torch.Tensor, targets: torch.Tensor,
                         chunk: int = CHUNK, guess=None, answer: torch.Tensor | None = None, packing=None,
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """IFT step 1, inference one step ahead (Alg. 1 lines 2-6): z = f(E(x)) on the ground-truth
    prefix without gradient, g[t] = argmax z[t] (greedy, the released code's default; guess =
    guess_picker(...) takes its other modes). Keeps only g and the detached NLL (the SFT loss, for
    logging), never logits: chunked_guess projects only the answer positions, a chunk at a time."""
    return model(idx, head=partial(chunked_guess, targets=targets, chunk=chunk, guess=guess, answer=answer),
                 packing=packing)


# -------------------------------------------------------------------------------------------------
# step 2, blend (Eq. 17, Alg. 1 lines 7-10): the token half here; the embedding mix is ift_forward's blend

def guess_inputs(idx: torch.Tensor, targets: torch.Tensor, guesses: torch.Tensor) -> torch.Tensor:
    """IFT step 2, the second token sequence of the temporal residual connection (Eq. 17, Alg. 1 lines 7-10):
    xh[0] = x[0]; for t >= 1, xh[t] = g[t-1] where m[t-1] = 1 (x[t] is an answer token), else x[t].
    So the first answer token is replaced by the guess from the last prompt position, and prompt,
    template and padding tokens stay. idx, targets, guesses (B, T) -> xh (B, T)."""
    answer = targets[:, :-1] != IGNORE  # (B, T-1): m[t-1] for t = 1..T-1
    return torch.cat([idx[:, :1], torch.where(answer, guesses[:, :-1], idx[:, 1:])], dim=1)


# -------------------------------------------------------------------------------------------------
# step 3, second pass (Alg. 1 lines 11-13): the per-token loss. token_nll is its definition on full logits;
# the training path computes the same values from hidden states with chunked_nll (below the rule)

def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """IFT step 3's loss, logits (B, T, V), targets (B, T) -> l (B, T) float32, l[t] = -log p(y[t]), 0 where
    ignored."""
    B, T, V = logits.shape
    nll = F.cross_entropy(logits.reshape(B * T, V).float(), targets.reshape(B * T),
                          ignore_index=IGNORE, reduction="none")
    return nll.view(B, T)


# -------------------------------------------------------------------------------------------------
# step 4, propagate (Sec. 4.2, Alg. 1 lines 14-18): the Bellman-style discounted suffix sum

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
    """IFT step 4, dynamic relation propagation weights (Sec. 4.2, Alg. 1 lines 14-18), nll, mask (B, T) -> w (B, T):
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


# -------------------------------------------------------------------------------------------------
# step 5, average: the two reductions, SFT's (w = 1) and IFT's, one implementation of each formula

def sft_reduce(nll: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SFT: L_seq = sum_t m[t] l[t] / n, then the mean over sequences (the reference code averages
    per sequence first, not over all tokens of the batch at once)."""
    n = mask.sum(1)  # (B,)
    per_seq = torch.where(mask, nll, 0).sum(1) / n.clamp(min=1)
    return _mean_over_sequences(per_seq, n)


def ift_reduce(nll: torch.Tensor, mask: torch.Tensor, gamma: float,
               propagation: tuple[str, str, str] = ("loss", "left", "L1")) -> torch.Tensor:
    """IFT steps 4 and 5: L_seq = sum_t m[t] l[t] w[t] / n, then the mean over sequences.
    gamma = 0 means no propagation, w = 1 (the released code special-cases it the same way; the
    formula itself would give w proportional to l), so IFT's reduction is SFT's, bit for bit.
    propagation = (item, side, norm) other than the default picks a released-code variant (below)."""
    if gamma == 0:
        return sft_reduce(nll, mask)
    if propagation != ("loss", "left", "L1"):
        w = propagation_variant(nll, mask, gamma, *propagation)
    else:
        w = propagation_weights(nll, mask, gamma)
    n = mask.sum(1)
    per_seq = (torch.where(mask, nll, 0) * w).sum(1) / n.clamp(min=1)
    return _mean_over_sequences(per_seq, n)


def _mean_over_sequences(per_seq: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    # per_seq (B,), n (B,) answer tokens; empty sequences are left out. An all-empty batch gives
    # 0 * (the graph), a zero loss that still backprops (zero gradients, no NaN)
    keep = n > 0
    return (per_seq * keep).sum() / keep.sum().clamp(min=1)


def n_empty(targets: torch.Tensor) -> torch.Tensor:
    """Sequences with no answer token: the reductions drop them from the batch mean. A 0-d tensor on targets'
    device: an int would make the CPU wait for a GPU."""
    return ((targets != IGNORE).sum(1) == 0).sum()


# the same two losses from full logits (B, T, V), for models whose forward returns logits (transformers')

def sft_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over sequences of the per-sequence mean answer-token NLL. logits (B, T, V), targets (B, T)."""
    return sft_reduce(token_nll(logits, targets), targets != IGNORE)


def ift_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float) -> torch.Tensor:
    """The IFT objective on the second pass's logits (B, T, V): SFT's average, propagation-weighted."""
    return ift_reduce(token_nll(logits, targets), targets != IGNORE, gamma)


# =================================================================================================
# memory-saving machinery: same values, less memory. Steps 1 and 3 reach the output projection through
# the model's head= hook with final hidden states: only answer positions are projected, a chunk at a time,
# so no (B, T, V) tensor is ever made, and step 3's backward is written out (_ChunkedNLL)
# =================================================================================================

def chunked_nll(h: torch.Tensor, lm_head: nn.Module, targets: torch.Tensor,
                chunk: int = CHUNK, answer: torch.Tensor | None = None) -> torch.Tensor:
    """h (B, T, dim) final-norm hidden states -> l (B, T) float32, 0 where ignored; same values as
    token_nll(lm_head(h), targets). No chunk's logits stay saved for backward: they are recomputed there
    (one extra output projection), by _ChunkedNLL for a plain bias-free linear head, else by checkpointing.
    answer = answer_index(targets), when given, spares the look at targets that waits for a GPU."""
    answer = answer_index(targets) if answer is None else answer
    hs, ys = h.flatten(0, 1)[answer], targets.flatten()[answer]  # (N, dim), (N,): answer positions only
    if torch.is_grad_enabled() and isinstance(lm_head, nn.Linear) and lm_head.bias is None:
        return place_answers(_ChunkedNLL.apply(hs, lm_head.weight, ys, chunk), answer, targets)
    parts = []
    for hc, yc in zip(hs.split(chunk), ys.split(chunk)):  # an empty batch still gives one empty chunk
        if torch.is_grad_enabled():
            parts.append(checkpoint(_chunk_nll, lm_head, hc, yc, use_reentrant=False))
        else:
            parts.append(_chunk_nll(lm_head, hc, yc))
    return place_answers(torch.cat(parts), answer, targets)


@torch.no_grad()
def chunked_guess(h: torch.Tensor, lm_head: nn.Module, targets: torch.Tensor,
                  chunk: int = CHUNK, guess=None, answer: torch.Tensor | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy guesses and their (detached) NLL from one chunked projection: h (B, T, dim) ->
    g (B, T) argmax ids at answer positions (IGNORE elsewhere: never read), l (B, T) float32.
    guess, when given, picks the ids from each chunk's logits instead of argmax (guess_picker); answer as in
    chunked_nll."""
    answer = answer_index(targets) if answer is None else answer
    hs, ys = h.flatten(0, 1)[answer], targets.flatten()[answer]
    guesses, nlls = [], []
    for hc, yc in zip(hs.split(chunk), ys.split(chunk)):
        z = lm_head(hc).float()  # (c, V)
        guesses.append(z.argmax(-1) if guess is None else guess(z))
        nlls.append(F.cross_entropy(z, yc, reduction="none"))
    return place_answers(torch.cat(guesses), answer, targets, IGNORE), place_answers(torch.cat(nlls), answer, targets)


def answer_index(targets: torch.Tensor) -> torch.Tensor:
    """targets (B, T) -> the flat indices (N,) of its answer positions, row by row (the order of h[mask]).
    Its length N is a size, so it is read where targets lives: on a GPU that waits for the GPU. Build it with
    the batch on the CPU and move it along (train.py does), and the loss path never waits."""
    return (targets.flatten() != IGNORE).nonzero().squeeze(1)


def place_answers(values: torch.Tensor, answer: torch.Tensor, targets: torch.Tensor, fill=0) -> torch.Tensor:
    """values (N,) back at the answer positions of a (B, T) tensor, fill elsewhere; differentiable in values."""
    out = torch.full((targets.numel(),), fill, dtype=values.dtype, device=values.device)
    return out.index_put((answer,), values).view(targets.shape)


def _chunk_nll(lm_head: nn.Module, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(lm_head(h).float(), y, reduction="none")  # (c, V) logits live only in here


class _ChunkedNLL(torch.autograd.Function):
    """l = cross_entropy(hs @ W.T, ys) for hs (N, dim), W (V, dim), ys (N,), with the backward written out:
    d l[i] / d logits[i] = softmax(logits[i]) - onehot(ys[i]). Forward takes a chunk of rows at a time against
    all of W and keeps each row's log-sum-exp. Backward recomputes the logits against one slice of W's rows at
    a time (SLICES of them), a block of up to chunk * V / slice rows, and turns them into that gradient in
    place with the saved log-sum-exp. So besides W's gradient it holds one slice of W in the autocast dtype and
    one block no bigger than forward's (chunk, V) one, and it writes each slice's gradient once per block, not
    once per chunk; autograd would hold a bf16 copy of all of W and a bf16 gradient of it too (reference_nll in
    bench.py: 1.5 W-sized float32 buffers). Under autocast the matmuls run in the autocast dtype, as autograd's
    would."""

    @staticmethod
    def forward(ctx, hs, weight, ys, chunk):
        parts, lses, ctx.dtype = [], [], weight.dtype
        for hc, yc in zip(hs.split(chunk), ys.split(chunk)):
            z = F.linear(hc, weight)  # (c, V); the same op as lm_head(hc), so the same bits as chunked_guess's
            ctx.dtype = z.dtype       # the autocast dtype when autocast is on
            z = z.float()
            parts.append(F.cross_entropy(z, yc, reduction="none"))
            lses.append(parts[-1] + z.gather(1, yc[:, None])[:, 0])  # log sum exp z = l + z[y], to rounding
        empty = hs.new_zeros(0, dtype=torch.float32)
        ctx.save_for_backward(hs, weight, ys, torch.cat(lses) if lses else empty)
        ctx.chunk = chunk
        return torch.cat(parts) if parts else empty

    @staticmethod
    def backward(ctx, grad):  # grad (N,): d loss / d l
        hs, weight, ys, lse = ctx.saved_tensors
        V = weight.size(0)
        step = -(-V // SLICES)  # rows of W per slice
        rows = max(1, ctx.chunk * V // step)  # rows of hs per block: (rows, step) no bigger than (chunk, V)
        hb = hs.to(ctx.dtype)
        # h's gradient sums over the slices: in float32, then hs' dtype
        grad_h = hs.new_zeros(hs.shape, dtype=torch.float32) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        for v0 in range(0, V, step):
            w = weight[v0:v0 + step].to(ctx.dtype)  # (s, dim); a view when there is nothing to cast
            for i in range(0, hs.size(0), rows):
                hc, yc, gc, lc = (t[i:i + rows] for t in (hb, ys, grad, lse))
                z = F.linear(hc, w).float()  # (c, s) logits, then in place: softmax, - onehot, * grad
                z.sub_(lc[:, None]).exp_()
                col = yc - v0  # the target's column, for rows whose target lies in this slice
                hit = (col >= 0) & (col < z.size(1))
                z[torch.arange(len(yc), device=z.device), col.clamp(0, z.size(1) - 1)] -= hit.float()
                z = z.mul_(gc[:, None]).to(ctx.dtype)
                if grad_h is not None:
                    _accumulate(grad_h[i:i + rows], z, w)
                if grad_w is not None:
                    _accumulate(grad_w[v0:v0 + step], z.t(), hc)
        return None if grad_h is None else grad_h.to(hs.dtype), grad_w, None, None


def _accumulate(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
    # out += a @ b in place: inside the matmul when the dtypes agree, else through a @ b's temporary
    out.addmm_(a, b) if a.dtype == out.dtype else out.add_(a @ b)


# =================================================================================================
# the released code's other modes: not on the paper's path above, each reached only by a flag (train.py
# --guess, --propagation, --propagation_side, --propagation_norm, --lam_schedule, --lam_noise); the defaults
# take none of them
# =================================================================================================

# ---- step 4's variants (train.py --propagation, --propagation_side, --propagation_norm): 3 items x 2 sides
# x 4 norms = 24. The default ("loss", "left", "L1") is propagation_weights above and stays on that path.

SHARPEN = {"L1": lambda x: x, "L2": torch.square, "softmax": lambda x: x.softmax(1), "log": torch.log1p}


def propagation_variant(nll: torch.Tensor, mask: torch.Tensor, gamma: float, item: str = "loss",
                        side: str = "left", norm: str = "L1") -> torch.Tensor:
    """Propagation weights as the released code's options define them, nll, mask (B, T) -> w (B, T), per sequence:
        c[t] = m[t] * {"mask": 1, "loss": l[t] / n, "logps": l[t]}[item]           (l = -log p, with gradient)
        left:  G[t] = sum_{i>=t} gamma^(i-t) c[i], 0 off the answer;
               L1: G, L2: G^2, softmax: softmax of G over all T positions (the 0s take part), log: log(G + 1)
        right: P[t] = sum_{i<=t} gamma^(t-i) c[i], 1e6 off the answer, plus the smallest nonzero P of the batch;
               L1: 1/P, L2: 1/P^2, softmax: softmax of 1/P over all T positions, log: 1/log(P + 1)
        w[t] = m[t] v[t] n / sum_j m[j] v[j] for the sharpened v (0 where that sum is 0: an empty answer, or
        zero loss everywhere), not detached. gamma = 0 gives w = m (no propagation). At the default it equals
        propagation_weights bit for bit (tests/test_ift_variants.py)."""
    if item not in ("mask", "loss", "logps") or side not in ("left", "right") or norm not in SHARPEN:
        raise ValueError(f"unknown propagation variant {(item, side, norm)}")
    m = mask.to(nll.dtype)
    n = m.sum(1, keepdim=True)  # (B, 1)
    if gamma == 0:
        return m
    c = {"mask": m, "loss": nll / n.clamp(min=1), "logps": nll}[item]
    c = torch.where(mask, c, 0)  # (B, T)
    with torch.autocast(nll.device.type, enabled=False):  # a bf16 matmul would blur the weights
        D = discount_matrix(nll.size(1), gamma, nll.dtype, nll.device)  # (T, T), D[i, t] = gamma^(i-t), i >= t
        if side == "left":
            G = torch.where(mask, c @ D, 0)  # discounted suffix sums
            v = SHARPEN[norm](G)
        else:
            P = torch.where(mask, c @ D.T, 1e6)  # discounted prefix sums
            # the released code shifts P by the smallest nonzero entry of the whole (B, T) tensor, so one
            # sequence's weights depend on the others' (a quirk we keep); no shift when there is none
            low = torch.where(P != 0, P, torch.inf).amin()
            P = P + torch.where(low < torch.inf, low, 0)
            v = SHARPEN[norm](_inverse(P)) if norm == "softmax" else _inverse(SHARPEN[norm](P))
    v = torch.where(mask, v, 0)
    S = v.sum(1, keepdim=True)  # (B, 1)
    return v * n / torch.where(S > 0, S, 1)


def _inverse(x: torch.Tensor) -> torch.Tensor:
    # 1/x, and 0 where x = 0; the inner where keeps inf out of the graph, so its gradient has no NaN
    return torch.where(x > 0, 1 / torch.where(x > 0, x, 1), 0)


# ---- step 1's other guesses (train.py --guess). Greedy (chunked_guess's argmax) is the paper's and the
# default. A picker maps one chunk's logits z (c, V) float32 to ids (c,).

def guess_picker(mode: str = "greedy", k: int = 2, temperature: float = 0.7, key: tuple[int, ...] = (0,),
                 device="cpu"):
    """The guess= argument of ift_forward for --guess greedy | topk | sample: None (argmax) or a picker.
    Samples come from their own generator seeded by key (train.py: seed, step, micro-batch of the step), so
    they touch no other randomness and a resumed run draws the same guesses as an uninterrupted one."""
    if mode == "greedy":
        return None
    if mode == "topk":
        return partial(kth_most_likely, k=k)
    if mode != "sample":
        raise ValueError(f"unknown guess mode {mode!r}")
    seed = 0
    for part in key:  # into 32 bits: the CPU generator keeps only 32 bits of its seed
        seed = (seed * 0x9E3779B1 + part + 1) % 2**32
    generator = torch.Generator(device=device).manual_seed(seed)
    return partial(sample_at_temperature, temperature=temperature, generator=generator)


def kth_most_likely(z: torch.Tensor, k: int = 2) -> torch.Tensor:
    """--guess topk: deterministically the k-th most likely token of each row, not a sample (k = 1: greedy)."""
    return z.topk(k, dim=-1).indices[:, -1]


def sample_at_temperature(z: torch.Tensor, temperature: float = 0.7, generator=None) -> torch.Tensor:
    """--guess sample: one draw from softmax(z / temperature) per row (the released code calls this mode
    "nucleus", though it makes no top-p cut), by inverting the cumulative distribution at a uniform draw u:
    the first token whose cumulative sum exceeds u. The sum runs in float64 so that rare tokens keep their
    share at V = 152k; torch.multinomial draws from the same distribution but is slower on CPU."""
    cdf = (z / temperature).softmax(-1).double().cumsum(-1)  # (c, V)
    u = torch.rand(z.size(0), 1, generator=generator, dtype=torch.float64, device=z.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True)[:, 0].clamp(max=z.size(1) - 1)


# ---- step 2's lam over training (train.py --lam_schedule, --lam_min, --lam_noise; the linear rise spans the
# lr warmup): constant by default; the noisy lambda is the paper's Table 7 ablation

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
