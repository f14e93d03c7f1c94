#!/usr/bin/env bash
# data-prep at scale: a synthetic web corpus of N documents with planted exact and near duplicates
# (scripts/web_corpus.py), through data-prep's phases run as separate worker processes, the way the
# operator runs them as Indexed Jobs: 8 map tasks, then T dedup tasks, the cluster task, T route
# tasks, T write tasks (T at most 8, the map and output shards) and the reduce, once with each task
# count T given. Rule filters and the quality cut are off, so dedup alone removes documents.
#
#   scripts/bench-data-prep-scale.sh [N] [TASKS...]     (default: 2000000, then 1 8)
#   PRETRAIN_BENCH_ORDER=in-context scripts/bench-data-prep-scale.sh [N] [TASKS...]
#
# With PRETRAIN_BENCH_ORDER=in-context the stream is ordered in context, in partitions of
# PRETRAIN_BENCH_PARTITION (default 250000) documents: T embed and T order tasks run between the
# cluster and route tasks (the corpus has no topics, so this measures cost, not order quality:
# `bench-order` measures that).
#
# Prints each task's peak memory (RSS) and time, each phase's wall time (two tasks at a time on
# this machine's two cores), dedup recall and precision against the plant, and whether the outputs
# with every task count are byte-identical. The corpus and the store stay in
# $PRETRAIN_BENCH_DIR (default ~/.cache/pretrain/bench-scale/N); the map outputs are reused by later
# task counts (the count is not part of the spec's hash), as they would be on a cluster, so their
# figures are those of the first count.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-2000000}
shift || true
counts=("$@")
[ ${#counts[@]} -gt 0 ] || counts=(1 8)
work=${PRETRAIN_BENCH_DIR:-$HOME/.cache/pretrain/bench-scale}/$n
py=$(scripts/python-env.sh)
command -v zstd >/dev/null || { echo "the score needs the zstd command" >&2; exit 1; }
if [ ! -f "$work/corpus/done" ]; then
    echo "generating $n documents into $work/corpus" >&2
    "$py" scripts/web_corpus.py gen "$work/corpus" "$n"
    touch "$work/corpus/done"
fi
cargo build --quiet --release -p pretrain-worker --bin pretrain-worker
worker=$PWD/target/release/pretrain-worker
stage=$work/store/scale/data-prep
order_spec=""
in_context=false
if [ "${PRETRAIN_BENCH_ORDER:-shuffle}" = in-context ]; then
    in_context=true
    order_spec="order: {strategy: in-context, partitionDocuments: ${PRETRAIN_BENCH_PARTITION:-250000}}"
fi

# One task under /usr/bin/time: appends "phase task peak-KiB seconds" to the log.
task() {
    local phase=$1 index=$2 manifest=$3
    local out
    out=$(mktemp)
    JOB_COMPLETION_INDEX=$index RAYON_NUM_THREADS=1 /usr/bin/time -f "%M %e" -o "$out" \
        "$worker" data-prep --spec "$manifest" --phase "$phase" > "$work/$phase-$index.out" 2>&1 \
        || { tail -5 "$work/$phase-$index.out" >&2; exit 1; }
    echo "$phase $index $(cat "$out")" >> "$log"
    rm -f "$out"
}
export -f task
export worker work

# Runs `count` tasks of `phase`, two at a time; prints the phase's wall time.
phase() {
    local phase=$1 count=$2 manifest=$3 start
    start=$(date +%s.%N)
    seq 0 $((count - 1)) | xargs -P 2 -I{} bash -c "task $phase {} $manifest" || exit 1
    python3 -c "print(f'{$(date +%s.%N) - $start:.1f}')"
}

for tasks in "${counts[@]}"; do
    shared=$((tasks < 8 ? tasks : 8))
    manifest=$work/scale-$tasks.yaml
    cat > "$manifest" <<EOF
apiVersion: pretrain.dev/v1alpha1
kind: PretrainRun
metadata: {name: scale}
spec:
  storage: {url: "file://$work/store"}
  seed: 7
  data:
    sources: [{name: web, url: "$work/corpus/part-*.jsonl"}]
    filters: {gopherQuality: {enabled: false}, gopherRepetition: {enabled: false}, c4: {enabled: false}, fineweb: {enabled: false}, language: {enabled: false}}
    heldOutFraction: 0.001
    shards: 8
    tasks: {dedup: $tasks, route: $shared, order: $shared, write: $shared}
    $order_spec
  model: {preset: tiny}
  train: {seqLen: 64, tokens: 100000, globalBatchTokens: 1024, microBatchSize: 16, schedule: {warmupSteps: 1}, resources: {gpusPerNode: 0}}
EOF
    # Each count redoes every phase after the map; the map outputs stay.
    rm -rf "$stage/_SUCCESS.json" "$stage/dedup" "$stage/cluster" "$stage/embed" "$stage/order" \
        "$stage/route" "$stage/write" \
        "$stage/shards" "$stage/heldout"
    export log=$work/tasks-$tasks.log
    : > "$log"
    map_s=$(phase map 8 "$manifest")
    dedup_s=$(phase dedup "$tasks" "$manifest")
    cluster_s=$(phase cluster 1 "$manifest")
    ordered=""
    if $in_context; then
        embed_s=$(phase embed "$shared" "$manifest")
        order_s=$(phase order "$shared" "$manifest")
        ordered=" embed ${embed_s} s, order ${order_s} s,"
    fi
    route_s=$(phase route "$shared" "$manifest")
    write_s=$(phase write "$shared" "$manifest")
    reduce_s=$(phase reduce 1 "$manifest")
    echo "== $tasks dedup, $shared route and write tasks: map ${map_s} s (its outputs reused after the first count)," \
        "dedup ${dedup_s} s, cluster ${cluster_s} s,${ordered} route ${route_s} s, write ${write_s} s, reduce ${reduce_s} s"
    echo "   phase task peak-KiB seconds:"
    sort -k1,1 -k2,2n "$log" | sed 's/^/    /'
    awk '{if ($3 > m[$1]) m[$1] = $3} END {for (p in m) printf "   largest %s task: %.0f MiB\n", p, m[p] / 1024}' "$log"
    if $in_context; then
        python3 - "$stage" <<'PY'
import glob, json, sys
stage = sys.argv[1]
parts = [p for f in sorted(glob.glob(f"{stage}/order/*/_DONE.json")) for p in json.load(open(f))["partitions"]]
sizes = [p["documents"] for p in parts]
stats = json.load(open(f"{stage}/_SUCCESS.json"))["stats"]
print(f"   {len(parts)} partitions: largest {max(sizes)}, mean {sum(sizes) / len(sizes):.0f} documents on the path;"
      f" {stats['dedup']['semanticRemoved']} semantic duplicates;"
      f" adjacent similarity {stats['train']['adjacentSimilarity'][0]:.3f} on the paths,"
      f" {stats['train']['adjacentSimilarity'][1]:.3f} for two random documents")
PY
    fi
    (cd "$stage" && sha256sum shards/* heldout/*) > "$work/sums-$tasks.txt"
    "$py" scripts/web_corpus.py score "$work/corpus" "$stage"
done
for tasks in "${counts[@]}"; do
    if cmp -s "$work/sums-${counts[0]}.txt" "$work/sums-$tasks.txt"; then
        echo "outputs with $tasks tasks a phase: identical to ${counts[0]} ($(wc -l < "$work/sums-$tasks.txt") files)"
    else
        echo "outputs with $tasks tasks a phase DIFFER from ${counts[0]}" >&2
        exit 1
    fi
done
