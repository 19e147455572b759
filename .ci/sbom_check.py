#!/usr/bin/env python3
"""Checks a CycloneDX SBOM of the dispatchd binary (made by cargo-cyclonedx in
.ci/platform.sh):

1. it is valid against the CycloneDX 1.5 JSON schema, strictly (no unknown fields), with
   the schemas that PyPI's cyclonedx-python-lib ships (offline);
2. it describes the dispatchd binary;
3. every component is a package of Cargo.lock at that version, and every crate that
   `cargo tree` says the binary's crate needs (normal and build dependencies, this host)
   is a component: nothing invented, nothing left out.

    python3 .ci/sbom_check.py SBOM.json
"""

import json
import subprocess
import sys
import tomllib
from pathlib import Path

from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator

ROOT = Path(__file__).resolve().parent.parent
CRATE = "dispatch-transport"
BINARY = "dispatchd"


def walk(components):
    for c in components:
        yield c
        yield from walk(c.get("components", []))


def main() -> int:
    path = Path(sys.argv[1])
    text = path.read_text()
    failures = []

    error = JsonStrictValidator(SchemaVersion.V1_5).validate_str(text)
    if error is not None:
        failures.append(f"not valid against the CycloneDX 1.5 JSON schema: {str(error)[:2000]}")
    bom = json.loads(text)
    top = bom.get("metadata", {}).get("component", {})
    if top.get("name") != BINARY:
        failures.append(f"metadata.component is {top.get('name')!r}, want {BINARY!r}")

    lock = {(p["name"], p["version"]) for p in tomllib.loads((ROOT / "Cargo.lock").read_text())["package"]}
    listed = {(c["name"], c["version"]) for c in walk(bom.get("components", []))}
    invented = sorted(listed - lock)
    if invented:
        failures.append(f"components not in Cargo.lock: {invented[:20]}")
    tree = subprocess.run(
        ["cargo", "tree", "--locked", "--offline", "-p", CRATE, "--edges", "normal,build",
         "--prefix", "none", "--format", "{p}"],
        cwd=ROOT, capture_output=True, text=True, check=True).stdout
    needed = set()
    for line in tree.splitlines():
        name, version = line.split()[:2]
        if name != CRATE:
            needed.add((name, version.removeprefix("v")))
    missing = sorted(needed - listed)
    if missing:
        failures.append(f"crates the binary needs (cargo tree) missing from the SBOM: {missing[:20]}")

    for f in failures:
        print(f"FAIL {f}")
    print(f"sbom: {path.name}: CycloneDX {bom.get('specVersion')}, {len(listed)} components "
          f"({len(needed)} in cargo tree), {len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
