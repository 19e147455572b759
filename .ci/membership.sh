#!/usr/bin/env bash
# Issue 16, membership: the shard map's property tests, the cluster crate's unit tests,
# and 3 real dispatchd nodes on loopback (tests/tests/membership.rs: kill -9, SIGSTOP,
# a wrong cookie, garbage on the cluster port). `cargo test --workspace` runs the same
# tests; this runs them alone. Needs only cargo; idempotent; prints its time.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
cargo test --locked -p dispatch-engine --lib shard
cargo test --locked -p dispatch-cluster
cargo test --locked -p dispatch-tests --test membership -- --nocapture
echo "membership.sh: $(( $(date +%s) - start )) s"
