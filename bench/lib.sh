# Shared by the bench scripts (side-by-side.sh, capacity.sh, demand.sh, failover.sh,
# cluster-latency.sh); sourced, not run.
#
# start_dispatchd BIN PORT DIR [FLAG...]: starts BIN listening on 127.0.0.1:PORT, its data
# in DIR/data and its log in DIR.log, and waits (at most 10 s) until /readyz answers. Every
# simulated client registers from this host, so the registration limit is lifted, through
# environment variables, which a binary from before the limit ignores. Sets DISPATCHD_PID.
# Matching is greedy unless DISPATCH_MATCHING says otherwise (or a FLAG does, as demand.sh's
# do): the default became batch with 2 s windows (issue 17), and these benchmarks' request →
# offer numbers (and the binaries from before, which have no batch mode) are greedy's; an
# environment variable, so a binary from before the flag ignores it.
start_dispatchd() {
  local bin=$1 port=$2 dir=$3
  shift 3
  DISPATCH_MATCHING=${DISPATCH_MATCHING:-greedy} \
  DISPATCH_REGISTER_RATE_PER_S=1000000 DISPATCH_REGISTER_BURST=1000000 \
    "$bin" --listen "127.0.0.1:$port" --data-dir "$dir/data" "$@" >"$dir.log" 2>&1 &
  DISPATCHD_PID=$!
  for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break
    sleep 0.1
  done
}

# stop_dispatchd SIDE ROUND: stops the server start_dispatchd started, and says the load.
stop_dispatchd() {
  kill "$DISPATCHD_PID"; wait "$DISPATCHD_PID" 2>/dev/null || true
  echo "side $1 round $2: load $(cut -d' ' -f1 /proc/loadavg)" >&2
}

# alternate ROUNDS A_BIN B_BIN FN: calls `FN SIDE BIN ROUND` for both sides each round,
# A first in odd rounds and B first in even ones.
alternate() {
  local rounds=$1 a=$2 b=$3 fn=$4 r
  for r in $(seq "$rounds"); do
    if (( r % 2 )); then "$fn" A "$a" "$r"; "$fn" B "$b" "$r"; else "$fn" B "$b" "$r"; "$fn" A "$a" "$r"; fi
  done
}

# bench_postgres: a PostgreSQL whose admin URL is in DISPATCH_TEST_DATABASE_URL: the one it
# names, or a server started here with .ci/postgres.sh (then $own_pg is 1, and
# bench_postgres_stop stops it). Run from the repository's root.
bench_postgres() {
  own_pg=
  if [ -z "${DISPATCH_TEST_DATABASE_URL:-}" ]; then
    # shellcheck source=../.ci/postgres.sh
    source .ci/postgres.sh start
    own_pg=1
  fi
}

# bench_postgres_stop: stops the server bench_postgres started, if it started one.
bench_postgres_stop() {
  if [ -n "${own_pg:-}" ]; then bash .ci/postgres.sh stop; fi
}

# The helpers below name a node by its index i: it listens on 127.0.0.1:$((BASE_PORT + i)),
# BASE_PORT being the sourcing script's.

# metric_sum NAME_WITH_LABELS NODES...: the sum of one series over the nodes' /metrics.
metric_sum() {
  local name=$1 i
  shift
  for i in "$@"; do
    curl -s -m 2 "http://127.0.0.1:$((BASE_PORT + i))/metrics" || true
  done | awk -v m="$name" '$1 == m { s += $2 } END { printf "%d\n", s }'
}

# wait_for SECONDS WHAT COMMAND...: runs COMMAND every 0.2 s until it succeeds; exits the
# script, saying WHAT, if it has not within SECONDS.
wait_for() {
  local until=$(($(date +%s) + $1)) what=$2
  shift 2
  until "$@"; do
    [ "$(date +%s)" -lt "$until" ] || { echo "$what: not within $1 s" >&2; exit 1; }
    sleep 0.2
  done
}

# members_are N NODES...: every node counts N cluster members.
members_are() {
  local n=$1 i
  shift
  for i in "$@"; do [ "$(metric_sum dispatch_cluster_members "$i")" = "$n" ] || return 1; done
}

# cluster_mode (failover.sh, cluster-latency.sh): CLUSTER_MODE is sharded (the default, as
# dispatchd's: --cluster-mode sharded, each node serves the shards it owns, the cell shards
# those of a box around loadgen's default city disc) or leader (--cluster-mode leader: one
# node serves the city, the others stand by; the README's leader-mode figures were measured
# so, with CLUSTER_MODE=leader). Sets MODE_FLAGS, the dispatchd flags for it: the mode is
# always said. The sharded box covers loadgen's default city disc, 10 km around
# 45.5017,-73.5673 (±0.090° of latitude, ±0.128° of longitude): a smaller box leaves pickups
# outside every cell shard (a 4 × 5 km one, 3 cell shards, had two thirds of loadgen's ride
# requests refused `unavailable`: "no node serves the pickup's area").
cluster_mode() {
  CLUSTER_MODE=${CLUSTER_MODE:-sharded}
  case $CLUSTER_MODE in
    leader) MODE_FLAGS=(--cluster-mode leader) ;;
    sharded) MODE_FLAGS=(--cluster-mode sharded --service-area 45.41,-73.70,45.60,-73.43) ;;
    *) echo "CLUSTER_MODE is leader or sharded, not '$CLUSTER_MODE'" >&2; exit 2 ;;
  esac
}

# ready_all NODES...: every node's /readyz is 200 (sharded mode: each serves its shards).
ready_all() {
  local i
  for i in "$@"; do
    [ "$(curl -s -o /dev/null -w '%{http_code}' -m 1 "http://127.0.0.1:$((BASE_PORT + i))/readyz" 2>/dev/null || true)" = 200 ] || return 1
  done
}
