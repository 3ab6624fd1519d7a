"""
Fine-tune a Mistral-family model with SFT or IFT, or the paper's preference baselines DPO, TDPO, ORPO and
SimPO on chosen/rejected pairs: one loop, one flag apart.

    python train.py                                    # embedded default: SmolLM2-135M + bundled data, CPU ok
    python train.py --method sft --max_steps 100
    python train.py --method dpo                       # pairs: the bundled task's rows carry a rejected answer
    torchrun --nproc_per_node=4 train.py --method ift  # DDP over torchrun's environment
    torchrun --nproc_per_node=4 train.py --preset paper  # Mistral-7B-v0.1, FSDP, the paper's recipe

Plain torch.distributed: DDP by default, FSDP2 (fully_shard) with --fsdp; one process when not under
torchrun. fp32 master weights with bf16 autocast on CUDA, float32 on CPU. out_dir/ ends as a Hugging Face
model directory; out_dir/checkpoint/ holds the latest resumable state (weights, optimizer, step, RNG).
"""
import argparse
import hashlib
import logging
import math
import os
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: idle threads sleep, not spin (docs/performance.md)
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError
from tqdm import tqdm

import baselines
import checkpoint
import hf_checkpoint
import ift
import lora
from convert_gguf import DEFAULT_OUT, ensure_default
from data import batch_indices, collate, tokenize_pairs, tokenize_sources
from packing import collate_packed
from errors import ArgumentParser, HelpFormatter, Interrupted, UserError, field_comments, run, signals_deferred
from hf_checkpoint import local, read_config
from model import ModelConfig, Transformer, pick_device, resolve_checkpoint
from presets import METHOD_PRESETS, PRESETS
from tokenizer import Tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))


LORA_TARGETS = ",".join(lora.TARGETS)


@dataclass
class TrainConfig:  # each field's comment is its --help text
    # model and data
    init: str = DEFAULT_OUT         # checkpoint dir or hub id; default: the embedded SmolLM2-135M-Instruct
    data: str = os.path.join(HERE, "data", "chain_train.jsonl")  # comma-separated sources, see data.py
    eval_data: str = os.path.join(HERE, "data", "chain_test.jsonl")  # "" -> hold out eval_fraction of data
    eval_fraction: float = 0.02     # share of --data held out when --eval_data is "", in (0, 1)
    out_dir: str = "out"            # a new or empty folder (or this run's own, with --resume)
    max_length: int = 256           # tokens per example; the prompt is cut from the left
    learn_all_turns: bool = False   # learn every assistant turn, not only the final one (the paper's setup)
    num_proc: int = 1               # processes for tokenization
    # method: IFT (lam, gamma and the lambda schedule) or SFT; or a preference baseline on pairs (baselines.py)
    method: str = "ift"             # ift and sft train on answers, the others on chosen/rejected pairs
    lam: float = 0.2                # temporal residual weight of the model's own guesses (paper: 0.2), in [0, 1]
    gamma: float = 0.95             # relation propagation discount (paper: 0.95), in [0, 1]
    lam_schedule: str = "constant"  # linear: lam_min -> lam over the warmup steps
    lam_min: float = 0.0            # first lam of the linear schedule, in [0, 1]
    lam_noise: float = 0.0          # sigma of the noisy lambda of the paper's Table 7 (0.5 there); 0 = off
    # the released code's other IFT modes (ift.guess_picker, ift.propagation_variant); defaults are the paper's
    guess: str = "greedy"           # first-pass guess
    guess_k: int = 2                # topk guesses the k-th most likely token (not a sample)
    guess_temperature: float = 0.7  # sample draws from softmax(logits / temperature)
    propagation: str = "loss"       # what is propagated
    propagation_side: str = "left"  # left: discounted suffix sums; right: prefix sums, inverted
    propagation_norm: str = "L1"    # how the propagated weights are sharpened
    beta: float = 0.0               # DPO/TDPO/ORPO/SimPO beta; 0 = the method's paper default (0.1/0.1/0.25/2.0)
    alpha: float = baselines.PAPER_TDPO_ALPHA  # TDPO2's weight of the sequential KL term (paper: 0.5)
    simpo_gamma_ratio: float = baselines.PAPER_SIMPO_GAMMA_RATIO  # SimPO's margin gamma / beta (paper: 0.8)
    # optimization
    optimizer: str = "rmsprop"      # rmsprop is the paper's
    lr: float = 2e-5                # peak learning rate
    weight_decay: float = 0.0       # decoupled (adamw) or L2 (rmsprop) weight decay
    warmup_ratio: float = 0.1       # share of the steps with a linear warmup, then cosine decay to 0
    grad_clip: float = 1.0          # clip the gradient norm at this value; 0 = off
    batch_size: int = 8             # examples per process per micro-step
    grad_accum: int = 1             # micro-steps per optimizer step, per process
    max_steps: int = 40             # optimizer steps; 0 -> epochs
    epochs: float = 1.0             # passes over the data when --max_steps is 0
    seed: int = 1337                # data order, guesses and initial RNG
    # system
    device: str = "auto"            # auto: cuda when there is one
    dtype: str = "auto"             # auto: bf16 autocast on CUDA, fp32 on CPU
    fsdp: bool = False              # shard weights, gradients and optimizer state (FSDP2) instead of DDP
    compile: bool = False           # torch.compile each transformer block and the optimizer update
    grad_checkpointing: bool = False  # recompute each block's activations in backward (less memory)
    pack: bool = False              # lay each micro-batch's examples end to end, no padding (packing.py); same loss
    # LoRA (lora.py): train low-rank adapters on a frozen base instead of every weight; out_dir gets peft's files
    lora: int = 0                   # adapter rank r; 0 = full fine-tuning
    lora_alpha: float = 0.0         # scale alpha / r of the adapters; 0 = 2 * r
    lora_dropout: float = 0.0       # dropout on the adapters' input, in [0, 1)
    lora_targets: str = LORA_TARGETS  # comma-separated projections of each block that get adapters
    peak_tflops: float = 0.0        # one device's dense peak, for the MFU log; 0 = the GPU's row in PEAK_BF16_FLOPS
    # logging and checkpoints
    eval_every: int = 20            # steps; 0 = only at the end
    eval_max: int = 64              # eval examples at most
    save_every: int = 0             # steps; 0 = only at the end
    sample_every: int = -1          # print a greedy sample of one eval prompt at start and end (-1), never (0)
    resume: bool = False            # continue the checkpoint in out_dir (same method, data, init, seed, batch)
    auto_resume: bool = False       # resume when out_dir holds a checkpoint, else start fresh (torchrun --max-restarts)
    stop_at: int = 0                # end this process after step N, checkpoint saved (time-boxed jobs); 0 = off
    wandb_project: str = ""         # log to Weights & Biases under this project; "" = off


