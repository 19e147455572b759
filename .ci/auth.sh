#!/usr/bin/env bash
# Issue 19 part 5 ("Who gets in"): tests/tests/jwt.rs makes its RSA and EC keys with the
# `openssl` command. Debian images usually carry it; this installs Debian's package when
# it is missing. Run before `cargo test --workspace` (which runs tests/tests/jwt.rs and
# tests/tests/ratelimit.rs). Idempotent; prints its time.
set -euo pipefail
start=$(date +%s)
if ! command -v openssl >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openssl >/dev/null
fi
openssl version
echo "auth.sh: $(( $(date +%s) - start )) s"
