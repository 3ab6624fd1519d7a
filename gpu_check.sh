#!/usr/bin/env bash
# What a GPU session runs, from the repository root (no internet needed). Three parts, each fits one device call:
#
#     OUT=/some/empty/dir GPU_CHECK_PARTS=core bash gpu_check.sh    # at most 10 minutes (timeouts add up to 590 s)
#     OUT=/some/empty/dir GPU_CHECK_PARTS=extra bash gpu_check.sh   # at most 17 minutes; 6+ on an H200
#     OUT=/some/empty/dir GPU_CHECK_PARTS=since bash gpu_check.sh   # what is new since the last GPU run (below)
#
# (core and extra by default). core: greedy_check.log, bench_decode1.log, bench_eager.log, bench_compile.log,
# loss_sweep.log. extra, the paths added since the first GPU run: methods.log (per-method step memory and time),
# bench_compile_ckpt.log, pack.log, pack_exact.log, lora_memory.log, then train.py end to end on random weights in
# SmolLM2-135M's shape (fsdp_ift_untied.log, fsdp_ift_tied.log, train_pack.log, train_lora_dpo.log,
# train_compile_ckpt.log; the tokenizer and config.json are read from $GPU_CHECK_TOK, default .gpu/tok). since:
# greedy_check.log, bench_decode1.log, bench_compile.log, train_pack.log, train_lora_dpo.log,
# train_compile_ckpt.log, lora_memory.log (with make_checkpoints.log and summary.log: 9 files).
# train.py's lines need the datasets package: where the machine lacks it, carry its wheels (and dill's and
# multiprocess's) and install them first. summary.log holds this script's own output. More than 8 logs: a
# device call that brings back at most 8 files should tar them.
# Each step runs under `timeout` and its wall time is printed; a failing step does not stop the others.
#
#     GPU_CHECK_DEVICE=cpu GPU_CHECK_SMALL=1 bash gpu_check.sh     # every line on the CPU at tiny sizes
#
# runs the same command lines on a CPU with a tiny model, to show that each parses and runs.
OUT=${OUT:-out-gpu-check}
DEV=${GPU_CHECK_DEVICE:-cuda}
mkdir -p "$OUT"
if ! command -v python > /dev/null; then  # images that have only python3 on the PATH
    mkdir -p /tmp/gpu_check_bin && ln -sf "$(command -v python3)" /tmp/gpu_check_bin/python
    export PATH="/tmp/gpu_check_bin:$PATH"
fi

if [ -n "$GPU_CHECK_SMALL" ]; then  # tiny sizes: seconds per line on a CPU
    INIT=tiny; B4="--batch_size 2 --seq_len 24"; B1="--batch_size 1 --seq_len 24"
    STEPS="--warmup 1 --steps 1"; NEW=4; PROFILE=3; LOSS="--loss_vocab 2048"
    SWEEP="--loss_sizes 1x16,2x32 --loss_dim 64"
    PACK="--batch_size 4 --seq_len 64 --pack_median 20"
    SLOW=300  # CPU: inductor's first compilation takes a minute or more
else
    INIT=llama-3.2-1b; B4="--batch_size 4 --seq_len 1024"; B1="--batch_size 1 --seq_len 512"
    STEPS="--warmup 2 --steps 3"; NEW=128; PROFILE=20; LOSS=""; SWEEP=""
    PACK="--batch_size 8 --seq_len 2048"
    SLOW=0
fi

# step NAME SECONDS CMD...: run CMD under timeout with its output in $OUT/NAME.log, then print its exit status,
# wall time and the log's last lines
step() {
    local name=$1 limit=$(( $2 + SLOW )) t0 rc ms
    shift 2
    echo "=== $name (timeout ${limit}s): $*"
    t0=$(date +%s%N)
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    ms=$(( ($(date +%s%N) - t0) / 1000000 ))
    echo "=== $name: exit $rc after $((ms / 1000)).$(printf %03d $((ms % 1000))) s" \
        "$([ $rc -eq 124 ] && echo '(timed out)')"
    grep -v '^USDT' "$OUT/$name.log" | tail -n "${TAIL:-12}"
    echo
}

environment() {
echo "=== environment"
date -u
git rev-parse --short HEAD 2>/dev/null && git status --short | head -20
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv 2>/dev/null
python -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda',
torch.version.cuda, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
python -c "import transformers; print('transformers', transformers.__version__)" 2>&1 | tail -1
nproc --all
echo

}
export PYTHONUNBUFFERED=1  # a step killed by its timeout keeps what it printed

# decoding at batch 1 (the roofline figure): eager, compiled, transformers; 128 new tokens (the compiled step's
# coordinate-descent tuning takes a while: 81 s for this line before it)
decode1() {
step bench_decode1 160 python bench.py --device "$DEV" --init "$INIT" $B1 $STEPS --new_tokens "$NEW" \
    --compile_decode $LOSS
}

