#!/usr/bin/env bash
# Issue 17: the batched-matching study's headline, checked on the replayed Manhattan day.
# Runs after `cargo test --workspace` (which builds the debug `replay` binary and runs the
# one-hour replay test, the assignment's property test and both modes of the seeded
# simulation and of tests/tests/batch.rs). Here the whole day runs once in each of greedy
# and batched matching (5 s windows) at 900 drivers, seed 1 (deterministic): batched must
# serve at least as many requests and cut the mean pickup time by at least 10%, as the
# README's table says. Idempotent; needs only cargo and python3; prints its time.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
cargo run --quiet --locked -p dispatch-loadgen --bin replay -- --drivers 900 --seed 1 \
  --matching greedy,batch --match-window-ms 5000 --markdown --markdown-header --json "$out/day.json"
python3 - "$out/day.json" <<'PY'
import json, sys
greedy, batch = json.load(open(sys.argv[1]))
g, b = greedy["day"], batch["day"]
cut = 1 - b["pickup_s"]["mean"] / g["pickup_s"]["mean"]
print(f"batch 5 s against greedy: served {b['served_pct']}% vs {g['served_pct']}%, "
      f"mean pickup {b['pickup_s']['mean']} s vs {g['pickup_s']['mean']} s ({cut:.1%} shorter)")
assert b["served"] >= g["served"], "batched matching served fewer requests"
assert cut >= 0.10, f"batched matching cut the mean pickup by only {cut:.1%}"
PY
echo "batch.sh: $(( $(date +%s) - start )) s"
