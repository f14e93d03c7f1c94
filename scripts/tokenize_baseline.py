#!/usr/bin/env python3
"""Peers for `bench-tokenize`: the Python `tokenizers` library and `tiktoken`, same text, same vocabulary.

usage: tokenize_baseline.py DIR
DIR is bench-tokenize's --out (tokenizer.json, texts.json, ours.json). Prints each peer's training and
encoding speed, checks that their ids equal pretrain's tokenizer.json ids, and prints pretrain's ratio
against each.
"""
import json
import os
import sys
import time

import tiktoken
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

# GPT-2's split, which `tokenizers`' ByteLevel pre-tokenizer uses.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def byte_level_decoder():
    """GPT-2's byte <-> printable character table, inverted."""
    printable = list(range(0x21, 0x7F)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def main() -> None:
    out = sys.argv[1]
    with open(os.path.join(out, "texts.json"), encoding="utf-8") as f:
        texts = json.load(f)
    with open(os.path.join(out, "ours.json"), encoding="utf-8") as f:
        ours = json.load(f)
    tokenizer_path = os.path.join(out, "tokenizer.json")
    megabytes = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    threads = ours["threads"]

    # Python tokenizers: train the same recipe, then encode with pretrain's tokenizer.json.
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=32000,
        min_frequency=2,
        special_tokens=["<|bos|>", "<|eos|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    start = time.perf_counter()
    hf.train_from_iterator(texts, trainer)
    hf_train = time.perf_counter() - start

    ours_tok = Tokenizer.from_file(tokenizer_path)
    start = time.perf_counter()
    hf_ids = [e.ids for e in ours_tok.encode_batch(texts, add_special_tokens=False)]
    hf_encode = time.perf_counter() - start
    hf_tokens = sum(len(i) for i in hf_ids)

    # tiktoken built from the same vocabulary: rank = id (merge order), GPT-2's split.
    with open(tokenizer_path, encoding="utf-8") as f:
        spec = json.load(f)
    decode_char = byte_level_decoder()
    ranks = {bytes(decode_char[c] for c in token): rank for token, rank in spec["model"]["vocab"].items()}
    specials = {t["content"]: t["id"] for t in spec["added_tokens"]}
    enc = tiktoken.Encoding("pretrain-bench", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    start = time.perf_counter()
    tk_ids = enc.encode_ordinary_batch(texts, num_threads=threads)
    tk_encode = time.perf_counter() - start
    tk_tokens = sum(len(i) for i in tk_ids)
    tk_same = sum(a == b for a, b in zip(tk_ids, hf_ids))

    ours_encode = ours["encodeColdSeconds"]
    print(f"corpus: {len(texts)} documents, {megabytes:.1f} MB; {threads} threads")
    print(f"{'':34} {'train 32k (s)':>14} {'encode MB/s':>12} {'M tokens/s':>11} {'bytes/token':>12}")
    rows = [
        ("tokenizers (Python)", hf_train, hf_encode, hf_tokens),
        (f"tiktoken {tiktoken.__version__}", None, tk_encode, tk_tokens),
        ("pretrain (cold word cache)", ours["trainSeconds"], ours_encode, ours["tokens"]),
    ]
    for name, train, encode, tokens in rows:
        train_s = f"{train:.2f}" if train is not None else "-"
        print(
            f"{name:34} {train_s:>14} {megabytes / encode:>12.1f} {tokens / 1e6 / encode:>11.2f}"
            f" {megabytes * 1e6 / tokens:>12.3f}"
        )
    print(f"tiktoken ids identical to tokenizer.json: {tk_same} of {len(texts)} documents")
    print(f"pretrain encode vs tiktoken: {tk_encode / ours_encode:.2f}x")
    print(f"pretrain encode vs tokenizers (Python): {hf_encode / ours_encode:.2f}x")
    print(f"pretrain train vs tokenizers (Python): {hf_train / ours['trainSeconds']:.2f}x")
    print(f"pretrain train 32k on {ours['trainBigBytes'] / 1e6:.0f} MB: {ours['trainBigSeconds']:.1f} s")


if __name__ == "__main__":
    main()
