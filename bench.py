"""
Benchmark: what IFT costs over SFT, what the chunked loss saves over log_softmax + gather, and how model.py
compares with transformers on the same weights. Every number is a ratio measured side by side in one process:
same model, same batch, same dtype; warm-up steps are discarded and the median of several timed steps reported.

    python bench.py --init tiny                                    # a tiny random model, seconds
    python bench.py --init checkpoints/SmolLM2-135M-Instruct --batch_size 4 --seq_len 256 --threads 2
    python bench.py --device cuda --init llama-3.2-1b --batch_size 4 --seq_len 1024 --compile  # random weights
    python bench.py --device cuda --init llama-3.2-1b --batch_size 1 --seq_len 512    # decoding roofline
    python bench.py --init tiny --profile 15 --compile_decode     # top kernels per step; SDPA kernel per call
    python bench.py --init tiny --pack --batch_size 8 --seq_len 2048   # train.py --pack against padded batches

The batch is realistic for fine-tuning: the first third of each sequence is prompt (targets -100, skipped
before the output projection), the rest is answer. A training step is forward + backward + optimizer step
(RMSprop, as train.py). The methods take turns step by step, so load from other processes hits them alike.

Memory: on CUDA, torch.cuda.max_memory_allocated. On CPU there is no allocator counter, so LiveBytes below
follows every tensor an op creates (a TorchDispatchMode) and keeps the peak of the bytes alive at once: the
same quantity as CUDA's counter, deterministic, in this one process. Both report the peak *above* what was
allocated before the step (weights, optimizer state), so the part the method itself adds is not diluted.
"""
import argparse
import copy
import math
import os
import statistics
import tempfile
import time
import weakref
from contextlib import nullcontext
from functools import partial

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import baselines
import decode
import ift
import lora
import train
from errors import UserError, read_json, run
from model import ModelConfig, Transformer, pick_device
from train import flops_per_token, gpu_row, peak_flops

HERE = os.path.dirname(os.path.abspath(__file__))
QWEN2_VOCAB = 152064  # Qwen2-7B's vocabulary: where the (positions, vocab) logits dominate memory
TINY = ModelConfig(vocab_size=1024, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=128,
                   max_position_embeddings=4096, model_type="llama")
# random weights in public models' shapes: speed and memory need no trained weights, and a GPU machine that
# cannot download still measures MFU at a realistic size (rope scaling left out: it costs nothing)
SHAPES = {
    "tiny": TINY,
    "llama-3.2-1b": ModelConfig(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                                intermediate_size=8192, rope_theta=500000.0, tie_word_embeddings=True,
                                max_position_embeddings=131072, model_type="llama"),
    "qwen2-1.5b": ModelConfig(vocab_size=151936, dim=1536, n_layers=28, n_heads=12, n_kv_heads=2,
                              intermediate_size=8960, rms_norm_eps=1e-6, rope_theta=1000000.0, qkv_bias=True,
                              tie_word_embeddings=True, model_type="qwen2"),
}
MB = 2**20


# -------------------------------------------------------------------------------------------------------------------
# measuring


