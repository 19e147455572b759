#!/usr/bin/env bash
# The two stores side by side, in one session on one machine (issue 15, item 6):
#   - persisted trip transitions per second, one at a time and 64 concurrent
#     (persistence/benches/transition.rs: Store::commit of a snapshot and its journal
#     entry, awaited until durable: sled's fsync, PostgreSQL's COMMIT);
#   - recovery time of 100,000 drivers, 10,000 riders and 10,000 live trips, from
#     opening the store to every actor started (actors/benches/recovery.rs).
#
#   bench/stores.sh            # needs a PostgreSQL: DISPATCH_TEST_DATABASE_URL, or it
#                              # starts one with .ci/postgres.sh (and stops it after)
#
# Release builds (cargo bench). Each backend gets a fresh database. RECOVERY_RUNS (3)
# and the sizes of actors/benches/recovery.rs can be changed through the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
own_pg=
if [ -z "${DISPATCH_TEST_DATABASE_URL:-}" ]; then
  # shellcheck source=../.ci/postgres.sh
  source .ci/postgres.sh start
  own_pg=1
fi
admin=$DISPATCH_TEST_DATABASE_URL
fresh_db() {
  local name="dispatch_bench_$1_$$"
  psql "$admin" -qAt -c "DROP DATABASE IF EXISTS $name" -c "CREATE DATABASE $name" >/dev/null
  echo "${admin%/*}/$name"
}
export RECOVERY_RUNS=${RECOVERY_RUNS:-3}
echo "== machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg); $(psql "$admin" -qAtc 'SHOW server_version') (fsync $(psql "$admin" -qAtc 'SHOW fsync'), synchronous_commit $(psql "$admin" -qAtc 'SHOW synchronous_commit'))"
# Built once, then run directly (cargo's build lock stays free meanwhile).
exe() {
  cargo bench -p "$1" --bench "$2" --no-run -q --message-format=json |
    python3 -c 'import json,sys; print([m["executable"] for m in map(json.loads, sys.stdin) if m.get("executable")][-1])'
}
transition_bin=$(exe dispatch-persistence transition)
recovery_bin=$(exe dispatch-actors recovery)
for store in sled postgres; do
  if [ "$store" = postgres ]; then export BENCH_DATABASE_URL; BENCH_DATABASE_URL=$(fresh_db transition); else unset BENCH_DATABASE_URL; fi
  echo "== $store: transitions (load $(cut -d' ' -f1 /proc/loadavg))"
  "$transition_bin" --bench 2>&1 | grep -E "thrpt|flushes|^transition/" || true
  if [ "$store" = postgres ]; then BENCH_DATABASE_URL=$(fresh_db recovery); fi
  echo "== $store: recovery (load $(cut -d' ' -f1 /proc/loadavg))"
  "$recovery_bin" --bench 2>&1 | grep -E "populated|^run|recovery of" || true
done
unset BENCH_DATABASE_URL
for db in $(psql "$admin" -qAt -c "SELECT datname FROM pg_database WHERE datname LIKE 'dispatch_bench_%_$$'"); do
  psql "$admin" -qc "DROP DATABASE $db" >/dev/null
done
if [ -n "$own_pg" ]; then bash .ci/postgres.sh stop; fi
echo "bench/stores.sh: $(($(date +%s) - started)) s"
