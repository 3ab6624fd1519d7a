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
import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields

import torch
import torch.distributed as dist
from tqdm import tqdm

import baselines
import ift
from convert_gguf import DEFAULT_OUT, ensure_default
from data import DataError, batch_indices, collate, tokenize_pairs, tokenize_sources
from hf_checkpoint import read_config, read_into
from model import ModelConfig, Transformer, pick_device, resolve_checkpoint
from presets import METHOD_PRESETS, PRESETS
from tokenizer import Tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass
class TrainConfig:
    # model and data
    init: str = DEFAULT_OUT         # checkpoint dir or hub id; default: the embedded SmolLM2-135M-Instruct
    data: str = os.path.join(HERE, "data", "chain_train.jsonl")  # comma-separated sources, see data.py
    eval_data: str = os.path.join(HERE, "data", "chain_test.jsonl")  # "" -> hold out eval_fraction of data
    eval_fraction: float = 0.02
    out_dir: str = "out"
    max_length: int = 256           # tokens per example; the prompt is cut from the left
    learn_all_turns: bool = False   # learn every assistant turn, not only the final one (the paper's setup)
    num_proc: int = 1               # processes for tokenization
    # method: IFT (lam, gamma and the lambda schedule) or SFT; or a preference baseline on pairs (baselines.py)
    method: str = "ift"             # "ift" | "sft" | "dpo" | "tdpo" | "orpo" | "simpo"
    lam: float = 0.2                # temporal residual weight of the model's own guesses (paper: 0.2)
    gamma: float = 0.95             # relation propagation discount (paper: 0.95)
    lam_schedule: str = "constant"  # "constant" | "linear" (lam_min -> lam over the warmup steps)
    lam_min: float = 0.0
    lam_noise: float = 0.0          # sigma of the noisy lambda of the paper's Table 7 (0.5 there); 0 = off
    # the released code's other IFT modes (ift.guess_picker, ift.propagation_variant); defaults are the paper's
    guess: str = "greedy"           # first-pass guess: "greedy" | "topk" | "sample"
    guess_k: int = 2                # topk guesses the k-th most likely token (not a sample)
    guess_temperature: float = 0.7  # sample draws from softmax(logits / temperature)
    propagation: str = "loss"       # what is propagated: "loss" | "mask" | "logps"
    propagation_side: str = "left"  # "left" (discounted suffix sums) | "right" (prefix sums, inverted)
    propagation_norm: str = "L1"    # sharpening: "L1" | "L2" | "softmax" | "log"
    beta: float = 0.0               # DPO/TDPO/ORPO/SimPO beta; 0 = the method's paper default (0.1/0.1/0.25/2.0)
    alpha: float = baselines.PAPER_TDPO_ALPHA  # TDPO2's weight of the sequential KL term (paper: 0.5)
    simpo_gamma_ratio: float = baselines.PAPER_SIMPO_GAMMA_RATIO  # SimPO's margin gamma / beta (paper: 0.8)
    # optimization
    optimizer: str = "rmsprop"      # "rmsprop" (paper) | "adamw"
    lr: float = 2e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    grad_clip: float = 1.0          # 0 = off
    batch_size: int = 8             # examples per process per micro-step
    grad_accum: int = 1             # micro-steps per optimizer step, per process
    max_steps: int = 40             # optimizer steps; 0 -> epochs
    epochs: float = 1.0
    seed: int = 1337
    # system
    device: str = "auto"            # "auto" | "cpu" | "cuda"
    dtype: str = "auto"             # "auto" (bf16 autocast on CUDA, fp32 on CPU) | "bf16" | "fp32"
    fsdp: bool = False
    compile: bool = False
    grad_checkpointing: bool = False
    peak_tflops: float = 0.0        # one device's dense peak, for the MFU log; 0 = the GPU's row in PEAK_BF16_FLOPS
    # logging and checkpoints
    eval_every: int = 20            # steps; 0 = only at the end
    eval_max: int = 64              # eval examples at most
    save_every: int = 0             # steps; 0 = only at the end
    sample_every: int = -1          # print a greedy sample of one eval prompt at start and end (-1), never (0)
    resume: bool = False
    auto_resume: bool = False       # resume when out_dir holds a checkpoint, else start fresh (torchrun --max-restarts)
    stop_at: int = 0                # end this process after step N, checkpoint saved (time-boxed jobs); 0 = off
    wandb_project: str = ""


