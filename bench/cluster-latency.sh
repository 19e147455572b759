#!/usr/bin/env bash
# 3 nodes vs 1, same load (issue 16, item 6): request → offer p50/p99 of the release
# dispatchd run as one node and as three, on the same PostgreSQL server, under the same
# loadgen load, alternating the two ROUNDS times each (1 then 3 in odd rounds, 3 then 1 in
# even ones), then the medians of each side.
#
# Both sides run in cluster mode (--node-name, --cluster-listen, --cluster-peers, the
# leases in PostgreSQL), so the only difference is the number of nodes. CLUSTER_MODE=leader
# (--cluster-mode leader; the README's Performance row was measured so): with 3, loadgen
# spreads its WebSocket sessions over them (--spread: each client on a node chosen by a
# hash of its token, about two thirds of them on the standbys, which relay them to the
# leader through ractor_cluster); REST goes to the leader. Each run gets a fresh database.
# Reported per run: request → offer p50/p99 (loadgen's), trips offered, the relay's share
# (the most sessions relayed at once, relay messages over the run), the load average before
# and after (and its highest 5 s sample), and over loadgen's run the machine's busy share
# of all its cores (every process on it, from /proc/stat) and the nodes' own CPU in cores.
#
#   bash bench/cluster-latency.sh                  # sharded, 2 rounds: 2,000 drivers + 500
#                                                  # riders, 10 requests/s, 60 s (+10 s drain)
#   ROUNDS=1 DRIVERS=200 RIDERS=50 DURATION=20 bash bench/cluster-latency.sh
#   CLUSTER_MODE=leader bash bench/cluster-latency.sh
#
# CLUSTER_MODE=sharded (the default, as dispatchd's) runs both sides with --cluster-mode
# sharded (the one node then owns every shard; with 3, each serves its own shards and
# relays the sessions of the others' accounts to their owners).
#
# Needs a PostgreSQL: DISPATCH_TEST_DATABASE_URL (an admin URL), or it starts one with
# .ci/postgres.sh (and stops it after). Builds the release dispatchd and loadgen unless
# BIN names a directory holding both. Ports BASE_PORT+1..3 (clients) and BASE_PORT+11..13
# (cluster links); BASE_PORT 28200. On this project's machine (2 cores shared by every
# process) three nodes share the same two cores as one does: this measures what the relay
# hop costs, not what three machines would give.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
ROUNDS=${ROUNDS:-2}
DRIVERS=${DRIVERS:-2000}
RIDERS=${RIDERS:-500}
RATE=${RATE:-10}
DURATION=${DURATION:-60}
DRAIN=${DRAIN:-10}
BASE_PORT=${BASE_PORT:-28200}
# shellcheck source=lib.sh
source bench/lib.sh
cluster_mode
bench_postgres
admin=$DISPATCH_TEST_DATABASE_URL
if [ -z "${BIN:-}" ]; then
  cargo build -q --release --locked -p dispatch-transport --bin dispatchd -p dispatch-loadgen --bin loadgen
  BIN=${CARGO_TARGET_DIR:-target}/release
