#!/usr/bin/env bash
# Where request → offer's tail goes (issue 14): one capacity run (15,000 drivers pinging
# every 4 s + 2,000 riders, 50 requests/s, as bench/capacity.sh) against one dispatchd,
# with every request's stage breakdown logged (target dispatch_actors::stages at debug)
# and, over the steady window, the off-CPU side: each thread's run-queue wait
# (/proc/<pid>/task/*/schedstat) for dispatchd and loadgen, the machine's CPU and I/O
# pressure (/proc/pressure), the load average, the store's group commits by stage (queue
# wait, write, fsync) and the session's stages from /metrics. Prints the table of the
# README's "Where request → offer's tail goes" paragraph.
#
#   bash bench/tail.sh DISPATCHD [LOADGEN] [DEMAND_CSV]
#
# PERF_SCHED=1 also records `perf sched` system-wide for 10 s of the steady window and
# prints `perf sched latency` for the busiest tasks. Same city knobs as capacity.sh.
# Bounded: the loadgen run is limited to 10 minutes, the wait for set-up to 5.
set -euo pipefail
bin=$1
loadgen=${2:-target/release/loadgen}
demand=${3:-loadgen/data/montreal_carshare_zones.csv}
drivers=${DRIVERS:-15000} riders=${RIDERS:-2000} rate=${RATE:-50}
duration=${DURATION:-60s} ping_ms=${PING_MS:-4000}
port=${PORT:-18191} admin=$((${PORT:-18191} + 1))
out=$(mktemp -d)
ulimit -n 20000 2>/dev/null || true
source "$(dirname "$0")/lib.sh"
started=$(date +%s)
DISPATCH_LOG=info,dispatch_actors::stages=debug start_dispatchd "$bin" "$port" "$out/run" \
  --admin-listen "127.0.0.1:$admin" --log-format json
timeout 600 "$loadgen" --url "ws://127.0.0.1:$port" --drivers "$drivers" --riders "$riders" \
  --request-rate "$rate" --duration "$duration" --drain 20s --ping-interval-ms "$ping_ms" \
  --time-scale 30 --demand-csv "$demand" --seed 1 --workers 2 \
  --source-ips 127.0.0.2-127.0.0.9 --connect-concurrency 256 \
  --server-pid "$DISPATCHD_PID" --json "$out/run.json" --quiet >"$out/loadgen.txt" 2>&1 &
lg=$!

descendants() { # the processes under PID (timeout's loadgen and its workers)
  local c
  for c in $(pgrep -P "$1" || true); do echo "$c"; descendants "$c"; done
}
# The off-CPU snapshot: per thread of dispatchd and of every loadgen process, its
# schedstat (ns on CPU, ns waiting on a run queue, timeslices), then pressure and load.
snapshot() {
  {
    for pid in "$DISPATCHD_PID" $(descendants "$lg"); do
      for t in /proc/"$pid"/task/*; do
        [ -r "$t/schedstat" ] || continue
        echo "thread $pid $(cat "$t/comm" | tr ' ' _) $(cat "$t/schedstat")"
      done
    done
    echo "io $(tr '\n' ' ' </proc/"$DISPATCHD_PID"/io)"
    echo "cpu_pressure $(head -1 /proc/pressure/cpu)"
    echo "io_pressure $(head -1 /proc/pressure/io)"
    echo "load $(cat /proc/loadavg)"
    echo "time $(date +%s.%N)"
  } >"$1"
  curl -sf "http://127.0.0.1:$admin/metrics" >"$1.metrics" || true
}
# The steady window: 10 s after every client is connected, for 40 s.
clients=$((drivers + riders))
for _ in $(seq 600); do
  n=$({ curl -sf "http://127.0.0.1:$admin/metrics" || true; } |
    awk '/^dispatch_actors_alive\{group="session"\}/ {print int($2)}')
  [ "${n:-0}" -ge "$clients" ] 2>/dev/null && break
  sleep 0.5
done
sleep 10
snapshot "$out/before"
if [ "${PERF_SCHED:-0}" = 1 ]; then
  perf sched record -o "$out/sched.data" -- sleep 10 >/dev/null 2>&1 || echo "perf sched record failed" >&2
  sleep 30
else
  sleep 40
fi
snapshot "$out/after"
wait "$lg" || echo "loadgen exited non-zero (see $out/loadgen.txt)" >&2
stop_dispatchd tail 1
echo "run took $(($(date +%s) - started)) s; load now $(cut -d' ' -f1-3 /proc/loadavg)"
python3 "$(dirname "$0")/tail_stages.py" "$out"
if [ -f "$out/sched.data" ]; then
  echo "perf sched latency (10 s of the steady window, busiest tasks by run-queue delay):"
  perf sched latency -i "$out/sched.data" --sort max 2>/dev/null |
    grep -E 'Task|----|tokio|store-wr|loadgen|dispatchd|rustc|cc1|ld' | head -25 || true
fi
echo "logs and reports: $out"