CHOICES = {"method": ("ift", "sft", *baselines.PAIR_METHODS), "optimizer": ("rmsprop", "adamw"),
           "lam_schedule": ("constant", "linear"), "dtype": ("auto", "bf16", "fp32"), "device": ("auto", "cpu", "cuda"),
           "guess": ("greedy", "topk", "sample"), "propagation": ("loss", "mask", "logps"),
           "propagation_side": ("left", "right"), "propagation_norm": tuple(ift.SHARPEN)}


def parse_args(argv=None) -> TrainConfig:
    """Flags are generated from TrainConfig; --preset NAME first replaces defaults with the preset's values."""
    pre = ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="default", choices=sorted(PRESETS), help="named defaults (presets.py)")
    known, rest = pre.parse_known_args(argv)
    defaults = asdict(TrainConfig())
    defaults.update(PRESETS[known.preset])
    # the preset's per-method changes (the paper's preference baselines train on pairs), for the method given
    probe = ArgumentParser(add_help=False)
    probe.add_argument("--method", default=defaults["method"])
    defaults.update(METHOD_PRESETS.get(known.preset, {}).get(probe.parse_known_args(rest)[0].method, {}))
    ap = ArgumentParser(description=__doc__, formatter_class=HelpFormatter, parents=[pre])
    comments = field_comments(TrainConfig)
    for f in fields(TrainConfig):
        kw = dict(default=defaults[f.name], help=comments.get(f.name, " "))
        if f.type is bool:
            ap.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, **kw)
        else:
            ap.add_argument(f"--{f.name}", type=f.type, choices=CHOICES.get(f.name), **kw)
    args = vars(ap.parse_args(rest))
    args.pop("preset")
    cfg = TrainConfig(**args)
    problem = config_problem(cfg)
    if problem:
        ap.error(problem)
    return cfg