fi
work=$(mktemp -d /tmp/cluster-latency.XXXXXX)
head -c 24 /dev/urandom | base64 >"$work/cookie"
pids=()
stop_nodes() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  pids=()
}
cleanup() {
  local rc=$?
  stop_nodes
  if [ -n "${loadgen_pid:-}" ]; then kill "$loadgen_pid" 2>/dev/null || true; fi
  wait 2>/dev/null || true
  for db in $(psql "$admin" -qAt -c "SELECT datname FROM pg_database WHERE datname LIKE 'dispatch_bench_cl_$$_%'"); do
    psql "$admin" -qAt -c "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1 || true
  done
  bench_postgres_stop >/dev/null 2>&1 || true
  if [ $rc = 0 ]; then rm -rf "$work"; else echo "cluster-latency.sh: logs kept in $work"; fi
  echo "cluster-latency.sh: $(($(date +%s) - started)) s, exit $rc"
}
trap cleanup EXIT
load() { cut -d' ' -f1-3 /proc/loadavg; }
# The machine's CPU since boot: "TOTAL IDLE" in clock ticks (idle counts iowait too).
machine_cpu() { awk '$1 == "cpu" { print $2+$3+$4+$5+$6+$7+$8+$9, $5+$6 }' /proc/stat; }
# The CPU time (user + system, clock ticks) the nodes' processes have used so far.
nodes_cpu() {
  local p t=0
  for p in "${pids[@]}"; do t=$((t + $(awk '{ print $14 + $15 }' "/proc/$p/stat" 2>/dev/null || echo 0))); done
  echo "$t"
}
ready() { [ "$(curl -s -o /dev/null -w '%{http_code}' -m 1 "http://127.0.0.1:$((BASE_PORT + $1))/readyz" 2>/dev/null || true)" = 200 ]; }

# run NODES ROUND: one run on a fresh database; appends a JSON line to $work/runs.jsonl.
run() {
  local nodes=$1 round=$2 i peers="" urls="" spread=() db url
  db="dispatch_bench_cl_$$_${nodes}_$round"
  PGOPTIONS=--client-min-messages=warning psql "$admin" -qAt -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db" >/dev/null
  url="${admin%/*}/$db"
  for i in $(seq "$nodes"); do
    peers+="${peers:+,}127.0.0.1:$((BASE_PORT + 10 + i))"
    urls+="${urls:+,}ws://127.0.0.1:$((BASE_PORT + i))"
  done
  if [ "$nodes" -gt 1 ]; then spread=(--spread); fi
  for i in $(seq "$nodes"); do
    # Greedy unless DISPATCH_MATCHING says otherwise, as bench/lib.sh's start_dispatchd.
    DISPATCH_MATCHING=${DISPATCH_MATCHING:-greedy} \
    DISPATCH_REGISTER_RATE_PER_S=1000000 DISPATCH_REGISTER_BURST=1000000 \
      DISPATCH_STORE=postgres DISPATCH_DATABASE_URL=$url \
      "$BIN/dispatchd" --listen "127.0.0.1:$((BASE_PORT + i))" --data-dir "$work/d-$nodes-$round-n$i" \
      --node-name "n$i" --cluster-listen "127.0.0.1:$((BASE_PORT + 10 + i))" --cluster-peers "$peers" \
      --cluster-cookie-file "$work/cookie" --lease-ttl-ms 6000 --lease-renew-ms 1000 "${MODE_FLAGS[@]}" \
      >"$work/n$i-$nodes-$round.log" 2>&1 &
    pids+=("$!")
    # Leader mode: n1 first, so that it holds the lease and the REST base (the first
    # --url) is the leader.
    if [ "$i" = 1 ] && [ "$CLUSTER_MODE" = leader ]; then wait_for 60 "n1 ready" ready 1; fi
  done
  # Sharded mode: every node serving its shards.
  # shellcheck disable=SC2046
  if [ "$CLUSTER_MODE" = sharded ]; then wait_for 120 "every node ready" ready_all $(seq "$nodes"); fi
  # shellcheck disable=SC2046
  wait_for 60 "membership of $nodes" members_are "$nodes" $(seq "$nodes")
  local load0 cpu0 ncpu0 t0
  load0=$(load)
  cpu0=$(machine_cpu)
  ncpu0=$(nodes_cpu)
  t0=$(date +%s%N)
  "$BIN/loadgen" --url "$urls" "${spread[@]}" --drivers "$DRIVERS" --riders "$RIDERS" \
    --request-rate "$RATE" --duration "${DURATION}s" --drain "${DRAIN}s" \
    --json "$work/report-$nodes-$round.json" --quiet >"$work/loadgen-$nodes-$round.txt" 2>&1 &
  loadgen_pid=$!
  # The most sessions relayed at once and the highest 1-minute load average (sampled
  # every 5 s while loadgen runs).
  local relayed=0 v rc=0 load_max=0 cpu1 ncpu1 secs
  while kill -0 "$loadgen_pid" 2>/dev/null; do
    # shellcheck disable=SC2046
    v=$(metric_sum 'dispatch_cluster_relayed_sessions{side="relaying"}' $(seq "$nodes"))
    if [ "$v" -gt "$relayed" ]; then relayed=$v; fi
    load_max=$(awk -v m="$load_max" '{ print ($1 > m ? $1 : m) }' /proc/loadavg)
    sleep 5
  done
  wait "$loadgen_pid" || rc=$?
  loadgen_pid=
  # Over loadgen's run: the machine's busy share of all its cores (every process: the
  # nodes, PostgreSQL, loadgen and anything else running) and the nodes' own CPU, in cores.
  cpu1=$(machine_cpu)
  ncpu1=$(nodes_cpu)
  secs=$(( ($(date +%s%N) - t0) / 1000000 ))
  local to_leader to_standby
  # shellcheck disable=SC2046
  to_leader=$(metric_sum 'dispatch_cluster_relay_messages_total{direction="to_leader"}' $(seq "$nodes"))
  to_standby=$(metric_sum 'dispatch_cluster_relay_messages_total{direction="to_standby"}' $(seq "$nodes"))
  stop_nodes
  python3 - "$work/report-$nodes-$round.json" "$nodes" "$round" "$relayed" "$to_leader" "$to_standby" \
    "$load0" "$(load)" "$rc" "$cpu0" "$cpu1" "$ncpu0" "$ncpu1" "$secs" "$load_max" "$(getconf CLK_TCK)" \
    >>"$work/runs.jsonl" <<'EOF'
import json, sys
(path, nodes, rnd, relayed, to_leader, to_standby, load0, load1, rc, cpu0, cpu1, ncpu0, ncpu1,
 ms, load_max, hz) = sys.argv[1:]
(t0, i0), (t1, i1) = (map(int, c.split()) for c in (cpu0, cpu1))
r = json.load(open(path))
lat = r["latency"].get("request_to_offer", {})
print(json.dumps({
    "nodes": int(nodes), "round": int(rnd), "loadgen_exit": int(rc),
    "p50_ms": lat.get("p50_ms"), "p99_ms": lat.get("p99_ms"), "offered": lat.get("count"),
    "trips_completed": r["trips"].get("completed"), "relayed_sessions": int(relayed),
    "relay_messages": int(to_leader) + int(to_standby), "load_before": load0, "load_after": load1,
    "load_max": float(load_max), "machine_busy_pct": round(100 * (1 - (i1 - i0) / max(t1 - t0, 1)), 1),
    "nodes_cores": round((int(ncpu1) - int(ncpu0)) / int(hz) / (int(ms) / 1000), 3),
}))
EOF
  tail -n 1 "$work/runs.jsonl"
}

echo "== cluster-latency ($CLUSTER_MODE mode): $DRIVERS drivers + $RIDERS riders, $RATE requests/s, ${DURATION} s (+${DRAIN} s drain), $ROUNDS rounds; $(nproc) cores, load $(load); $("$BIN/dispatchd" --version 2>/dev/null || echo dispatchd)"
for r in $(seq "$ROUNDS"); do
  if ((r % 2)); then run 1 "$r"; run 3 "$r"; else run 3 "$r"; run 1 "$r"; fi
done
python3 - "$work/runs.jsonl" <<'EOF'
import json, os, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
print("== medians (request -> offer, loadgen's)")
for n in sorted({r["nodes"] for r in runs}):
    rs = [r for r in runs if r["nodes"] == n]
    med = lambda k: statistics.median(r[k] for r in rs if r[k] is not None)
    print(f"{n} node{'s' if n > 1 else ' '}: p50 {med('p50_ms'):.2f} ms, p99 {med('p99_ms'):.2f} ms over {len(rs)} runs "
          f"(offered {med('offered'):.0f}, completed {med('trips_completed'):.0f}; sessions relayed {med('relayed_sessions'):.0f}, "
          f"relay messages {med('relay_messages'):.0f}; machine busy {med('machine_busy_pct'):.0f}% of {os.cpu_count()} cores, "
          f"the nodes {med('nodes_cores'):.2f} cores; load {', '.join(r['load_before'].split()[0] + '->' + r['load_after'].split()[0] for r in rs)})")
    print(f"  per run: " + "; ".join(f"round {r['round']}: p50 {r['p50_ms']}, p99 {r['p99_ms']} ms, offered {r['offered']}, "
          f"busy {r['machine_busy_pct']}%, nodes {r['nodes_cores']} cores, load max {r['load_max']}" for r in rs))
bad = [r for r in runs if r["loadgen_exit"] != 0]
if bad:
    print(f"note: loadgen failed its own checks in {len(bad)} runs (exit codes {[r['loadgen_exit'] for r in bad]})")
EOF