class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storage allocated inside the `with` block and alive at the same time.
    Every aten op passes through __torch_dispatch__ (below autograd, so backward and recomputation are seen).
    An output whose storage is none of the op's inputs' is a new allocation (views and in-place ops reuse an
    input's storage); a weak reference to the storage says when it is freed. Counts what tensors hold, not what
    an allocator caches nor scratch memory a kernel uses inside one op."""

    def __init__(self):
        super().__init__()
        self.now = self.peak = 0
        self._alive = {}  # storage data_ptr -> weakref, for storages allocated in the block

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            ptr, nbytes = st.data_ptr(), st.nbytes()
            if nbytes and ptr not in inputs and ptr not in self._alive:
                self._alive[ptr] = weakref.ref(st, partial(self._freed, ptr, nbytes))
                self.now += nbytes
                self.peak = max(self.peak, self.now)
        return out

    def _freed(self, ptr, nbytes, _ref):
        self._alive.pop(ptr, None)
        self.now -= nbytes


def peak_memory(fn, device) -> int:
    """Peak bytes allocated while fn() runs, above what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with LiveBytes() as live:
        fn()
    return live.peak


def memory_measure(device) -> str:
    return ("torch.cuda.max_memory_allocated" if device.type == "cuda"
            else "peak live tensor bytes seen by a TorchDispatchMode (bench.LiveBytes)")


def median_times(fns: dict, warmup: int, steps: int, device) -> dict:
    """Median seconds per call of each fn; the fns take turns, warm-up calls discarded."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(steps):
        for k, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


# Peak memory bandwidth per GPU, bytes/s (vendor datasheets), first matching name wins: the decoding roofline.
PEAK_BANDWIDTH = {"H100 PCIe": 2.0e12, "H100": 3.35e12, "GH200": 4.0e12, "H200": 4.8e12,
                  "A100 80GB PCIe": 1.935e12, "A100-SXM4-80GB": 2.039e12, "A100": 1.555e12}


def device_peaks(device, peak_tflops: float, bandwidth_gbs: float) -> tuple[float | None, float | None]:
    """(dense bf16 FLOP/s, memory bytes/s) of the device: the flags when given, else the GPU's row in
    train.PEAK_BF16_FLOPS / PEAK_BANDWIDTH; None where unknown (CPUs are in no table)."""
    bandwidth = bandwidth_gbs * 1e9 if bandwidth_gbs else gpu_row(PEAK_BANDWIDTH, device)
    return peak_flops(device, peak_tflops), bandwidth


def decode_bytes(model: Transformer) -> int:
    """Weight bytes one decoding step reads: every parameter, except that an untied input embedding table is
    read one row per token (its rows are negligible and not counted)."""
    emb = model.embed_tokens.weight
    skip = 0 if model.config.tie_word_embeddings else emb.numel() * emb.element_size()
    return sum(p.numel() * p.element_size() for p in model.parameters()) - skip


def decode_times(decoders: dict, n: int, steps: int, device) -> tuple[dict, dict, dict]:
    """Each decoder(k) returns the prompt plus k greedy tokens. Timed at k = n and k = 1 (median of steps calls
    after one warm-up, which also compiles) -> (the n-token outputs, seconds for n tokens with the prefill,
    seconds per step after the prefill: (t_n - t_1) / (n - 1), what the memory roofline bounds)."""
    outs = {}

    def run(name, k):
        out = decoders[name](k)
        if k == n:
            outs[name] = out

    secs = median_times({(name, k): partial(run, name, k) for name in decoders for k in (n, 1)}, 1, steps, device)
    per_step = {name: max(secs[name, n] - secs[name, 1], 1e-9) / max(n - 1, 1) for name in decoders}
    return outs, {name: secs[name, n] for name in decoders}, per_step


def one_decode_step(model: Transformer, prompt, how: str = "eager", pad=None):
    """A function running one decoding step of model.generate after prefilling prompt (B, P), for the profiler.
    how: "eager" (the forward over the cache up to the position), "compiled" (decode.py's compiled step over the
    static cache) or "static" (the compiled step's inputs run eagerly, so that its aten ops stay visible)."""
    B, P = prompt.shape
    cfg, dtype, tok = model.config, model.embed_tokens.weight.dtype, prompt[:, -1:].contiguous()  # as sampled
    if how == "eager":
        cache = [decode.KVCache(B, P + 1, cfg.n_kv_heads, cfg.head_dim, dtype, prompt.device)
                 for _ in range(cfg.n_layers)]
    else:
        cache = decode.static_cache(model, B, P + 1, dtype, prompt.device)
    eager = torch.compiler.set_stance("force_eager")  # as in decode.py: blocks of compile_blocks() stay eager
    with torch.no_grad(), eager:
        model(prompt, cache=cache, pad=pad)  # prefill
    pos = P if how == "eager" else torch.tensor([P], device=prompt.device)
    step = decode.compiled_step(prompt.device.type) if how == "compiled" else decode._step

    @torch.no_grad()
    def run():
        torch.compiler.cudagraph_mark_step_begin()
        with nullcontext() if how == "compiled" else eager:
            return step(model, tok, cache, pos, pad)
    return run


def top_kernels(fn, device, n: int) -> tuple[list, float]:
    """torch.profiler over one fn() call -> ([(name, ms, calls)] of the n kernels taking the most time, total
    ms of all): GPU kernels by device time on CUDA, aten ops by self CPU time on a CPU. Two calls before it
    are not profiled (compilation; a CUDA graph's warm-up and recording)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    fn()
    fn()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize(device)
    rows = [(e.key, (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e3, e.count)
            for e in prof.key_averages() if (e.device_type == DeviceType.CUDA) == cuda]
    rows.sort(key=lambda r: -r[1])
    return rows[:n], sum(r[1] for r in rows)


def print_profile(name: str, fn, device, n: int):
    rows, total = top_kernels(fn, device, n)
    kind = "GPU kernels by device time" if device.type == "cuda" else "aten ops by self CPU time"
    print(f"profile {name}: top {len(rows)} {kind}, {total:.2f} ms in all")
    print(f"    {'ms':>9} {'share':>6} {'calls':>6}  kernel")
    for key, ms, calls in rows:
        print(f"    {ms:9.3f} {ms / max(total, 1e-9):6.1%} {calls:6d}  {key[:100]}")


def sdpa_kernels(fn) -> str:
    """The scaled_dot_product_attention backends fn() reaches, by the aten ops the profiler records:
    flash, efficient (memory-efficient), cudnn, math (unfused), flash_attention_for_cpu."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = {e.key.removeprefix("aten::_scaled_dot_product_") for e in prof.key_averages()
             if e.key.startswith("aten::_scaled_dot_product_")}
    return ", ".join(sorted(names)) or "none"


# -------------------------------------------------------------------------------------------------------------------
# what is measured


def make_batch(B: int, T: int, vocab: int, device, seed: int = 0):
    """Random tokens; the first third of each row is prompt (targets -100), the rest answer.
    -> idx (B, T), targets (B, T) with targets[:, t] = idx[:, t + 1] where idx[:, t + 1] is an answer token."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(vocab, (B, T), generator=g)
    targets = torch.full((B, T), ift.IGNORE)
    p = max(1, T // 3)
    targets[:, p - 1:T - 1] = idx[:, p:]
    return idx.to(device), targets.to(device)


def train_step(loss_fn, optimizer, update: bool = True):
    """One optimizer step of loss_fn(): forward, backward, update (update False: the gradients are dropped)."""
    def step():
        loss_fn().backward()
        if update:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def reference_nll(h, lm_head, targets):
    """The reference code's per-token loss: full float32 log_softmax over (B, T, V), then gather."""
    # (B, T, V); freed once log_softmax has run. The reference code keeps them alive in the model's output,
    # which would only add to its peak: this is the kindest version of that approach
    logits = lm_head(h).float()
    logp = logits.log_softmax(-1)
    nll = -logp.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)  # (B, T)
    return torch.where(targets != ift.IGNORE, nll, 0)


def loss_memory(vocab, dim, idx_shape, targets, device, autocast, reference=True) -> tuple[int, int | None]:
    """Peak memory of the per-token losses and their backward, from final hidden states (B, T, dim) through a
    (vocab, dim) output projection: ours (ift.chunked_nll) vs the reference's log_softmax + gather (None when
    reference=False)."""
    torch.manual_seed(0)
    lm_head = nn.Linear(dim, vocab, bias=False, device=device)
    nn.init.normal_(lm_head.weight, std=0.02)
    h = torch.randn(*idx_shape, dim, device=device, requires_grad=True)
    mask = targets != ift.IGNORE

    def run(nll_fn):
        with autocast:
            loss = ift.sft_reduce(nll_fn(h, lm_head, targets), mask)
        loss.backward()
        h.grad = lm_head.weight.grad = None

    fns = {"ours": partial(run, ift.chunked_nll), "reference": partial(run, reference_nll)}
    if not reference:
        del fns["reference"]
    for fn in fns.values():  # warm-up: lazily created library state must not count against the first
        fn()
    peaks = {k: peak_memory(fn, device) for k, fn in fns.items()}
    return peaks["ours"], peaks.get("reference")


