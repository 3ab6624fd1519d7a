"""
A Mistral-family decoder-only transformer in one file: Mistral, Llama (2, 3, 3.2) and Qwen2
checkpoints in Hugging Face format, loaded from safetensors and saved back to them.

The math follows the reference implementations exactly (tests compare logits against
transformers to 1e-4 in float32):
- RMSNorm computed in float32, then cast back (as HF does);
- rotary embeddings in HF's "rotate_half" layout (the first and second halves of each head are
  the pairs; Meta's original code rotates interleaved pairs instead, HF permuted the q/k rows when
  converting, so HF weights load here as-is), with rope_theta and the "llama3" frequency scaling;
- grouped-query attention through F.scaled_dot_product_attention, Mistral's sliding window;
- SwiGLU MLP, optional q/k/v bias (Qwen2), optional tied input/output embeddings.

One forward serves training and decoding: `cache` is None in training and a list of decode.KVCache when decoding
(decode.py holds the decoding loop, eager or one compiled step per token).
`forward` also takes an `embed` function that builds the input vectors from the embedding table (IFT
blends two lookups) and a `head` function applied to the final hidden states instead of the output
projection (ift.py uses it to skip ignored positions and to chunk the vocabulary projection).
Reading and writing Hugging Face checkpoints (config.json rules, safetensors) lives in hf_checkpoint.py.
"""
import inspect
import math
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

