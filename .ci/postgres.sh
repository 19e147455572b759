# A throwaway PostgreSQL for the tests (issue 15).
#
#   source .ci/postgres.sh start   # installs Debian's postgresql if missing, starts a
#                                  # cluster in a temp dir, exports DISPATCH_TEST_DATABASE_URL
#   bash .ci/postgres.sh stop      # stops it and removes the temp dir
#
# initdb refuses to run as root, so the cluster belongs to an unprivileged user
# (`dispatchci`, created if missing). It listens on 127.0.0.1 only (port
# DISPATCH_PG_PORT, default 55432) and on a Unix socket in its own directory. The tests
# create a fresh database per test, so they can run in parallel. DISPATCH_PG_LISTEN
# (another address to listen on instead) and DISPATCH_PG_HBA (a CIDR whose clients may log
# in with the password) are for .ci/partition.sh, which runs it in a network namespace.
# Idempotent: `start` on a running cluster only exports the URL again.
#
# Works when sourced (bash) and when run; it never calls `exit` when sourced.

_dispatch_pg_main() {
    local cmd="${1:-start}"
    local started
    started=$(date +%s)
    local port="${DISPATCH_PG_PORT:-55432}"
    local base="${DISPATCH_PG_DIR:-/tmp/dispatch-ci-pg}"
    local user=dispatchci
    local bin
    local listen="${DISPATCH_PG_LISTEN:-127.0.0.1}"
    local url="postgres://dispatch:dispatch@${listen}:${port}/postgres"
    case "$cmd" in
    start)
        if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
            export DEBIAN_FRONTEND=noninteractive
            apt-get -o DPkg::Lock::Timeout=600 update -qq || return 1
            apt-get -o DPkg::Lock::Timeout=600 install -y -qq postgresql >/dev/null || return 1
        fi
        bin=$(dirname "$(ls -d /usr/lib/postgresql/*/bin/initdb | sort -V | tail -1)")
        if [ "$(id -u)" = 0 ] && ! id "$user" >/dev/null 2>&1; then
            useradd --system --no-create-home --shell /usr/sbin/nologin "$user" || return 1
        fi
        local as=()
        if [ "$(id -u)" = 0 ]; then as=(runuser -u "$user" --); fi
        mkdir -p "$base"
        if [ "$(id -u)" = 0 ]; then chown "$user" "$base"; fi
        if ! "${as[@]}" "$bin/pg_ctl" -D "$base/data" status >/dev/null 2>&1; then
            if [ ! -f "$base/data/PG_VERSION" ]; then
                # No cluster in it: what an interrupted `stop` (its rm cut short) leaves,
                # which initdb refuses ("exists but is not empty").
                rm -rf "$base/data"
                printf 'dispatch\n' >"$base/pw" && chmod 644 "$base/pw"
                "${as[@]}" "$bin/initdb" -D "$base/data" -U dispatch --pwfile="$base/pw" \
                    --auth=scram-sha-256 -E UTF8 >"$base/initdb.log" 2>&1 || {
                    cat "$base/initdb.log"
                    return 1
                }
                if [ -n "${DISPATCH_PG_HBA:-}" ]; then
                    echo "host all all ${DISPATCH_PG_HBA} scram-sha-256" >>"$base/data/pg_hba.conf"
                fi
            fi
            mkdir -p "$base/sock" && { [ "$(id -u)" != 0 ] || chown "$user" "$base/sock"; }
            # fsync stays on: the crash tests rely on what a commit promises.
            "${as[@]}" "$bin/pg_ctl" -D "$base/data" -l "$base/server.log" -w -t 60 \
                -o "-c listen_addresses=$listen -p $port -k $base/sock -c max_connections=400 -c shared_buffers=64MB" \
                start >/dev/null || {
                cat "$base/server.log"
                return 1
            }
        fi
        export DISPATCH_TEST_DATABASE_URL="$url"
        echo "postgres.sh: PostgreSQL $("$bin/postgres" --version | awk '{print $3}') on $listen:$port (data $base/data); DISPATCH_TEST_DATABASE_URL exported; $(($(date +%s) - started))s"
        ;;
    stop)
        bin=$(dirname "$(ls -d /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -1)")
        if [ -f "$base/data/PG_VERSION" ]; then
            local as=()
            if [ "$(id -u)" = 0 ]; then as=(runuser -u "$user" --); fi
            "${as[@]}" "$bin/pg_ctl" -D "$base/data" -m fast -w stop >/dev/null 2>&1 || true
        fi
        rm -rf "$base"
        echo "postgres.sh: stopped; $(($(date +%s) - started))s"
        ;;
    *)
        echo "usage: source .ci/postgres.sh start | bash .ci/postgres.sh stop" >&2
        return 2
        ;;
    esac
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    _dispatch_pg_main "$@"
    exit $?
else
    _dispatch_pg_main "$@"
fi