def free_bytes(device) -> int:
    """Memory the device has free now (CUDA: the driver's count; CPU: Linux's MemAvailable, else free pages)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def reference_bytes(vocab, dim, B, T) -> int:
    """A generous estimate of reference_nll's peak with its backward under bf16 autocast: 12 bytes per logit
    (10 measured at 4 x 1024 on CPU: a bf16 and two float32 (V,) rows, or their gradients), plus 1.5
    weight-sized float32 buffers (the bf16 weight and its bf16 gradient, then the float32 gradient)."""
    return B * T * vocab * 12 + vocab * dim * 4 * 3 // 2


def loss_sweep(vocab, dim, sizes, device, autocast):
    """The loss-memory line at several batch shapes: ours, the reference and their ratio, one line each. A
    reference that would not fit in free memory (reference_bytes) is skipped, not crashed into."""
    print(f"loss memory at vocab {vocab}, dim {dim}, forward + backward of sft_reduce over the per-token "
          f"losses ({memory_measure(device)}, peak above the head's weights)")
    for B, T in sizes:
        _, targets = make_batch(B, T, vocab, device)
        need, free = reference_bytes(vocab, dim, B, T), free_bytes(device)
        if need > free:
            ours, _ = loss_memory(vocab, dim, (B, T), targets, device, autocast, reference=False)
            print(f"loss memory {B} x {T}: ours {ours / MB:.1f} MB, log_softmax+gather not run (needs about "
                  f"{need / 2**30:.1f} GB, {free / 2**30:.1f} GB free)")
            continue
        ours, ref = loss_memory(vocab, dim, (B, T), targets, device, autocast)
        print(f"loss memory {B} x {T}: ours {ours / MB:.1f} MB, log_softmax+gather {ref / MB:.1f} MB, "
              f"{ours / ref:.2f}x")


def hf_twin(model: Transformer, device):
    """transformers' implementation loaded with the same weights (written by our save_pretrained)."""
    from transformers import AutoModelForCausalLM
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d, tokenizer_dir=d)  # tokenizer_dir=d: copy no tokenizer files
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=model.embed_tokens.weight.dtype, attn_implementation="sdpa")
    return hf.to(device)


def pair_batch(B: int, T: int, vocab: int, device, seed: int = 0):
    """B preference pairs as train.py batches them: 2B rows, make_batch's B rows as the chosen answers, then B
    rejected rows with the same prompts and other random answers of the same length. -> idx, targets (2B, T)."""
    idx, targets = make_batch(B, T, vocab, device, seed)
    other, other_targets = make_batch(B, T, vocab, device, seed + 1)
    p = max(1, T // 3)
    other[:, :p] = idx[:, :p]  # the shared prompt; the targets (answer tokens from position p on) stay
    return torch.cat([idx, other]), torch.cat([targets, other_targets])


def method_memory(model: Transformer, methods: list, B: int, T: int, device, autocast, lam: float = 0.2,
                  gamma: float = 0.95, warmup: int = 0, timed: int = 0) -> dict:
    """Peak memory of one training step (forward, backward, RMSprop update) of each method on one model and
    optimizer, above its weights and optimizer state: SFT and IFT on B rows, the preference baselines on B pairs
    (2B rows: chosen then rejected; "sft 2B rows" is SFT on those same rows). DPO and TDPO also hold a frozen
    reference, a copy of the weights made before any step (bf16 on CUDA, as train.py), reported beside it.
    With timed > 0 each line also gives the median step time of that many steps (after warmup more).
    Prints one line per method and returns {method: (peak bytes, reference bytes)}."""
    cfg = model.config
    x, y = make_batch(B, T, cfg.vocab_size, device)
    px, py = pair_batch(B, T, cfg.vocab_size, device)
    ref = None
    if any(m in baselines.REFERENCE_METHODS for m in methods):
        ref = copy.deepcopy(model).to(torch.bfloat16 if device.type == "cuda" else torch.float32)
        ref.requires_grad_(False).eval()
    ref_bytes = 0 if ref is None else sum(p.numel() * p.element_size() for p in ref.parameters())
    optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-8)

    def loss_of(method):
        with autocast:
            if method == "sft":
                return ift.sft_forward(model, x, y)
            if method == "sft 2B rows":
                return ift.sft_forward(model, px, py)
            if method == "ift":
                return ift.ift_forward(model, x, y, lam, gamma)[0]
            return baselines.pair_forward(model, ref, px, py, method)[0]

    names = list(dict.fromkeys(["sft", *methods]))  # sft first: the baseline of the ratios
    if any(m in baselines.PAIR_METHODS for m in methods):
        names.insert(1, "sft 2B rows")
    steps = {m: train_step(partial(loss_of, m), optimizer) for m in names}
    for step in steps.values():  # warm-up: optimizer state and lazily created library state are not the step's
        step()
    peaks = {m: peak_memory(steps[m], device) for m in names}
    secs = median_times(steps, warmup, timed, device) if timed else {}
    print(f"method memory: one training step, {B} rows (sft, ift) or {B} pairs = {2 * B} rows (the rest) of {T} "
          f"tokens; peak above the weights and optimizer state; reference weights held besides by dpo/tdpo")
    out = {}
    for m in names:
        held = ref_bytes if m in baselines.REFERENCE_METHODS else 0
        out[m] = (peaks[m], held)
        rows = 2 * B if m in baselines.PAIR_METHODS or m == "sft 2B rows" else B
        print(f"method memory {m}: {rows} rows, step peak {peaks[m] / MB:.1f} MB ({peaks[m] / peaks['sft']:.2f}x "
              f"sft), reference weights {held / MB:.1f} MB, together {(peaks[m] + held) / MB:.1f} MB "
              f"({(peaks[m] + held) / peaks['sft']:.2f}x sft)"
              + (f", step {secs[m] * 1e3:.1f} ms ({secs[m] / secs['sft']:.2f}x sft)" if secs else ""))
    return out


