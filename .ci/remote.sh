#!/usr/bin/env bash
# Issue 16, stage 3, messages between nodes (actors/src/remote.rs): the remote forms' unit
# tests, and two real membership nodes linked over loopback TCP in one test process, each
# with its own system and router (actors/tests/remote.rs: every message kind, a call that
# times out, malformed and unknown-version frames, the in-flight bounds). `cargo test
# --workspace` runs the same tests; this runs them alone. Needs only cargo and loopback
# ports 29511-29552; idempotent; prints its time.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
cargo test --locked -p dispatch-actors --lib remote
cargo test --locked -p dispatch-actors --test remote
echo "remote.sh: $(( $(date +%s) - start )) s"
