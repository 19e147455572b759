#!/usr/bin/env bash
# The README's study (issue 17): greedy against batched matching (1, 2 and 5 s windows) on
# the replayed Manhattan day (loadgen/data/nyc_taxi_2011-02-01_manhattan.csv), one seed,
# over fleet sizes from scarce to plentiful. Prints the README's Markdown table; writes the
# JSON and an HTML page (inline SVG) per fleet size under ${OUT:-target/study}.
#
#   bash bench/study.sh                  # the README's fleets
#   FLEETS="900 1500" SEED=2 bash bench/study.sh
#
# Release build; each full-day run takes about a second here (the simulated clock, not
# the wall clock, runs the day), the whole study well under a minute after the build.
set -euo pipefail
cd "$(dirname "$0")/.."
FLEETS=${FLEETS:-"500 700 900 1000 1200 1500 2000"}
WINDOWS=${WINDOWS:-"1000,2000,5000"}
SEED=${SEED:-1}
OUT=${OUT:-target/study}
mkdir -p "$OUT"
cargo build --release --locked -p dispatch-loadgen --bin replay >&2
bin=${CARGO_TARGET_DIR:-target}/release/replay
start=$(date +%s)
header=--markdown-header
for n in $FLEETS; do
  "$bin" --drivers "$n" --seed "$SEED" --matching greedy,batch --match-window-ms "$WINDOWS" \
    --markdown $header --json "$OUT/day-$n.json" --html "$OUT/day-$n.html"
  header=
done
echo "study: $(( $(date +%s) - start )) s for fleets $FLEETS, seed $SEED" >&2
