#!/usr/bin/env bash
# Runs the README's loadgen row against two dispatchd binaries, alternating A and B, each
# on a fresh data directory, with one loadgen binary for both, and prints the medians of
# request → offer p50/p99, server CPU and server peak RSS per side.
#
#   bash bench/side-by-side.sh A_DISPATCHD B_DISPATCHD [ROUNDS] [LOADGEN] [DEMAND_CSV]
#
# ROUNDS per side (default 3). LOADGEN defaults to target/release/loadgen. DEMAND_CSV
# defaults to the Montreal zones committed with loadgen (loadgen/data/…); any
# `lat,lng,weight` CSV works. Bounded: each loadgen run is 60 s + 30 s of drain.
set -euo pipefail
a=$1 b=$2 rounds=${3:-3}
loadgen=${4:-target/release/loadgen}
demand=${5:-loadgen/data/montreal_carshare_zones.csv}
out=$(mktemp -d)
port=18181
source "$(dirname "$0")/lib.sh"
one() { # side binary round
  local side=$1 bin=$2 round=$3 dir="$out/$1-$3"
  start_dispatchd "$bin" "$port" "$dir"
  timeout 180 "$loadgen" --url "ws://127.0.0.1:$port" --drivers 2000 --riders 300 \
    --request-rate 20 --duration 60s --drain 30s --time-scale 30 --demand-csv "$demand" \
    --seed 1 --max-error-rate 0 --server-pid "$DISPATCHD_PID" --json "$dir.json" >"$dir.txt" 2>&1 ||
    echo "side $side round $round: loadgen failed (see $dir.txt)" >&2
  stop_dispatchd "$side" "$round"
}
alternate "$rounds" "$a" "$b" one
python3 - "$out" <<'PY'
import glob, json, statistics, sys
out = sys.argv[1]
for side in "AB":
    runs = [json.load(open(f)) for f in sorted(glob.glob(f"{out}/{side}-*.json"))]
    col = lambda f: statistics.median(f(r) for r in runs)
    print(f"{side}: {len(runs)} runs;",
          f"request->offer p50 {col(lambda r: r['latency']['request_to_offer']['p50_ms']):.2f} ms,",
          f"p99 {col(lambda r: r['latency']['request_to_offer']['p99_ms']):.2f} ms;",
          f"server cpu {col(lambda r: r['cpu']['server']['cpu_s']):.1f} s;",
          f"peak rss {col(lambda r: r['cpu']['server']['vm_hwm_kib'])/1024:.0f} MiB;",
          f"matched {col(lambda r: r['trips']['matched']):.0f}, completed {col(lambda r: r['trips']['completed']):.0f},",
          f"errors {max(r['errors']['unexpected'] for r in runs)}")
    for r in runs:
        l = r['latency']['request_to_offer']
        print(f"   p50 {l['p50_ms']:.2f}  p99 {l['p99_ms']:.2f}  cpu {r['cpu']['server']['cpu_s']:.1f}  rss {r['cpu']['server']['vm_hwm_kib']/1024:.0f}")
PY
echo "logs and reports: $out"
