#!/usr/bin/env bash
# What a GPU session runs, in one call from the repository root (no internet needed; at most 9 minutes:
# the step timeouts add up to 540 s):
#
#     OUT=/some/empty/dir bash gpu_check.sh
#
# Logs go to $OUT (default out-gpu-check/), six files: summary.log (this script's own output), greedy_check.log,
# bench_decode1.log, bench_eager.log, bench_compile.log, loss_sweep.log. Each step runs under `timeout` and its
# wall time is printed; a failing step does not stop the others (no set -e).
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

main() {

if [ -n "$GPU_CHECK_SMALL" ]; then  # tiny sizes: seconds per line on a CPU
    INIT=tiny; B4="--batch_size 2 --seq_len 24"; B1="--batch_size 1 --seq_len 24"
    STEPS="--warmup 1 --steps 1"; NEW=4; PROFILE=3; LOSS="--loss_vocab 2048"
    SWEEP="--loss_sizes 1x16,2x32 --loss_dim 64"
    SLOW=300  # CPU: inductor's first compilation takes a minute or more
else
    INIT=llama-3.2-1b; B4="--batch_size 4 --seq_len 1024"; B1="--batch_size 1 --seq_len 512"
    STEPS="--warmup 2 --steps 3"; NEW=128; PROFILE=20; LOSS=""; SWEEP=""
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

echo "=== environment"
date -u
git rev-parse --short HEAD 2>/dev/null && git status --short | head -20
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv 2>/dev/null
python -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda',
torch.version.cuda, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
python -c "import transformers; print('transformers', transformers.__version__)" 2>&1 | tail -1
nproc --all
echo

export PYTHONUNBUFFERED=1  # a step killed by its timeout keeps what it printed

# compiled decoding gives the eager tokens on this device (tiny models in float32 and bf16, batch 4 left-padded,
# eos, sampling; the llama-3.2-1b shape in bf16 is compared by bench.py below); one graph for every position;
# no CUDA graph skipped; and the SDPA kernel training reaches
TAIL=40 step greedy_check 90 env TORCH_LOGS=recompiles,perf_hints DEV="$DEV" \
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

# decoding at batch 1 (the roofline figure): eager, compiled, transformers; 128 new tokens
step bench_decode1 110 python bench.py --device "$DEV" --init "$INIT" $B1 $STEPS --new_tokens "$NEW" \
    --compile_decode $LOSS

# eager training and decoding (eager, compiled) at batch 4 x 1024, the profiler tables, the SDPA kernel per call
TAIL=30 step bench_eager 150 python bench.py --device "$DEV" --init "$INIT" $B4 $STEPS --compile_decode \
    --profile "$PROFILE" $LOSS

# the same with compiled blocks for training (decoding eager only: its compiled step was timed just above)
step bench_compile 100 python bench.py --device "$DEV" --init "$INIT" $B4 $STEPS --compile --no-compile_decode $LOSS

# the loss-memory sweep, when this bench.py has it
if python bench.py --help | grep -q -- "--loss_sweep"; then
    step loss_sweep 90 python bench.py --device "$DEV" --loss_sweep $SWEEP
else
    echo "=== loss_sweep: skipped, bench.py has no --loss_sweep"
fi
echo "=== done: $(date -u)"
}

main "$@" 2>&1 | tee "$OUT/summary.log"
