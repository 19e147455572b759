#!/usr/bin/env bash
# Where a connected client's memory goes (issue 14): dispatchd built without mimalloc
# (`--cfg dispatch_system_alloc`, so heaptrack sees every allocation) runs under heaptrack
# while loadgen connects DRIVERS drivers and RIDERS riders (pings every 4 s, RATE rides a
# second) for DURATION; then the peak heap is split by owner (bench/heap_owners.py).
#
#   bash bench/heap.sh [OUT_DIR]      # DRIVERS=5000 RIDERS=500 RATE=10 DURATION=40s
#
# Needs heaptrack (Debian's `heaptrack`). Heap only: thread stacks, the kernel's socket
# buffers and the allocator's slack are not in it (RSS per client is loadgen's capacity
# report, bench/capacity.sh). Builds into target/heap (or $HEAP_TARGET).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-$(mktemp -d)}
mkdir -p "$out"
drivers=${DRIVERS:-5000} riders=${RIDERS:-500} rate=${RATE:-10} duration=${DURATION:-40s}
port=${PORT:-18291}
command -v heaptrack >/dev/null || apt-get -o DPkg::Lock::Timeout=600 install -y heaptrack
export CARGO_TARGET_DIR=${HEAP_TARGET:-target/heap} CARGO_PROFILE_RELEASE_DEBUG=line-tables-only
RUSTFLAGS="--cfg dispatch_system_alloc" cargo build --release --locked --bin dispatchd --bin loadgen
ulimit -n 20000 2>/dev/null || true
DISPATCH_REGISTER_RATE_PER_S=1000000 DISPATCH_REGISTER_BURST=1000000 \
  heaptrack -o "$out/heap" "$CARGO_TARGET_DIR"/release/dispatchd --listen "127.0.0.1:$port" \
  --admin-listen "127.0.0.1:$((port + 1))" --data-dir "$out/data" >"$out/server.log" 2>&1 &
wrapper=$!
trap 'pkill -f -- "--data-dir $out/data" 2>/dev/null || true' EXIT
for _ in $(seq 200); do
  curl -sf "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break
  sleep 0.5
done
timeout 600 "$CARGO_TARGET_DIR"/release/loadgen --url "ws://127.0.0.1:$port" --drivers "$drivers" \
  --riders "$riders" --request-rate "$rate" --duration "$duration" --drain 5s \
  --ping-interval-ms 4000 --time-scale 30 --demand-csv loadgen/data/montreal_carshare_zones.csv \
  --seed 1 --workers 1 --connect-concurrency 128 --quiet >"$out/loadgen.txt" 2>&1 ||
  echo "loadgen exited non-zero (see $out/loadgen.txt)" >&2
grep -E "clients:" "$out/loadgen.txt" || true
pkill -f -- "--data-dir $out/data" || true
wait "$wrapper" || true
heaptrack_print -f "$out/heap.zst" --flamegraph-cost-type peak -F "$out/peak.folded" >/dev/null
python3 bench/heap_owners.py "$out/peak.folded" "$((drivers + riders))"