def config_problem(cfg: TrainConfig) -> str | None:
    """What is out of range in cfg, as argparse's one-line error; None when nothing is."""
    numbers = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.type is float}
    bad = next((name for name, v in numbers.items() if not math.isfinite(v)), None)
    if bad:
        return f"--{bad} must be a finite number, got {numbers[bad]}"
    unknown = lora_targets(cfg.lora_targets)[1]
    rules = [
        (0 <= cfg.lam <= 1 and 0 <= cfg.gamma <= 1 and 0 <= cfg.lam_min <= 1,
         "--lam, --gamma and --lam_min must lie in [0, 1]"),
        (0 < cfg.eval_fraction < 1, "--eval_fraction must lie in (0, 1)"),
        (0 <= cfg.warmup_ratio <= 1, "--warmup_ratio must lie in [0, 1]"),
        (cfg.lr >= 0 and cfg.weight_decay >= 0 and cfg.grad_clip >= 0 and cfg.lam_noise >= 0,
         "--lr, --weight_decay, --grad_clip and --lam_noise must be >= 0"),
        (cfg.guess_k >= 1 and cfg.guess_temperature > 0, "--guess_k must be >= 1 and --guess_temperature > 0"),
        (cfg.beta >= 0 and cfg.alpha >= 0 and cfg.simpo_gamma_ratio >= 0,
         "--beta, --alpha and --simpo_gamma_ratio must be >= 0"),
        (cfg.batch_size >= 1 and cfg.grad_accum >= 1 and cfg.num_proc >= 1,
         "--batch_size, --grad_accum and --num_proc must be >= 1"),
        (cfg.max_length >= 2, "--max_length must be >= 2"),
        (cfg.max_steps >= 0 and cfg.epochs > 0, "--max_steps must be >= 0 and --epochs > 0"),
        (min(cfg.seed, cfg.eval_every, cfg.eval_max, cfg.save_every, cfg.stop_at) >= 0,
         "--seed, --eval_every, --eval_max, --save_every and --stop_at must be >= 0"),
        (cfg.sample_every >= -1, "--sample_every must be -1 (start and end), 0 (never) or more"),
        (cfg.peak_tflops >= 0, "--peak_tflops must be >= 0"),
        (cfg.lora >= 0 and cfg.lora_alpha >= 0 and 0 <= cfg.lora_dropout < 1,
         "--lora and --lora_alpha must be >= 0 and --lora_dropout in [0, 1)"),
        (not unknown, f"--lora_targets: unknown {', '.join(unknown)} (valid: {', '.join(lora.TARGETS)})"),
    ]
    return next((message for ok, message in rules if not ok), None)


def lora_targets(text: str) -> tuple[tuple, list]:
    """--lora_targets "q_proj,v_proj" -> (the targets, the unknown names)."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    return tuple(names), [t for t in names if t not in lora.TARGETS] or ([] if names else ["(none)"])


# -------------------------------------------------------------------------------------------------------------------
# distributed helpers


def init_distributed(device: str, fsdp: bool = False):
    """(rank, world, device) from torchrun's environment; a single process without it. FSDP needs a process
    group even alone: a single process gets a world of one (an in-memory store, no ports)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    try:
        dev = pick_device(device)
    except ValueError as e:  # --device cuda without one
        raise UserError(str(e)) from None
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if world > 1:
        dist.init_process_group(backend)
    elif fsdp and not dist.is_initialized():
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return rank, world, dev


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A batch tensor built on the CPU, on `device`. On CUDA it goes through pinned memory with non_blocking:
    a plain .to("cuda") from pageable memory synchronizes the stream, so the CPU would wait for the previous
    micro-step's backward before queuing the next forward. Elsewhere a plain .to()."""
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def print0(*args, **kw):
    if int(os.environ.get("RANK", 0)) == 0:
        tqdm.write(" ".join(str(a) for a in args), **kw)


def shard_fsdp(model: Transformer, bf16: bool):
    """FSDP2: one unit per block, and the root unit with the embedding table, the final norm and the output
    layer (tied or not: one unit holds both). IFT's blend and the loss heads run inside forward, where the
    root unit's parameters are gathered."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else torch.float32, reduce_dtype=torch.float32)
    for layer in model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)


def peak_rss_gb(world: int) -> list[float]:
    """Peak resident host memory of every rank so far, in GB (Linux reports ru_maxrss in KB)."""
    import resource
    mine = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    every = [mine] * world
    if world > 1:
        dist.all_gather_object(every, mine)
    return every


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warmup over warmup_ratio of the steps, then cosine decay to 0 (as the paper's HF recipe).
    A pure function of the step: resuming restores the schedule by restoring the step."""
    warm = math.ceil(cfg.warmup_ratio * total)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))


PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12}


def gpu_row(table: dict, device):
    """The value of the first key of table found in this GPU's name; None on a CPU or an unknown GPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in table.items() if k in name), None)


def peak_flops(device, tflops: float = 0.0) -> float | None:
    """Dense bf16 FLOP/s of one device: tflops when given, else the GPU's row in the table above."""
    return tflops * 1e12 if tflops else gpu_row(PEAK_BF16_FLOPS, device)


def flops_per_token(model: Transformer, seq_len: int, method: str) -> float:
    """Model FLOPs of one training token: 6N + 12*L*d*T for forward and backward (PaLM appendix B);
    IFT adds one forward pass without gradient, 2N + 4*L*d*T, so its floor is 4/3 of SFT's; so do DPO and TDPO
    (the reference model's forward; their tokens are those of the chosen and the rejected rows)."""
    c = model.config
    n = sum(p.numel() for p in model.parameters()) - (0 if c.tie_word_embeddings else model.embed_tokens.weight.numel())
    attn = c.n_layers * c.n_heads * c.head_dim * seq_len
    fwd = 2 * n + 4 * attn
    return 3 * fwd + (fwd if method in ("ift", *baselines.REFERENCE_METHODS) else 0)