def parse_args(argv=None) -> TrainConfig:
    """Flags are generated from TrainConfig; --preset NAME first replaces defaults with the preset's values."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="default", choices=sorted(PRESETS))
    known, rest = pre.parse_known_args(argv)
    defaults = asdict(TrainConfig())
    defaults.update(PRESETS[known.preset])
    # the preset's per-method changes (the paper's preference baselines train on pairs), for the method given
    probe = argparse.ArgumentParser(add_help=False)
    probe.add_argument("--method", default=defaults["method"])
    defaults.update(METHOD_PRESETS.get(known.preset, {}).get(probe.parse_known_args(rest)[0].method, {}))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 parents=[pre])
    for f in fields(TrainConfig):
        if f.type is bool:
            ap.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=defaults[f.name])
        else:
            ap.add_argument(f"--{f.name}", type=f.type, default=defaults[f.name])
    args = vars(ap.parse_args(rest))
    args.pop("preset")
    cfg = TrainConfig(**args)
    for name, allowed in [("method", ("ift", "sft", *baselines.PAIR_METHODS)), ("optimizer", ("rmsprop", "adamw")),
                          ("lam_schedule", ("constant", "linear")), ("dtype", ("auto", "bf16", "fp32")),
                          ("device", ("auto", "cpu", "cuda")), ("guess", ("greedy", "topk", "sample")),
                          ("propagation", ("loss", "mask", "logps")), ("propagation_side", ("left", "right")),
                          ("propagation_norm", tuple(ift.SHARPEN))]:
        if getattr(cfg, name) not in allowed:
            ap.error(f"--{name} must be one of {allowed}, got {getattr(cfg, name)!r}")
    if not 0 <= cfg.lam <= 1 or not 0 <= cfg.gamma <= 1:
        ap.error("--lam and --gamma must lie in [0, 1]")
    if cfg.guess_k < 1 or not cfg.guess_temperature > 0:
        ap.error("--guess_k must be >= 1 and --guess_temperature > 0")
    if cfg.beta < 0 or cfg.alpha < 0 or cfg.simpo_gamma_ratio < 0:
        ap.error("--beta, --alpha and --simpo_gamma_ratio must be >= 0")
    if cfg.batch_size < 1 or cfg.grad_accum < 1 or cfg.max_length < 2:
        ap.error("--batch_size and --grad_accum must be >= 1, --max_length >= 2")
    return cfg


# -------------------------------------------------------------------------------------------------------------------
# distributed helpers


def init_distributed(device: str, fsdp: bool = False):
    """(rank, world, device) from torchrun's environment; a single process without it. FSDP needs a process
    group even alone: a single process gets a world of one (an in-memory store, no ports)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    dev = pick_device(device)
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
# checkpoints: out_dir/checkpoint is replaced atomically (write checkpoint.tmp, then swap names)


def find_checkpoint(out_dir: str) -> str | None:
    for name in ("checkpoint", "checkpoint.old"):  # .old survives a crash between the two renames
        path = os.path.join(out_dir, name)
        if os.path.exists(os.path.join(path, "resume.pt")):
            return path
    return None


