"""
Decoding for Transformer.generate / stream: the KV cache, sampling, and the loop. The prompt runs once (prefill),
then one position per step, eagerly or as one compiled step; both give the same tokens.

- eager (default on a CPU): each step is the model's forward on one token over the cache up to its position.
- compiled (default on CUDA): a GPU step of a ~1B model is hundreds of small kernels, and eager decoding waits
  on the CPU that launches them (a small share of the memory roofline, measurements/2026-11-26-h100).
  The compiled step has one set of shapes at every position: the cache is preallocated, written at a position
  *tensor* and read whole, the positions not written yet masked. So torch.compile makes one graph for all
  positions, and on CUDA mode="reduce-overhead" records it as a CUDA graph, replayed per token in one launch
  (gpt-fast's recipe). The prefill, whose length varies, stays eager; so does sampling (a torch.Generator
  cannot go into a graph), a few small kernels per token.
"""
import functools

import torch
import torch.nn as nn

from errors import BadValue

CACHE_ROUND = 256  # static caches are allocated in multiples of this many positions, so other prompt lengths fit


class KVCache(nn.Module):
    """Keys and values of one layer for decoding, preallocated for max_len positions."""

    def __init__(self, batch_size, max_len, n_kv_heads, head_dim, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, pos, k, v):
        """Write k, v (B, nkv, T, hd) from position pos on and return what attention reads. pos an int: the
        cache up to pos + T. pos a (T,) tensor (the compiled step): written by index and the whole cache returned,
        the same shapes at every position (the caller's mask hides the positions not written yet)."""
        if torch.is_tensor(pos):
            self.k.index_copy_(2, pos, k.to(self.k.dtype))
            self.v.index_copy_(2, pos, v.to(self.v.dtype))
            return self.k, self.v
        t = pos + k.size(2)
        self.k[:, :, pos:t] = k
        self.v[:, :, pos:t] = v
        return self.k[:, :, :t], self.v[:, :, :t]


