#!/usr/bin/env bash
# Issues 4 and 15: dispatchd against Redis GEO (GEOADD / GEOSEARCH) and PostGIS (UPDATE /
# index KNN) on the same machine, in the same run, with the same drivers at the same
# positions and the same client concurrency.
#
#   bash bench/vs-peers/run.sh                  # 15,000 drivers, then a 100,000-driver query-only round
#   bash bench/vs-peers/run.sh --drivers 30000  # more, on a machine whose processes may hold more files
#   bash bench/vs-peers/run.sh --big 0          # skip the 100,000-driver round
#   bash bench/vs-peers/run.sh --quick          # a smoke run: 2,000 drivers, 1 repetition of short windows
#   bash bench/vs-peers/run.sh -- --query-conc 64   # anything after -- goes to the vs-peers binary
#
# Installs Debian's redis-server and postgresql-15-postgis-3 if they are missing (as root),
# builds dispatchd and the bench in release, starts the three servers on free loopback ports
# (BENCH_PORTS=lo-hi picks the range; Postgres in a throwaway cluster), runs
# bench/vs-peers (src/main.rs), prints the results with their ratios, and stops everything.
# It exits non-zero only when something failed (a server, a load, answers that disagree); a
# missed target is reported, not failed. See README.md beside this file.
set -euo pipefail
SECONDS=0
cd "$(dirname "$0")/../.."
HERE=bench/vs-peers
# shellcheck source=bench/vs-peers/peers.sh
source "$HERE/peers.sh"

DRIVERS=15000
BIG=100000
QUICK=0
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --drivers) DRIVERS=$2; shift 2 ;;
    --big) BIG=$2; shift 2 ;;
    --quick) QUICK=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "run.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ "$QUICK" = 1 ]; then
  DRIVERS=2000 BIG=0
  EXTRA=(--reps 1 --warm-secs 1 --query-secs 2 --update-secs 2 --update-conns 64 "${EXTRA[@]}")
fi

# One process may hold only so many open files: the bench holds one per driver session
# (dispatchd one per session too), plus a few hundred connections of its own.
NOFILE=$(ulimit -n)
if [ "$NOFILE" != unlimited ] && [ "$DRIVERS" -gt $((NOFILE - 2000)) ]; then
  echo "run.sh: NOTE: this process may open only $NOFILE files; --drivers $DRIVERS lowered to $((NOFILE - 2000))"
  DRIVERS=$((NOFILE - 2000))
fi

echo "== redis-server, postgresql-15-postgis-3"
peers_install

WORK=$(mktemp -d /tmp/vs-peers.XXXXXX)
DISPATCH_PID=""
stop_dispatchd() {
  if [ -n "$DISPATCH_PID" ] && kill -0 "$DISPATCH_PID" 2>/dev/null; then
    kill -TERM "$DISPATCH_PID" 2>/dev/null || true
    for _ in $(seq 1 300); do kill -0 "$DISPATCH_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$DISPATCH_PID" 2>/dev/null || true
    wait "$DISPATCH_PID" 2>/dev/null || true
  fi
  DISPATCH_PID=""
}
cleanup() {
  stop_dispatchd
  peers_stop "$WORK"
  echo "run.sh: done in ${SECONDS} s"
}
trap cleanup EXIT

peers_build
peers_start "$WORK"

# Starts dispatchd with the given extra flags; sets DISPATCH_PORT and DISPATCH_PID.
start_dispatchd() {
  local name=$1
  shift
  DISPATCH_PORT=$(free_port)
  mkdir -p "$WORK/$name"
  "$DISPATCHD" --listen "127.0.0.1:$DISPATCH_PORT" --data-dir "$WORK/$name/data" \
    --location-max-per-s 1000 --ws-messages-max-per-s 1000 --ws-in-flight-max 1024 \
    --max-connections 20000 --log-format json \
    --register-rate-per-s 1000000 --register-burst 1000000 "$@" \
    >"$WORK/$name/dispatchd.log" 2>&1 &
  DISPATCH_PID=$!
  echo "dispatchd on 127.0.0.1:$DISPATCH_PORT (pid $DISPATCH_PID) $*"
}

rss_mb() {
  awk '/VmRSS/ {r = $2} /VmHWM/ {h = $2} END {printf "%.0f MB (peak %.0f MB)", r / 1024, h / 1024}' \
    "/proc/$1/status" 2>/dev/null || echo "?"
}

# Runs one round; its report goes to $WORK/<name>.out as well as to the terminal.
round() {
  local name=$1
  shift
  local rc
  set +e
  "$BENCH" --dispatch "127.0.0.1:$DISPATCH_PORT" --redis "127.0.0.1:$REDIS_PORT" \
    --postgres "$PG_CONN" --dispatch-pid "$DISPATCH_PID" --redis-pid "$REDIS_PID" \
    --postgres-pid "$PG_PID" "$@" \
    | tee "$WORK/$name.out"
  rc=${PIPESTATUS[0]}
  set -e
  {
    echo "memory at the end of the round: dispatchd $(rss_mb "$DISPATCH_PID") RSS," \
      "redis-server $(rss_mb "$REDIS_PID") RSS ($(redis-cli -p "$REDIS_PORT" info memory | tr -d '\r' | awk -F: '/^used_memory_human/ {print $2}') used)," \
      "PostGIS table + indexes $(psql -At -h 127.0.0.1 -p "$PG_PORT" -U bench -d bench -c "SELECT pg_size_pretty(pg_total_relation_size('drivers'))")"
  } | tee -a "$WORK/$name.out"
  if ! kill -0 "$DISPATCH_PID" 2>/dev/null; then
    echo "run.sh: dispatchd died during the $name round; its log ends:" >&2
    tail -n 30 "$WORK/$name/dispatchd.log" >&2
    exit 1
  fi
  if [ "$rc" != 0 ]; then
    echo "run.sh: the $name round failed (exit $rc); dispatchd's log ends:" >&2
    tail -n 30 "$WORK/$name/dispatchd.log" >&2
    exit 1
  fi
  echo "dispatchd log: $(grep -c -E '"level":"(WARN|ERROR)"' "$WORK/$name/dispatchd.log" || true) WARN/ERROR lines" \
    | tee -a "$WORK/$name.out"
  grep -E '"level":"(WARN|ERROR)"' "$WORK/$name/dispatchd.log" | head -n 5 | tee -a "$WORK/$name.out" || true
}

echo
echo "== round 1: $DRIVERS drivers, each online over its own open session: queries and position updates"
start_dispatchd main
round main --drivers "$DRIVERS" "${EXTRA[@]}"
stop_dispatchd

if [ "$BIG" -gt 0 ]; then
  echo
  echo "== round 2: $BIG drivers, queries only"
  echo "   One process cannot hold $BIG sessions (at most $NOFILE open files): each driver goes online over"
  echo "   its own session, which is then closed; --session-grace-ms keeps it available (and indexed) for the run."
  start_dispatchd big --session-grace-ms 86400000
  round big --drivers "$BIG" --close-sessions --source-addrs 8 --redis-key drivers_big "${EXTRA[@]}"
  stop_dispatchd
fi

echo
echo "==================================== RESULTS ===================================="
sed -n '/^=====/,$p' "$WORK/main.out"
if [ "$BIG" -gt 0 ]; then
  echo
  sed -n '/^=====/,$p' "$WORK/big.out"
fi
exit 0
