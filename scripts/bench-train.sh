#!/usr/bin/env bash
# Training throughput on this machine's CPU cores: pretrain (candle) and an equivalent PyTorch model
# (same shapes, batch, fp32, AdamW), run alternately for ROUNDS rounds (default 3) so that both see
# the same machine; prints each side's median tokens/s and pretrain's ratio for each preset, and
# checkpoint save/load time against the disk's sequential write speed.
#
#   scripts/bench-train.sh [ROUNDS]
#
# PyTorch comes from scripts/python-env.sh (installed once under ~/.cache/pretrain); set PRETRAIN_PYTHON
# to use a Python that already has torch.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
python=${PRETRAIN_PYTHON:-$(scripts/python-env.sh)}
cargo build --quiet --release -p pretrain-worker --bin bench-train

median() { tr ' ' '\n' | sed '/^$/d' | sort -g | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }

result() { # command...: its output on stderr, its tokens/s on stdout
    local out
    out=$("$@")
    echo "$out" >&2
    sed -n 's/^RESULT tokens_per_s=//p' <<<"$out"
}

run() { # preset vocab batch seq steps
    local args=(--preset "$1" --vocab "$2" --batch "$3" --seq "$4" --steps "$5") ours=() theirs=()
    for _ in $(seq "$rounds"); do
        ours+=("$(result ./target/release/bench-train "${args[@]}")")
        theirs+=("$(result "$python" scripts/train_baseline.py "${args[@]}")")
    done
    local a b
    a=$(echo "${ours[*]}" | median)
    b=$(echo "${theirs[*]}" | median)
    echo "== $1: pretrain ${ours[*]} tokens/s (median $a), PyTorch ${theirs[*]} (median $b): ratio $(python3 -c "print(f'{$a / $b:.2f}')")x"
}
run tiny 4096 16 256 6
run llama-125m 32000 4 256 2
