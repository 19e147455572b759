# shellcheck shell=bash
# Shared by .ci/partition.sh (leader mode) and .ci/partition-sharded.sh (sharded mode);
# sourced, not run. Issue 16, item 5: real processes in network namespaces of the
# script's own (dnx-*):
#
#   dnx-db   PostgreSQL (.ci/postgres.sh, as its unprivileged user)  10.231.0.10, and
#            .ci/delay_proxy.py in front of it (the nodes' database URL)  10.231.0.10:33433
#   dnx-n1..N  dispatchd --node-name nI, two links each: cluster link (peers + database)
#            10.231.0.I on the bridge in dnx-sw; client link 10.232.0.I on the bridge in dnx-cl
#   dnx-cl   the clients                                              10.232.0.100
#
# The client network does not reach the cluster network (no node forwards).
# Before sourcing: NODES (how many node namespaces, 3 unless set), and optionally
# NODE_FLAGS (an array: more dispatchd flags for every node). After: $work (removed on
# exit unless the script failed), the pid map, bg (more processes the cleanup stops), and
# the helpers below. Installs what it lacks (iproute2, iptables, curl, PostgreSQL,
# websockets from PyPI). Ports 33080 (clients), 33090 (cluster), 33432 (PostgreSQL),
# 33433 (its delay proxy).
set -euo pipefail
started=$(date +%s)
ME=${ME:-$(basename "$0")}
NODES=${NODES:-3}
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/debug}
PORT=33080
CPORT=33090
PGPORT=33432
PROXYPORT=33433
NET=10.231.0
CNET=10.232.0
NAMESPACES=(dnx-cl dnx-db dnx-sw)
for i in $(seq "$NODES"); do NAMESPACES+=("dnx-n$i"); done
ADMIN=adm-partition-0123456789abcdef0123
export DISPATCH_PG_DIR=/tmp/dnx-partition-pg DISPATCH_PG_PORT=$PGPORT
export DISPATCH_PG_LISTEN=$NET.10 DISPATCH_PG_HBA=$NET.0/24

say() { echo "$ME [$(($(date +%s) - started)) s] $*"; }
fail() {
    say "FAIL: $*"
    exit 1
}
now_ms() { date +%s%3N; }
wait_until() { # SECONDS WHAT COMMAND...: polls every 100 ms
    local until=$(($(date +%s) + $1)) what=$2
    shift 2
    until "$@"; do
        [ "$(date +%s)" -lt "$until" ] || fail "$what: not within the time allowed"
        sleep 0.1
    done
}
sleep_until() { local d=$(($1 - $(now_ms))); [ $d -le 0 ] || sleep "$(awk -v d="$d" 'BEGIN { print d / 1000 }')"; }