# -------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def eval_loss(model, examples, cfg, device, autocast, rank, world) -> float:
    """Held-out SFT loss (per-sequence mean NLL of the answer, then mean), the same for every method (the
    preference baselines' held-out examples are the chosen answers)."""
    model.eval()
    total = torch.zeros(2, device=device, dtype=torch.float64)
    mine = list(range(rank, len(examples), world))
    for i in range(0, len(mine), cfg.batch_size):
        batch = [examples[j] for j in mine[i:i + cfg.batch_size]]
        x, y, answer, packing = make_batch(batch, cfg.pack, device)
        with autocast:
            loss = ift.sft_forward(model, x, y, answer=answer, packing=packing)
        total += torch.tensor([loss.item() * len(batch), len(batch)], device=device, dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


def make_batch(examples, pack: bool, device):
    """x, y on device, padded (B, T), or with pack laid end to end (1, L) with their Packing (else None); and the
    answer index, built here on the CPU so the loss never waits for the GPU (ift.chunked_nll)."""
    x, y, packing = collate_packed(examples) if pack else (*collate(examples), None)
    answer = ift.answer_index(y)
    if packing is not None:
        packing = packing.to(device, to_device)
    return (*(to_device(t, device) for t in (x, y, answer)), packing)


def prompt_of(example) -> list[int]:
    ids, mask = example
    return ids[: int(mask.argmax())].tolist()  # everything before the first answer token


@torch.no_grad()
def sample(raw, tok, example, device, autocast, max_new_tokens=64) -> str:
    prompt = torch.tensor(prompt_of(example), dtype=torch.long, device=device)[None]
    # decoding compiles on CUDA (decode.py), but not through FSDP's sharded parameters and their gathering hooks
    from torch.distributed.fsdp import FSDPModule
    with autocast:
        out = raw.generate(prompt, max_new_tokens, temperature=0, eos_ids=tok.eos_ids,
                           compile=False if isinstance(raw, FSDPModule) else None)
    return tok.decode([t for t in out[0, prompt.shape[1]:].tolist() if t not in tok.eos_ids])


# -------------------------------------------------------------------------------------------------------------------
# the run, phase by phase: where it writes, the data, the model, the loop, the save


def load_data(cfg: TrainConfig, init_dir: str):
    """(tokenizer, train examples, held-out examples). Every problem with them, or with the model's config, stops
    here, before any model or GPU time."""
    hf = ModelConfig.from_hf(read_config(init_dir), source=os.path.join(init_dir, "config.json"))
    if cfg.method == "ift" and cfg.guess == "topk" and cfg.guess_k > hf.vocab_size:
        raise UserError(f"--guess_k {cfg.guess_k} is beyond the vocabulary of {init_dir} ({hf.vocab_size} tokens)")
    tok = Tokenizer.from_pretrained(init_dir)
    learn = "all" if cfg.learn_all_turns else "last"
    pairs = cfg.method in baselines.PAIR_METHODS  # train on (chosen, rejected) pairs of examples
    tokenize = tokenize_pairs if pairs else tokenize_sources
    train = tokenize(cfg.data, init_dir, cfg.max_length, learn, cfg.seed, cfg.num_proc, print0)
    # held out: the SFT loss of the (chosen) answers, for every method alike
    if cfg.eval_data:
        held = tokenize_sources(cfg.eval_data, init_dir, cfg.max_length, learn, cfg.seed, cfg.num_proc, print0)
    else:  # hold out a fraction of the (shuffled) training data
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
        k = max(1, int(cfg.eval_fraction * len(train)))
        held, train = [train[i] for i in order[:k]], [train[i] for i in order[k:]]
        held = [chosen for chosen, _ in held] if pairs else held
    return tok, train, held[: cfg.eval_max]


def fingerprint(examples) -> str:
    """sha256 of the tokenized training examples: the data file, the tokenizer, --max_length and the turns learned,
    all at once."""
    h = hashlib.sha256()

    def walk(x):  # examples are (ids, mask) arrays, pairs are two of them
        if isinstance(x, (tuple, list)):
            for part in x:
                walk(part)
        else:
            h.update(np.asarray(x).tobytes())
    walk(examples)
    return h.hexdigest()


# what --resume must find unchanged, and why
MUST_MATCH = {"method": "--method", "init_dir": "--init", "seed": "--seed (the data order)",
              "data_sha256": "training data (--data, the tokenizer, --max_length or --learn_all_turns)",
              "examples_per_step": "examples per step (--batch_size x --grad_accum x processes: the data position)",
              "lora": "--lora (the adapter rank; 0 = full fine-tuning)", "lora_alpha": "--lora_alpha",
              "lora_dropout": "--lora_dropout", "lora_targets": "--lora_targets"}


def check_resume(cfg: TrainConfig, ckpt: str, record: dict, total: int):
    """Refuse in one line a --resume that cannot continue the run exactly; print what else changed, and add it to
    the record's history (train_config.json then says what really ran)."""
    saved = checkpoint.saved_config(ckpt)
    for key, what in MUST_MATCH.items():
        if key in saved and saved[key] != record[key]:
            why = (f" (--method {cfg.method} rebuilds its reference model from --init)"
                   if key == "init_dir" and cfg.method in baselines.REFERENCE_METHODS else "")
            raise UserError(f"--resume: {ckpt} was trained with other {what}: {str(saved[key])[:64]}, now "
                            f"{str(record[key])[:64]}{why}; resume with the run's own")
    if saved["step"] > total:
        raise UserError(f"--resume: {ckpt} is at step {saved['step']}, past this run's {total} steps "
                        "(--max_steps, --epochs)")
    skip = {"resume", "auto_resume", "stop_at", "history", "step", "out_dir"}
    changed = {k: [saved[k], v] for k, v in record.items() if k in saved and saved[k] != v and k not in skip}
    if changed:
        print0("resume: changed since the checkpoint: " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()))
    record["history"] = saved.get("history", []) + [{"resumed_at": saved["step"], "changed": changed}]


