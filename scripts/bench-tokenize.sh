#!/usr/bin/env bash
# Tokenizer training and encoding: pretrain, the Python `tokenizers` library and `tiktoken`, on the
# same text (code + legal JSONL of ../shared/corpus) with the same 32,000-token vocabulary, all cores.
#
#   scripts/bench-tokenize.sh [OUT_DIR]
#
# The Python peers are installed once into $PRETRAIN_BENCH_VENV (default ~/.cache/pretrain/tokenize-venv).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${TMPDIR:-/tmp}/bench-tokenize}
venv=${PRETRAIN_BENCH_VENV:-$HOME/.cache/pretrain/tokenize-venv}

if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet tokenizers tiktoken
fi

cargo build --quiet --release -p pretrain-worker --bin bench-tokenize
./target/release/bench-tokenize --out "$out"
echo
"$venv/bin/python" scripts/tokenize_baseline.py "$out"