# --- prerequisites --------------------------------------------------------------------
[ "$(id -u)" = 0 ] || fail "needs root (network namespaces)"
need=()
command -v ip >/dev/null || need+=(iproute2)
command -v iptables-legacy >/dev/null || need+=(iptables)
command -v curl >/dev/null || need+=(curl)
if [ ${#need[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
python3 -c 'import websockets.asyncio.client' 2>/dev/null ||
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore 'websockets==17.4'
if [ ! -x "$BIN/dispatchd" ] || [ ! -x "$BIN/loadgen" ]; then
    cargo build --locked -p dispatch-transport --bin dispatchd -p dispatch-loadgen --bin loadgen
fi

work=$(mktemp -d "/tmp/dnx-${ME%.sh}.XXXXXX")
declare -A pid
bg=()
cleanup() {
    local rc=$?
    trap - EXIT
    touch "$work/stop-cut" "$work/stop-pause"
    for i in "${!pid[@]}"; do kill -CONT "${pid[$i]}" 2>/dev/null || true; done
    for p in "${pid[@]}" "${bg[@]}"; do kill "$p" 2>/dev/null || true; done
    for _ in $(seq 50); do
        local alive=0
        for p in "${pid[@]}" "${bg[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
        [ $alive = 0 ] && break
        sleep 0.1
    done
    for p in "${pid[@]}" "${bg[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    cp "$DISPATCH_PG_DIR/server.log" "$work/postgres.log" 2>/dev/null || true
    bash .ci/postgres.sh stop >/dev/null 2>&1 || true
    for ns in "${NAMESPACES[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
    if [ $rc != 0 ]; then
        for f in "$work"/n?.log "$work"/loadgen.txt; do
            [ -f "$f" ] && { echo "--- tail of $f"; tail -n 40 "$f"; }
        done
        echo "$ME: logs kept in $work"
    else
        rm -rf "$work"
    fi
    echo "$ME: $(($(date +%s) - started)) s, exit $rc"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- the networks ---------------------------------------------------------------------
for ns in "${NAMESPACES[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
bash .ci/postgres.sh stop >/dev/null 2>&1 || true
for ns in "${NAMESPACES[@]}"; do
    ip netns add "$ns"
    ip -n "$ns" link set lo up
done
ip -n dnx-sw link add br0 type bridge && ip -n dnx-sw link set br0 up
ip -n dnx-cl link add br1 type bridge && ip -n dnx-cl link set br1 up
ip -n dnx-cl addr add "$CNET.100/24" dev br1
plug() { # NS IFACE ADDR BRIDGE_NS BRIDGE PORT_NAME: a veth from NS onto a bridge
    ip -n "$1" link add "$2" type veth peer name "$6" netns "$4"
    ip -n "$4" link set "$6" master "$5" up
    ip -n "$1" addr add "$3/24" dev "$2"
    ip -n "$1" link set "$2" up
}
plug dnx-db c0 "$NET.10" dnx-sw br0 vdb
for i in $(seq "$NODES"); do
    plug "dnx-n$i" c0 "$NET.$i" dnx-sw br0 "vn$i"
    plug "dnx-n$i" k0 "$CNET.$i" dnx-cl br1 "vk$i"
done
cl() { ip netns exec dnx-cl "$@"; }
# In the background, `ip netns exec` itself (not a function's subshell) so that $! is the
# process the cleanup must stop.
CL=(ip netns exec dnx-cl)
# Cut node I off from its peers and the database (silent: its packets vanish), its
# client link up; and heal it.
cut() { ip -n dnx-sw link set "vn$1" nomaster; }
heal() { ip -n dnx-sw link set "vn$1" master br0; }
say "namespaces ${NAMESPACES[*]}: cluster network $NET.0/24 (bridge in dnx-sw), client network $CNET.0/24 (bridge in dnx-cl)"

# --- PostgreSQL in dnx-db -------------------------------------------------------------
ip netns exec dnx-db bash .ci/postgres.sh start
# The nodes reach it through .ci/delay_proxy.py (in dnx-db too), which delays what it
# carries while $work/delay-on exists.
ip netns exec dnx-db python3 .ci/delay_proxy.py "$NET.10:$PROXYPORT" "$NET.10:$PGPORT" "$work/delay-on" 50 20 \
    >"$work/proxy.txt" 2>&1 &
bg+=("$!")
url="postgres://dispatch:dispatch@$NET.10:$PROXYPORT/postgres"
wait_until 10 "n1 reaches PostgreSQL through the proxy" ip netns exec dnx-n1 timeout 5 bash -c "</dev/tcp/$NET.10/$PROXYPORT"
if cl timeout 2 bash -c "</dev/tcp/$NET.10/$PGPORT" 2>/dev/null; then
    fail "the client network reaches the database: the namespaces leak"
fi
# SQL against the store from dnx-db itself (not through the proxy, never cut).
direct="postgres://dispatch:dispatch@$NET.10:$PGPORT/postgres"
sql() { ip netns exec dnx-db psql "$direct" -qAt -c "$1"; }

# Every row the nodes write from now on (the store's tables with a shard column), with the
# writer (nI, from its connection's address: the nodes must reach PostgreSQL directly,
# NODE_DB_URL=$direct, not through the proxy) and the shard's lease holder and epoch in
# the writing transaction: a write by a node not holding the shard is one the fence should
# have refused. Called once the nodes made the tables; read with `sql`.
log_writes() {
    sql "CREATE TABLE IF NOT EXISTS netns_writes (tbl text, shard bigint, writer text, holder text, epoch bigint, at timestamptz, op text)" >/dev/null
    sql "CREATE OR REPLACE FUNCTION netns_log_write() RETURNS trigger LANGUAGE plpgsql AS \$\$
DECLARE s bigint;
BEGIN
  IF TG_OP = 'DELETE' THEN s := OLD.shard; ELSE s := NEW.shard; END IF;
  INSERT INTO netns_writes SELECT TG_TABLE_NAME, s, 'n' || split_part(host(inet_client_addr()), '.', 4), l.holder, l.epoch, clock_timestamp(), TG_OP
    FROM (SELECT 1) one LEFT JOIN dispatch_leases l ON l.shard = s;
  RETURN NULL;
END \$\$" >/dev/null
    local t
    for t in drivers riders trips journal quotes meta ledger provider; do
        sql "CREATE TRIGGER netns_$t AFTER INSERT OR UPDATE OR DELETE ON $t FOR EACH ROW EXECUTE FUNCTION netns_log_write()" >/dev/null
    done
}

# --- the nodes ------------------------------------------------------------------------
printf 'partition-test-cookie-%s\n' "$RANDOM$RANDOM" >"$work/cookie"
peers=$(for i in $(seq "$NODES"); do echo "$NET.$i:$CPORT"; done | paste -sd,)
[ -n "${NODE_FLAGS+x}" ] || NODE_FLAGS=()
# Each node's cluster port listens on 0.0.0.0:$CPORT, the same address on every host, as
# the Kubernetes overlay's pods do (DISPATCH_CLUSTER_LISTEN=0.0.0.0:7070): with that, every
# node once named itself 0.0.0.0:$CPORT to its peers, ractor_cluster dropped each link as
# one to itself, and no membership formed (cluster/src/lib.rs advertised_host).
start_node() { # I
    local i=$1
    ip netns exec "dnx-n$i" env DISPATCH_REGISTER_RATE_PER_S=1000000 DISPATCH_REGISTER_BURST=1000000 \
        DISPATCH_STORE=postgres DISPATCH_DATABASE_URL="${NODE_DB_URL:-$url}" \
        "$BIN/dispatchd" --listen "$CNET.$i:$PORT" --data-dir "$work/n$i" --node-name "n$i" \
        --lease-ttl-ms "$TTL" --lease-renew-ms "$RENEW" --database-timeout-ms 2000 \
        --admin-token "$ADMIN" --cluster-listen "0.0.0.0:$CPORT" --cluster-peers "$peers" \
        --cluster-cookie-file "$work/cookie" --cluster-heartbeat-ms 200 --cluster-peer-timeout-ms 1000 \
        --offer-timeout-ms 3000 --dispatch-deadline-ms 15000 --snapshot-interval-ms 200 \
        --shutdown-timeout-ms 3000 "${NODE_FLAGS[@]}" >>"$work/n$i.log" 2>&1 &
    pid[$i]=$!
}
get() { cl curl -s -m 2 "http://$CNET.$1:$PORT$2" || true; }
code() { cl curl -s -m 1 -o /dev/null -w '%{http_code}' "http://$CNET.$1:$PORT$2" 2>/dev/null || true; }
metric() { get "$1" /metrics | awk -v m="$2" '$1 == m { print $2 }'; }
members() { metric "$1" dispatch_cluster_members; }
ready() { [ "$(code "$1" /readyz)" = 200 ]; }
all_members() { # N NODES...: every node named counts N members
    local n=$1 i
    shift
    for i in "$@"; do [ "$(members "$i")" = "$n" ] || return 1; done
}
# Every thread of process PID stopped (SIGSTOP delivered).
stopped() { ! grep -L '^State:.*T' /proc/"$1"/task/*/status | grep -q .; }
# loadgen over the nodes given (their client addresses), its ack log $work/acks.jsonl.
start_loadgen() { # DURATION NODES...
    local duration=$1 urls
    shift
    urls=$(for i in "$@"; do echo "ws://$CNET.$i:$PORT"; done | paste -sd,)
    "${CL[@]}" "$BIN/loadgen" --url "$urls" --drivers 40 --riders 40 --request-rate 2 --radius-km 2 \
        --speed-mps 30 --decision-delay-ms 300-1500 --boarding-ms 2000-6000 --duration "$duration" --drain 25s \
        --reconnect --reconnect-for 40s --ack-log "$work/acks.jsonl" --quiet "${LOADGEN_FLAGS[@]}" \
        >"$work/loadgen.txt" 2>&1 &
    loadgen=$!
    bg+=("$loadgen")
}
[ -n "${LOADGEN_FLAGS+x}" ] || LOADGEN_FLAGS=()
# The load (start_loadgen DURATION over n1..n3) and the cut case's probe, pinned to n1
# (its log $work/probe-cut.jsonl, stopped by $work/stop-cut), 8 s in.
load_and_cut_probe() { # DURATION
    start_loadgen "$1" 1 2 3
    "${CL[@]}" python3 .ci/partition_probe.py run "http://$CNET.1:$PORT" "$work/probe-cut.jsonl" "$work/stop-cut" \
        >"$work/probe-cut.txt" 2>&1 &
    bg+=("$!")
    sleep 8
    grep -q '"trip_update"' "$work/acks.jsonl" 2>/dev/null || say "(no trip_update acknowledged yet after 8 s)"
}
# The SIGSTOP case's clients on node I: a probe pinned to it (partition_probe.py run
# --once, its log $work/probe-pause.jsonl, stopped by $work/stop-pause) and a rider
# registered on it (its id in $rider2) with a session open, which asks for a ride once
# $work/go-ride exists (the node stopped by then: with fencing, that trip can never
# reach the store; its frames in $work/ride.jsonl).
pause_probes() { # I
    local i=$1 probe_token token2
    "${CL[@]}" python3 .ci/partition_probe.py run "http://$CNET.$i:$PORT" "$work/probe-pause.jsonl" "$work/stop-pause" --once \
        >"$work/probe-pause.txt" 2>&1 &
    bg+=("$!")
    wait_until 30 "the pause probe answered by n$i" grep -qs '"kind": "frame"' "$work/probe-pause.jsonl"
    probe_token=$(cl curl -s -m 2 -X POST -H 'content-type: application/json' -d '{"name": "Pause probe", "phone": "+15145550101"}' \
        "http://$CNET.$i:$PORT/v1/riders")
    rider2=$(echo "$probe_token" | python3 -c 'import json, sys; print(json.load(sys.stdin)["rider_id"])')
    token2=$(echo "$probe_token" | python3 -c 'import json, sys; print(json.load(sys.stdin)["token"])')
    "${CL[@]}" python3 .ci/partition_probe.py ride "http://$CNET.$i:$PORT" "$token2" "$work/go-ride" "$work/ride.jsonl" \
        >"$work/ride.txt" 2>&1 &
    bg+=("$!")
    wait_until 30 "the ride probe's session on n$i" grep -qs '"welcome"' "$work/ride.jsonl"
}
# After the pause: exit 1 if node I answered the ride asked of it while stopped, or if a
# trip of that rider is in the store (asked of node J).
ride_untold() { # I J
    local told trips
    told=$(grep -c '"kind": "frame"' "$work/ride.jsonl" || true)
    [ "$told" = 0 ] || fail "the ride requested of the stopped n$1 was answered: $(grep '"frame"' "$work/ride.jsonl" | head -3)"
    trips=$(cl curl -s -m 5 -H "authorization: Bearer $ADMIN" "http://$CNET.$2:$PORT/admin/trips?rider_id=$rider2" |
        python3 -c 'import json, sys; print(len(json.load(sys.stdin)["trips"]))')
    [ "$trips" = 0 ] ||
        fail "the ride requested of n$1 while it was stopped is in the store ($trips trips): a write with its old epoch"
}
