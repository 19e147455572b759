#!/usr/bin/env bash
# The capacity rows of the README (issue 14): 15,000 drivers pinging every 4 s and 2,000
# riders asking 50 rides a second, against two dispatchd binaries, alternating A and B,
# each on a fresh data directory, with one loadgen binary for both. Prints, per side, the
# medians of loadgen's capacity report (server CPU per ping, RSS per client, the projection
# to 1M drivers) and of request → offer p50/p99/p99.9.
#
#   bash bench/capacity.sh A_DISPATCHD B_DISPATCHD [ROUNDS] [LOADGEN] [DEMAND_CSV]
#
# ROUNDS per side (default 3). LOADGEN defaults to target/release/loadgen; DEMAND_CSV to
# the Montreal zones in loadgen/data (any `lat,lng,weight` CSV works). The city is set by DRIVERS (15000),
# RIDERS (2000), RATE (50), DURATION (60s), PING_MS (4000). Above ~19,000 connections one
# process runs out of files and one source address out of ports, so loadgen runs 2 worker
# processes over 127.0.0.2-127.0.0.9. Bounded: each loadgen run is limited to 10 minutes.
set -euo pipefail
a=$1 b=$2 rounds=${3:-3}
loadgen=${4:-target/release/loadgen}
demand=${5:-loadgen/data/montreal_carshare_zones.csv}
drivers=${DRIVERS:-15000} riders=${RIDERS:-2000} rate=${RATE:-50}
duration=${DURATION:-60s} ping_ms=${PING_MS:-4000}
out=$(mktemp -d)
port=${PORT:-18191}
ulimit -n 20000 2>/dev/null || true
source "$(dirname "$0")/lib.sh"
one() { # side binary round
  local side=$1 bin=$2 round=$3 dir="$out/$1-$3"
  start_dispatchd "$bin" "$port" "$dir" --admin-listen "127.0.0.1:$((port + 1))"
  timeout 600 "$loadgen" --url "ws://127.0.0.1:$port" --drivers "$drivers" --riders "$riders" \
    --request-rate "$rate" --duration "$duration" --drain 20s --ping-interval-ms "$ping_ms" \
    --time-scale 30 --demand-csv "$demand" --seed 1 --workers 2 \
    --source-ips 127.0.0.2-127.0.0.9 --connect-concurrency 256 \
    --server-pid "$DISPATCHD_PID" --json "$dir.json" --quiet >"$dir.txt" 2>&1 ||
    echo "side $side round $round: loadgen exited non-zero (see $dir.txt)" >&2
  stop_dispatchd "$side" "$round"
}
alternate "$rounds" "$a" "$b" one
python3 - "$out" <<'PY'
import glob, json, statistics, sys
out = sys.argv[1]
def cap(r): return r['cpu']['server']['capacity']
for side in "AB":
    runs = [json.load(open(f)) for f in sorted(glob.glob(f"{out}/{side}-*.json"))]
    runs = [r for r in runs if r['cpu'].get('server') and r['cpu']['server'].get('capacity')]
    if not runs:
        print(f"{side}: no run with a capacity report"); continue
    med = lambda f: statistics.median(f(r) for r in runs)
    lat = lambda q: med(lambda r: r['latency']['request_to_offer'][q])
    print(f"{side}: {len(runs)} runs; clients {med(lambda r: cap(r)['clients']):.0f};",
          f"CPU per ping {med(lambda r: cap(r)['cpu_us_per_ping']):.1f} µs",
          f"({med(lambda r: cap(r)['server_cores']):.2f} cores for {med(lambda r: cap(r)['pings_per_s']):.0f} pings/s);",
          f"RSS per client {med(lambda r: cap(r)['rss_kib_per_client']):.1f} KiB",
          f"({med(lambda r: cap(r)['rss_mib']):.0f} MiB; above baseline {med(lambda r: cap(r)['rss_kib_per_client_marginal']):.1f} KiB);",
          f"1M drivers: {med(lambda r: cap(r)['projection']['cores']):.1f} cores, {med(lambda r: cap(r)['projection']['memory_gib']):.1f} GiB;",
          f"request->offer p50 {lat('p50_ms'):.2f} p99 {lat('p99_ms'):.2f} p99.9 {lat('p999_ms'):.2f} ms;",
          f"matched {med(lambda r: r['trips']['matched']):.0f}, errors {max(r['errors']['unexpected'] for r in runs)}")
    for r in runs:
        c, l = cap(r), r['latency']['request_to_offer']
        print(f"   ping {c['cpu_us_per_ping']:.1f} µs  rss/client {c['rss_kib_per_client']:.1f} KiB  p50 {l['p50_ms']:.2f}  p99 {l['p99_ms']:.2f}  p99.9 {l['p999_ms']:.2f}")
PY
echo "logs and reports: $out"