# training with compiled blocks and updates at batch 4 x 1024 (decoding eager only: decode1 times its compiled
# step), profiled: the update's share of the step
bench_compile() {
TAIL=30 step bench_compile 150 python bench.py --device "$DEV" --init "$INIT" $B4 $STEPS --compile --no-compile_decode \
    --profile "$PROFILE" $LOSS
}

# compiled decoding gives the eager tokens on this device (tiny models in float32 and bf16, batch 4 left-padded,
# eos, sampling; the llama-3.2-1b shape in bf16 is compared by bench.py below); one graph for every position;
# no CUDA graph skipped; and the SDPA kernel training reaches
greedy_check() {
TAIL=40 step greedy_check 80 env TORCH_LOGS=recompiles,perf_hints DEV="$DEV" \
    python - <<'EOF'
import os
import torch
from torch._dynamo.utils import counters

from bench import sdpa_kernels
from model import ModelConfig, Transformer

dev = torch.device(os.environ["DEV"])
tiny = dict(vocab_size=512, dim=64, n_layers=2, n_heads=8, n_kv_heads=2, intermediate_size=128)
cases = {"mistral window 16": ModelConfig(**tiny, sliding_window=16),
         "qwen2 window on layer 0": ModelConfig(**tiny, sliding_window=16, window_layers=[True, False],
                                                qkv_bias=True, model_type="qwen2"),
         "llama": ModelConfig(**tiny, model_type="llama")}
torch._dynamo.config.recompile_limit = 64  # several models in one process; each case is reset below anyway
g = torch.Generator().manual_seed(0)
for name, cfg in cases.items():
    for dtype in (torch.bfloat16,) if name == "llama" else (torch.float32,):  # three compilations in all
        torch._dynamo.reset()  # each case compiles its own graph: "new graphs" below is per case
        torch.manual_seed(0)
        with torch.device(dev):
            m = Transformer(cfg).to(dtype).eval()
        if cfg.dim == 64:  # random tiny weights give near-uniform logits: sharpen them so greedy choices are clear
            torch.nn.init.normal_(m.lm_head.weight, std=0.5)
        lengths = [37, 20, 64, 5]
        T = max(lengths)
        pad = torch.tensor([T - n for n in lengths], device=dev)
        idx = torch.randint(0, cfg.vocab_size, (4, T), generator=g).to(dev)
        n = 48
        graphs = counters["stats"]["unique_graphs"]
        eager = m.generate(idx, n, temperature=0, pad=pad, compile=False)
        comp = m.generate(idx, n, temperature=0, pad=pad, compile=True)
        same = (eager[:, T:] == comp[:, T:]).float().mean().item()
        eos = int(eager[1, T + 5])
        e2 = m.generate(idx, n, temperature=0, pad=pad, eos_ids=[eos], compile=False)
        c2 = m.generate(idx, n, temperature=0, pad=pad, eos_ids=[eos], compile=True)
        s1, s2 = (m.generate(idx, 24, 0.8, top_k=50, pad=pad, compile=c,
                             generator=torch.Generator(dev).manual_seed(1)) for c in (False, True))
        verdict = {True: "equal", False: "DIFFERENT"}
        print(f"{name}, {str(dtype)[6:]}: greedy compiled == eager at {same:.1%} of {eager[:, T:].numel()} "
              f"positions{' (EXACT)' if torch.equal(eager, comp) else ''}; with eos {verdict[torch.equal(e2, c2)]} "
              f"({e2.shape[1] - T} vs {c2.shape[1] - T} steps); sampled {verdict[torch.equal(s1, s2)]}; "
              f"new graphs {counters['stats']['unique_graphs'] - graphs}")
        for b in range(4):  # where a row parts: a tie or near-tie of the top two logits is rounding, not a bug
            differ = (eager[b, T:] != comp[b, T:]).nonzero()
            if len(differ):
                j = T + int(differ[0])
                with torch.no_grad():
                    top = m(eager[b:b + 1, :j], pad=pad[b:b + 1])[0, -1].float().topk(2).values.tolist()
                print(f"    row {b} parts at new token {j - T}: top-2 logits {top[0]:.4f}, {top[1]:.4f} "
                      f"(one {str(dtype)[6:]} step there: {torch.finfo(dtype).eps * abs(top[0]):.4f})")
        del m
print("dynamo:", dict(counters["stats"]), "recompiles:", dict(counters.get("recompiles", {})))
print("inductor cudagraph skips:", dict(counters["inductor"]).get("cudagraph_skips", 0))

# which SDPA kernel training reaches, float32 and bf16 autocast, with and without a padding mask
torch.manual_seed(0)
with torch.device(dev):
    m = Transformer(cases["llama"]).train()
x = torch.randint(0, 512, (2, 128), device=dev)
pad = torch.tensor([0, 3], device=dev)
for label, ctx in [("float32", torch.autocast(dev.type, enabled=False)),
                   ("bf16 autocast", torch.autocast(dev.type, dtype=torch.bfloat16))]:
    for padded in (None, pad):
        def fwd_bwd():
            with ctx:
                m(x, pad=padded).float().mean().backward()
        print(f"sdpa kernels, training forward + backward, {label}{', left-padded' if padded is not None else ''}: "
              f"{sdpa_kernels(fwd_bwd)}")

# host syncs in one IFT micro-step, the batch moved as train.py moves it (answer index built on the CPU,
# train.to_device: pinned, non_blocking) and the plain way (.to(dev), index built on the device). On CUDA,
# torch.cuda.set_sync_debug_mode("warn") warns at each op that makes the CPU wait. Prediction: 0 and >= 3.
import warnings

import ift
import train

x = torch.randint(0, 512, (2, 128))
y = x.roll(-1, 1)
y[:, :40] = ift.IGNORE
for way in ("train.py", "plain"):
    if way == "train.py":
        batch = [train.to_device(t, dev) for t in (x, y, ift.answer_index(y))]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
        if way == "plain":
            batch = [x.to(dev), y.to(dev), None]
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss, _, _ = ift.ift_forward(m, batch[0], batch[1], 0.2, 0.95, answer=batch[2])
        loss.backward()
        if dev.type == "cuda":
            torch.cuda.set_sync_debug_mode(0)
    where = sorted({str(w.message).split("\n")[0][:100] for w in seen})
    print(f"host syncs in one IFT micro-step, {way} way: {len(seen)}"
          f"{'' if dev.type == 'cuda' else ' (CPU: no detector, the step only ran)'}", *where, sep="\n    ")
EOF
}

