"""
Benchmark: what IFT costs over SFT, what the chunked loss saves over log_softmax + gather, and how model.py
compares with transformers on the same weights. Every number is a ratio measured side by side in one process:
same model, same batch, same dtype; warm-up steps are discarded and the median of several timed steps reported.

    python bench.py --init tiny                                    # a tiny random model, seconds
    python bench.py --init checkpoints/SmolLM2-135M-Instruct --batch_size 4 --seq_len 256 --threads 2
    python bench.py --device cuda --init llama-3.2-1b --batch_size 4 --seq_len 1024 --compile  # random weights
    python bench.py --device cuda --init llama-3.2-1b --batch_size 1 --seq_len 512    # decoding roofline

The batch is realistic for fine-tuning: the first third of each sequence is prompt (targets -100, skipped
before the output projection), the rest is answer. A training step is forward + backward + optimizer step
(RMSprop, as train.py). The methods take turns step by step, so load from other processes hits them alike.

Memory: on CUDA, torch.cuda.max_memory_allocated. On CPU there is no allocator counter, so LiveBytes below
follows every tensor an op creates (a TorchDispatchMode) and keeps the peak of the bytes alive at once: the
same quantity as CUDA's counter, deterministic, in this one process. Both report the peak *above* what was
allocated before the step (weights, optimizer state), so the part the method itself adds is not diluted.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
import weakref
from contextlib import nullcontext
from functools import partial

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import ift
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


def train_step(loss_fn, optimizer):
    """One optimizer step of loss_fn(): forward, backward, update."""
    def step():
        loss_fn().backward()
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


def loss_memory(vocab, dim, idx_shape, targets, device, autocast) -> tuple[int, int]:
    """Peak memory of the per-token losses and their backward, from final hidden states (B, T, dim) through a
    (vocab, dim) output projection: ours (ift.chunked_nll) vs the reference's log_softmax + gather."""
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
    for fn in fns.values():  # warm-up: lazily created library state must not count against the first
        fn()
    peaks = {k: peak_memory(fn, device) for k, fn in fns.items()}
    return peaks["ours"], peaks["reference"]


def hf_twin(model: Transformer, device):
    """transformers' implementation loaded with the same weights (written by our save_pretrained)."""
    from transformers import AutoModelForCausalLM
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d, tokenizer_dir=d)  # tokenizer_dir=d: copy no tokenizer files
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=model.embed_tokens.weight.dtype, attn_implementation="sdpa")
    return hf.to(device)