def nonfinite(named_tensors, world: int) -> list[str]:
    """Names of the tensors holding an inf or a nan, on any rank (each rank looks at its own shards)."""
    mine = [name for name, t in named_tensors if not torch.isfinite(local(t)).all()]
    if world > 1:
        every = [None] * world
        dist.all_gather_object(every, mine)
        mine = sorted(set().union(*every))
    return mine


def build_model(cfg: TrainConfig, init_dir: str, ckpt: str | None, device, world: int):
    """(raw model, the model to call (DDP-wrapped or not), the frozen reference or None, the optimizer, the
    autocast context). fp32 master weights; bf16 autocast on CUDA. Built on the meta device and (with --fsdp)
    sharded before any weight is read, so each rank reads only its rows of each tensor; a resumed run reads the
    checkpoint's own weights."""
    bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 and not cfg.fsdp else nullcontext()

    def prepare(meta_model, policy=True):
        if cfg.lora and policy:  # the adapters exist before compiling and sharding: FSDP shards them too
            add_lora(cfg, meta_model, bf16)
        if cfg.compile:
            meta_model.compile_blocks()
        if cfg.fsdp:
            shard_fsdp(meta_model, bf16)

    source = init_dir if cfg.lora else ckpt or init_dir  # under LoRA the checkpoint holds the adapters alone
    raw = Transformer.from_pretrained(source, torch.float32, device, shard=prepare)
    if cfg.lora:  # the adapters' values: the checkpoint's on --resume (each rank its rows), else fresh
        if ckpt:
            lora.load_adapter(raw, ckpt, into_existing=True)
        else:  # one generator for every rank: the same adapters, sharded or not
            lora.init_adapters(raw, torch.Generator().manual_seed(cfg.seed))
    bad = nonfinite(raw.named_parameters(), world)
    if bad:
        raise UserError(f"{source}: {bad[0]}{f' and {len(bad) - 1} more' if bad[1:] else ''} hold non-finite "
                        "values (inf or nan): training from them would publish a broken model")
    raw.grad_checkpointing = cfg.grad_checkpointing
    raw.train()
    model = raw
    if world > 1 and not cfg.fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(raw, device_ids=[device.index] if device.type == "cuda" else None)
    ref = None
    if cfg.method in baselines.REFERENCE_METHODS and cfg.lora:  # the same base with its adapters off: no copy
        ref = lora.Reference(raw)
    elif cfg.method in baselines.REFERENCE_METHODS:
        # DPO/TDPO's frozen reference: the initial weights, from --init also on --resume (never the checkpoint's).
        # No gradients, no optimizer state, not wrapped by DDP, never saved; sharded like the policy under FSDP.
        # bf16 weights when computing in bf16 on CUDA (half the policy's fp32 weights), else float32
        ref_dtype = torch.bfloat16 if bf16 and device.type == "cuda" else torch.float32
        ref = Transformer.from_pretrained(init_dir, ref_dtype, device, shard=partial(prepare, policy=False))
        ref.requires_grad_(False)
    optimizer = make_optimizer(cfg.optimizer, [p for p in raw.parameters() if p.requires_grad], cfg.lr,
                               cfg.weight_decay, compiled=cfg.compile)
    return raw, model, ref, optimizer, autocast


def make_optimizer(name: str, params, lr: float, weight_decay: float, compiled: bool = False):
    """RMSprop (the paper's) or AdamW. compiled (--compile): the update is compiled too, into a few fused kernels
    that read each weight, gradient and moment once, where torch's eager update makes a pass per operation (for
    RMSprop: the square average, its root, the epsilon, the step) and holds the root as one more fp32 copy of the
    weights. Eager RMSprop was 14.7% of an SFT step's kernel time on an H200 (measurements/2026-12-04-h200). The
    learning rate is then a tensor that set_lr changes in place, so a new value is not a new graph."""
    cls = torch.optim.RMSprop if name == "rmsprop" else torch.optim.AdamW
    optimizer = cls(params, lr=torch.tensor(lr) if compiled else lr, weight_decay=weight_decay)
    if compiled:
        optimizer.step = torch.compile(optimizer.step)
        # dynamo leaves out the step's profiler label (a record_function) and warns once that it does: not news
        logging.getLogger("torch._dynamo.variables.ctx_manager").addFilter(_not_the_profiler_note)  # once only
    return optimizer


