#!/usr/bin/env bash
# Issue 16, item 5: a partition, not only a crash, and a paused leader fenced like a dead
# one. Real processes in network namespaces of this script's own (dnx-*):
#
#   dnx-db   PostgreSQL (.ci/postgres.sh, as its unprivileged user)  10.231.0.10
#   dnx-n1..3  dispatchd --node-name nI in cluster mode, two links each:
#              cluster link (peers + database) 10.231.0.I, on the bridge in dnx-sw;
#              client link 10.232.0.I, on the bridge in dnx-cl
#   dnx-cl   the clients: loadgen (--url over the 3 nodes, --reconnect, --ack-log) and
#            .ci/partition_probe.py (a rider pinned to one node)       10.232.0.100
#
# The client network does not reach the cluster network (no node forwards).
# Phases, each with its checks (exit 1 on the first that fails):
#  1. impairment of every healthy cluster link for 12 s: netem delay 50 ms +- 20 ms and
#     1% loss where the kernel has sch_netem; else 1% random loss by iptables and the
#     delay on the database's connections (.ci/delay_proxy.py): no takeover.
#  2. the cut: the leader's cluster link is unplugged from the bridge (silent: its packets
#     vanish) while its client link stays up, held for 3 leases. (a) the cut node answers
#     nothing to a request sent at or after cut + lease (the probe), says `unavailable`
#     and closes its sessions with 1001; (b) another node leads (dispatch_cluster_leader
#     1, a higher epoch) and the takeover time is printed; (c) healed, the cut node is a
#     standby naming the new leader and membership is 3 on every node again.
#  3. SIGSTOP of the new leader for 2 leases, then SIGCONT: a probe pinned to it sends
#     requests (and a ride request) while it is stopped; it answers none of them, another
#     node leads, it wakes a standby naming that node, membership is 3 again, and no trip
#     of the probe's rider is in the store.
#  4. the last leader hands over (SIGTERM); the next one recovers from the store, and
#     bench/ackcheck.py checks loadgen's ack log against it: every acknowledged
#     transition is there, no trip with two drivers, no driver in two trips.
#
#   bash .ci/partition.sh        # as root; BIN=dir with dispatchd and loadgen (default
#                                # ${CARGO_TARGET_DIR:-target}/debug, built if missing)
#
# Installs what it lacks (iproute2, iptables, curl, PostgreSQL, websockets from PyPI).
# Ports 33080 (clients), 33090 (cluster), 33432 (PostgreSQL), 33433 (its delay proxy). Everything it creates is
# removed on exit, failure included. Prints its duration.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/debug}
# A 4 s lease: 2 s (the failover test's) ended terms on the impaired links of phase 1 on
# a loaded machine (a renewal waits for the commit that holds the lease row FOR SHARE,
# several 100 ms round trips long there).
TTL=${LEASE_TTL_MS:-4000}
RENEW=${LEASE_RENEW_MS:-800}
PORT=33080
CPORT=33090
PGPORT=33432
PROXYPORT=33433
NET=10.231.0
CNET=10.232.0
NAMESPACES=(dnx-cl dnx-n1 dnx-n2 dnx-n3 dnx-db dnx-sw)
ADMIN=adm-partition-0123456789abcdef0123
export DISPATCH_PG_DIR=/tmp/dnx-partition-pg DISPATCH_PG_PORT=$PGPORT
export DISPATCH_PG_LISTEN=$NET.10 DISPATCH_PG_HBA=$NET.0/24

say() { echo "partition.sh [$(($(date +%s) - started)) s] $*"; }
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

work=$(mktemp -d /tmp/dnx-partition.XXXXXX)
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
        echo "partition.sh: logs kept in $work"
    else
        rm -rf "$work"
    fi
    echo "partition.sh: $(($(date +%s) - started)) s, exit $rc"
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
for i in 1 2 3; do
    plug "dnx-n$i" c0 "$NET.$i" dnx-sw br0 "vn$i"
    plug "dnx-n$i" k0 "$CNET.$i" dnx-cl br1 "vk$i"
done
cl() { ip netns exec dnx-cl "$@"; }
# In the background, `ip netns exec` itself (not a function's subshell) so that $! is the
# process the cleanup must stop.
CL=(ip netns exec dnx-cl)
say "namespaces ${NAMESPACES[*]}: cluster network $NET.0/24 (bridge in dnx-sw), client network $CNET.0/24 (bridge in dnx-cl)"

# --- PostgreSQL in dnx-db -------------------------------------------------------------
ip netns exec dnx-db bash .ci/postgres.sh start
# The nodes reach it through .ci/delay_proxy.py (in dnx-db too), which delays what it
# carries while $work/delay-on exists: the delay of phase 1 where netem is missing.
ip netns exec dnx-db python3 .ci/delay_proxy.py "$NET.10:$PROXYPORT" "$NET.10:$PGPORT" "$work/delay-on" 50 20 \
    >"$work/proxy.txt" 2>&1 &