def held_bytes(model, optimizer) -> int:
    """Bytes a training run holds between steps: the weights (a tied table once) and the optimizer's state."""
    storages = {}
    tensors = [*model.parameters(), *(v for st in optimizer.state.values() for v in st.values()
                                      if isinstance(v, torch.Tensor))]
    for t in tensors:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def lora_memory(args, device, autocast, bf16: bool) -> dict:
    """Training memory of one step of each of --methods with --lora R against full fine-tuning, on fresh models
    with the same random weights: what the run holds between steps (weights, a reference copy for full DPO/TDPO,
    optimizer state) plus the step's peak above it (activations, gradients, the update's temporaries). LoRA as
    train.py --lora runs it: frozen base in bf16 when computing in bf16, float32 adapters, the reference the base
    with the adapters off. Prints one line per (mode, method) and the ratios; returns {(mode, method): bytes}."""
    B = args.batch_size
    methods = list(args.methods)
    if any(m in baselines.PAIR_METHODS for m in methods):
        methods.append("sft 2B rows")  # SFT on the pairs' rows: what a pair method costs beyond its rows
    out = {}
    for mode in ("full", "lora") if args.lora_full else ("lora",):
        for method in methods:
            out[mode, method] = lora_memory_row(args, mode, method, device, autocast, bf16)
    for method in methods:
        if ("full", method) in out:
            print(f"lora memory, {method}: lora / full {out['lora', method] / out['full', method]:.2f}x")
    for method in args.methods:
        if method in baselines.PAIR_METHODS:
            print(f"lora memory, lora {method} / lora sft on the same {2 * B} rows: "
                  f"{out['lora', method] / out['lora', 'sft 2B rows']:.2f}x")
    return out


def lora_memory_row(args, mode: str, method: str, device, autocast, bf16: bool) -> int:
    """One line of lora_memory: a fresh model, one step to create the optimizer's state, then the measured step."""
    model = fresh_model(args, device)
    ref, ref_bytes = None, 0
    if mode == "lora":
        lora.add_adapters(model, args.lora, base_dtype=torch.bfloat16 if bf16 else None)  # as train.py --lora
        ref = lora.Reference(model)
    elif method in baselines.REFERENCE_METHODS:
        ref = copy.deepcopy(model).to(torch.bfloat16 if bf16 else torch.float32).requires_grad_(False)
        ref_bytes = sum(p.numel() * p.element_size() for p in ref.parameters())
    optimizer = torch.optim.RMSprop([p for p in model.parameters() if p.requires_grad], lr=1e-8)
    rows = pair_batch if method in baselines.PAIR_METHODS or method == "sft 2B rows" else make_batch
    x, y = rows(args.batch_size, args.seq_len, model.config.vocab_size, device)

    def loss_fn():
        with autocast:
            if method.startswith("sft"):
                return ift.sft_forward(model, x, y)
            if method == "ift":
                return ift.ift_forward(model, x, y, args.lam, args.gamma)[0]
            return baselines.pair_forward(model, ref, x, y, method)[0]

    step = train_step(loss_fn, optimizer)
    step()  # the optimizer's state exists from the first step on
    held = held_bytes(model, optimizer) + ref_bytes
    peak = peak_memory(step, device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"lora memory, {mode} {method}: {held / MB:.0f} MB held (weights, reference, optimizer state) + "
          f"{peak / MB:.0f} MB step peak = {(held + peak) / MB:.0f} MB; {trainable / 1e6:.1f}M trainable parameters",
          flush=True)
    return held + peak


def memory_table(config_path: str, r: int, bf16: bool) -> dict:
    """Training state of a model (config.json) per method, full fine-tuning against rank-r LoRA on every
    projection, from what train.py holds, in bytes per parameter: full: fp32 weights 4, gradients 4, RMSprop's
    square average 4 (AdamW's two moments: 8), and at the update one more fp32 copy (torch's foreach RMSprop on
    CUDA, seen on an H200: bench_eager's step peak); DPO/TDPO add a reference, bf16 when computing in bf16 (2),
    else fp32 (4). LoRA: the frozen base bf16 (2; fp32 4 without bf16), the adapters 4 + 4 + 4 (+ 4 at the
    update), no reference. Activations are not in it (they depend on the batch; bench.py --lora measures a step).
    Prints the table in GB (1e9 bytes) and returns {(mode, method): bytes}."""
    cfg = ModelConfig.from_hf(read_json(config_path), source=config_path)
    with torch.device("meta"):
        model = Transformer(cfg)
    P = sum(p.numel() for p in model.parameters())
    lora.add_adapters(model, r)
    A = sum(p.numel() for p in model.parameters() if p.requires_grad)
    base, ref = (2, 2) if bf16 else (4, 4)
    held = {"full": 4 * P + 4 * P, "lora": base * P + 8 * A}  # weights and optimizer state, between steps
    step = {"full": 4 * P + 4 * P, "lora": 8 * A}  # gradients and the update's temporary copy
    print(f"memory table: {config_path}: {P / 1e9:.3f}B parameters; --lora {r}: {A / 1e6:.1f}M adapter "
          f"parameters ({A / P:.2%}); RMSprop; {'bf16' if bf16 else 'float32'} compute; GB, activations excluded")
    out = {}
    for method in ("sft", "ift", "dpo", "tdpo", "orpo", "simpo"):
        for mode in ("full", "lora"):
            reference = ref * P if mode == "full" and method in baselines.REFERENCE_METHODS else 0
            out[mode, method] = held[mode] + reference + step[mode]
        print(f"memory table, {method}: full {out['full', method] / 1e9:.1f} (held between steps "
              f"{(out['full', method] - step['full']) / 1e9:.1f}), lora {out['lora', method] / 1e9:.1f} (held "
              f"{(out['lora', method] - step['lora']) / 1e9:.1f}); lora / full "
              f"{out['lora', method] / out['full', method]:.2f}x")
    return out


