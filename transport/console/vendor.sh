#!/usr/bin/env bash
# The console's map library, Leaflet, is vendored (served from the binary, no CDN): its
# version is pinned in package.json and package-lock.json, and vendor/leaflet/ holds the
# files the page loads, copied from node_modules by this script.
#   vendor.sh          refresh vendor/leaflet/ from node_modules (after `npm ci`)
#   vendor.sh --check  fail when vendor/leaflet/ differs from what the lock installs
set -euo pipefail
cd "$(dirname "$0")"
FILES=(dist/leaflet.js dist/leaflet.css LICENSE package.json)
[ -d node_modules/leaflet ] || npm ci --no-audit --no-fund >/dev/null
locked=$(node -e 'console.log(require("./package-lock.json").packages["node_modules/leaflet"].version)')
installed=$(node -e 'console.log(require("./node_modules/leaflet/package.json").version)')
if [ "$locked" != "$installed" ]; then
  echo "node_modules has leaflet $installed, the lock pins $locked: run npm ci" >&2
  exit 1
fi
if [ "${1:-}" = "--check" ]; then
  status=0
  for f in "${FILES[@]}"; do
    if ! cmp -s "node_modules/leaflet/$f" "vendor/leaflet/$(basename "$f")"; then
      echo "vendor/leaflet/$(basename "$f") differs from leaflet $locked's $f: run transport/console/vendor.sh" >&2
      status=1
    fi
  done
  [ $status = 0 ] && echo "vendor/leaflet matches leaflet $locked in package-lock.json"
  exit $status
fi
mkdir -p vendor/leaflet
for f in "${FILES[@]}"; do
  cp "node_modules/leaflet/$f" "vendor/leaflet/$(basename "$f")"
done
echo "vendor/leaflet refreshed from leaflet $locked"