core() {
greedy_check
decode1

# eager training and decoding (eager, compiled) at batch 4 x 1024, the profiler tables, the SDPA kernel per call
TAIL=30 step bench_eager 150 python bench.py --device "$DEV" --init "$INIT" $B4 $STEPS --compile_decode \
    --profile "$PROFILE" $LOSS

bench_compile

# the loss-memory sweep, when this bench.py has it
if python bench.py --help | grep -q -- "--loss_sweep"; then
    step loss_sweep 50 python bench.py --device "$DEV" --loss_sweep $SWEEP
else
    echo "=== loss_sweep: skipped, bench.py has no --loss_sweep"
fi
}

# The paths added since the first GPU run (each also runs on the CPU at tiny sizes with GPU_CHECK_SMALL=1).
extra() {

# one training step of each method: peak memory and time; dpo and tdpo hold the frozen reference beside it
step methods 90 python bench.py --device "$DEV" --init "$INIT" $B4 $STEPS --methods ift dpo tdpo orpo simpo

# compiled blocks with activation checkpointing (bench_compile above: without)
step bench_compile_ckpt 100 python bench.py --device "$DEV" --init "$INIT" $B4 $STEPS --compile \
    --grad_checkpointing --no-compile_decode $LOSS

# --pack against padded batches: useful tokens/s on bench.py's length profile and on equal lengths
step pack 90 python bench.py --device "$DEV" --init "$INIT" $PACK $STEPS --pack

# packed == unpadded on this device: float32 (the per-example path) and bf16 autocast (varlen flash attention
# where this torch has it), IFT loss and gradients, against the bf16 run's own distance from float32
TAIL=20 step pack_exact 60 env DEV="$DEV" python - <<'PY'
import os
import numpy as np
import torch
import ift
import model as model_py
from data import collate
from model import ModelConfig, Transformer
from packing import collate_packed

dev = torch.device(os.environ["DEV"])
print("varlen_attn:", "yes" if model_py.varlen_attn is not None else "no (per-example path)")
rng = np.random.default_rng(0)
ex = []
for n in (70, 33, 129, 91, 12, 100, 64, 5):
    mask = np.zeros(n, bool)
    mask[n // 3:] = True
    ex.append((rng.integers(0, 1000, n).astype(np.int32), mask))
for window in (None, 48):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=1000, dim=256, n_layers=4, n_heads=8, n_kv_heads=2, intermediate_size=512,
                      sliding_window=window)
    with torch.device(dev):
        m = Transformer(cfg)
    x, y = (t.to(dev) for t in collate(ex))
    px, py, packing = collate_packed(ex)
    px, py, packing = px.to(dev), py.to(dev), packing.to(dev)
    runs = {}
    for name, bf16, args in [("fp32 padded", False, (x, y, None)), ("fp32 packed", False, (px, py, packing)),
                             ("bf16 padded", True, (x, y, None)), ("bf16 packed", True, (px, py, packing))]:
        m.zero_grad()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            loss = ift.ift_forward(m, args[0], args[1], 0.2, 0.95, packing=args[2])[0]
        loss.backward()
        runs[name] = (loss.detach().float(), torch.cat([p.grad.flatten() for p in m.parameters()]))

    def rel(a, b):
        return max(((runs[a][0] - runs[b][0]).abs() / runs[a][0].abs()).item(),
                   ((runs[a][1] - runs[b][1]).norm() / runs[a][1].norm()).item())
    print(f"window {window}: packed vs padded, fp32 {rel('fp32 padded', 'fp32 packed'):.2e}, bf16 "
          f"{rel('bf16 padded', 'bf16 packed'):.2e}; bf16 padded vs fp32 padded {rel('fp32 padded', 'bf16 padded'):.2e}"
          " (relative: loss, and gradient norm of the difference)")
PY

# --lora 16 against full fine-tuning: training memory per method (the frozen base in bf16 on CUDA)
step lora_memory 120 python bench.py --device "$DEV" --init "$INIT" $B1 --lora 16 --methods sft ift dpo

train_py fsdp pack lora compile
}