import decode
import hf_checkpoint
from errors import BadValue
from packing import Packing
from hf_checkpoint import resolve_checkpoint  # noqa: F401  (scripts import it from here)


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    dim: int = 4096                   # hidden_size
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8               # grouped-query attention: n_heads // n_kv_heads queries share a k/v head
    head_dim: int = 0                 # 0 -> dim // n_heads (Mistral-NeMo sets it explicitly)
    intermediate_size: int = 14336
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # None or the "llama3" dict (factor, low/high_freq_factor, original_max...)
    max_position_embeddings: int = 32768
    sliding_window: int | None = None  # tokens a query sees, itself included (Mistral-7B-v0.1: 4096)
    window_layers: list | None = None  # per layer True where the window applies (Qwen2 layer_types); None: all
    qkv_bias: bool = False            # Qwen2
    tie_word_embeddings: bool = False
    model_type: str = "mistral"
    extra: dict = field(default_factory=dict)  # config.json keys the math does not read, kept for saving

    def __post_init__(self):
        self.head_dim = self.head_dim or self.dim // self.n_heads
        assert self.n_heads % self.n_kv_heads == 0, "n_heads must be a multiple of n_kv_heads"

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> "ModelConfig":
        """Read a transformers config.json dict by the rules of hf_checkpoint.py (inert, math, unknown keys)."""
        return cls(**hf_checkpoint.config_kwargs(hf, source))

    def to_hf(self) -> dict:
        return hf_checkpoint.config_to_hf(self)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalize in float32 whatever the compute dtype, then cast back before the gain (as HF does)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_frequencies(cfg: ModelConfig, device=None) -> torch.Tensor:
    """inv_freq (head_dim // 2,): theta^(-2i/d), with Llama-3's long-context rescaling when configured."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
    if cfg.rope_scaling:  # "llama3": slow frequencies are divided by factor, fast ones kept, a smooth ramp between
        s = cfg.rope_scaling
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - lo) / (hi - lo)
        mixed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        is_mid = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
        inv_freq = torch.where(is_mid, mixed, inv_freq)
    return inv_freq


def apply_rope(x, cos, sin):
    # x (B, nh, T, hd); pairs are (x[i], x[i + hd/2]): HF's rotate_half layout
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def attend(q, k, v, mask, causal: bool, gqa: bool | None = None):
    """Attention of q (B, nh, T, hd) over k, v (B, nkv, S, hd), nh a multiple of nkv -> (B, nh, T, hd).
    SDPA's enable_gqa reaches a fused CUDA kernel (flash) only in bf16/fp16 without a mask; with a mask or in
    float32 CUDA falls back to the unfused math kernel. There (gqa False; None: by that rule) SDPA gets plain
    multi-head inputs: a single query per head (decoding) becomes g queries of its k/v head (no copy), longer
    queries get k/v repeated per query head. CPU kernels take enable_gqa as it is."""
    B, nh, T, hd = q.shape
    g = nh // k.size(1)
    if gqa is None:
        gqa = not q.is_cuda or (mask is None and q.dtype in (torch.float16, torch.bfloat16))
    if g == 1 or gqa:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=g > 1)
    if T == 1:  # a (T, S) or (B, 1, T, S) mask broadcasts over the g queries
        y = F.scaled_dot_product_attention(q.reshape(B, -1, g, hd), k, v, attn_mask=mask)  # (B, nkv, g, hd)
        return y.reshape(B, nh, 1, hd)  # reshape: fused kernels may return a transposed layout
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


try:  # flash attention over examples laid end to end (torch >= 2.12 has the window and GQA arguments)
    from torch.nn.attention.varlen import varlen_attn
    if not {"window_size", "enable_gqa"} <= set(inspect.signature(varlen_attn).parameters):
        varlen_attn = None
except ImportError:
    varlen_attn = None
# Attention example by example on CUDA leaves out cuDNN's kernel: cuDNN builds an execution plan for every new
# sequence length, and packed examples bring a dozen new lengths at every step. Seen on an H200 with torch
# 2.11 before this rule: train.py --pack at 3.5 s a step, padded batches of the same examples at 0.4 s (bench.py,
# whose examples repeat, ran packed 1.5x faster); the rule itself has not run on a GPU yet.
PER_EXAMPLE_KERNELS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def varlen_ok(q) -> bool:
    return varlen_attn is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


@torch.compiler.disable  # the examples' lengths change every batch: compiled blocks break around this call
def attend_packed(q, k, v, packing: Packing):
    """Attention of examples laid end to end in one row (packing.py): q (1, nh, L, hd), k, v (1, nkv, L, hd).
    Each example attends causally to its own tokens only (within packing.window), never across a boundary.
    On CUDA in bf16/fp16 with torch >= 2.12: one varlen flash-attention call over the row. Elsewhere: examples
    of one length as the rows of one batch, else one by one, each exactly as attend() runs an unpadded row."""
    if varlen_ok(q):
        left = -1 if packing.window is None else packing.window - 1  # keys q-left .. q
        y = varlen_attn(*(t[0].transpose(0, 1) for t in (q, k, v)), packing.cu, packing.cu, max(packing.lengths),
                        max(packing.lengths), window_size=(left, 0), enable_gqa=True)  # (L, nh, hd)
        return y.transpose(0, 1)[None]
    n, N = packing.lengths[0], len(packing.lengths)
    if packing.lengths == (n,) * N:  # all of one length: the examples as rows of one batch, one call
        qs, ks, vs = (t[0].reshape(t.size(1), N, n, t.size(3)).transpose(0, 1) for t in (q, k, v))
        mask = None if packing.window is None or n <= packing.window else causal_mask(
            torch.arange(n, device=q.device), n, packing.window)
        y = attend(qs, ks, vs, mask, causal=mask is None)  # (N, nh, n, hd)
        return y.transpose(0, 1).reshape(1, q.size(1), N * n, q.size(3))
    out, start = [], 0
    with sdpa_kernel(PER_EXAMPLE_KERNELS) if q.is_cuda else nullcontext():
        for n in packing.lengths:
            qs, ks, vs = (t[:, :, start:start + n] for t in (q, k, v))
            mask = None
            if packing.window is not None and n > packing.window:
                mask = causal_mask(torch.arange(n, device=q.device), n, packing.window)
            out.append(attend(qs, ks, vs, mask, causal=mask is None))
            start += n
    return torch.cat(out, dim=2)


def causal_mask(q, n_keys, window, pad=None):
    """Boolean (T, n_keys) mask for queries at positions q (T,) over keys 0 .. n_keys-1, True = may attend.
    With left padding pad (B,): (B, 1, T, n_keys), each row's padding hidden from its real tokens. (Rows need
    no position shift: RoPE attention scores depend only on the distance between query and key.)"""
    k = torch.arange(n_keys, device=q.device)[None, :]
    q = q[:, None]
    m = (k <= q) if window is None else (k <= q) & (q - k < window)
    if pad is not None:  # a padding query still sees itself: no all-masked (NaN) softmax row
        m = (m & (k >= pad[:, None, None, None])) | (k == q)
    return m


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, self.nh * self.hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, self.nkv * self.hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, self.nkv * self.hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.nh * self.hd, cfg.dim, bias=False)

    def forward(self, x, cos, sin, mask, cache=None, pos=0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hd).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(pos, k, v)  # (B, nkv, pos+T, hd); the whole cache when pos is a tensor
        if isinstance(mask, Packing):  # examples laid end to end: each attends to itself only
            y = attend_packed(q, k, v, mask)
        else:  # mask None: causal attention from position 0, or one query (decoding) that sees every cached key
            y = attend(q, k, v, mask, causal=mask is None and T > 1)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache=None, pos=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_frequencies(cfg), persistent=False)
        self.grad_checkpointing = False  # train.py switches it on (non-reentrant, safe under DDP)
        self.name_or_path = None         # where the weights came from, to copy tokenizer files on save
        self.apply(self._init_weights)

    def _init_weights(self, m):
        if isinstance(m, (nn.Linear, nn.Embedding)) and m.weight.device.type != "meta":
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def forward(self, idx=None, *, embed=None, head=None, cache=None, pos: int | torch.Tensor = 0, pad=None,
                packing: Packing | None = None):
        """idx (B, T) token ids -> logits (B, T, vocab). embed(embed_tokens) -> (B, T, dim) replaces the input
        lookup and head(h, lm_head) the output projection when given (IFT's blend and loss heads; both run
        inside forward, where FSDP has gathered the tables); cache/pos are for decoding (pos an int, or for the
        compiled step of decode.py a (T,) tensor of positions, the whole cache then read under a mask);
        pad (B,) counts left-padding positions per row (batched prompts of different lengths); packing: idx is
        one row (1, L) of examples laid end to end (packing.py), positions and attention restart per example."""
        x = self.embed_tokens(idx) if embed is None else embed(self.embed_tokens)
        B, T, _ = x.shape
        static = torch.is_tensor(pos)
        positions = pos if static else torch.arange(pos, pos + T, device=x.device)
        if packing is not None:
            positions = packing.positions
        n_keys = cache[0].k.size(2) if static else pos + T
        freqs = positions[:, None].float() * self.inv_freq[None]
        emb = torch.cat((freqs, freqs), dim=-1)  # (T, hd)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        if torch.is_autocast_enabled(x.device.type):  # q, k come out of autocast linears: rotate them in that dtype
            cos, sin = (c.to(torch.get_autocast_dtype(x.device.type)) for c in (cos, sin))

        def mask(window):  # None (SDPA's fast path): causal from position 0, or one query within the window
            if not static and pad is None and (pos == 0 or T == 1) and (window is None or n_keys <= window):
                return None
            return causal_mask(positions, n_keys, window, pad)

        # Mistral windows every layer; Qwen2's layer_types can window some layers only
        win = self.config.sliding_window
        if packing is not None:
            masks = {False: packing, True: packing.with_window(win)}
        else:
            masks = {False: mask(None)}
            masks[True] = masks[False] if win is None else mask(win)
        windowed = self.config.window_layers or [True] * len(self.layers)
        for i, layer in enumerate(self.layers):
            m = masks[windowed[i]]
            c = None if cache is None else cache[i]
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, m, c, pos, use_reentrant=False)
            else:
                x = layer(x, cos, sin, m, c, pos)
        h = self.norm(x)
        return self.lm_head(h) if head is None else head(h, self.lm_head)

    def compile_blocks(self):
        """torch.compile block by block (one graph serves every layer). The heads ift.py passes to forward pick
        answer positions, a data-dependent shape that would break a whole-model graph; they stay eager."""
        for layer in self.layers:
            layer.compile()

    # ---------------------------------------------------------------------------------------------------------------
    # decoding

    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, eos_ids=None, generator=None, pad=None, compile: bool | None = None):
        """Continue idx (B, T); temperature 0 is greedy. Returns (B, T + n) with n <= max_new_tokens.
        Rows that produced an eos id keep emitting it until every row has finished. Prompts of different
        lengths: left-pad them and give pad (B,), the number of padding positions of each row. compile: one
        compiled step over a static cache, a CUDA graph on a GPU (decode.py); None = on CUDA only."""
        return decode.generate(self, idx, max_new_tokens, temperature, top_k, top_p, eos_ids=eos_ids,
                               generator=generator, pad=pad, compile=compile)

    def stream(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, eos_ids=None, generator=None, pad=None, compile: bool | None = None):
        """Yield the next token (B, 1) step by step: prefill the KV cache once, then one position per step."""
        return decode.stream(self, idx, max_new_tokens, temperature, top_k, top_p, eos_ids=eos_ids,
                             generator=generator, pad=pad, compile=compile)

    # ---------------------------------------------------------------------------------------------------------------
    # Hugging Face checkpoints

    @classmethod
    def from_pretrained(cls, path: str, dtype=None, device=None, shard=None) -> "Transformer":
        """A local directory with config.json + model.safetensors (or sharded with an index), or a hub id.
        Built on the meta device, then filled tensor by tensor: one copy of the weights in memory. dtype: the
        checkpoint's own when None. shard(model), when given, runs on the meta model first (FSDP's fully_shard),
        and each rank then reads only the rows of each tensor it keeps."""
        path = resolve_checkpoint(path)
        if hf_checkpoint.is_adapter(path):  # peft's adapter files: its base with the adapters merged in (lora.py)
            import lora
            return lora.merged(cls, path, dtype, device, shard)
        source = f"{path}/config.json"
        cfg = ModelConfig.from_hf(hf_checkpoint.read_config(path), source=source)
        files = hf_checkpoint.weight_files(path)
        hf_checkpoint.check_layers(cfg, files, source)  # before building: no million-layer model from a typo
        with torch.device("meta"):
            model = cls(cfg).to(dtype or hf_checkpoint.stored_dtype(files))
        hf_checkpoint.check_shapes(model, files, source)  # before allocating: sizes contradicting the weights
        if shard is not None:
            shard(model)
        model.to_empty(device=device or "cpu")
        if cfg.tie_word_embeddings:  # to_empty makes new Parameters of plain tensors: one table again
            model.lm_head.weight = model.embed_tokens.weight
        hf_checkpoint.load_weights(model, path, files)
        model.inv_freq = rope_frequencies(cfg, device=device)  # buffers come out of to_empty uninitialized
        model.name_or_path = path
        return model.eval()

    def save_pretrained(self, out_dir: str, max_shard_bytes: int = 4 * 1024**3, tokenizer_dir: str | None = None,
                        state_dict: dict | None = None):
        """config.json + safetensors with HF tensor names and the tokenizer files of tokenizer_dir (default:
        where the weights came from). state_dict: a full state dict gathered elsewhere (FSDP), else this
        module's own."""
        hf_checkpoint.save(self.config, state_dict or self.state_dict(), out_dir, max_shard_bytes,
                           tokenizer_dir or self.name_or_path)


def pick_device(name: str = "auto") -> torch.device:
    """The --device rule of every script: "auto" is cuda when there is one, else cpu."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise BadValue(f"--device {name}: not a device (auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BadValue(f"--device {name}: no CUDA device is visible to torch (use --device cpu or auto)")
    return device


def decoding_dtype(device) -> torch.dtype:
    """Weights for decoding: bf16 on CUDA (autocast over float32 weights would re-cast them at every token),
    float32 on CPU."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
