#!/usr/bin/env bash
# Coverage-guided fuzzing of every target in fuzz/fuzz_targets for SECONDS each (default 60) under
# libFuzzer and AddressSanitizer, with allocations capped so a length field that asks for gigabytes
# is a finding. Needs a nightly toolchain; installs cargo-fuzz if missing.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# A crash or leak is copied into fuzz/regressions/<target>/, where the stable test
# (cargo test -p pretrain-worker --test fuzz_corpus) replays it from then on; commit it with the fix.
set -euo pipefail
seconds=${1:-60}
shift || true
cd "$(dirname "$0")/../fuzz"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
targets=${*:-$(cargo +nightly fuzz list)}
failed=0
for t in $targets; do
  mkdir -p "corpus/$t"
  extra=()
  [ -d "regressions/$t" ] && extra+=("regressions/$t")
  if ! cargo +nightly fuzz run "$t" "corpus/$t" "seeds/$t" "${extra[@]}" -- \
      -max_total_time="$seconds" -rss_limit_mb=2048 -malloc_limit_mb=512 -max_len=65536 -print_final_stats=1 \
      2>"corpus/$t.log"; then
    mkdir -p "regressions/$t"
    cp artifacts/"$t"/* "regressions/$t/"
    grep -m1 -A12 "ERROR\|panicked" "corpus/$t.log" || tail -20 "corpus/$t.log"
    echo "fuzz: $t: crash kept in fuzz/regressions/$t"
    failed=1
  fi
  grep -E "stat::number_of_executed_units|stat::peak_rss_mb" "corpus/$t.log" | sed "s/^/fuzz: $t: /"
done
exit $failed
