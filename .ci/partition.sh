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
# The namespaces, PostgreSQL and the cleanup are .ci/netns.sh's (shared with
# .ci/partition-sharded.sh, the same cases in sharded mode). Installs what it lacks
# (iproute2, iptables, curl, PostgreSQL, websockets from PyPI). Ports 33080 (clients),
# 33090 (cluster), 33432 (PostgreSQL), 33433 (its delay proxy). Everything it creates is
# removed on exit, failure included. Prints its duration.
set -euo pipefail
cd "$(dirname "$0")/.."
# A 4 s lease: 2 s (the failover test's) ended terms on the impaired links of phase 1 on
# a loaded machine (a renewal waits for the commit that holds the lease row FOR SHARE,
# several 100 ms round trips long there).
TTL=${LEASE_TTL_MS:-4000}
RENEW=${LEASE_RENEW_MS:-800}
# Leader mode, said: sharded is dispatchd's default (.ci/partition-sharded.sh runs it).
NODE_FLAGS=(--cluster-mode leader)
# The namespaces, PostgreSQL, the cleanup and the helpers (start_node, metric, ...).
# shellcheck source=netns.sh
source .ci/netns.sh

leaders() { for i in 1 2 3; do if ready "$i"; then echo "$i"; fi; done; }
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
wait_until 30 "membership of 3 on every node" all_members 3 1 2 3
say "n1 leads (epoch $(metric 1 dispatch_cluster_epoch)); n2, n3 stand by; membership 3 on each"

# --- load -----------------------------------------------------------------------------
load_and_cut_probe 60s

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
cut 1
t_cut=$(now_ms)
say "phase 2: n1's cluster link unplugged (its client link stays up); lease $TTL ms"
wait_until 30 "another node takes over from the cut n1" one_leader_not 1
took=$(($(now_ms) - t_cut))
new=$(leaders | grep -vx 1)
new_epoch=$(metric "$new" dispatch_cluster_epoch)
[ "$(metric "$new" dispatch_cluster_leader)" = 1 ] || fail "n$new is ready but dispatch_cluster_leader is not 1"
[ "$new_epoch" -gt "$old_epoch" ] || fail "the epoch went from $old_epoch to $new_epoch"
say "phase 2: n$new leads ${took} ms after the cut (epoch $old_epoch -> $new_epoch)"
sleep_until $((t_cut + 3 * TTL))
cl python3 .ci/partition_probe.py check "$work/probe-cut.jsonl" $((t_cut + TTL)) \
    "phase 2 probe on n1 (bound: cut + lease)" --closed || fail "the cut node answered after its lease"
n1_ready=$(code 1 /readyz)
n1_leader=$(metric 1 dispatch_cluster_leader)
{ [ "$n1_ready" = 503 ] && [ "$n1_leader" = 0 ]; } ||
    fail "3 leases into the cut, n1 answers /readyz $n1_ready with dispatch_cluster_leader '$n1_leader'"
say "phase 2: 3 leases into the cut n1 is a standby (/readyz 503: $(get 1 /readyz | head -c 160)); it counts $(members 1) member(s)"
heal 1
t_heal=$(now_ms)
wait_until 30 "n1 back as a standby naming the leader" standby_of_leader 1
[ "$(leaders)" = "$new" ] || say "phase 2: (the lease moved on meanwhile: n$(leaders) leads now)"
new=$(leaders)
wait_until 30 "membership of 3 on every node after the heal" all_members 3 1 2 3
say "phase 2: healed; n1 is a standby naming n$new and every node counts 3 members $(($(now_ms) - t_heal)) ms after the heal"
touch "$work/stop-cut"

# --- 3. SIGSTOP past the lease --------------------------------------------------------
paused=$new
pause_probes "$paused"
fenced_before=$(metric "$paused" dispatch_cluster_fenced_commits_total)
kill -STOP "${pid[$paused]}"
wait_until 10 "every thread of n$paused stopped" stopped "${pid[$paused]}"
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
wait_until 30 "membership of 3 on every node after SIGCONT" all_members 3 1 2 3
fenced_after=$(metric "$paused" dispatch_cluster_fenced_commits_total)
say "phase 3: n$paused woke a standby naming n$next; membership 3; its commits refused by the fence: ${fenced_before:-0} -> ${fenced_after:-0}"
touch "$work/stop-pause"
sleep 1
cl python3 .ci/partition_probe.py check "$work/probe-pause.jsonl" "$t_stop" \
    "phase 3 probe on n$paused (bound: the stop)" --closed || fail "the paused node answered after it was stopped"


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
ride_untold "$paused" "$final"
cl python3 bench/ackcheck.py "http://$CNET.$final:$PORT" "$ADMIN" "$work/acks.jsonl" ||
    fail "the store does not hold what the clients were told"
say "PASS: takeover after the cut ${took} ms, after SIGSTOP ${took_pause} ms (lease $TTL ms, renewals every $RENEW ms)"
