#!/usr/bin/env bash
# Issue 14's last row: `GET /v1/drivers/nearby` (nearest 10 within 5 km) under `wrk`, against
# PostGIS's index KNN (knn.sql: `ORDER BY geom <-> pt LIMIT 10` over GiST, prepared) under
# `pgbench`, with the same drivers, the same set of query points (each request picks one at
# random) and the same number of client connections, on this machine in one run, the two
# sides alternating (A B B A …); prints each run and the medians.
#
#   bash bench/vs-peers/http.sh              # 15,000 drivers, 50 connections, 2 rounds of 10 s per side
#   bash bench/vs-peers/http.sh --quick      # a smoke run: 2,000 drivers, 1 round of 2 s
#   DRIVERS=… CONNS=… SECS=… ROUNDS=… WARM=… bash bench/vs-peers/http.sh
#   DISPATCHD_BIN=/path/to/dispatchd bash bench/vs-peers/http.sh   # another build, e.g. an older
#                                            # commit's, for a side-by-side row
#   PERF=/tmp/nearby.perf bash bench/vs-peers/http.sh   # also `perf record` dispatchd during
#                                            # one more wrk window (build with
#                                            # CARGO_PROFILE_RELEASE_DEBUG=line-tables-only)
#
# Installs what is missing (redis-server, postgresql-15-postgis-3, wrk; as root), builds
# dispatchd and bench/vs-peers in release, starts dispatchd (bench/lib.sh), Redis and a
# throwaway Postgres on loopback (BENCH_PORTS=lo-hi picks the ports), loads the drivers into
# all three with `vs-peers --ready-file` (which checks their nearest-10 answers against brute
# force and each other, then holds the drivers' sessions open), runs
#   wrk -t 2 -c CONNS -d SECS --latency -s nearby.lua http://…  -- TOKEN NPOINTS BOX…
#   pgbench -n -c CONNS -j 2 -M prepared -T SECS -f knn.sql -D npoints=… -D lat0=… …
# and stops everything on exit. Exits non-zero when something failed (a server, the load,
# answers that disagree, an error answer under load); a missed target is printed.
set -euo pipefail
SECONDS=0
cd "$(dirname "$0")/../.."
HERE=bench/vs-peers
# shellcheck source=bench/lib.sh
source bench/lib.sh
# shellcheck source=bench/vs-peers/peers.sh
source "$HERE/peers.sh"

DRIVERS=${DRIVERS:-15000} CONNS=${CONNS:-50} SECS=${SECS:-10} ROUNDS=${ROUNDS:-2} WARM=${WARM:-3}
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) DRIVERS=2000 SECS=2 ROUNDS=1 WARM=1; shift ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "http.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
ulimit -n 20000 2>/dev/null || true

echo "== redis-server, postgresql-15-postgis-3, wrk"
peers_install wrk

WORK=$(mktemp -d /tmp/vs-peers-http.XXXXXX)
DISPATCHD_PID="" HOLDER_PID=""
cleanup() {
  touch "$WORK/release" 2>/dev/null || true
  if [ -n "$HOLDER_PID" ]; then
    for _ in $(seq 1 100); do kill -0 "$HOLDER_PID" 2>/dev/null || break; sleep 0.1; done
    kill "$HOLDER_PID" 2>/dev/null || true
  fi
  if [ -n "$DISPATCHD_PID" ]; then kill "$DISPATCHD_PID" 2>/dev/null || true; wait "$DISPATCHD_PID" 2>/dev/null || true; fi
  peers_stop "$WORK"
  echo "http.sh: done in ${SECONDS} s"
}
trap cleanup EXIT

peers_build
peers_start "$WORK"
DISPATCH_PORT=$(free_port)
start_dispatchd "$DISPATCHD" "$DISPATCH_PORT" "$WORK/dispatchd" \
  --location-max-per-s 1000 --max-connections 20000 --log-format json
echo "dispatchd on 127.0.0.1:$DISPATCH_PORT (pid $DISPATCHD_PID)"

