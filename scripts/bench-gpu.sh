#!/usr/bin/env bash
# Training throughput on one GPU: our step (bench-train, bf16 compute over fp32 weights) and PyTorch's
# (bf16 autocast, fused AdamW, SDPA; eager and torch.compile) on the same card, for the two shapes of
# the GPU issues: 124.7M at 32 x 1024 and 1.1B at 8 x 2048 (vocab 32000). Prints tokens/s, MFU
# (989 TFLOP/s bf16 peak) and peak memory per row, and our ratio to PyTorch eager.
#
#   scripts/bench-gpu.sh [path/to/bench-train]     # built with --features cuda
#
# Needs a Python with torch and CUDA (PRETRAIN_BENCH_PYTHON, default python3). BENCH_UNFUSED=1 adds
# our step with the composed candle operations (--unfused: the straightforward candle baseline).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin=${1:-$here/../target/release/bench-train}
python=${PRETRAIN_BENCH_PYTHON:-python3}
out=${BENCH_OUT:-$(mktemp -d)}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

value() { sed -n "s/^RESULT $1=//p" "$2" | tail -1; }

# ours PRESET BATCH SEQ STEPS [--unfused]: runs bench-train while sampling the card's memory; prints
# the log name.
ours() {
    local log="$out/ours-$1-$2${5:+-unfused}.log" mem="$out/ours-$1-$2${5:+-unfused}.mem"
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$mem" &
    local sampler=$!
    timeout 300 "$bin" --preset "$1" --batch "$2" --seq "$3" --steps "$4" --device cuda --dtype bf16 ${5:-} > "$log" 2>&1
    echo "exit $?" >> "$log"
    kill "$sampler" 2>/dev/null
    echo "RESULT peak_gib=$(sort -n "$mem" | tail -1 | awk '{printf "%.2f", $1 / 1024}')" >> "$log"
    echo "$log"
}

theirs() { # PRESET BATCH SEQ STEPS [--compile]
    local log="$out/torch-$1-$2${5:+-compiled}.log"
    timeout 300 "$python" "$here/train_baseline.py" --preset "$1" --batch "$2" --seq "$3" --steps "$4" \
        --device cuda --dtype bf16 ${5:-} > "$log" 2>&1
    echo "$log"
}

row() { # PRESET BATCH SEQ STEPS
    local preset=$1 batch=$2 seq=$3 steps=$4
    local o e c
    o=$(ours "$preset" "$batch" "$seq" "$steps")
    local ours_batch=$batch
    if [ -z "$(value tokens_per_s "$o")" ]; then
        echo "pretrain at batch $batch: $(grep -m1 -iE 'out of memory|error|panicked' "$o")"
        ours_batch=$(( batch / 4 > 0 ? batch / 4 : 1 ))
        o=$(ours "$preset" "$ours_batch" "$seq" "$steps")
    fi
    if [ "${BENCH_UNFUSED:-0}" = 1 ]; then
        local u
        u=$(ours "$preset" "$ours_batch" "$seq" "$steps" --unfused)
        echo "$preset unfused (batch $ours_batch): $(value tokens_per_s "$u") tok/s, MFU $(value mfu "$u"), $(value peak_gib "$u") GiB"
    fi
    e=$(theirs "$preset" "$batch" "$seq" "$steps")
    c=$(theirs "$preset" "$batch" "$seq" "$steps" --compile)
    printf '%s %sx%s | pretrain (batch %s): %s tok/s, MFU %s, %s GiB | PyTorch eager: %s tok/s, MFU %s, %s GiB | torch.compile: %s tok/s, MFU %s, %s GiB\n' \
        "$preset" "$batch" "$seq" "$ours_batch" \
        "$(value tokens_per_s "$o")" "$(value mfu "$o")" "$(value peak_gib "$o")" \
        "$(value tokens_per_s "$e")" "$(value mfu "$e")" "$(value peak_gib "$e")" \
        "$(value tokens_per_s "$c")" "$(value mfu "$c")" "$(value peak_gib "$c")"
    awk -v p="$preset" -v a="$(value tokens_per_s "$o")" -v b="$(value tokens_per_s "$e")" \
        'BEGIN { if (a > 0 && b > 0) printf "== %s: pretrain / PyTorch eager = %.3f\n", p, a / b; else printf "== %s: no ratio\n", p }' 
}

row llama-125m 32 1024 8
row llama-1b 8 2048 4
echo "logs: $out"
