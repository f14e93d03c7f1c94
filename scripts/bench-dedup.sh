#!/usr/bin/env bash
# Near-duplicate recall and precision: pretrain's MinHash (data-prep's defaults) against DataTrove
# 0.10.1's MinHash dedup (its 5-gram, 14 x 8 defaults) on one planted corpus, by Jaccard bins.
#
#   scripts/bench-dedup.sh [N]      (N base documents, each with one copy; default 2000)
#
# DataTrove is installed once into $PRETRAIN_DEDUP_VENV (default ~/.cache/pretrain/minhash-venv).
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-2000}
venv=${PRETRAIN_DEDUP_VENV:-$HOME/.cache/pretrain/minhash-venv}
if ! "$venv/bin/python" -c "import datatrove, regex, tokenizers" >/dev/null 2>&1; then
    python3 -m venv "$venv"
    # xxhash 3.4: DataTrove 0.10.1 hashes str, which later xxhash releases refuse.
    "$venv/bin/pip" install --quiet "datatrove==0.10.1" regex tokenizers orjson "xxhash==3.4.1"
fi
cargo build --quiet --release -p pretrain-worker --bin bench-dedup
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$venv/bin/python" scripts/bench_dedup.py plant "$work/corpus.jsonl" "$n"
./target/release/bench-dedup "$work/corpus.jsonl" > "$work/pretrain.txt"
start=$(date +%s.%N)
"$venv/bin/python" scripts/bench_dedup.py datatrove "$work/corpus.jsonl" "$work/datatrove.txt" > "$work/datatrove.log" 2>&1 \
    || { tail -20 "$work/datatrove.log"; exit 1; }
echo "datatrove: $(python3 -c "print(f'{$(date +%s.%N) - $start:.2f}')") s (four pipeline stages, one process)" >&2
"$venv/bin/python" scripts/bench_dedup.py score "$work/corpus.jsonl" pretrain="$work/pretrain.txt" datatrove="$work/datatrove.txt"
