#!/usr/bin/env bash
# Extraction + rule filters on a WARC crawl: DataTrove (the baseline) and pretrain, one core each,
# same file, run back to back; prints pretrain's speed-up over the DataTrove time measured here.
#
#   scripts/bench-data-prep.sh [WARC]      (default: ../shared/corpus/web-rustdocs-1.95.warc.gz)
#
# DataTrove is installed once into $PRETRAIN_BENCH_VENV (default ~/.cache/pretrain/datatrove-venv).
set -euo pipefail
cd "$(dirname "$0")/.."
warc=${1:-../shared/corpus/web-rustdocs-1.95.warc.gz}
venv=${PRETRAIN_BENCH_VENV:-$HOME/.cache/pretrain/datatrove-venv}

# The check imports what the baseline runs, so a broken install fails here instead of timing out on
# every record inside DataTrove.
if ! "$venv/bin/python" -c "import trafilatura, warcio, magic, cchardet, datatrove" >/dev/null 2>&1; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet "datatrove[processing]==0.10.1" trafilatura spacy faust-cchardet python-magic warcio lxml_html_clean
fi

cargo build --quiet --release -p pretrain-worker --bin bench-data-prep

start=$(date +%s.%N)
taskset -c 0 "$venv/bin/python" scripts/datatrove_baseline.py "$warc"
end=$(date +%s.%N)
baseline=$(python3 -c "print(f'{$end - $start:.1f}')")
echo "DataTrove: ${baseline} s"

taskset -c 0 ./target/release/bench-data-prep "$warc" --baseline-seconds "$baseline"