def _not_the_profiler_note(record) -> bool:
    return "Profiler record function" not in record.getMessage()


def set_lr(optimizer, lr: float):
    for group in optimizer.param_groups:
        if torch.is_tensor(group["lr"]):  # compiled update (make_optimizer)
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def add_lora(cfg: TrainConfig, meta_model: Transformer, bf16_base: bool):
    """--lora, on the model before its weights exist: freeze the base and add adapters (lora.py; their values come
    after loading). The frozen base is held in bf16 when computing in bf16 (on CUDA by default; an fp32 copy would
    only cost memory: it gets no updates); the adapters stay float32, so only they carry fp32 masters, gradients
    and optimizer state. IFT's blend then reads the frozen embedding table, as the released code does under peft.
    On --resume, lora.load_adapter checks the checkpoint's adapters against these."""
    targets = lora_targets(cfg.lora_targets)[0]
    lora.add_adapters(meta_model, cfg.lora, cfg.lora_alpha or None, cfg.lora_dropout, targets,
                      base_dtype=torch.bfloat16 if bf16_base else None)


def train_step(cfg, model, raw, ref, ref_head, optimizer, train, step, lam, rank, world, device, autocast):
    """One optimizer step over grad_accum micro-batches. Returns the step's statistics, summed over the processes:
    loss and first-pass SFT loss (each a mean over micro-steps), positions computed, pairs' margin sum, wins and
    count, gradient norm (each process adds the same norm), tokens (padding excluded), positions of the padded
    batches; and the mean length one token attends over (for the MFU)."""
    pairs = cfg.method in baselines.PAIR_METHODS
    stats = torch.zeros(9, device=device)
    for micro in range(cfg.grad_accum):
        idx = batch_indices(step, micro, rank, world, cfg.batch_size, cfg.grad_accum, len(train), cfg.seed)
        batch = [train[i] for i in idx]
        if pairs:  # B pairs are 2B rows: the chosen ones, then the rejected ones (one forward, one backward)
            batch = [chosen for chosen, _ in batch] + [rejected for _, rejected in batch]
        x, y, answer, packing = make_batch(batch, cfg.pack, device)
        last = micro == cfg.grad_accum - 1  # all-reduce gradients only on the last micro-step
        if cfg.fsdp:
            raw.set_requires_gradient_sync(last)
        elif world > 1:
            model.require_backward_grad_sync = last
        with autocast:
            if cfg.method == "ift":
                # sampled guesses: a generator per micro-batch, seeded by its place in the run (resume-exact)
                guess = ift.guess_picker(cfg.guess, cfg.guess_k, cfg.guess_temperature,
                                         key=(cfg.seed, step, micro * world + rank), device=device)
                loss, first, _ = ift.ift_forward(model, x, y, lam, cfg.gamma, guess=guess, propagation=(
                    cfg.propagation, cfg.propagation_side, cfg.propagation_norm), answer=answer, packing=packing)
            elif pairs:
                loss, pair_stats = baselines.pair_forward(model, ref, x, y, cfg.method, cfg.beta, cfg.alpha,
                                                          cfg.simpo_gamma_ratio, answer=answer, ref_weight=ref_head,
                                                          packing=packing)
                first = loss
                stats[3:6] += pair_stats
            else:
                loss = first = ift.sft_forward(model, x, y, answer=answer, packing=packing)
        (loss / cfg.grad_accum).backward()
        stats[0] += loss.detach().float() / cfg.grad_accum
        stats[1] += first.detach().float() / cfg.grad_accum
        lengths = [len(ids) - 1 for ids, _ in batch]  # input positions of each example
        stats[2] += x.numel()  # positions computed: padding included, unless packed
        stats[7] += sum(lengths)
        stats[8] += len(lengths) * max(lengths)  # the padded batch's positions
    # the norm of the whole gradient (max_norm inf: measured, not clipped), for the non-finite check
    norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
    stats[6] = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if dist.is_initialized():
        dist.all_reduce(stats)
    attends = sum(n * n for n in lengths) / sum(lengths) if cfg.pack else x.shape[1]
    return stats, attends


