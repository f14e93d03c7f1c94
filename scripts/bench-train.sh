#!/usr/bin/env bash
# Training throughput on this machine's CPU cores: pretrain (candle) and an equivalent PyTorch model
# (same shapes, batch, fp32, AdamW), run back to back; prints pretrain's ratio for each preset, and
# checkpoint save/load time against the disk's sequential write speed.
#
#   scripts/bench-train.sh
#
# PyTorch comes from scripts/python-env.sh (installed once under ~/.cache/pretrain); set PRETRAIN_PYTHON
# to use a Python that already has torch.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PRETRAIN_PYTHON:-$(scripts/python-env.sh)}
cargo build --quiet --release -p pretrain-worker --bin bench-train

run() { # preset vocab batch seq steps
    local args=(--preset "$1" --vocab "$2" --batch "$3" --seq "$4" --steps "$5")
    ours=$(./target/release/bench-train "${args[@]}" | tee /dev/stderr | sed -n 's/^RESULT tokens_per_s=//p')
    theirs=$("$python" scripts/train_baseline.py "${args[@]}" | tee /dev/stderr | sed -n 's/^RESULT tokens_per_s=//p')
    echo "== $1: pretrain $ours tokens/s, PyTorch $theirs tokens/s, ratio $(python3 -c "print(f'{$ours / $theirs:.2f}')")x"
}
run tiny 4096 16 256 3
run llama-125m 32000 4 256 2