echo "== loading $DRIVERS drivers into dispatchd, PostGIS and Redis; checking their answers"
"$BENCH" --dispatch "127.0.0.1:$DISPATCH_PORT" --redis "127.0.0.1:$REDIS_PORT" \
  --postgres "$PG_CONN" --drivers "$DRIVERS" --update-conns 0 \
  --ready-file "$WORK/ready" --hold-until "$WORK/release" >"$WORK/holder.out" 2>&1 &
HOLDER_PID=$!
for _ in $(seq 1 900); do
  [ -f "$WORK/ready" ] && break
  if ! kill -0 "$HOLDER_PID" 2>/dev/null; then
    cat "$WORK/holder.out" >&2
    echo "http.sh: loading failed" >&2
    exit 1
  fi
  sleep 1
done
[ -f "$WORK/ready" ] || { cat "$WORK/holder.out" >&2; echo "http.sh: not loaded within 15 minutes" >&2; exit 1; }
grep -E "PostgreSQL|dispatchd: .* online in|sanity|misses" "$WORK/holder.out"
# shellcheck disable=SC1091
source "$WORK/ready"
BOX=("$NPOINTS" "$LAT0" "$DLAT" "$LNG0" "$DLNG")

# CPU ticks (USER_HZ) used so far by PID, its exited children and its live children.
cpu_ticks() {
  # A process may exit between the glob and cat: cat then fails, which is fine.
  { cat /proc/[0-9]*/stat 2>/dev/null || true; } |
    awk -v p="$1" '$1 == p {t += $14 + $15 + $16 + $17} $4 == p {t += $14 + $15} END {print t + 0}'
}
# cores S0 S1 T0 T1: the cores used between two cpu_ticks readings S0, S1 at times T0, T1.
cores() {
  awk -v s0="$1" -v s1="$2" -v t0="$3" -v t1="$4" 'BEGIN {print (s1 - s0) / 100 / (t1 - t0)}'
}

# fail TOOL LOG: the tool exited non-zero; show its output and stop.
fail() {
  cat "$2" >&2
  echo "http.sh: $1 failed (its output is above)" >&2
  exit 1
}

# run_wrk SECS OUT / run_pgbench SECS OUT: one window; OUT gets "per_s p50_ms p99_ms cores".
run_wrk() {
  local secs=$1 out=$2 t0 t1 s0 s1
  s0=$(cpu_ticks "$DISPATCHD_PID") t0=$(date +%s.%N)
  timeout $((secs + 60)) wrk -t 2 -c "$CONNS" -d "${secs}s" --timeout 10s --latency \
    -s "$HERE/nearby.lua" "http://127.0.0.1:$DISPATCH_PORT" -- "$TOKEN" "${BOX[@]}" >"$out.log" 2>&1 ||
    fail "wrk" "$out.log"
  t1=$(date +%s.%N) s1=$(cpu_ticks "$DISPATCHD_PID")
  if grep -qE "Non-2xx|Socket errors" "$out.log"; then
    cat "$out.log" >&2
    echo "http.sh: dispatchd answered errors under wrk" >&2
    exit 1
  fi
  awk -v c="$(cores "$s0" "$s1" "$t0" "$t1")" '
    function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; if (v ~ /s$/) return v * 1000; return v }
    /^ +50%/ {p50 = ms($2)} /^ +99%/ {p99 = ms($2)} /^Requests\/sec:/ {rps = $2}
    END {printf "%.0f %.3f %.3f %.2f\n", rps, p50, p99, c}' "$out.log" >"$out"
}
run_pgbench() {
  local secs=$1 out=$2 t0 t1 s0 s1
  mkdir -p "$out.d"
  s0=$(cpu_ticks "$PG_PID") t0=$(date +%s.%N)
  timeout $((secs + 60)) pgbench -h 127.0.0.1 -p "$PG_PORT" -U bench -n -c "$CONNS" -j 2 \
    -M prepared -T "$secs" -f "$HERE/knn.sql" -D npoints="$NPOINTS" -D lat0="$LAT0" \
    -D dlat="$DLAT" -D lng0="$LNG0" -D dlng="$DLNG" -l --log-prefix "$out.d/tx" bench >"$out.log" 2>&1 ||
    fail "pgbench" "$out.log"
  t1=$(date +%s.%N) s1=$(cpu_ticks "$PG_PID")
  if ! grep -q "number of failed transactions: 0 " "$out.log"; then
    cat "$out.log" >&2
    echo "http.sh: pgbench saw failed transactions" >&2
    exit 1
  fi
  # Per-transaction log: client, transaction, latency in µs, …
  cat "$out.d"/tx.* | awk '{print $3}' | sort -n | awk -v c="$(cores "$s0" "$s1" "$t0" "$t1")" \
    -v tps="$(awk '/^tps = / {print $3}' "$out.log")" '
    {v[NR] = $1} END {printf "%.0f %.3f %.3f %.2f\n", tps, v[int(NR * 0.5) + 1] / 1000, v[int(NR * 0.99) + 1] / 1000, c}' >"$out"
  rm -rf "$out.d"
}

