#!/usr/bin/env bash
# The operator's console (issue 18): the vendored Leaflet matches its lock, the page's
# own logic passes its unit tests (vitest), and the browser test drives Debian's Chromium
# through Selenium against a real dispatchd (tests/console/console_test.py).
#
#   bash .ci/console.sh
#
# Runs on a clean clone as root on Debian; installs what it needs itself: Debian's
# chromium and chromium-driver, the console's npm packages (transport/console/
# package-lock.json, into transport/console/node_modules, which git ignores) and the
# test's PyPI packages (tests/console/requirements.txt) into a cache directory
# ($XDG_CACHE_HOME or ~/.cache, /dispatchd-console). Idempotent. Screenshots go to
# $CONSOLE_SHOTS (default: target/console-shots) and are kept when the test fails.
set -euo pipefail
cd "$(dirname "$0")/.."
began=$(date +%s)
export CARGO_TERM_COLOR=never CARGO_INCREMENTAL=0 CARGO_PROFILE_DEV_DEBUG=line-tables-only
step() { echo "== console: $* ($(($(date +%s) - began)) s)"; }
venv="${XDG_CACHE_HOME:-$HOME/.cache}/dispatchd-console/venv"

step "Debian's chromium and chromium-driver"
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq chromium chromium-driver >/dev/null
fi
/usr/bin/chromium --version
/usr/bin/chromedriver --version

step "npm packages (pinned) and the vendored Leaflet against its lock"
(cd transport/console && npm ci --no-audit --no-fund --loglevel=error)
bash transport/console/vendor.sh --check

step "the page's own logic: vitest"
(cd transport/console && npx --no-install vitest run)

step "Python packages (pinned)"
[ -x "$venv/bin/python" ] || { mkdir -p "$(dirname "$venv")" && python3 -m venv "$venv"; }
"$venv/bin/pip" install --quiet --disable-pip-version-check -r tests/console/requirements.txt

step "build dispatchd"
cargo build --locked -p dispatch-transport --bin dispatchd
target="${CARGO_TARGET_DIR:-target}"

step "the browser test"
shots="${CONSOLE_SHOTS:-$target/console-shots}"
"$venv/bin/python" tests/console/console_test.py --dispatchd "$target/debug/dispatchd" --out "$shots"

step "done"