bg+=("$!")
url="postgres://dispatch:dispatch@$NET.10:$PROXYPORT/postgres"
wait_until 10 "n1 reaches PostgreSQL through the proxy" ip netns exec dnx-n1 timeout 5 bash -c "</dev/tcp/$NET.10/$PROXYPORT"
if cl timeout 2 bash -c "</dev/tcp/$NET.10/$PGPORT" 2>/dev/null; then
    fail "the client network reaches the database: the namespaces leak"
fi

# --- the nodes ------------------------------------------------------------------------
printf 'partition-test-cookie-%s\n' "$RANDOM$RANDOM" >"$work/cookie"
peers="$NET.1:$CPORT,$NET.2:$CPORT,$NET.3:$CPORT"
start_node() { # I
    local i=$1
    ip netns exec "dnx-n$i" env DISPATCH_REGISTER_RATE_PER_S=1000000 DISPATCH_REGISTER_BURST=1000000 \
        DISPATCH_STORE=postgres DISPATCH_DATABASE_URL="$url" \
        "$BIN/dispatchd" --listen "$CNET.$i:$PORT" --data-dir "$work/n$i" --node-name "n$i" \
        --lease-ttl-ms "$TTL" --lease-renew-ms "$RENEW" --database-timeout-ms 2000 \
        --admin-token "$ADMIN" --cluster-listen "$NET.$i:$CPORT" --cluster-peers "$peers" \
        --cluster-cookie-file "$work/cookie" --cluster-heartbeat-ms 200 --cluster-peer-timeout-ms 1000 \
        --offer-timeout-ms 3000 --dispatch-deadline-ms 15000 --snapshot-interval-ms 200 \
        --shutdown-timeout-ms 3000 >>"$work/n$i.log" 2>&1 &
    pid[$i]=$!
}
get() { cl curl -s -m 2 "http://$CNET.$1:$PORT$2" || true; }
code() { cl curl -s -m 1 -o /dev/null -w '%{http_code}' "http://$CNET.$1:$PORT$2" 2>/dev/null || true; }
metric() { get "$1" /metrics | awk -v m="$2" '$1 == m { print $2 }'; }
members() { metric "$1" dispatch_cluster_members; }
ready() { [ "$(code "$1" /readyz)" = 200 ]; }
leaders() { for i in 1 2 3; do if ready "$i"; then echo "$i"; fi; done; }
all_members() { for i in 1 2 3; do [ "$(members "$i")" = 3 ] || return 1; done; }
standby_of_leader() { # I: I is a standby naming the one node that leads now (leadership
    # may move again under load: a new leader that cannot renew in time loses it too)
    local l
    l=$(leaders | grep -vx "$1" || true)
    [ -n "$l" ] && [ "$(echo "$l" | wc -l)" = 1 ] && standby_of "$1" "$l"
}
standby_of() { # I LEADER: I's /readyz names nLEADER as the lease's holder
    get "$1" /readyz | grep -q "standby: n$2 holds the lease"
}
one_leader_not() { # EXCEPT: exactly one node other than EXCEPT serves
    local l
    l=$(leaders | grep -vx "$1" || true)
    [ -n "$l" ] && [ "$(echo "$l" | wc -l)" = 1 ]
}

start_node 1
wait_until 60 "n1 ready" ready 1
start_node 2
start_node 3
wait_until 60 "n2 and n3 standing by, naming n1" eval 'standby_of 2 1 && standby_of 3 1'
wait_until 30 "membership of 3 on every node" all_members
say "n1 leads (epoch $(metric 1 dispatch_cluster_epoch)); n2, n3 stand by; membership 3 on each"

# --- load -----------------------------------------------------------------------------
urls="ws://$CNET.1:$PORT,ws://$CNET.2:$PORT,ws://$CNET.3:$PORT"
"${CL[@]}" "$BIN/loadgen" --url "$urls" --drivers 40 --riders 40 --request-rate 2 --radius-km 2 \
    --speed-mps 30 --decision-delay-ms 300-1500 --boarding-ms 2000-6000 --duration 60s --drain 25s \
    --reconnect --reconnect-for 40s --ack-log "$work/acks.jsonl" --quiet >"$work/loadgen.txt" 2>&1 &
loadgen=$!
bg+=("$loadgen")
"${CL[@]}" python3 .ci/partition_probe.py run "http://$CNET.1:$PORT" "$work/probe-cut.jsonl" "$work/stop-cut" \
    >"$work/probe-cut.txt" 2>&1 &
bg+=("$!")
sleep 8
grep -q '"trip_update"' "$work/acks.jsonl" 2>/dev/null || say "(no trip_update acknowledged yet after 8 s)"