def save(cfg, model, raw, optimizer, step, rank, world, record, final=False):
    """Every rank takes part (FSDP gathers the full state on CPU), rank 0 writes (checkpoint.py says how a crash
    at any point is survived). Ctrl-C and SIGTERM wait until the checkpoint is complete."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         get_state_dict)
    bad = nonfinite(raw.named_parameters(), world)
    if bad:  # the step's loss and gradient were finite, the update was not (an extreme --lr, say)
        raise UserError(f"step {step}: the weights hold non-finite values ({bad[0]}) after the update; not saved. "
                        f"{last_checkpoint(cfg.out_dir)}; nothing published")
    with signals_deferred():
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        if cfg.lora:  # the adapters and their optimizer state: the frozen base is --init's, never copied
            osd = get_optimizer_state_dict(model, optimizer, options=options)
            adapters = lora.adapter_state_dict(raw)  # gathered whole by every rank under FSDP

            def save_model(folder):  # python lora.py merge OUT_DIR MERGED makes a plain model of it
                lora.save_adapter(raw, folder, record["init_dir"], adapters)
                hf_checkpoint.copy_tokenizer(record["init_dir"], folder)
        else:
            msd, osd = get_state_dict(model, optimizer, options=options)

            def save_model(folder):
                raw.save_pretrained(folder, state_dict=msd, tokenizer_dir=record["init_dir"])
        failed = None
        if rank == 0:
            try:
                checkpoint.write(cfg.out_dir, save_model, osd, step, record, final)
            except (OSError, RuntimeError, SafetensorError) as e:  # a full disk (torch.save says RuntimeError)
                failed = (f"step {step}: the checkpoint could not be written ({type(e).__name__}: {e}). "
                          f"{last_checkpoint(cfg.out_dir)}; nothing published. Free some space (or mend --out_dir), "
                          "then continue with --resume")
        if dist.is_initialized():  # every rank learns whether rank 0's save held, and all stop together if not
            box = [failed]
            dist.broadcast_object_list(box, src=0)
            failed = box[0]
        if failed:
            raise UserError(failed)


def checkpoint_bytes(raw, cfg: TrainConfig) -> tuple[int, int]:
    """(weights, optimizer state) a checkpoint of this run writes, in bytes: every weight (a tied table once), or
    under --lora the adapters; one float32 moment per trained weight for RMSprop, two for AdamW."""
    trained = [p for p in raw.parameters() if p.requires_grad]
    saved = trained if cfg.lora else list(raw.parameters())
    moments = 1 if cfg.optimizer == "rmsprop" else 2
    return (sum(p.numel() * p.element_size() for p in saved),
            moments * sum(p.numel() * p.element_size() for p in trained))


def last_checkpoint(out_dir: str) -> str:
    ckpt = checkpoint.find_checkpoint(out_dir)
    if ckpt is None:
        return "no checkpoint was saved yet (--save_every N saves one every N steps)"
    return f"last checkpoint: step {checkpoint.saved_config(ckpt)['step']} in {ckpt}, untouched"


def train_loop(cfg, raw, model, ref, optimizer, autocast, train, held, step, total, record, rank, world, device):
    """Steps `step` to `total`: each one's update, log, eval and save. Stops at the first non-finite loss or
    gradient norm (values the step reduces anyway: no extra host sync), before anything is saved."""
    # TDPO's policy head projects the reference's hidden states through the reference's output projection:
    # under FSDP gathered once here (it never changes), not on every micro-step
    ref_head = baselines.full_weight(ref.lm_head.weight) if cfg.method == "tdpo" else None
    peak = peak_flops(device, cfg.peak_tflops)
    wandb = None
    if cfg.wandb_project and rank == 0:
        import wandb
        wandb.init(project=cfg.wandb_project, config=record)
    bar = tqdm(total=total, initial=step, disable=rank != 0, desc=cfg.method, dynamic_ncols=True)
    try:
        while step < total:
            t0 = time.time()
            lr = lr_at(step, total, cfg)
            set_lr(optimizer, lr)
            lam = ift.lam_at(step, cfg.lam, schedule=cfg.lam_schedule, lam_min=cfg.lam_min,
                             warmup=math.ceil(cfg.warmup_ratio * total), sigma=cfg.lam_noise, seed=cfg.seed)
            stats, attends = train_step(cfg, model, raw, ref, ref_head, optimizer, train, step, lam, rank, world,
                                        device, autocast)
            step += 1
            loss, first, positions, margin, wins, n_pairs, norm, tokens, padded = stats.tolist()  # the one host sync
            loss, first, norm = loss / world, first / world, norm / world
            if not (math.isfinite(loss) and math.isfinite(norm)):
                raise UserError(f"step {step}: loss {loss:.4g}, gradient norm {norm:.4g}: not finite, the run stops "
                                f"(lower --lr, or check --init and the data). {last_checkpoint(cfg.out_dir)}; "
                                "nothing published")
            seconds = time.time() - t0
            # tok/s counts tokens, never padding; pad is the padded batch's share of padding: computed without
            # --pack, skipped with it
            log = {"loss": loss, **({"lam": lam, "sft": first} if cfg.method == "ift" else {}),  # sft: first pass
                   "lr": lr, "gnorm": norm, "tok/s": tokens / seconds,
                   ("pad_skipped" if cfg.pack else "pad"): 1 - tokens / padded}
            if cfg.method in baselines.PAIR_METHODS:  # chosen reward minus rejected (baselines.py), how often > 0
                log["margin"], log["acc"] = margin / max(n_pairs, 1), wins / max(n_pairs, 1)
            if peak:
                log["mfu"] = positions / seconds * flops_per_token(raw, attends, cfg.method) / (peak * world)
            if (cfg.eval_every and step % cfg.eval_every == 0) or step == total:
                log["eval"] = eval_loss(raw, held, cfg, device, autocast, rank, world)
                print0(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in log.items()))
            bar.set_postfix({k: f"{v:.3g}" for k, v in log.items()}, refresh=False)
            bar.update(1)
            if wandb:
                wandb.log(log, step=step)
            if step == total or step == cfg.stop_at or (cfg.save_every and step % cfg.save_every == 0):
                save(cfg, model, raw, optimizer, step, rank, world, record, final=step == total)
            if step == cfg.stop_at:
                print0(f"stopping after step {step} (--stop_at); continue with --resume")
                break
    except (KeyboardInterrupt, Interrupted) as e:  # Ctrl-C or SIGTERM: one line that says how to continue
        raise KeyboardInterrupt(f"{str(e) or 'interrupted'} after step {step} of {total}; "
                                f"{last_checkpoint(cfg.out_dir)}; continue with --resume") from None
    finally:
        bar.close()
    return step


def main(argv=None):
    cfg = parse_args(argv)
    rank, world, device = init_distributed(cfg.device, cfg.fsdp)
    torch.manual_seed(cfg.seed + rank)
    # ---- where the run writes, and the data: every refusal comes here, before any model or GPU time
    init_dir = resolve_checkpoint(ensure_default(cfg.init))
    if cfg.auto_resume:  # a worker torchrun restarts continues the checkpoint its group left; a first start is fresh
        cfg.resume = checkpoint.find_checkpoint(cfg.out_dir) is not None
    ckpt = checkpoint.check_out_dir(cfg.out_dir, cfg.resume, init_dir)  # refused: nothing touched
    if cfg.resume:  # finish or undo a save that a crash cut short, then continue from what that leaves
        if rank == 0:
            checkpoint.recover(cfg.out_dir)
        if dist.is_initialized():
            dist.barrier()
        ckpt = checkpoint.find_checkpoint(cfg.out_dir)
    tok, train, held = load_data(cfg, init_dir)
    per_step = cfg.batch_size * cfg.grad_accum * world
    total = cfg.max_steps or max(1, int(cfg.epochs * len(train) / per_step))
    # what train_config.json records: the flags, and what they came to
    record = dict(asdict(cfg), init_dir=init_dir, world=world, examples_per_step=per_step,
                  data_examples=len(train), data_sha256=fingerprint(train), history=[])
    if cfg.resume:
        check_resume(cfg, ckpt, record, total)
    unit = "pairs" if cfg.method in baselines.PAIR_METHODS else "examples"
    print0(f"data: {len(train)} train {unit} / {len(held)} eval examples; {per_step} {unit} per step, {total} steps")

    # ---- the model
    raw, model, ref, optimizer, autocast = build_model(cfg, init_dir, ckpt, device, world)
    checkpoint.check_space(cfg.out_dir, *checkpoint_bytes(raw, cfg))
    step = resumed_at = checkpoint.load_state(ckpt, raw, optimizer, cfg.optimizer) if cfg.resume else 0
    print0(f"model: {sum(p.numel() for p in raw.parameters()) / 1e6:.0f}M parameters; peak host memory while "
           f"loading, per rank: {', '.join(f'{gb:.2f}' for gb in peak_rss_gb(world))} GB")
    if cfg.resume:
        print0(f"resumed from {ckpt} at step {step}")
    if cfg.eval_every and held and step == 0:
        print0(f"step 0: eval {eval_loss(raw, held, cfg, device, autocast, rank, world):.4g}")
    if cfg.sample_every and held and step == 0:
        print0(f"sample prompt: {tok.decode(prompt_of(held[0]))!r}")
        print0(f"sample before: {sample(raw, tok, held[0], device, autocast)!r}")

    # ---- the loop, then the end
    step = train_loop(cfg, raw, model, ref, optimizer, autocast, train, held, step, total, record, rank, world,
                      device)
    if step == total and rank == 0:
        final = checkpoint.find_checkpoint(cfg.out_dir)
        if not checkpoint.published(final, cfg.out_dir):  # a resumed run whose last save was cut while publishing
            checkpoint.publish(final, cfg.out_dir)
    if cfg.sample_every and held:
        if resumed_at:  # the prompt was printed by the run that started
            print0(f"sample prompt: {tok.decode(prompt_of(held[0]))!r}")
        print0(f"sample after:  {sample(raw, tok, held[0], device, autocast)!r}")
    if step == total:
        print0(f"done: {total} steps; model in {cfg.out_dir}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    run(main)