def static_cache(model, batch_size: int, max_len: int, dtype, device) -> list:
    """The model's cache for compiled decoding, kept on the model and reused by later calls when it fits (same
    batch size, dtype and device, at least max_len positions). A CUDA graph reads the cache at fixed addresses
    (mark_static_address: no copy per step); a new cache makes the graph re-record, without a recompile."""
    cfg = model.config
    old = getattr(model, "_static_cache", None)
    k = old[0].k if old else None
    if k is not None and (k.size(0), k.dtype, k.device) == (batch_size, dtype, device) and k.size(2) >= max_len:
        return old
    model._static_cache = None  # free the old cache before allocating the new one
    length = -(-max_len // CACHE_ROUND) * CACHE_ROUND
    cache = [KVCache(batch_size, length, cfg.n_kv_heads, cfg.head_dim, dtype, device) for _ in range(cfg.n_layers)]
    for c in cache:
        torch._dynamo.mark_static_address(c.k, guard=False)
        torch._dynamo.mark_static_address(c.v, guard=False)
    model._static_cache = cache
    return cache


def _step(model, tok, cache, pos, pad):
    """One decoding position: tok (B, 1) at position pos (a (1,) tensor) -> logits (B, vocab)."""
    return model(tok, cache=cache, pos=pos, pad=pad)[:, -1]


@functools.cache
def compiled_step(device_type: str):
    """_step compiled, once per process: replayed as a CUDA graph on CUDA (what mode="reduce-overhead" sets),
    inductor's default elsewhere. emulate_precision_casts: fused bf16 ops round where eager rounds (on CPU, one
    tiny bf16 model and batch: 95% of greedy tokens as eager without it, 100% with it; a tie of the top two
    logits can still part the paths). fullgraph: a graph break would quietly bring the launches back.
    coordinate_descent_tuning (CUDA): with it inductor writes each one-row matmul (a token's activations against a
    weight matrix: nearly all of a step's bytes) as its own reduction kernel, tuned, instead of calling cuBLAS,
    whose matrix-vector kernels moved the weights at about half the H200's bandwidth
    (measurements/2026-12-04-h200); compiling takes longer."""
    options = {"triton.cudagraphs": device_type == "cuda", "emulate_precision_casts": True,
               "coordinate_descent_tuning": device_type == "cuda"}
    return torch.compile(_step, options=options, fullgraph=True)


def _last_position(h, lm_head):
    return lm_head(h[:, -1:])  # prefill only needs the last position's logits


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """logits (B, V) -> next ids (B, 1): greedy at temperature 0, else top-k / nucleus sampling."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)


@torch.no_grad()
def decode(model, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, eos_ids=None, generator=None, pad=None, compile: bool | None = None):
    """Yield (token (B, 1), finished) per step; finished is a 0-dim bool tensor, True once every row has produced
    an eos id (rows that did keep emitting eos_ids[0]). It stays a tensor: reading it waits for the device,
    so the caller decides how often. compile None: compiled on CUDA, eager elsewhere."""
    B, T = idx.shape
    cfg = model.config
    # positions past the model's context give garbage, not text: refused (the scripts check their flags and rows
    # against the context before loading a model; this is the last line for every other caller)
    if max_new_tokens < 0 or T + max_new_tokens > cfg.max_position_embeddings:
        raise BadValue(f"cannot decode {max_new_tokens} new tokens after a {T}-token prompt: the model's context is "
                       f"{cfg.max_position_embeddings} positions (max_position_embeddings), prompt and new tokens "
                       "together")
    dtype = model.embed_tokens.weight.dtype
    if torch.is_autocast_enabled(idx.device.type):
        dtype = torch.get_autocast_dtype(idx.device.type)
    if compile is None:
        compile = idx.device.type == "cuda"
    if compile:
        cache, step = static_cache(model, B, T + max_new_tokens, dtype, idx.device), compiled_step(idx.device.type)
    else:
        cache = [KVCache(B, T + max_new_tokens, cfg.n_kv_heads, cfg.head_dim, dtype, idx.device)
                 for _ in range(cfg.n_layers)]
    eos = torch.tensor(list(eos_ids or []), device=idx.device, dtype=torch.long)
    done = torch.zeros(B, dtype=torch.bool, device=idx.device)
    # eager even when compile_blocks() ran: compiled blocks would recompile at every new length and position
    with torch.compiler.set_stance("force_eager"):
        logits = model(idx, cache=cache, head=_last_position, pad=pad)[:, -1]
    pos = torch.tensor([T], device=idx.device)  # the compiled step's position, advanced in place
    for i in range(max_new_tokens):
        tok = sample_next(logits, temperature, top_k, top_p, generator)  # (B, 1)
        if len(eos):
            tok = torch.where(done[:, None], eos[0], tok)
            done |= torch.isin(tok[:, 0], eos)
        yield tok, done.all()
        if i == max_new_tokens - 1:
            return
        if compile:
            torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are consumed: reuse its memory
            logits = step(model, tok, cache, pos, pad)
            pos += 1
        else:
            with torch.compiler.set_stance("force_eager"):
                logits = model(tok, cache=cache, pos=T + i, pad=pad)[:, -1]


def generate(model, idx, max_new_tokens: int, *args, eos_ids=None, check_every: int | None = None,
             **kw) -> torch.Tensor:
    """model.generate: (B, T + n), stopping once every row has produced an eos id. Whether all rows have finished
    is read every check_every steps (None: each step on a CPU, every 8 on a GPU, where a read waits for the GPU,
    which then idles while the CPU queues the next step); the steps run past the point are cut, so the output is
    the same as when checking each step."""
    every = check_every or (1 if idx.device.type == "cpu" else 8)
    toks, finished = [], []
    for tok, fin in decode(model, idx, max_new_tokens, *args, eos_ids=eos_ids, **kw):
        toks.append(tok)
        finished.append(fin)
        if eos_ids and len(toks) % every == 0 and bool(fin):
            break
    if eos_ids and finished and bool(finished[-1]):
        toks = toks[:int(torch.stack(finished).int().argmax()) + 1]  # up to the first step where all had finished
    return torch.cat([idx] + toks, dim=1)


def stream(model, idx, max_new_tokens: int, *args, **kw):
    """model.stream: yield each token (B, 1) as soon as it is sampled, until every row has produced an eos id."""
    for tok, fin in decode(model, idx, max_new_tokens, *args, **kw):
        yield tok
        if bool(fin):
            return
