#!/usr/bin/env python3
"""A synthetic web corpus with planted duplicates, for data-prep at scale, and the score of a
data-prep run's dedup against the plant.

    web_corpus.py gen OUT_DIR N [--files F] [--seed S]
    web_corpus.py score OUT_DIR STAGE_DIR

`gen` writes OUT_DIR/part-NNNNN.jsonl (F files, default 64, in stream order) holding N documents
`{"id", "text"}`, and OUT_DIR/truth.tsv, one line per planted duplicate:
`id <TAB> original id <TAB> exact|near <TAB> true Jaccard of word 5-grams`.

- Lengths are log-normal, as web page lengths are: median 150 words, sigma 0.9 (mean about 225
  words, 1.5 KB), clipped to 20..20,000 words.
- Words are drawn from a Zipfian vocabulary of 100,000 made-up words (exponent 1.1), with a line
  break every 8 to 40 words.
- 5% of documents are exact duplicates of an earlier original (half of them with other case and
  spacing, which exact dedup normalises away); 10% are near duplicates of an earlier original with
  1%, 2%, 4%, 8%, 15% or 30% of words replaced, so their Jaccard similarity spreads from about 0.95
  down to about 0.25. The similarity of each planted pair is measured here, exactly, on the shingles
  data-prep's MinHash uses (lowercased alphanumeric words, 5-grams).
- A duplicate always comes after its original in stream order, so dedup keeps the original.

`score` reads the documents a committed data-prep stage kept (STAGE_DIR/shards/*.jsonl.zst and
heldout/, through the `zstd` command) and prints, against truth.tsv: recall of exact duplicates and
of near duplicates by bins of true Jaccard, and precision: the share of removed documents that are
planted duplicates at Jaccard 0.5 or more. Run it on a stage without rule filters or a quality cut,
so that dedup is the only thing that removes documents.
"""

import argparse
import glob
import json
import os
import subprocess

import numpy as np

EDITS = [0.01, 0.02, 0.04, 0.08, 0.15, 0.30]


def vocabulary(rng, size):
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    lengths = rng.integers(2, 11, size)
    return ["".join(rng.choice(letters, n)) + str(i % 7) for i, n in enumerate(lengths)]


def grams(words, n=5):
    return {tuple(words[i : i + n]) for i in range(max(1, len(words) - n + 1))}


def jaccard(a, b):
    ga, gb = grams(a), grams(b)
    return len(ga & gb) / len(ga | gb)


def text_of(words, breaks):
    out, at = [], 0
    for gap in breaks:
        if at >= len(words):
            break
        out.append(" ".join(words[at : at + gap]))
        at += gap
    if at < len(words):
        out.append(" ".join(words[at:]))
    return "\n".join(out)


def kept_ids(stage):
    ids = set()
    for path in sorted(glob.glob(os.path.join(stage, "shards", "*.jsonl.zst")) + glob.glob(os.path.join(stage, "heldout", "*.jsonl.zst"))):
        out = subprocess.run(["zstd", "-dc", path], check=True, capture_output=True).stdout
        for line in out.splitlines():
            ids.add(json.loads(line)["id"])
    return ids


def score(args):
    kept = kept_ids(args.stage)
    n = sum(1 for path in glob.glob(os.path.join(args.out, "part-*.jsonl")) for _ in open(path))
    planted = {}
    for line in open(os.path.join(args.out, "truth.tsv")):
        doc_id, orig, kind, j = line.rstrip("\n").split("\t")
        planted[doc_id] = (orig, kind, float(j))
    bins = {}
    for doc_id, (orig, kind, j) in planted.items():
        name = "exact" if kind == "exact" else f"near J {min(int(j * 10), 9) / 10:.1f}-{min(int(j * 10), 9) / 10 + 0.1:.1f}"
        found, total = bins.get(name, (0, 0))
        bins[name] = (found + (doc_id not in kept), total + 1)
    removed = n - len(kept)
    # Removed documents that are neither planted duplicates at J >= 0.5 nor an original of one (an
    # original is removed only if its cluster keeps a duplicate, which never comes first).
    true_removed = sum(1 for d, (o, k, j) in planted.items() if j >= 0.5 and d not in kept)
    print(f"documents {n}, kept {len(kept)}, removed {removed}")
    for name in sorted(bins, key=lambda b: (b != "exact", b)):
        found, total = bins[name]
        print(f"  recall {name:<16} {found}/{total} = {found / total:.4f}")
    print(f"  precision {true_removed}/{removed} = {true_removed / max(removed, 1):.4f}")


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("gen")
    g.add_argument("out")
    g.add_argument("n", type=int)
    g.add_argument("--files", type=int, default=64)
    g.add_argument("--seed", type=int, default=1)
    s = sub.add_parser("score")
    s.add_argument("out")
    s.add_argument("stage")
    args = ap.parse_args()
    if args.command == "score":
        score(args)
    else:
        generate(args)


def generate(args):
    rng = np.random.default_rng(args.seed)
    vocab = vocabulary(rng, 100_000)
    ranks = np.arange(1, len(vocab) + 1, dtype=np.float64)
    cdf = np.cumsum(ranks**-1.1)
    cdf /= cdf[-1]
    os.makedirs(args.out, exist_ok=True)
    per_file = -(-args.n // args.files)
    # Originals kept for copying: a reservoir, so memory stays bounded at any N.
    pool, pool_size = [], 20_000
    kinds = rng.random(args.n)
    truth = open(os.path.join(args.out, "truth.tsv"), "w")
    out = None
    originals = 0
    for i in range(args.n):
        if i % per_file == 0:
            if out:
                out.close()
            out = open(os.path.join(args.out, f"part-{i // per_file:05d}.jsonl"), "w")
        doc_id = f"d{i:09d}"
        kind = kinds[i]
        if pool and kind < 0.05:
            orig_id, words, breaks = pool[rng.integers(len(pool))]
            text = text_of(words, breaks)
            if kind < 0.025:
                text = text.upper().replace(" ", "  ")
            truth.write(f"{doc_id}\t{orig_id}\texact\t1.0\n")
        elif pool and kind < 0.15:
            orig_id, words, breaks = pool[rng.integers(len(pool))]
            edit = EDITS[rng.integers(len(EDITS))]
            copy = list(words)
            where = np.flatnonzero(rng.random(len(copy)) < edit)
            for k, w in zip(where, np.searchsorted(cdf, rng.random(len(where)))):
                copy[k] = vocab[w]
            text = text_of(copy, breaks)
            truth.write(f"{doc_id}\t{orig_id}\tnear\t{jaccard(words, copy):.4f}\n")
        else:
            n = int(np.clip(rng.lognormal(np.log(150), 0.9), 20, 20_000))
            words = [vocab[w] for w in np.searchsorted(cdf, rng.random(n))]
            breaks = rng.integers(8, 41, n // 8 + 1)
            text = text_of(words, breaks)
            originals += 1
            entry = (doc_id, words, breaks)
            if len(pool) < pool_size:
                pool.append(entry)
            elif rng.random() < pool_size / originals:
                pool[rng.integers(pool_size)] = entry
        out.write(json.dumps({"id": doc_id, "text": text}) + "\n")
    out.close()
    truth.close()


if __name__ == "__main__":
    main()