one() { # SIDE TOOL ROUND
  local out="$WORK/$1-$3"
  if [ "$2" = wrk ]; then run_wrk "$SECS" "$out"; else run_pgbench "$SECS" "$out"; fi
  echo "  round $3 $2: $(awk '{printf "%s/s  p50 %s ms  p99 %s ms  server %s cores", $1, $2, $3, $4}' "$out")  (load $(cut -d' ' -f1 /proc/loadavg))"
}

echo "== warm-up: ${WARM} s each"
run_wrk "$WARM" "$WORK/warm-wrk"
run_pgbench "$WARM" "$WORK/warm-pgbench"
echo "== $ROUNDS rounds of $SECS s per side, $CONNS connections, alternating (A = dispatchd under wrk, B = PostGIS under pgbench)"
alternate "$ROUNDS" wrk pgbench one

if [ -n "${PERF:-}" ]; then
  echo "== perf record of dispatchd (pid $DISPATCHD_PID) during one more ${SECS} s wrk window -> $PERF"
  perf record -F 499 -g -p "$DISPATCHD_PID" -o "$PERF" -- sleep "$SECS" >"$WORK/perf.log" 2>&1 &
  PERF_PID=$!
  run_wrk "$SECS" "$WORK/perf-wrk"
  wait "$PERF_PID" || { cat "$WORK/perf.log" >&2; echo "http.sh: perf record failed" >&2; }
  echo "  under perf: $(cat "$WORK/perf-wrk")"
fi

echo
echo "==================================== RESULTS ===================================="
echo "$DRIVERS drivers; $CONNS connections per side; medians of $ROUNDS x $SECS s; $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
python3 - "$WORK" <<'PY'
import glob, statistics, sys
work = sys.argv[1]
rows = {}
for side, name in (("A", "dispatchd GET /v1/drivers/nearby (wrk)"), ("B", "PostGIS index KNN, prepared (pgbench)")):
    runs = [list(map(float, open(f).read().split())) for f in sorted(glob.glob(f"{work}/{side}-*")) if "." not in f.rsplit("/", 1)[1]]
    med = [statistics.median(r[i] for r in runs) for i in range(4)]
    rows[side] = med
    print(f"  {name:<42} {med[0]:>10,.0f}/s  p50 {med[1]:6.2f} ms  p99 {med[2]:6.2f} ms  server {med[3]:.2f} cores"
          f"  ({med[0] / med[3]:,.0f} per server core-s)  runs: " + ", ".join(f"{r[0]:,.0f}" for r in runs))
a, b = rows["A"], rows["B"]
ratio = a[0] / b[0]
print(f"  ratio dispatchd/PostGIS: throughput {ratio:.2f}x, p99 {a[2] / b[2]:.2f}x, per server core-s {(a[0] / a[3]) / (b[0] / b[3]):.2f}x"
      f"  -> issue 14's target (>= 4x): {'MET' if ratio >= 4 else 'NOT MET'}")
PY