# -------------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--init", default=os.path.join(HERE, "checkpoints", "SmolLM2-135M-Instruct"),
                    help=f"checkpoint dir or hub id, or random weights in one of these shapes: {', '.join(SHAPES)}")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                    help="auto: bf16 autocast over fp32 weights on CUDA, fp32 on CPU (as train.py)")
    ap.add_argument("--batch_size", type=int, default=4)
    ap.add_argument("--seq_len", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=2, help="discarded steps per method")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per method (the median is reported)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the models for the training steps")
    ap.add_argument("--grad_checkpointing", action="store_true")
    ap.add_argument("--lam", type=float, default=0.2)
    ap.add_argument("--gamma", type=float, default=0.95)
    ap.add_argument("--new_tokens", type=int, default=32, help="tokens decoded per row")
    ap.add_argument("--loss_vocab", type=int, default=QWEN2_VOCAB, help="vocabulary of the loss-memory comparison")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
    ap.add_argument("--peak_tflops", type=float, default=0,
                    help="the device's dense peak for MFU; 0 = look the GPU up in train.PEAK_BF16_FLOPS")
    ap.add_argument("--bandwidth", type=float, default=0,
                    help="the device's memory bandwidth in GB/s for the decoding roofline; 0 = look the GPU up")
    args = ap.parse_args(argv)
    if args.seq_len < 3 or args.batch_size < 1 or args.steps < 1 or args.warmup < 0:
        ap.error("--seq_len >= 3, --batch_size >= 1, --steps >= 1, --warmup >= 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = pick_device(args.device)
    except ValueError as e:
        sys.exit(f"error: {e}")
    cuda = device.type == "cuda"
    bf16 = args.dtype == "bf16" or (args.dtype == "auto" and cuda)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    torch.manual_seed(0)
    if args.init in SHAPES:
        with torch.device(device):
            model = Transformer(SHAPES[args.init])
    else:
        model = Transformer.from_pretrained(args.init, dtype=torch.float32, device=device)
    model.train()
    model.grad_checkpointing = args.grad_checkpointing
    cfg = model.config
    B, T = args.batch_size, args.seq_len
    idx, targets = make_batch(B, T, cfg.vocab_size, device)
    n_answer = int((targets[0] != ift.IGNORE).sum())
    where = (f"{torch.cuda.get_device_name(device)}" if cuda
             else f"cpu, {torch.get_num_threads()} threads, load average "
                  f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"device: {where}; torch {torch.__version__}")
    print(f"model: {args.init} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"vocab {cfg.vocab_size}), fp32 weights{', bf16 autocast' if bf16 else ''}"
          f"{', compiled' if args.compile else ''}{', activation checkpointing' if args.grad_checkpointing else ''}")
    print(f"batch: {B} x {T} tokens, {n_answer} answer tokens per sequence (the rest prompt, targets -100); "
          f"{args.warmup} warm-up steps, median of {args.steps}")
    print(f"memory: {memory_measure(device)}, peak above the weights and optimizer state")

    # ---- training steps: SFT and IFT on one model (and optimizer), transformers' SFT on a twin
    if args.compile:
        model.compile_blocks()  # as train.py
    optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-8)

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
    hf, skipped = None, "skipped (transformers is not installed)"
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

        steps["transformers sft"] = train_step(hf_loss, torch.optim.RMSprop(hf.parameters(), lr=1e-8))
    secs = median_times(dict(steps, guess=guess_pass), args.warmup, args.steps, device)
    guess = secs.pop("guess")
    peaks = {k: peak_memory(steps[k], device) for k in ("sft", "ift")}
    peak, bandwidth = device_peaks(device, args.peak_tflops, args.bandwidth)
    for k, s in secs.items():
        line = f"{k}: step {s * 1e3:.1f} ms, {B * T / s:.0f} tokens/s"
        if peak:  # model FLOPs utilization: the PaLM count (train.flops_per_token) per second over the peak
            line += f", MFU {B * T / s * flops_per_token(model, T, 'ift' if k == 'ift' else 'sft') / peak:.1%}"
        elif cuda:
            line += ", MFU n/a (device not in train.PEAK_BF16_FLOPS; pass --peak_tflops)"
        if k in peaks:
            line += f", peak memory {peaks[k] / MB:.1f} MB"
        print(line)

    # ---- decoding: greedy with the KV cache, the same prompt and number of new tokens
    if hf is not None:
        from transformers import GenerationConfig
        model.eval()
        hf.eval()
        if bf16:  # decode from bf16 weights, as sample.py does: autocast would re-cast fp32 weights every token
            model.to(torch.bfloat16)
            hf.to(torch.bfloat16)
        prompt = idx[:, :max(1, T // 3)]
        n = args.new_tokens
        # no eos on either side, so both decode exactly n tokens. (Not min_new_tokens: transformers then bans the
        # checkpoint's eos id, and the greedy paths part wherever eos is the top token.)
        hf.generation_config.eos_token_id = None
        gen_cfg = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
        outs = {}

        def ours_decode():
            outs["ours"] = model.generate(prompt, n, temperature=0)

        def hf_decode():
            with torch.no_grad():
                outs["transformers"] = hf.generate(prompt, attention_mask=torch.ones_like(prompt),
                                                   generation_config=gen_cfg)

        dsecs = median_times({"ours": ours_decode, "transformers": hf_decode}, 1, args.steps, device)
        assert outs["ours"].shape == outs["transformers"].shape, "both must decode the same number of tokens"
        agree = (outs["ours"][:, prompt.size(1):] == outs["transformers"][:, prompt.size(1):]).float().mean().item()
        for k, s in dsecs.items():
            print(f"decode {k}: {B} x {n} new tokens from a {prompt.size(1)}-token prompt, {s * 1e3:.1f} ms, "
                  f"{B * n / s:.1f} tokens/s")
        print(f"decode: greedy tokens identical at {agree:.1%} of positions")
        if bandwidth:  # each step reads every weight once, for all B rows: at best B * bandwidth / bytes tokens/s
            weight_bytes = decode_bytes(model)
            roof = B * bandwidth / weight_bytes
            print(f"decode roofline: {weight_bytes / 1e9:.3f} GB of weights per step at "
                  f"{bandwidth / 1e9:.0f} GB/s -> {roof:.0f} tokens/s; ours {B * n / dsecs['ours'] / roof:.1%} of it, "
                  f"transformers {B * n / dsecs['transformers'] / roof:.1%}")
        del hf, hf_run

    # ---- the per-token loss at a large vocabulary: ours (answer positions only, chunked) vs log_softmax + gather
    ours, ref = loss_memory(args.loss_vocab, cfg.dim, (B, T), targets, device, autocast)
    print(f"loss at vocab {args.loss_vocab}, {B} x {T} positions x {cfg.dim} dim, forward + backward: "
          f"peak memory ours {ours / MB:.1f} MB, log_softmax+gather {ref / MB:.1f} MB ({memory_measure(device)})")

    print(f"ift/sft step time: {secs['ift'] / secs['sft']:.2f}x")
    floor = (secs["sft"] + guess) / secs["sft"]
    print(f"ift/sft floor on this machine, (sft step + guess pass) / sft step: {floor:.2f}x "
          f"(guess pass {guess * 1e3:.1f} ms)")
    print(f"ift/sft peak memory: {peaks['ift'] / peaks['sft']:.2f}x")
    print(f"loss peak memory vs log_softmax+gather: {ours / ref:.2f}x")
    if "transformers sft" in secs:
        print(f"train tokens/s vs transformers: {secs['transformers sft'] / secs['sft']:.2f}x")
        print(f"decode tokens/s vs transformers: {dsecs['transformers'] / dsecs['ours']:.2f}x")
    else:
        print(f"train tokens/s vs transformers: {skipped}")
        print(f"decode tokens/s vs transformers: {skipped}")


if __name__ == "__main__":
    main()