# Packing's length profile: conversation lengths in tokens, log-normal with median PACK_MEDIAN and log-space
# deviation PACK_SIGMA, clipped to [PACK_MIN, --seq_len + 1]. The median is the figure the packing issue gives for
# UltraChat (about 1,000 tokens, a long tail); sigma 0.8 puts the 90th percentile at 2.8x the median. Both are our
# choice, not a fit: no chat data set is reachable here. --pack_median and --pack_sigma change them.
PACK_MEDIAN, PACK_SIGMA, PACK_MIN = 1000, 0.8, 16


def pack_examples(n: int, max_tokens: int, vocab: int, median: float, sigma: float, seed: int = 0) -> list:
    """n examples as data.py makes them, (ids, mask) with lengths from the profile above (sigma 0: all of
    max_tokens tokens), the first third of each prompt, the rest answer."""
    g = torch.Generator().manual_seed(seed)
    if sigma > 0:
        lengths = (torch.randn(n, generator=g, dtype=torch.float64) * sigma + math.log(median)).exp()
        lengths = lengths.round().clamp(PACK_MIN, max_tokens).long().tolist()
    else:
        lengths = [max_tokens] * n
    out = []
    for n_tok in lengths:
        ids = torch.randint(vocab, (n_tok,), generator=g).numpy()
        mask = (torch.arange(n_tok) >= max(1, n_tok // 3)).numpy()
        out.append((ids, mask))
    return out


def pack_bench(args, model, device, autocast) -> dict:
    """Useful (non-padding) tokens per second of SFT and IFT steps on the same examples, padded (train.py) and
    packed (train.py --pack), on the length profile and with every example of the same length. Prints one line
    per step and the packed/padded ratios; returns {profile: {name: seconds}}."""
    vocab = model.config.vocab_size
    optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-8)
    out = {}
    for profile, sigma in (("profile", args.pack_sigma), ("equal lengths", 0.0)):
        examples = pack_examples(args.batch_size, args.seq_len + 1, vocab, args.pack_median, sigma)
        useful = sum(len(ids) - 1 for ids, _ in examples)
        batches = {how: train.make_batch(examples, how == "packed", device) for how in ("padded", "packed")}

        def loss_fn(method, how):
            x, y, answer, packing = batches[how]
            with autocast:
                if method == "sft":
                    return ift.sft_forward(model, x, y, answer=answer, packing=packing)
                return ift.ift_forward(model, x, y, args.lam, args.gamma, answer=answer, packing=packing)[0]

        steps = {f"{m} {how}": train_step(partial(loss_fn, m, how), optimizer)
                 for m in ("sft", "ift") for how in batches}
        secs = median_times(steps, args.warmup, args.steps, device)
        lengths = sorted(len(ids) - 1 for ids, _ in examples)
        padded = batches["padded"][0].numel()
        print(f"pack, {profile}: {len(examples)} examples, lengths min {lengths[0]} median "
              f"{lengths[len(lengths) // 2]} max {lengths[-1]}, {useful} tokens; padded batch {padded} positions "
              f"({1 - useful / padded:.0%} padding)")
        for k, s in secs.items():
            print(f"pack, {profile}, {k}: step {s * 1e3:.1f} ms, {useful / s:.0f} useful tokens/s")
        for m in ("sft", "ift"):
            ratio = secs[f"{m} padded"] / secs[f"{m} packed"]
            print(f"pack, {profile}, {m}: packed/padded useful tokens/s {ratio:.2f}x")
        out[profile] = secs
    return out


# -------------------------------------------------------------------------------------------------------------------
# the run, phase by phase: each phase prints its own lines; main calls them in the order of the output


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help: the module docstring as written, then each flag with its meaning, allowed values and default (left
    out where there is none to show: the help says what happens)."""

    def _get_help_string(self, action):
        return action.help if action.default in (None, []) else super()._get_help_string(action)


def arg_parser() -> argparse.ArgumentParser:
    """Every flag, with its meaning, allowed values and default (python bench.py --help)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--init", default=os.path.join(HERE, "checkpoints", "SmolLM2-135M-Instruct"),
                    help=f"checkpoint dir or hub id, or random weights in one of these shapes: {', '.join(SHAPES)}")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                    help="auto: cuda when there is one, else cpu")
    ap.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                    help="auto: bf16 autocast over fp32 weights on CUDA, fp32 on CPU (as train.py)")
    ap.add_argument("--batch_size", type=int, default=4, help="rows of the training and decoding batch, >= 1")
    ap.add_argument("--seq_len", type=int, default=256,
                    help="tokens per row, >= 3: the first third prompt (also the decoding prompt), the rest answer")
    ap.add_argument("--warmup", type=int, default=2, help="discarded steps per method, >= 0")
    ap.add_argument("--steps", type=int, default=5,
                    help="timed steps per method, >= 1 (the median is reported); decoding calls too")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the models and their optimizer updates for the training steps, as train.py")
    ap.add_argument("--grad_checkpointing", action="store_true",
                    help="activation checkpointing in the training steps, ours and transformers'")
    ap.add_argument("--lam", type=float, default=0.2, help="IFT's blend weight of the guesses, as train.py --lam")
    ap.add_argument("--gamma", type=float, default=0.95, help="IFT's propagation discount, as train.py --gamma")
    ap.add_argument("--new_tokens", type=int, default=32,
                    help="tokens decoded per row, >= 2 (decoding is timed at 1 and at N tokens)")
    ap.add_argument("--compile_decode", action=argparse.BooleanOptionalAction, default=None,
                    help="also time decode.py's compiled step (a CUDA graph on CUDA); default: on CUDA only")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="print torch.profiler's top N kernels of each training step and of one decoding step, "
                         "and the SDPA kernel each attention call reaches; 0 = off")
    ap.add_argument("--loss_vocab", type=int, default=QWEN2_VOCAB,
                    help="vocabulary of the loss-memory comparison; the default is Qwen2-7B's")
    ap.add_argument("--loss_sweep", action="store_true",
                    help="only the loss-memory comparison, at each of --loss_sizes (builds no model; --dtype auto "
                         "is bf16 autocast here, on CPU too)")
    ap.add_argument("--loss_sizes", default="1x128,1x512,4x1024,8x2048",
                    help="comma-separated BxT batch shapes of --loss_sweep, B and T >= 1")
    ap.add_argument("--loss_dim", type=int, default=2048,
                    help="hidden size of --loss_sweep (2048: llama-3.2-1b's); the plain run uses the model's")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
    ap.add_argument("--peak_tflops", type=float, default=0,
                    help="the device's dense peak for MFU; 0 = look the GPU up in train.PEAK_BF16_FLOPS")
    ap.add_argument("--bandwidth", type=float, default=0,
                    help="the device's memory bandwidth in GB/s for the decoding roofline; 0 = look the GPU up")
    ap.add_argument("--pack", action="store_true",
                    help="only the packing comparison (pack_bench): SFT and IFT steps on --batch_size examples of "
                         "at most --seq_len + 1 tokens from the length profile, padded and packed")
    ap.add_argument("--pack_median", type=float, default=PACK_MEDIAN,
                    help="median example length of --pack's log-normal profile, tokens")
    ap.add_argument("--pack_sigma", type=float, default=PACK_SIGMA,
                    help="log-space standard deviation of --pack's profile, >= 0")
    ap.add_argument("--lora", type=int, default=0, metavar="R",
                    help="with --methods: training memory of each method with rank-R adapters against full "
                         "fine-tuning (lora_memory); 0 = off")
    ap.add_argument("--memory_table", default="", metavar="CONFIG",
                    help="only the training-state table of a model's config.json, full against --lora R (default "
                         "16), from bytes per parameter (memory_table); --dtype fp32 for float32 compute")
    ap.add_argument("--lora_full", action=argparse.BooleanOptionalAction, default=True,
                    help="with --lora: also the full fine-tuning rows (--no-lora_full: the adapters' rows alone)")
    ap.add_argument("--methods", nargs="+", default=[], choices=["sft", "ift", *baselines.PAIR_METHODS],
                    help="only the peak memory of one training step of each of these methods (method_memory); "
                         "default: none, the full benchmark")
    return ap


