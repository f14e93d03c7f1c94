#!/usr/bin/env bash
# Everything the GPU issues measure, in one run on a GPU machine that has no Rust toolchain: the
# kernels' correctness on the card (check-kernels: every fused op against the composed ops on the
# CPU, NaN propagation, a whole training step fused against unfused), their per-op times against
# the composed ops, and the training benchmark against PyTorch (scripts/bench-gpu.sh).
#
#   scripts/cuda-toolkit.sh build              # here: dist/gpu/*.gz
#   scripts/gpu-session.sh [quick]             # there, from the checkout root
#
# `quick` stops after the correctness checks. Logs go to $OUT (or a temporary folder), one per part.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-$(mktemp -d)}
mkdir -p "$out" dist/gpu
for gz in dist/gpu/*.gz; do
    gunzip -kfc "$gz" > "${gz%.gz}" && chmod +x "${gz%.gz}"
done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"

echo "== correctness (check-kernels --device cuda)"
timeout 300 dist/gpu/check-kernels --device cuda > "$out/check.log" 2>&1
echo "exit $?" >> "$out/check.log"
grep -E "^FAIL|checks passed|^exit|panicked" "$out/check.log"
[ "${1:-}" = quick ] && exit 0

echo "== per-op times, fused and composed (bf16)"
timeout 180 dist/gpu/check-kernels --device cuda --dtype bf16 --time > "$out/time.log" 2>&1
grep -E "^time|panicked|error" "$out/time.log"

echo "== training throughput against PyTorch"
BENCH_OUT="$out/bench" scripts/bench-gpu.sh dist/gpu/bench-train 2>&1 | tee "$out/bench.log"
echo "logs: $out"