# train.py end to end on random weights in SmolLM2-135M's shape (carried tokenizer and config), the runs named:
# fsdp (FSDP2 with sharded reads, one process, untied and tied), pack, lora (DPO), compile (with activation
# checkpointing)
train_py() {
CK=$OUT/ck
TAIL=4 step make_checkpoints 60 env CK="$CK" TOK="${GPU_CHECK_TOK:-.gpu/tok}" SMALL="$GPU_CHECK_SMALL" python - <<'PY'
import dataclasses, json, os
import torch
from model import ModelConfig, Transformer
hf = json.load(open(os.path.join(os.environ["TOK"], "config.json")))
cfg = ModelConfig.from_hf(hf)
if os.environ.get("SMALL"):
    cfg = dataclasses.replace(cfg, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, intermediate_size=128)
for name, tied in (("tied", True), ("untied", False)):
    torch.manual_seed(0)
    m = Transformer(dataclasses.replace(cfg, tie_word_embeddings=tied))
    m.save_pretrained(os.path.join(os.environ["CK"], name), max_shard_bytes=200 * 2**20, tokenizer_dir=os.environ["TOK"])
    print(name, sum(p.numel() for p in m.parameters()) / 1e6, "M parameters")
PY
TRAIN="--data data/chain_train.jsonl --max_steps 10 --batch_size 16 --optimizer adamw --lr 3e-4 --eval_every 10 \
    --sample_every 0 --seed 0"
case " $* " in *" fsdp "*)
    for init in untied tied; do
        TAIL=4 step "fsdp_ift_$init" 90 torchrun --nproc_per_node=1 train.py --init "$CK/$init" --fsdp --method ift \
            --out_dir "$CK/out_fsdp_$init" $TRAIN
    done ;;
esac
case " $* " in *" pack "*)
    TAIL=4 step train_pack 60 python train.py --init "$CK/untied" --method ift --pack --out_dir "$CK/out_pack" $TRAIN ;;
esac
case " $* " in *" lora "*)
    TAIL=4 step train_lora_dpo 60 python train.py --init "$CK/untied" --method dpo --lora 16 \
        --out_dir "$CK/out_lora" $TRAIN ;;
esac
case " $* " in *" compile "*)
    TAIL=4 step train_compile_ckpt 120 python train.py --init "$CK/untied" --method ift --compile \
        --grad_checkpointing --out_dir "$CK/out_compile" $TRAIN ;;
esac
rm -rf "$CK"
}

# What changed, or never ran on a GPU, since the H200 run of 2026-12-04 (measurements/2026-12-04-h200), most
# wanted first, for one device call (timeouts add up to 610 s; expect about 6 minutes on an H200): the two fixes
# for its missed goals (decoding's tuned one-row matmuls, the compiled update), train.py's --pack after the cuDNN
# change, LoRA DPO and --compile --grad_checkpointing through train.py, then LoRA memory.
since() {
greedy_check
decode1
bench_compile
train_py pack lora compile
step lora_memory 120 python bench.py --device "$DEV" --init "$INIT" $B1 --lora 16 --methods sft ift dpo
}

case "${GPU_CHECK_PARTS:-core extra}" in
    *core*extra*) run_parts() { environment; core; extra; } ;;
    *extra*) run_parts() { environment; extra; } ;;
    *since*) run_parts() { environment; since; } ;;
    *) run_parts() { environment; core; } ;;
esac

{ run_parts; echo "=== done: $(date -u)"; } 2>&1 | tee "$OUT/summary.log"
