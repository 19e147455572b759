#!/usr/bin/env bash
# Issue 17 part 4: the real Manhattan day (loadgen/data/nyc_taxi_2011-02-01_manhattan.csv)
# through the real release dispatchd over real WebSockets, greedy against batched
# matching, alternating the modes (A B B A …) on a fresh server and data directory each
# run, and the medians per mode of request → offer p50/p99 and the match rate.
#
#   bash bench/demand.sh                       # 08:00–09:00 at ×60, 400 drivers, 2 rounds
#   MODES="greedy batch:2000 batch:5000" ROUNDS=2 bash bench/demand.sh
#
# Knobs (environment): MODES (greedy, batch:WINDOW_MS; the first two alternate A/B, any
# third runs after them in the same order each round), ROUNDS (default 2), FROM (HH:MM,
# 08:00), HOURS (1), SCALE (60: one hour in 60 s), DRIVERS (400, about what the study's
# 1,200-driver fleet keeps on shift at that hour: the file is a 1-in-10 sample and the
# fleet is sized to it, so requests compete), RIDERS (1000), PORT (55651), OUT, DISPATCHD
# (a dispatchd binary to run instead of this tree's, e.g. a base commit's build, to measure
# a change against it). Before each server stops, its batched-matching counters are read
# from /metrics into the run's .metrics file and summed up in the second table.
# Each run is HOURS×3600/SCALE s of requests + 15 s of drain + set-up, bounded by timeout.
set -euo pipefail
cd "$(dirname "$0")/.."
MODES=${MODES:-"greedy batch:2000"}
ROUNDS=${ROUNDS:-2}
FROM=${FROM:-08:00}
HOURS=${HOURS:-1}
SCALE=${SCALE:-60}
DRIVERS=${DRIVERS:-400}
RIDERS=${RIDERS:-1000}
PORT=${PORT:-55651}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
cargo build --release --locked -p dispatch-transport --bin dispatchd -p dispatch-loadgen --bin loadgen >&2
bin=${CARGO_TARGET_DIR:-target}/release
dispatchd=${DISPATCHD:-$bin/dispatchd}
source bench/lib.sh
start=$(date +%s)
run_s=$(python3 -c "print(int($HOURS*3600/$SCALE) + 120)")

one() { # mode round
  local mode=$1 round=$2 tag=${1/:/-} flags=(--matching greedy)
  [[ $mode == batch:* ]] && flags=(--matching batch --match-window-ms "${mode#batch:}")
  local dir="$OUT/$tag-$round"
  start_dispatchd "$dispatchd" "$PORT" "$dir" "${flags[@]}"
  timeout "$run_s" "$bin/loadgen" --url "ws://127.0.0.1:$PORT" --quiet \
    --demand-trips loadgen/data/nyc_taxi_2011-02-01_manhattan.csv --demand-from "$FROM" \
    --demand-hours "$HOURS" --time-scale "$SCALE" --drivers "$DRIVERS" --riders "$RIDERS" \
    --drain 15s --seed 1 --server-pid "$DISPATCHD_PID" --json "$dir.json" >"$dir.txt" 2>&1 ||
    echo "$mode round $round: loadgen failed or a check failed (see $dir.txt)" >&2
  curl -sf -m 5 "http://127.0.0.1:$PORT/metrics" >"$dir.metrics" || true
  stop_dispatchd "$mode" "$round"
}

read -r -a modes <<<"$MODES"
for r in $(seq "$ROUNDS"); do
  order=("${modes[@]}")
  if (( r % 2 == 0 )) && (( ${#modes[@]} >= 2 )); then
    order=("${modes[1]}" "${modes[0]}" "${modes[@]:2}")
  fi
  for m in "${order[@]}"; do one "$m" "$r"; done
done

python3 - "$OUT" "${modes[@]}" <<'PY'
import glob, json, re, statistics, sys
out, modes = sys.argv[1], sys.argv[2:]
print("| matching | runs | requested | skipped (riders busy) | request → offer p50 ms | p99 ms | max ms | match rate % | request → assigned p50 ms |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for m in modes:
    runs = [json.load(open(f)) for f in sorted(glob.glob(f"{out}/{m.replace(':', '-')}-*.json"))]
    if not runs:
        print(f"| {m} | 0 | | | | | | | |"); continue
    med = lambda f: statistics.median(f(r) for r in runs)
    lat = lambda r, k, q: r['latency'][k][q]
    print(f"| {m} | {len(runs)} | {med(lambda r: r['trips']['requested']):.0f} "
          f"| {med(lambda r: r['trips']['arrivals_skipped_all_riders_busy']):.0f} "
          f"| {med(lambda r: lat(r, 'request_to_offer', 'p50_ms')):.1f} "
          f"| {med(lambda r: lat(r, 'request_to_offer', 'p99_ms')):.0f} "
          f"| {med(lambda r: lat(r, 'request_to_offer', 'max_ms')):.0f} "
          f"| {100 * med(lambda r: r['trips']['match_rate'] or 0):.1f} "
          f"| {med(lambda r: lat(r, 'request_to_assigned', 'p50_ms')):.0f} |")
    for r in runs:
        l = r['latency']['request_to_offer']
        print(f"<!-- {m}: p50 {l['p50_ms']:.1f} p99 {l['p99_ms']:.1f} max {l['max_ms']:.1f} match {r['trips']['match_rate']} -->")
# The server's own counters, read before it stopped (medians per mode).
series = [("retries same_window", r'dispatch_batch_retries_total\{outcome="same_window"\}'),
          ("retries greedy", r'dispatch_batch_retries_total\{outcome="greedy"\}'),
          ("retries next_window", r'dispatch_batch_retries_total\{outcome="next_window"\}'),
          ("retries waited_greedy", r'dispatch_batch_retries_total\{outcome="waited_greedy"\}'),
          ("handed a freed driver", r'dispatch_batch_retries_total\{outcome="freed"\}'),
          ("waiting trips' searches", r'dispatch_actor_messages_total\{group="trip",kind="search_again"\}'),
          ("gave up in a window", r'dispatch_batch_gave_up_total'),
          ("offers refused", r'dispatch_offers_total\{outcome="refused"\}'),
          ("offers sent", r'dispatch_offers_total\{outcome="sent"\}'),
          ("batch_leftover hits", r'dispatch_bound_hits_total\{bound="batch_leftover"\}'),
          ("batch_wait hits", r'dispatch_bound_hits_total\{bound="batch_wait"\}')]
print()
print("| matching | " + " | ".join(n for n, _ in series) + " |")
print("|---|" + "---:|" * len(series))
for m in modes:
    texts = [open(f).read() for f in sorted(glob.glob(f"{out}/{m.replace(':', '-')}-*.metrics"))]
    def value(t, pat):
        hit = re.search(r'^' + pat + r'\s+(\S+)$', t, re.M)
        return float(hit.group(1)) if hit else 0.0
    cells = [f"{statistics.median(value(t, p) for t in texts):.0f}" if texts else "" for _, p in series]
    print(f"| {m} | " + " | ".join(cells) + " |")
PY
echo "demand: $(( $(date +%s) - start )) s; modes $MODES, $ROUNDS rounds, $FROM +${HOURS}h at x$SCALE, $DRIVERS drivers; reports in $OUT" >&2