def save_checkpoint(cfg, model, raw, optimizer, step, rank, tokenizer_dir, final=False):
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    # full (unsharded) state on CPU; every rank takes part (FSDP gathers), rank 0 writes
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd, osd = get_state_dict(model, optimizer, options=opts)
    if rank == 0:
        os.makedirs(cfg.out_dir, exist_ok=True)
        tmp, dst = os.path.join(cfg.out_dir, "checkpoint.tmp"), os.path.join(cfg.out_dir, "checkpoint")
        shutil.rmtree(tmp, ignore_errors=True)
        raw.save_pretrained(tmp, state_dict=msd, tokenizer_dir=tokenizer_dir)
        # the optimizer's moments as safetensors (a resumed rank reads only its rows of them), named
        # "<parameter>.<moment>"; step and RNG in resume.pt, loadable with torch.load(weights_only=True)
        save_file({f"{fqn}.{k}": v.contiguous() for fqn, moments in osd["state"].items() for k, v in moments.items()},
                  os.path.join(tmp, "optimizer.safetensors"))
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.stack([s for s in torch.cuda.get_rng_state_all()])
        torch.save({"step": step, "rng": rng}, os.path.join(tmp, "resume.pt"))
        with open(os.path.join(tmp, "train_config.json"), "w") as f:
            json.dump(dict(asdict(cfg), step=step, init_dir=tokenizer_dir), f, indent=2)  # init_dir: see main
        if os.path.exists(dst):
            os.replace(dst, dst + ".old")
        os.replace(tmp, dst)
        shutil.rmtree(dst + ".old", ignore_errors=True)
        if final:  # publish the weights as out_dir itself: hard links, each swapped in atomically
            for name in os.listdir(dst):
                if name not in ("resume.pt", "optimizer.safetensors"):
                    link = os.path.join(cfg.out_dir, name + ".tmp")
                    if os.path.exists(link):
                        os.remove(link)
                    os.link(os.path.join(dst, name), link)
                    os.replace(link, os.path.join(cfg.out_dir, name))
    if dist.is_initialized():
        dist.barrier()


