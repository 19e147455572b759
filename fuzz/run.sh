#!/usr/bin/env bash
# Fuzzes every cargo-fuzz target for a bounded time, for CI: bash fuzz/run.sh [SECONDS]
# (60 per target by default). Fails, printing the crashing input, if a target finds one.
#
# - Installs cargo-fuzz (pinned) when it is missing.
# - Toolchain: nightly when rustup has one, else the default (stable) toolchain with
#   RUSTC_BOOTSTRAP=1 for the unstable flags cargo-fuzz passes. FUZZ_TOOLCHAIN=nightly or
#   FUZZ_TOOLCHAIN=stable forces one.
# - Sanitizer: none by default (FUZZ_SANITIZER=address for ASan, which works on both
#   toolchains): the fuzzed code is safe Rust, where ASan finds little, and without it the
#   targets run 3 to 4 times as many inputs in the same time (fuzz/README.md).
# - The committed corpus (fuzz/corpus/<target>/) and the saved crashes
#   (fuzz/regressions/<target>/) are read as seeds, never written: new inputs go to a
#   temporary directory. Build output is fuzz/target/ (gitignored), crashes are written
#   to fuzz/artifacts/<target>/ (gitignored) and printed.
set -euo pipefail
cd "$(dirname "$0")/.."

secs="${1:-60}"
CARGO_FUZZ_VERSION=0.13.2
TARGETS=(wire_decode trip_machine)
sanitizer="${FUZZ_SANITIZER:-none}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

t_start=$(date +%s)
stamp() { echo "   ($(($(date +%s) - t_start)) s since start)"; }

echo "== cargo-fuzz $CARGO_FUZZ_VERSION"
if ! cargo fuzz --version 2>/dev/null | grep -qF "$CARGO_FUZZ_VERSION"; then
  cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked --force
fi
cargo fuzz --version
stamp

toolchain="${FUZZ_TOOLCHAIN:-}"
if [ -z "$toolchain" ]; then
  if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    toolchain=nightly
  else
    toolchain=stable
  fi
fi
case "$toolchain" in
  nightly) cargo=(cargo +nightly) ;;
  stable)
    # cargo-fuzz's flags are nightly-only (-Zsanitizer); this unlocks them on stable.
    export RUSTC_BOOTSTRAP=1
    cargo=(cargo)
    ;;
  *) echo "FUZZ_TOOLCHAIN must be nightly or stable, not $toolchain" >&2; exit 2 ;;
esac
# -a: debug assertions and overflow checks on, as in `cargo test` (the engine checks its
# trip invariants with debug_assert).
fuzz_opts=(-a --sanitizer "$sanitizer")
echo "== toolchain: $toolchain ($("${cargo[@]}" --version)), sanitizer: $sanitizer${RUSTC_BOOTSTRAP:+, RUSTC_BOOTSTRAP=1}"

echo "== build (${TARGETS[*]})"
"${cargo[@]}" fuzz build "${fuzz_opts[@]}"
stamp

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
failed=()
for t in "${TARGETS[@]}"; do
  echo "== fuzz $t for ${secs} s"
  mkdir -p "$tmp/$t"
  args=(-max_total_time="$secs" -timeout=10 -print_final_stats=1)
  if [ -f "fuzz/$t.dict" ]; then
    args+=(-dict="fuzz/$t.dict")
  fi
  log="$tmp/$t.log"
  if "${cargo[@]}" fuzz run "${fuzz_opts[@]}" "$t" "$tmp/$t" "fuzz/corpus/$t" "fuzz/regressions/$t" \
    -- "${args[@]}" >"$log" 2>&1; then
    # libFuzzer's summary: the seed corpus, coverage at start and end, executions per second.
    grep -E '^INFO: seed corpus|INITED|DONE|^stat::' "$log" || true
    echo "   new inputs this run: $(find "$tmp/$t" -type f | wc -l) (not kept)"
  else
    failed+=("$t")
    echo "!! $t FAILED; the end of its output:"
    tail -n 80 "$log"
    artifact="$(sed -n 's/.*Test unit written to \(\S*\).*/\1/p' "$log" | tail -n 1)"
    if [ -n "$artifact" ] && [ -f "$artifact" ]; then
      echo "!! the input ($artifact, $(wc -c <"$artifact") bytes), as base64:"
      base64 -w 76 "$artifact"
      echo "!! minimise it with:   ${RUSTC_BOOTSTRAP:+RUSTC_BOOTSTRAP=1 }${cargo[*]} fuzz tmin ${fuzz_opts[*]} $t $artifact"
      echo "!! and save it as a regression test: fuzz/regressions/$t/<name> (fuzz/README.md)"
    fi
  fi
  stamp
done

if [ "${#failed[@]}" -ne 0 ]; then
  echo "fuzz: FAILED: ${failed[*]}"
  exit 1
fi
echo "fuzz: ${#TARGETS[@]} targets, ${secs} s each, no crash"