# --- 1. impaired but healthy links: no takeover ---------------------------------------
takeovers() {
    local n=0 v
    for i in 1 2 3; do
        v=$(metric "$i" dispatch_cluster_takeovers_total)
        n=$((n + ${v:-0}))
    done
    echo "$n"
}
psql_ms() { # one psql session (connect, SELECT 1) from dnx-n2, in ms
    local t
    t=$(now_ms)
    ip netns exec dnx-n2 psql "$url" -qAt -c 'SELECT 1' >/dev/null
    echo $(($(now_ms) - t))
}
before=$(takeovers)
fast=$(psql_ms)
impaired=()
if tc -n dnx-n1 qdisc add dev c0 root netem delay 50ms 20ms loss 1% 2>/dev/null; then
    how="netem delay 50 ms +- 20 ms, loss 1% (each direction)"
    impaired+=("dnx-n1")
    for ns in dnx-n2 dnx-n3 dnx-db; do
        tc -n "$ns" qdisc add dev c0 root netem delay 50ms 20ms loss 1%
        impaired+=("$ns")
    done
else
    how="50 ms +- 20 ms each way on the database's connections (.ci/delay_proxy.py) and 1% random loss each way by iptables on every cluster link (this kernel has no sch_netem)"
    touch "$work/delay-on"
    for ns in dnx-n1 dnx-n2 dnx-n3 dnx-db; do
        for chain in "INPUT -i c0" "OUTPUT -o c0"; do
            # shellcheck disable=SC2086
            ip netns exec "$ns" iptables-legacy -A $chain -m statistic --mode random --probability 0.01 -j DROP
        done
        impaired+=("$ns")
    done
fi
say "phase 1: every cluster link impaired for 12 s: $how"
slow=$(psql_ms)
sleep 12
rm -f "$work/delay-on"
for ns in "${impaired[@]}"; do
    tc -n "$ns" qdisc del dev c0 root 2>/dev/null || true
    ip netns exec "$ns" iptables-legacy -F 2>/dev/null || true
done
after=$(takeovers)
[ "$after" = "$before" ] || fail "takeovers went from $before to $after on links that were slow but up"
[ "$(code 1 /readyz)" = 200 ] || fail "n1 stopped leading on impaired links"
say "phase 1: no takeover (takeovers counted: $before before, $after after); n1 still leads; a psql session from dnx-n2 took $fast ms before, $slow ms impaired"

# --- 2. the cut -----------------------------------------------------------------------
old_epoch=$(metric 1 dispatch_cluster_epoch)
ip -n dnx-sw link set vn1 nomaster
t_cut=$(now_ms)
say "phase 2: n1's cluster link unplugged (its client link stays up); lease $TTL ms"
wait_until 30 "another node takes over from the cut n1" one_leader_not 1
took=$(($(now_ms) - t_cut))
new=$(leaders | grep -vx 1)
new_epoch=$(metric "$new" dispatch_cluster_epoch)
[ "$(metric "$new" dispatch_cluster_leader)" = 1 ] || fail "n$new is ready but dispatch_cluster_leader is not 1"
[ "$new_epoch" -gt "$old_epoch" ] || fail "the epoch went from $old_epoch to $new_epoch"
say "phase 2: n$new leads ${took} ms after the cut (epoch $old_epoch -> $new_epoch)"
sleep_until() { local d=$(($1 - $(now_ms))); [ $d -le 0 ] || sleep "$(awk -v d="$d" 'BEGIN { print d / 1000 }')"; }
sleep_until $((t_cut + 3 * TTL))
cl python3 .ci/partition_probe.py check "$work/probe-cut.jsonl" $((t_cut + TTL)) \
    "phase 2 probe on n1 (bound: cut + lease)" --closed || fail "the cut node answered after its lease"
n1_ready=$(code 1 /readyz)
n1_leader=$(metric 1 dispatch_cluster_leader)
{ [ "$n1_ready" = 503 ] && [ "$n1_leader" = 0 ]; } ||
    fail "3 leases into the cut, n1 answers /readyz $n1_ready with dispatch_cluster_leader '$n1_leader'"
say "phase 2: 3 leases into the cut n1 is a standby (/readyz 503: $(get 1 /readyz | head -c 160)); it counts $(members 1) member(s)"
ip -n dnx-sw link set vn1 master br0
t_heal=$(now_ms)
wait_until 30 "n1 back as a standby naming the leader" standby_of_leader 1
[ "$(leaders)" = "$new" ] || say "phase 2: (the lease moved on meanwhile: n$(leaders) leads now)"
new=$(leaders)
wait_until 30 "membership of 3 on every node after the heal" all_members
say "phase 2: healed; n1 is a standby naming n$new and every node counts 3 members $(($(now_ms) - t_heal)) ms after the heal"
touch "$work/stop-cut"

