"""Near-duplicate recall and precision of pretrain's MinHash and DataTrove's, side by side.

    bench_dedup.py plant OUT.jsonl N      # N base documents, each with a copy at a known Jaccard
    bench_dedup.py datatrove CORPUS.jsonl REMOVED.txt
    bench_dedup.py score CORPUS.jsonl NAME=REMOVED.txt ...

The corpus: N random documents of 200-800 words from a 20,000-word Zipfian vocabulary, each followed
by a copy in which a fraction of words (0 to 35%) is replaced, so that the pair's Jaccard similarity
of word 5-grams spreads over 0.1 to 1. The score counts a pair as found when exactly one of the two is
removed, by bins of true Jaccard, and counts removals of documents whose pair is below J 0.5 or that
have no similar document at all. Both tools use 5-grams, 14 bands of 8 hashes (DataTrove's
MinhashConfig defaults); pretrain verifies candidates' signatures at J 0.75, DataTrove merges every
bucket collision.
"""

import json
import random
import sys
import tempfile


def words_of(text):
    return [w for w in "".join(c if c.isalnum() else " " for c in text.lower()).split() if w]


def grams(text, n=5):
    w = words_of(text)
    return {tuple(w[i : i + n]) for i in range(max(1, len(w) - n + 1))}


def jaccard(a, b):
    ga, gb = grams(a), grams(b)
    return len(ga & gb) / len(ga | gb)


def plant(out, n):
    rng = random.Random(7)
    # Letters only: DataTrove's text normalisation folds digits together.
    def word(i):
        out = ""
        while True:
            out += chr(97 + i % 26)
            i //= 26
            if i == 0:
                return out + "x"

    vocab = [word(i) for i in range(20_000)]
    weights = [1 / (i + 1) for i in range(len(vocab))]
    with open(out, "w") as f:
        for i in range(n):
            base = rng.choices(vocab, weights, k=rng.randint(200, 800))
            edit = rng.choice([0.0, 0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.12, 0.2, 0.35])
            copy = [rng.choice(vocab) if rng.random() < edit else w for w in base]
            a, b = " ".join(base), " ".join(copy)
            f.write(json.dumps({"id": f"{i}a", "text": a, "pair": f"{i}b", "jaccard": round(jaccard(a, b), 4)}) + "\n")
            f.write(json.dumps({"id": f"{i}b", "text": b, "pair": f"{i}a"}) + "\n")


def datatrove(corpus, removed):
    import os
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.word_tokenizers import WordTokenizer

    class Words(WordTokenizer):
        def word_tokenize(self, text):
            return words_of(text)

        def sent_tokenize(self, text):
            return [text]

        def span_tokenize(self, text):
            return [(0, len(text))]

    config = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8)
    with tempfile.TemporaryDirectory() as tmp:
        reader = JsonlReader(os.path.dirname(os.path.abspath(corpus)), glob_pattern=os.path.basename(corpus))
        stages = [
            [reader, MinhashDedupSignature(f"{tmp}/sigs", config=config, language=Words())],
            [MinhashDedupBuckets(f"{tmp}/sigs", f"{tmp}/buckets", config=config)],
            [MinhashDedupCluster(f"{tmp}/buckets", f"{tmp}/remove", config=config)],
            [reader, MinhashDedupFilter(f"{tmp}/remove", exclusion_writer=JsonlWriter(f"{tmp}/removed"))],
        ]
        # The bucket stage runs one task per bucket (DataTrove requires it).
        for i, (pipeline, tasks) in enumerate(zip(stages, [1, config.num_buckets, 1, 1])):
            LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=1, logging_dir=f"{tmp}/logs{i}").run()
        import glob
        import gzip

        with open(removed, "w") as out:
            for path in glob.glob(f"{tmp}/removed/*"):
                with gzip.open(path, "rt") if path.endswith(".gz") else open(path) as f:
                    for line in f:
                        out.write(json.loads(line)["id"] + "\n")


def score(corpus, runs):
    pairs = {}
    with open(corpus) as f:
        for line in f:
            d = json.loads(line)
            if "jaccard" in d:
                pairs[d["id"]] = (d["pair"], d["jaccard"])
    bins = [(0.0, 0.5), (0.5, 0.7), (0.7, 0.8), (0.8, 0.9), (0.9, 1.01)]
    print("| J of the pair | pairs | " + " | ".join(f"{name} found" for name, _ in runs) + " |")
    print("|---|---:|" + "---:|" * len(runs))
    removed = {name: set(open(path).read().split()) for name, path in runs}
    for lo, hi in bins:
        inside = [(a, b) for a, (b, j) in pairs.items() if lo <= j < hi]
        cells = []
        for name, _ in runs:
            r = removed[name]
            found = sum(1 for a, b in inside if (a in r) != (b in r))
            cells.append(f"{found} ({found / max(1, len(inside)):.1%})")
        print(f"| {lo:.1f}-{min(hi, 1.0):.1f} | {len(inside)} | " + " | ".join(cells) + " |")
    for name, _ in runs:
        r = removed[name]
        both = sum(1 for a, (b, _) in pairs.items() if a in r and b in r)
        high = [(a, b) for a, (b, j) in pairs.items() if j >= 0.8]
        recall = sum(1 for a, b in high if (a in r) != (b in r)) / max(1, len(high))
        low = sum(1 for a, (b, j) in pairs.items() if j < 0.5 and ((a in r) != (b in r)))
        print(f"{name}: recall {recall:.3f} at J >= 0.8; {low} merges below J 0.5; "
              f"{both} pairs lost both documents (merged with an unrelated one); {len(r)} removed")


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "plant":
        plant(sys.argv[2], int(sys.argv[3]))
    elif cmd == "datatrove":
        datatrove(sys.argv[2], sys.argv[3])
    else:
        score(sys.argv[2], [tuple(a.split("=", 1)) for a in sys.argv[3:]])