def load_checkpoint(path, model, optimizer, cfg):
    """Optimizer state, step and RNG of a checkpoint (its weights were loaded with the model). Each moment is
    allocated like its parameter (sharded under FSDP) and filled from optimizer.safetensors with only the rows
    this rank keeps: no rank ever holds the whole state, and no zero-initialized copy is made first."""
    from safetensors import safe_open
    with open(os.path.join(path, "train_config.json")) as f:
        saved = json.load(f)["optimizer"]
    if saved != cfg.optimizer:
        sys.exit(f"error: {path} was trained with --optimizer {saved}; resume with the same optimizer")
    file = os.path.join(path, "optimizer.safetensors")
    if not os.path.exists(file):  # train.py before optimizer.safetensors kept the state inside resume.pt
        sys.exit(f"error: {path} has no optimizer.safetensors (written by an older train.py); its weights load "
                 "as --init, without --resume")
    params = dict(model.named_parameters())
    with safe_open(file, framework="pt") as f:  # names "<parameter>.<moment>"; 0-dim ones are step counters
        moments = {name: torch.empty_like(params[name.rsplit(".", 1)[0]]) if f.get_slice(name).get_shape()
                   else f.get_tensor(name) for name in f.keys()}
    read_into(moments, dict.fromkeys(moments, file))
    index = {id(p): i for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"])}
    osd = optimizer.state_dict()  # param_groups with this run's hyperparameters; state filled in below
    for name, t in moments.items():
        fqn, moment = name.rsplit(".", 1)
        osd["state"].setdefault(index[id(params[fqn])], {})[moment] = t
    if len(osd["state"]) != len(index):
        sys.exit(f"error: {file} lacks the state of {len(index) - len(osd['state'])} parameters")
    optimizer.load_state_dict(osd)
    state = torch.load(os.path.join(path, "resume.pt"), map_location="cpu", weights_only=True)
    torch.set_rng_state(state["rng"]["cpu"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["rng"]["cuda"]))
    return state["step"]


# -------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def eval_loss(model, examples, cfg, device, autocast, rank, world) -> float:
    """Held-out SFT loss (per-sequence mean NLL of the answer, then mean), the same for every method (the
    preference baselines' held-out examples are the chosen answers)."""
    model.eval()
    total = torch.zeros(2, device=device, dtype=torch.float64)
    mine = list(range(rank, len(examples), world))
    for i in range(0, len(mine), cfg.batch_size):
        x, y = collate([examples[j] for j in mine[i:i + cfg.batch_size]])
        with autocast:
            loss = ift.sft_forward(model, x.to(device), y.to(device))
        total += torch.tensor([loss.item() * len(x), len(x)], device=device, dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


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


def main(argv=None):
    cfg = parse_args(argv)
    try:
        rank, world, device = init_distributed(cfg.device, cfg.fsdp)
    except ValueError as e:
        sys.exit(f"error: {e}")
    torch.manual_seed(cfg.seed + rank)
    # ---- data first: every problem with it stops here, before any model or GPU time, and out_dir stays clean
    ckpt = find_checkpoint(cfg.out_dir)
    if cfg.auto_resume:  # a worker torchrun restarts continues the checkpoint its group left; a first start is fresh
        cfg.resume = ckpt is not None
    if ckpt and not cfg.resume:
        sys.exit(f"{cfg.out_dir} holds a checkpoint; pass --resume (or --auto_resume) to continue it or choose "
                 "another --out_dir")
    if cfg.resume and not ckpt:
        sys.exit(f"--resume: no checkpoint in {cfg.out_dir}")
    try:
        init_dir = resolve_checkpoint(ensure_default(cfg.init))
        ModelConfig.from_hf(read_config(init_dir), source=os.path.join(init_dir, "config.json"))  # refusals first
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
    except (DataError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    if cfg.resume and cfg.method in baselines.REFERENCE_METHODS:  # the reference must be the run's original init
        with open(os.path.join(ckpt, "train_config.json")) as f:
            saved = json.load(f).get("init_dir")
        if saved != init_dir:
            sys.exit(f"error: {ckpt} was trained from --init {saved}; --method {cfg.method} rebuilds its reference "
                     f"model from --init (now {init_dir}): resume with the run's original --init")
    held = held[: cfg.eval_max]
    per_step = cfg.batch_size * cfg.grad_accum * world
    total = cfg.max_steps or max(1, int(cfg.epochs * len(train) / per_step))
    unit = "pairs" if pairs else "examples"
    print0(f"data: {len(train)} train {unit} / {len(held)} eval examples; {per_step} {unit} per step, {total} steps")

    # ---- model: fp32 master weights; bf16 autocast on CUDA. Built on the meta device and (with --fsdp) sharded
    # before any weight is read, so each rank reads only its rows of each tensor; a resumed run reads the
    # checkpoint's own weights
    bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 and not cfg.fsdp else nullcontext()

    def prepare(meta_model):
        if cfg.compile:
            meta_model.compile_blocks()
        if cfg.fsdp:
            shard_fsdp(meta_model, bf16)

    try:
        raw = Transformer.from_pretrained(ckpt if cfg.resume else init_dir, torch.float32, device, shard=prepare)
    except (KeyError, ValueError) as e:
        sys.exit(f"error: {e}")
    raw.grad_checkpointing = cfg.grad_checkpointing
    raw.train()
    model = raw
    if world > 1 and not cfg.fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(raw, device_ids=[device.index] if device.type == "cuda" else None)
    ref = None
    if cfg.method in baselines.REFERENCE_METHODS:
        # DPO/TDPO's frozen reference: the initial weights, from --init also on --resume (never the checkpoint's).
        # No gradients, no optimizer state, not wrapped by DDP, never saved; sharded like the policy under FSDP.
        # bf16 weights when computing in bf16 on CUDA (half the policy's fp32 weights), else float32
        ref_dtype = torch.bfloat16 if bf16 and device.type == "cuda" else torch.float32
        try:
            ref = Transformer.from_pretrained(init_dir, ref_dtype, device, shard=prepare).requires_grad_(False)
        except (KeyError, ValueError) as e:
            sys.exit(f"error: {e}")
    # TDPO's policy head projects the reference's hidden states through the reference's output projection:
    # under FSDP gathered once here (it never changes), not on every micro-step
    ref_head = baselines.full_weight(ref.lm_head.weight) if cfg.method == "tdpo" else None
    opt_cls = torch.optim.RMSprop if cfg.optimizer == "rmsprop" else torch.optim.AdamW
    optimizer = opt_cls(raw.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step = resumed_at = load_checkpoint(ckpt, raw, optimizer, cfg) if cfg.resume else 0
    print0(f"model: {sum(p.numel() for p in raw.parameters()) / 1e6:.0f}M parameters; peak host memory while "
           f"loading, per rank: {', '.join(f'{gb:.2f}' for gb in peak_rss_gb(world))} GB")
    if cfg.resume:
        print0(f"resumed from {ckpt} at step {step}")
    peak = peak_flops(device, cfg.peak_tflops)
    wandb = None
    if cfg.wandb_project and rank == 0:
        import wandb
        wandb.init(project=cfg.wandb_project, config=asdict(cfg))
    if cfg.eval_every and held and step == 0:
        print0(f"step 0: eval {eval_loss(raw, held, cfg, device, autocast, rank, world):.4g}")
    if cfg.sample_every and held and step == 0:
        print0(f"sample prompt: {tok.decode(prompt_of(held[0]))!r}")
        print0(f"sample before: {sample(raw, tok, held[0], device, autocast)!r}")

    # ---- the loop
    bar = tqdm(total=total, initial=step, disable=rank != 0, desc=cfg.method, dynamic_ncols=True)
    while step < total:
        t0 = time.time()
        lr = lr_at(step, total, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        lam = ift.lam_at(step, cfg.lam, schedule=cfg.lam_schedule, lam_min=cfg.lam_min,
                         warmup=math.ceil(cfg.warmup_ratio * total), sigma=cfg.lam_noise, seed=cfg.seed)
        # loss, first-pass SFT loss (both averaged over micro-steps), tokens; pairs: margin sum, wins, pairs kept
        stats = torch.zeros(6, device=device)
        for micro in range(cfg.grad_accum):
            idx = batch_indices(step, micro, rank, world, cfg.batch_size, cfg.grad_accum, len(train), cfg.seed)
            batch = [train[i] for i in idx]
            if pairs:  # B pairs are 2B rows: the chosen ones, then the rejected ones (one forward, one backward)
                batch = [chosen for chosen, _ in batch] + [rejected for _, rejected in batch]
            x, y = collate(batch)
            answer = ift.answer_index(y)  # here on the CPU, so the loss never waits for the GPU (ift.chunked_nll)
            x, y, answer = (to_device(t, device) for t in (x, y, answer))
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
                        cfg.propagation, cfg.propagation_side, cfg.propagation_norm), answer=answer)
                elif pairs:
                    loss, pair_stats = baselines.pair_forward(model, ref, x, y, cfg.method, cfg.beta, cfg.alpha,
                                                              cfg.simpo_gamma_ratio, answer=answer,
                                                              ref_weight=ref_head)
                    first = loss
                    stats[3:] += pair_stats
                else:
                    loss = first = ift.sft_forward(model, x, y, answer=answer)
            (loss / cfg.grad_accum).backward()
            stats[0] += loss.detach().float() / cfg.grad_accum
            stats[1] += first.detach().float() / cfg.grad_accum
            stats[2] += x.numel()  # positions computed, padding included
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if dist.is_initialized():
            dist.all_reduce(stats)
            stats[:2] /= world
        dt = time.time() - t0
        tps = stats[2].item() / dt
        log = {"loss": stats[0].item(), "lam": lam, "lr": lr, "tok/s": tps}
        if cfg.method == "ift":
            log["sft"] = stats[1].item()  # the first pass's loss on the ground-truth prefix
        if pairs:  # the chosen answer's reward minus the rejected one's (baselines.py), and how often it is > 0
            log["margin"] = (stats[3] / stats[5].clamp(min=1)).item()
            log["acc"] = (stats[4] / stats[5].clamp(min=1)).item()
        if peak:
            log["mfu"] = tps * flops_per_token(raw, x.shape[1], cfg.method) / (peak * world)
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == total:
            log["eval"] = eval_loss(raw, held, cfg, device, autocast, rank, world)
            print0(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in log.items()))
        bar.set_postfix({k: f"{v:.3g}" for k, v in log.items()}, refresh=False)
        bar.update(1)
        if wandb:
            wandb.log(log, step=step)
        if step == total or step == cfg.stop_at or (cfg.save_every and step % cfg.save_every == 0):
            save_checkpoint(cfg, model, raw, optimizer, step, rank, init_dir, final=step == total)
        if step == cfg.stop_at:
            print0(f"stopping after step {step} (--stop_at); continue with --resume")
            break
    bar.close()
    if cfg.sample_every and held:
        if resumed_at:  # the prompt was printed by the run that started
            print0(f"sample prompt: {tok.decode(prompt_of(held[0]))!r}")
        print0(f"sample after:  {sample(raw, tok, held[0], device, autocast)!r}")
    if step == total:
        print0(f"done: {total} steps; model in {cfg.out_dir}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
