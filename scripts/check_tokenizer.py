#!/usr/bin/env python3
"""Encodes texts with the Python `tokenizers` library, for the tokenize stage's tests.

usage: check_tokenizer.py TOKENIZER_JSON TEXTS_JSON
TEXTS_JSON holds a JSON list of strings; prints a JSON list of id lists (no special tokens added)
and checks that each decodes back to its text.
"""
import json
import sys

from tokenizers import Tokenizer


def main() -> None:
    tokenizer = Tokenizer.from_file(sys.argv[1])
    with open(sys.argv[2], encoding="utf-8") as f:
        texts = json.load(f)
    encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
    ids = [e.ids for e in encodings]
    for i, (text, row) in enumerate(zip(texts, ids)):
        decoded = tokenizer.decode(row, skip_special_tokens=False)
        if decoded != text:
            sys.exit(f"text {i} does not round-trip through the Python tokenizer")
    json.dump(ids, sys.stdout)


if __name__ == "__main__":
    main()