# --- 3. SIGSTOP past the lease --------------------------------------------------------
paused=$new
"${CL[@]}" python3 .ci/partition_probe.py run "http://$CNET.$paused:$PORT" "$work/probe-pause.jsonl" "$work/stop-pause" --once \
    >"$work/probe-pause.txt" 2>&1 &
bg+=("$!")
wait_until 30 "the pause probe answered by n$paused" grep -qs '"kind": "frame"' "$work/probe-pause.jsonl"
probe_token=$(cl curl -s -m 2 -X POST -H 'content-type: application/json' -d '{"name": "Pause probe", "phone": "+15145550101"}' \
    "http://$CNET.$paused:$PORT/v1/riders")
rider2=$(echo "$probe_token" | python3 -c 'import json, sys; print(json.load(sys.stdin)["rider_id"])')
token2=$(echo "$probe_token" | python3 -c 'import json, sys; print(json.load(sys.stdin)["token"])')
# A session opened now, to ask for a ride once the node is stopped: with fencing, that
# trip can never reach the store.
"${CL[@]}" python3 .ci/partition_probe.py ride "http://$CNET.$paused:$PORT" "$token2" "$work/go-ride" "$work/ride.jsonl" \
    >"$work/ride.txt" 2>&1 &
bg+=("$!")
wait_until 30 "the ride probe's session on n$paused" grep -qs '"welcome"' "$work/ride.jsonl"
fenced_before=$(metric "$paused" dispatch_cluster_fenced_commits_total)
kill -STOP "${pid[$paused]}"
stopped() { ! grep -L '^State:.*T' /proc/"${pid[$paused]}"/task/*/status | grep -q .; }
wait_until 10 "every thread of n$paused stopped" stopped
t_stop=$(now_ms)
say "phase 3: n$paused (the leader) stopped"
touch "$work/go-ride"
wait_until 30 "another node takes over from the stopped n$paused" one_leader_not "$paused"
took_pause=$(($(now_ms) - t_stop))
next=$(leaders | grep -vx "$paused")
sleep_until $((t_stop + 2 * TTL))
kill -CONT "${pid[$paused]}"
t_cont=$(now_ms)
say "phase 3: n$next leads ${took_pause} ms after the stop; n$paused continued $((t_cont - t_stop)) ms after it stopped"
wait_until 30 "n$paused a standby naming the leader after SIGCONT" standby_of_leader "$paused"
[ "$(leaders)" = "$next" ] || say "phase 3: (the lease moved on meanwhile: n$(leaders) leads now)"
next=$(leaders)
wait_until 30 "membership of 3 on every node after SIGCONT" all_members
fenced_after=$(metric "$paused" dispatch_cluster_fenced_commits_total)
say "phase 3: n$paused woke a standby naming n$next; membership 3; its commits refused by the fence: ${fenced_before:-0} -> ${fenced_after:-0}"
touch "$work/stop-pause"
sleep 1
cl python3 .ci/partition_probe.py check "$work/probe-pause.jsonl" "$t_stop" \
    "phase 3 probe on n$paused (bound: the stop)" --closed || fail "the paused node answered after it was stopped"

told=$(grep -c '"kind": "frame"' "$work/ride.jsonl" || true)
[ "$told" = 0 ] || fail "the ride requested of the stopped n$paused was answered: $(grep '"frame"' "$work/ride.jsonl" | head -3)"

# --- 4. the store after all of it -----------------------------------------------------
say "waiting for loadgen to finish"
wait "$loadgen" || say "loadgen exited $?"
grep -E "trips|requests|errors|reconnect|first offer" "$work/loadgen.txt" | head -20 || true
kill -TERM "${pid[$next]}"
wait "${pid[$next]}" || true
unset "pid[$next]"
wait_until 30 "a node takes over after n$next's SIGTERM" one_leader_not "$next"
final=$(leaders | grep -vx "$next")
say "phase 4: n$next stopped (SIGTERM), n$final leads, recovered from the store"
trips_of_probe=$(cl curl -s -m 5 -H "authorization: Bearer $ADMIN" "http://$CNET.$final:$PORT/admin/trips?rider_id=$rider2" |
    python3 -c 'import json, sys; print(len(json.load(sys.stdin)["trips"]))')
[ "$trips_of_probe" = 0 ] ||
    fail "the ride requested of n$paused while it was stopped is in the store ($trips_of_probe trips): a write with its old epoch"
cl python3 bench/ackcheck.py "http://$CNET.$final:$PORT" "$ADMIN" "$work/acks.jsonl" ||
    fail "the store does not hold what the clients were told"
say "PASS: takeover after the cut ${took} ms, after SIGSTOP ${took_pause} ms (lease $TTL ms, renewals every $RENEW ms)"