def parse_args(argv=None):
    ap = arg_parser()
    args = ap.parse_args(argv)
    if args.seq_len < 3 or args.batch_size < 1 or args.steps < 1 or args.warmup < 0:
        ap.error("--seq_len >= 3, --batch_size >= 1, --steps >= 1, --warmup >= 0")
    if args.lora < 0:
        ap.error("--lora >= 0 (0: off)")
    if not args.pack_median >= 1 or not args.pack_sigma >= 0:
        ap.error("--pack_median >= 1, --pack_sigma >= 0")
    if args.new_tokens < 2 or args.profile < 0:
        ap.error("--new_tokens >= 2 (decoding is timed at 1 and at N tokens), --profile >= 0")
    try:
        args.loss_sizes = [tuple(int(n) for n in s.split("x")) for s in args.loss_sizes.split(",")]
        if not all(len(s) == 2 and min(s) >= 1 for s in args.loss_sizes):
            raise ValueError
    except ValueError:
        ap.error(f"--loss_sizes: comma-separated BxT shapes like 1x128,4x1024, not {args.loss_sizes!r}")
    return args


def main(argv=None):
    """The whole benchmark: set-up and the batch, training steps, decoding, the loss's memory, then the ratios.
    --loss_sweep and --methods each print one table alone."""
    args = parse_args(argv)
    device, bf16, autocast = setup(args)
    if args.loss_sweep:
        print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; "
              f"torch {torch.__version__}{'; bf16 autocast' if bf16 else ''}")
        return loss_sweep(args.loss_vocab, args.loss_dim, args.loss_sizes, device, autocast)
    if args.memory_table:
        return memory_table(args.memory_table, args.lora or 16, args.dtype != "fp32")
    if args.lora:
        if not args.methods:
            raise UserError("--lora measures the methods named by --methods (e.g. --methods sft ift dpo)")
        return lora_memory(args, device, autocast, bf16)
    model, idx, targets = model_and_batch(args, device, bf16)
    if args.methods:  # the per-method step memory alone: SFT, IFT and the preference baselines
        return method_memory(model, args.methods, args.batch_size, args.seq_len, device, autocast, args.lam,
                             args.gamma, args.warmup, args.steps)
    if args.pack:
        return pack_bench(args, model, device, autocast)
    steps, backward, guess_pass, hf = training_steps(args, model, idx, targets, device, autocast)
    secs, guess, peaks = training_table(args, model, steps, backward, guess_pass, device)
    if args.profile:
        profile_training(steps, device, args.profile)
    dsecs = decoding_table(args, model, hf, idx[:, :max(1, args.seq_len // 3)], device, bf16)
    model._static_cache = None  # free decode.py's cache, the training steps and transformers' twin
    del steps, backward, guess_pass, hf
    ours, ref = loss_line(args, model.config.dim, targets, device, autocast)
    ratio_lines(secs, guess, peaks, dsecs, ours, ref)


def setup(args) -> tuple[torch.device, bool, object]:
    """Threads, the device, and the dtype: (device, bf16, the autocast context or a null one)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = pick_device(args.device)
    except ValueError as e:  # --device cuda without one
        raise UserError(str(e)) from None
    bf16 = args.dtype == "bf16" or (args.dtype == "auto" and (device.type == "cuda" or args.loss_sweep))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    return device, bf16, autocast


def fresh_model(args, device) -> Transformer:
    """--init's model (random weights in a SHAPES shape, seeded, or a checkpoint) in float32, training mode."""
    torch.manual_seed(0)
    if args.init in SHAPES:
        with torch.device(device):
            model = Transformer(SHAPES[args.init])
    else:
        model = Transformer.from_pretrained(args.init, dtype=torch.float32, device=device)
    model.train()
    model.grad_checkpointing = args.grad_checkpointing
    return model


def model_and_batch(args, device, bf16: bool):
    """The model in training mode and the batch (make_batch) -> model, idx, targets; prints where, what and how."""
    model = fresh_model(args, device)
    cfg = model.config
    B, T = args.batch_size, args.seq_len
    idx, targets = make_batch(B, T, cfg.vocab_size, device)
    n_answer = int((targets[0] != ift.IGNORE).sum())
    where = (f"{torch.cuda.get_device_name(device)}" if device.type == "cuda"
             else f"cpu, {torch.get_num_threads()} threads, load average "
                  f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"device: {where}; torch {torch.__version__}")
    print(f"model: {args.init} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"vocab {cfg.vocab_size}), fp32 weights{', bf16 autocast' if bf16 else ''}"
          f"{', compiled' if args.compile else ''}{', activation checkpointing' if args.grad_checkpointing else ''}")
    print(f"batch: {B} x {T} tokens, {n_answer} answer tokens per sequence (the rest prompt, targets -100); "
          f"{args.warmup} warm-up steps, median of {args.steps}")
    print(f"memory: {memory_measure(device)}, peak above the weights and optimizer state")
    return model, idx, targets


def training_steps(args, model, idx, targets, device, autocast) -> tuple[dict, dict, object, nn.Module | None]:
    """The training steps to time: SFT and IFT on one model (and optimizer), transformers' SFT on a twin with the
    same weights when transformers is installed -> ({name: step}, {"sft", "ift": the step without its update},
    IFT's guess pass alone, the twin or None)."""
    if args.compile:
        model.compile_blocks()  # as train.py, the update included
    optimizer = train.make_optimizer("rmsprop", model.parameters(), 1e-8, 0.0, compiled=args.compile)

    def sft_loss():
        with autocast:
            return ift.sft_forward(model, idx, targets)

    def ift_loss():
        with autocast:
            return ift.ift_forward(model, idx, targets, args.lam, args.gamma)[0]

    def guess_pass():  # IFT's extra work alone: the forward without gradient that makes the guesses
        with torch.no_grad(), autocast:
            ift.infer_one_step_ahead(model, idx, targets)

    steps = {"sft": train_step(sft_loss, optimizer),
             "ift": train_step(ift_loss, optimizer)}
    # for memory only: each method's own part of the step, without the update's temporaries
    backward = {"sft": train_step(sft_loss, optimizer, update=False),
                "ift": train_step(ift_loss, optimizer, update=False)}
    hf = None
    try:
        hf = hf_twin(model, device).train()
    except ImportError:
        pass
    if hf is not None:
        if args.grad_checkpointing:
            if hasattr(hf, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name warns
                hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        hf_run = torch.compile(hf) if args.compile else hf

        def hf_loss():
            with autocast:
                return ift.sft_loss(hf_run(input_ids=idx, use_cache=False).logits, targets)

        steps["transformers sft"] = train_step(hf_loss, train.make_optimizer("rmsprop", hf.parameters(), 1e-8, 0.0,
                                                                             compiled=args.compile))
    return steps, backward, guess_pass, hf


def training_table(args, model, steps: dict, backward: dict, guess_pass, device) -> tuple[dict, float, dict]:
    """One line per training step: time, tokens/s, MFU where the peak is known, peak memory for ours (the step's,
    and forward + backward's) -> ({name: seconds per step}, seconds of the guess pass, {"sft", "ift", "sft
    backward", "ift backward": peak bytes})."""
    B, T = args.batch_size, args.seq_len
    secs = median_times(dict(steps, guess=guess_pass), args.warmup, args.steps, device)
    guess = secs.pop("guess")
    peaks = {k: peak_memory(steps[k], device) for k in ("sft", "ift")}
    peaks.update({f"{k} backward": peak_memory(fn, device) for k, fn in backward.items()})
    peak, _ = device_peaks(device, args.peak_tflops, args.bandwidth)
    for k, s in secs.items():
        line = f"{k}: step {s * 1e3:.1f} ms, {B * T / s:.0f} tokens/s"
        if peak:  # model FLOPs utilization: the PaLM count (train.flops_per_token) per second over the peak
            line += f", MFU {B * T / s * flops_per_token(model, T, 'ift' if k == 'ift' else 'sft') / peak:.1%}"
        elif device.type == "cuda":
            line += ", MFU n/a (device not in train.PEAK_BF16_FLOPS; pass --peak_tflops)"
        if k in peaks:
            line += f", peak memory {peaks[k] / MB:.1f} MB (forward + backward {peaks[k + ' backward'] / MB:.1f} MB)"
        print(line)
    return secs, guess, peaks


def profile_training(steps: dict, device, n: int):
    """Where the time of each training step goes; which attention kernel training reaches."""
    for k, fn in steps.items():
        print_profile(f"{k} step", fn, device, n)
    print(f"sdpa kernels, training step (sft, forward + backward): {sdpa_kernels(steps['sft'])}")


def decoders_for(args, model, hf, prompt, device, bf16: bool) -> dict:
    """Greedy decoding with the KV cache, the same prompt and number of new tokens: ours eager, ours compiled
    (decode.py: one CUDA graph per step over a static cache) and transformers -> {name: decoder(k)}."""
    model.eval()
    if bf16:  # decode from bf16 weights, as sample.py does: autocast would re-cast fp32 weights every token
        model.to(torch.bfloat16)
    decoders = {"ours eager": partial(model.generate, prompt, temperature=0, compile=False)}
    compile_decode = device.type == "cuda" if args.compile_decode is None else args.compile_decode
    if compile_decode:
        decoders["ours compiled"] = partial(model.generate, prompt, temperature=0, compile=True)
    if hf is not None:
        from transformers import GenerationConfig
        hf.eval()
        if bf16:
            hf.to(torch.bfloat16)
        # no eos on either side, so both decode exactly n tokens. (Not min_new_tokens: transformers then bans the
        # checkpoint's eos id, and the greedy paths part wherever eos is the top token.)
        hf.generation_config.eos_token_id = None

        @torch.no_grad()
        def hf_decode(k):
            gen_cfg = GenerationConfig(max_new_tokens=k, do_sample=False, eos_token_id=None, pad_token_id=0)
            return hf.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=gen_cfg)
        decoders["transformers"] = hf_decode
    return decoders


def decoding_table(args, model, hf, prompt, device, bf16: bool) -> dict:
    """One line per decoder, then how often their greedy tokens agree and, where the bandwidth is known, the
    memory roofline -> {name: seconds for the new tokens with the prefill}."""
    B, P, n = prompt.size(0), prompt.size(1), args.new_tokens
    decoders = decoders_for(args, model, hf, prompt, device, bf16)
    outs, dsecs, step_secs = decode_times(decoders, n, args.steps, device)
    assert len({o.shape for o in outs.values()}) == 1, "all must decode the same number of tokens"
    for k, s in dsecs.items():
        print(f"decode {k}: {B} x {n} new tokens from a {P}-token prompt, {s * 1e3:.1f} ms, {B * n / s:.1f} "
              f"tokens/s; {step_secs[k] * 1e3:.2f} ms per step after the prefill ({B / step_secs[k]:.1f} tokens/s)")
    for a, b in [("ours eager", "transformers"), ("ours compiled", "ours eager")]:
        if a in outs and b in outs:
            agree = (outs[a][:, P:] == outs[b][:, P:]).float().mean().item()
            print(f"decode: greedy tokens identical at {agree:.1%} of positions, {a} vs {b}")
    _, bandwidth = device_peaks(device, args.peak_tflops, args.bandwidth)
    if bandwidth:  # each step reads every weight once, for all B rows: at best B * bandwidth / bytes tokens/s
        weight_bytes = decode_bytes(model)
        roof = B * bandwidth / weight_bytes
        shares = ", ".join(f"{k} {B / s / roof:.1%}" for k, s in step_secs.items())
        print(f"decode roofline: {weight_bytes / 1e9:.3f} GB of weights per step at {bandwidth / 1e9:.0f} GB/s -> "
              f"{roof:.0f} tokens/s; steps after the prefill reach {shares} of it")
    if args.profile:
        profile_decoding(model, prompt, "ours compiled" in decoders, device, args.profile)
    return dsecs


def profile_decoding(model, prompt, compiled: bool, device, n: int):
    """One decoding step (eager, and compiled when it was timed), and the attention kernel each kind of decoding
    call reaches."""
    print_profile("decode step (eager)", one_decode_step(model, prompt), device, n)
    if compiled:
        print_profile("decode step (compiled)", one_decode_step(model, prompt, "compiled"), device, n)
    padded = torch.ones(prompt.size(0), dtype=torch.long, device=device)  # one position of left padding per row
    calls = {"prefill": lambda: model(prompt), "prefill left-padded": lambda: model(prompt, pad=padded),
             "decode step": one_decode_step(model, prompt),
             "decode step left-padded": one_decode_step(model, prompt, pad=padded),
             "decode step over the static cache (the compiled step's inputs)": one_decode_step(model, prompt,
                                                                                              "static")}
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        for name, fn in calls.items():
            print(f"sdpa kernels, {name}: {sdpa_kernels(fn)}")


def loss_line(args, dim: int, targets, device, autocast) -> tuple[int, int]:
    """The per-token loss at a large vocabulary: ours (answer positions only, chunked) vs log_softmax + gather,
    on the run's batch shape and hidden size -> (our peak bytes, the reference's)."""
    B, T = args.batch_size, args.seq_len
    ours, ref = loss_memory(args.loss_vocab, dim, (B, T), targets, device, autocast)
    print(f"loss at vocab {args.loss_vocab}, {B} x {T} positions x {dim} dim, forward + backward: "
          f"peak memory ours {ours / MB:.1f} MB, log_softmax+gather {ref / MB:.1f} MB ({memory_measure(device)})")
    return ours, ref


def ratio_lines(secs: dict, guess: float, peaks: dict, dsecs: dict, ours: int, ref: int):
    """The summary: IFT over SFT in time and memory, the loss over log_softmax + gather, ours over transformers."""
    print(f"ift/sft step time: {secs['ift'] / secs['sft']:.2f}x")
    floor = (secs["sft"] + guess) / secs["sft"]
    print(f"ift/sft floor on this machine, (sft step + guess pass) / sft step: {floor:.2f}x "
          f"(guess pass {guess * 1e3:.1f} ms)")
    print(f"ift/sft peak memory: {peaks['ift'] / peaks['sft']:.2f}x")
    print(f"ift/sft peak memory, forward + backward (the update's temporaries left out): "
          f"{peaks['ift backward'] / peaks['sft backward']:.2f}x")
    print(f"loss peak memory vs log_softmax+gather: {ours / ref:.2f}x")
    if "transformers sft" in secs:
        print(f"train tokens/s vs transformers: {secs['transformers sft'] / secs['sft']:.2f}x")
        print(f"decode tokens/s vs transformers: {dsecs['transformers'] / dsecs['ours eager']:.2f}x")
    else:
        skipped = "skipped (transformers is not installed)"
        print(f"train tokens/s vs transformers: {skipped}")
        print(f"decode tokens/s vs transformers: {skipped}")


if __name__ == "__main__":
    run(main)
