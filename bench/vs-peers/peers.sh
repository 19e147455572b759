# shellcheck shell=bash disable=SC2034  # sourced: the scripts that source it read the variables it sets
# The peers of the vs-peers benches (run.sh, http.sh): Redis and a throwaway PostgreSQL +
# PostGIS cluster, on loopback; sourced, not run.
#
# free_port: a port no socket uses, from BENCH_PORTS ("lo-hi", default 20000-29999, below
# the usual ephemeral range).
#
# peers_install [PKG...]: installs, as root, Debian's redis-server and
# postgresql-15-postgis-3 (with it postgresql-15 and postgresql-client: psql, pgbench) and
# any PKG given, whichever is missing (waiting up to 10 minutes for apt's lock).
#
# redis_start DIR PORT / redis_stop: Redis without persistence; sets REDIS_PID.
#
# peers_build: builds dispatchd and bench/vs-peers in release (from the repository's root);
# sets DISPATCHD and BENCH.
#
# peers_start WORK / peers_stop WORK: Redis in WORK/redis and Postgres in WORK-pg, on free
# ports (sets REDIS_PORT and PG_*); stopped, and both directories removed.
#
# pg_start DIR PORT: initialises a cluster in DIR (initdb refuses root, so as root it runs
# as Debian's unprivileged `postgres` user, who must be able to reach DIR: put it directly
# under /tmp), starts it on 127.0.0.1:PORT with its Unix
# socket in DIR, creates the database `bench` with PostGIS, and sets PG_PID (the
# postmaster), PG_PORT and PG_CONN (a libpq connection string). The settings favour PostGIS where a
# team would: synchronous_commit off (a position table does not need every UPDATE flushed
# before it answers; Redis here keeps nothing at all), shared_buffers big enough for the
# whole table and index, no JIT (its compile time dwarfs a 0.2 ms query), and no statement
# is logged. fsync stays on.
#
# pg_stop: stops the cluster pg_start started (fast shutdown), at most 30 s.

PG_BIN=/usr/lib/postgresql/15/bin
PG_DIR=""
PG_PORT=""
PG_PID=""
PG_CONN=""

REDIS_PID=""

free_port() {
  local range=${BENCH_PORTS:-20000-29999} lo hi p
  lo=${range%-*} hi=${range#*-}
  for _ in $(seq 1 200); do
    p=$((lo + RANDOM % (hi - lo + 1)))
    # No socket in any state (listening, connected, TIME_WAIT) has it as its local port:
    # a range inside the ephemeral one is also where clients' sockets get their ports.
    if ! awk 'NR > 1 {print $2}' /proc/net/tcp /proc/net/tcp6 2>/dev/null |
      grep -q "$(printf ':%04X$' "$p")"; then
      echo "$p"
      return
    fi
  done
  echo "peers.sh: no free port in $range" >&2
  exit 1
}

peers_install() {
  local missing=()
  command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
  if ! [ -f /usr/share/postgresql/15/extension/postgis.control ] || ! [ -x "$PG_BIN/initdb" ]; then
    missing+=(postgresql-15-postgis-3)
  fi
  command -v pgbench >/dev/null 2>&1 || missing+=(postgresql-client)
  for pkg in "$@"; do command -v "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  [ ${#missing[@]} -eq 0 ] && return
  if [ "$(id -u)" != 0 ]; then
    echo "peers.sh: missing and this is not root: apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
  echo "installing ${missing[*]}"
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
    "${missing[@]}" >/dev/null
}

redis_start() {
  local dir=$1 port=$2
  mkdir -p "$dir"
  redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no \
    --daemonize yes --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" --dir "$dir"
  for _ in $(seq 1 100); do
    [ -s "$dir/redis.pid" ] && redis-cli -p "$port" ping >/dev/null 2>&1 && break
    sleep 0.1
  done
  REDIS_PID=$(cat "$dir/redis.pid")
  echo "redis-server $(redis-server --version | awk '{print $3}' | sed 's/v=//') on 127.0.0.1:$port (pid $REDIS_PID, no persistence)"
}

redis_stop() {
  if [ -n "$REDIS_PID" ]; then
    kill -TERM "$REDIS_PID" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$REDIS_PID" 2>/dev/null || break; sleep 0.1; done
  fi
  REDIS_PID=""
}

# Runs a command as the cluster's owner: `postgres` when this is root, else this user.
pg_as_owner() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

pg_start() {
  local dir=$1 port=$2
  PG_DIR=$dir PG_PORT=$port
  rm -rf "$dir"
  mkdir -p "$dir"
  if [ "$(id -u)" = 0 ]; then chown postgres: "$dir"; fi
  pg_as_owner "$PG_BIN/initdb" -D "$dir/data" -U bench --auth=trust -E UTF8 --locale=C.UTF-8 \
    >"$dir/initdb.log" 2>&1 || { cat "$dir/initdb.log" >&2; return 1; }
  cat >>"$dir/data/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$dir'
max_connections = 400
shared_buffers = 512MB
synchronous_commit = off
jit = off
log_min_messages = warning
log_statement = none
EOF
  pg_as_owner "$PG_BIN/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t 60 start >/dev/null ||
    { tail -n 20 "$dir/postgres.log" >&2; return 1; }
  PG_PID=$(head -n 1 "$dir/data/postmaster.pid")
  PG_CONN="host=127.0.0.1 port=$port user=bench dbname=bench"
  psql -q -h 127.0.0.1 -p "$port" -U bench -d postgres -c 'CREATE DATABASE bench' >/dev/null
  psql -q -h 127.0.0.1 -p "$port" -U bench -d bench -c 'CREATE EXTENSION postgis' >/dev/null
  echo "postgres $("$PG_BIN/postgres" --version | awk '{print $3}') with PostGIS $(psql -At -h 127.0.0.1 -p "$port" -U bench -d bench -c 'SELECT postgis_lib_version()') on 127.0.0.1:$port (postmaster pid $PG_PID, cluster in $dir)"
}

pg_stop() {
  if [ -n "$PG_DIR" ] && [ -f "$PG_DIR/data/postmaster.pid" ]; then
    pg_as_owner "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m fast -w -t 30 stop >/dev/null 2>&1 || true
  fi
  PG_PID=""
}

peers_build() {
  echo "== build (release): dispatchd and bench/vs-peers"
  # DISPATCHD_BIN runs another build of dispatchd (e.g. an older commit's, side by side).
  if [ -z "${DISPATCHD_BIN:-}" ]; then cargo build --release --bin dispatchd; fi
  cargo build --release --manifest-path bench/vs-peers/Cargo.toml
  DISPATCHD=${DISPATCHD_BIN:-${CARGO_TARGET_DIR:-$PWD/target}/release/dispatchd}
  BENCH=${CARGO_TARGET_DIR:-$PWD/bench/vs-peers/target}/release/vs-peers
}

peers_start() {
  REDIS_PORT=$(free_port)
  redis_start "$1/redis" "$REDIS_PORT"
  pg_start "$1-pg" "$(free_port)"
}

peers_stop() {
  redis_stop
  pg_stop
  rm -rf "$1" "$1-pg" || true
}
