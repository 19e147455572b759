#!/usr/bin/env bash
# Takeover under load (issue 16, item 6). CLUSTER_MODE=leader: PostgreSQL, three dispatchd nodes
# (--node-name n1..n3, --lease-ttl-ms $LEASE_TTL_MS) and loadgen spreading its clients over
# them (--url with the three, --spread, --reconnect, --ack-log; the nodes linked by
# --cluster-listen/--cluster-peers, so standbys relay their sessions to the leader).
# ROUNDS times (20): find the leader, kill -9 it, time until another node's /readyz is
# 200, start the killed one again (a standby now). Then: the takeover time distribution
# (p50/p90/max), and every transition in the ack log checked against the last leader's
# store (bench/ackcheck.py: the history has that version in that state; no trip with two
# drivers, no driver in two trips).
#
# CLUSTER_MODE=sharded (the default, as dispatchd's; --cluster-mode sharded, each node
# owning its shards): each round
# kills n1, n2, n3 in turn (kill -9) and times until every shard it held (in the store's
# dispatch_leases at the kill) is held by a survivor and both survivors are ready (their
# /readyz: every shard the map gives them served); then starts it again and waits until it
# serves its shards again (handed back by the others) before the next round.
#
#   bench/failover.sh            # sharded; needs a PostgreSQL: DISPATCH_TEST_DATABASE_URL,
#                                # or it starts one with .ci/postgres.sh (and stops it after)
#   ROUNDS=5 PROFILE=release bench/failover.sh
#   ROUNDS=3 CLUSTER_MODE=leader bench/failover.sh
#
# Debug builds unless PROFILE=release. Ports BASE_PORT+1..3 (clients) and BASE_PORT+11..13
# (cluster links); BASE_PORT 24100.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
ROUNDS=${ROUNDS:-20}
LEASE_TTL_MS=${LEASE_TTL_MS:-2000}
BASE_PORT=${BASE_PORT:-24100}
PROFILE=${PROFILE:-debug}
# shellcheck source=lib.sh
source bench/lib.sh
cluster_mode
bench_postgres
admin=$DISPATCH_TEST_DATABASE_URL
db="dispatch_bench_failover_$$"
psql "$admin" -qAt -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db" >/dev/null
url="${admin%/*}/$db"
flag=(); [ "$PROFILE" = release ] && flag=(--release)
cargo build -q "${flag[@]}" -p dispatch-transport --bin dispatchd
cargo build -q "${flag[@]}" -p dispatch-loadgen --bin loadgen
target=${CARGO_TARGET_DIR:-target}/$PROFILE
work=$(mktemp -d /tmp/failover-bench.XXXXXX)
head -c 24 /dev/urandom | base64 >"$work/cookie"
peers="127.0.0.1:$((BASE_PORT + 11)),127.0.0.1:$((BASE_PORT + 12)),127.0.0.1:$((BASE_PORT + 13))"
declare -A pid
start_node() { # NAME: n1 -> port BASE_PORT+1, cluster link BASE_PORT+11
  local n=$1 port=$((BASE_PORT + ${1#n}))
  DISPATCH_REGISTER_RATE_PER_S=1000000 DISPATCH_REGISTER_BURST=1000000 \
    DISPATCH_STORE=postgres DISPATCH_DATABASE_URL=$url \
    "$target/dispatchd" --listen "127.0.0.1:$port" --data-dir "$work/$n" \
    --node-name "$n" --lease-ttl-ms "$LEASE_TTL_MS" --database-timeout-ms 2000 \
    --cluster-listen "127.0.0.1:$((port + 10))" --cluster-peers "$peers" \
    --cluster-cookie-file "$work/cookie" "${MODE_FLAGS[@]}" \
    >>"$work/$n.log" 2>&1 &
  pid[$n]=$!
}
ready() { curl -s -o /dev/null -w '%{http_code}' -m 1 "http://127.0.0.1:$((BASE_PORT + ${1#n}))/readyz" 2>/dev/null || true; }
leader() { for n in n1 n2 n3; do [ "$(ready "$n")" = 200 ] && { echo "$n"; return; }; done; }
cleanup() {
  for n in "${!pid[@]}"; do kill "${pid[$n]}" 2>/dev/null || true; done
  [ -n "${loadgen_pid:-}" ] && kill "$loadgen_pid" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap cleanup EXIT
start_node n1
if [ "$CLUSTER_MODE" = leader ]; then
  for _ in $(seq 300); do [ "$(ready n1)" = 200 ] && break; sleep 0.1; done
fi
start_node n2; start_node n3
# The standbys relay only once linked: loadgen starts when every node counts 3 members and
# one of them leads.
wait_for 60 "membership of 3" members_are 3 1 2 3
has_leader() { [ -n "$(leader)" ]; }
if [ "$CLUSTER_MODE" = leader ]; then wait_for 30 "a leader" has_leader; else wait_for 120 "every node ready" ready_all 1 2 3; fi
# Sharded mode: the shards node $1 holds now (a,b,...), and whether every one of a list is
# held by another node now, by the store's clock.
leases_of() { psql "$url" -qAt -c "SELECT coalesce(string_agg(shard::text, ','), '') FROM dispatch_leases WHERE holder = '$1' AND expires_at > clock_timestamp()"; }
taken_from() { # NODE SHARDS
  [ "$(psql "$url" -qAt -c "SELECT count(*) FROM dispatch_leases WHERE shard = ANY('{$2}'::bigint[]) AND holder <> '$1' AND expires_at > clock_timestamp()")" = \
    "$(echo "$2" | tr ',' '\n' | grep -c .)" ]
}
echo "== 3 nodes ($CLUSTER_MODE mode) on $PROFILE builds, lease ${LEASE_TTL_MS} ms; $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
per_round=8
# --spread: each client's session on a node of its own (the standbys relay theirs to the
# leader), as behind a load balancer, rather than every client on the first --url.
"$target/loadgen" --url "ws://127.0.0.1:$((BASE_PORT + 1)),ws://127.0.0.1:$((BASE_PORT + 2)),ws://127.0.0.1:$((BASE_PORT + 3))" \
  --spread --drivers 40 --riders 20 --request-rate 2 --duration "$(((ROUNDS + 1) * per_round))s" --drain 20s \
  --reconnect --reconnect-for 30s --ack-log "$work/acks.jsonl" --quiet >"$work/loadgen.txt" 2>&1 &
loadgen_pid=$!
sleep 5
echo "sessions relayed by standbys 5 s in: $(metric_sum 'dispatch_cluster_relayed_sessions{side="relaying"}' 1 2 3) of 60"
times=()
sharded_round() { # R: kill -9 one node, time until its shards are held by survivors and served
  local r=$1 v had t0 t1 ms others=()
  v=n$(( (r - 1) % 3 + 1 ))
  for n in 1 2 3; do [ "n$n" != "$v" ] && others+=("$n"); done
  had=$(leases_of "$v")
  kill -9 "${pid[$v]}"; wait "${pid[$v]}" 2>/dev/null || true
  t0=$(date +%s%N)
  until taken_from "$v" "$had" && ready_all "${others[@]}"; do
    [ $(( ($(date +%s%N) - t0) / 1000000 )) -lt 60000 ] || { echo "round $r: $v's shards not taken over within 60 s"; exit 1; }
    sleep 0.05
  done
  ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  times+=("$ms")
  echo "round $r: kill -9 $v (holding $(echo "$had" | tr ',' '\n' | grep -c .) shards): all held by n${others[0]}/n${others[1]} and served after $ms ms"
  start_node "$v"
  t1=$(date +%s)
  wait_for 60 "$v serving its shards again" ready_all 1 2 3
  echo "round $r: $v back, serving $(leases_of "$v" | tr ',' '\n' | grep -c .) shards, $(( $(date +%s) - t1 )) s after its start"
  sleep $(( per_round - 2 - ($(date +%s) - t1) > 0 ? per_round - 2 - ($(date +%s) - t1) : 0 ))
}
for r in $(seq "$ROUNDS"); do
  if [ "$CLUSTER_MODE" = sharded ]; then sharded_round "$r"; continue; fi
  l=$(leader)
  [ -n "$l" ] || { echo "round $r: no leader"; exit 1; }
  kill -9 "${pid[$l]}"; wait "${pid[$l]}" 2>/dev/null || true
  t0=$(date +%s%N)
  next=
  while [ -z "$next" ]; do
    for n in n1 n2 n3; do [ "$n" != "$l" ] && [ "$(ready "$n")" = 200 ] && next=$n; done
    [ $(( ($(date +%s%N) - t0) / 1000000 )) -lt 60000 ] || { echo "round $r: no takeover within 60 s"; exit 1; }
  done
  ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  times+=("$ms")
  echo "round $r: kill -9 $l, $next ready after $ms ms"
  start_node "$l"
  sleep $((per_round - 2))
done
wait "$loadgen_pid" || echo "loadgen exited $?"
loadgen_pid=
grep -E "trips|reconnect|requests|errors|first offer" "$work/loadgen.txt" | head -20 || true
# Nearest-rank percentiles.
printf '%s\n' "${times[@]}" | sort -n | awk '{a[NR]=$1} END {
  p50 = a[int(NR*0.5) + (NR*0.5 > int(NR*0.5))]; p90 = a[int(NR*0.9) + (NR*0.9 > int(NR*0.9))]
  print "== takeover after kill -9 (" NR " rounds): p50 " p50 " ms, p90 " p90 " ms, max " a[NR] " ms"}'
l=$(leader)
[ -n "$l" ] || l=n1
token=$(cat "$work/$l/admin.token")
python3 bench/ackcheck.py "http://127.0.0.1:$((BASE_PORT + ${l#n}))" "$token" "$work/acks.jsonl"
cleanup; pid=()
psql "$admin" -qc "DROP DATABASE $db" >/dev/null
bench_postgres_stop
echo "bench/failover.sh: $(($(date +%s) - started)) s; logs in $work"
