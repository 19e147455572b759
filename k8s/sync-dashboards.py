#!/usr/bin/env python3
"""Keeps k8s/base/dashboards/ an exact copy of the Grafana dashboards and alert rules in
dashboards/, the one source (edit there, never here).

kustomize only reads files inside a kustomization's own directory tree unless given
`--load-restrictor LoadRestrictionsNone`, a flag `kubectl apply -k` does not have. So the
base's ConfigMap generators read this copy, and CI fails when it differs from dashboards/.

    python3 k8s/sync-dashboards.py           # write the copy (after editing dashboards/)
    python3 k8s/sync-dashboards.py --check   # exit 1, naming the files, if it differs

The copy is every dashboards/*.json and dashboards/alerts.yml, byte for byte, and nothing
else. Standard library only.
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "dashboards"
COPY = ROOT / "k8s" / "base" / "dashboards"


def wanted() -> dict[str, bytes]:
    files = sorted(SOURCE.glob("*.json")) + [SOURCE / "alerts.yml"]
    return {f.name: f.read_bytes() for f in files}


def differences(want: dict[str, bytes]) -> list[str]:
    have = {f.name: f for f in COPY.iterdir()} if COPY.is_dir() else {}
    out = []
    for name, data in want.items():
        if name not in have:
            out.append(f"missing: k8s/base/dashboards/{name}")
        elif have[name].read_bytes() != data:
            out.append(f"differs from dashboards/{name}: k8s/base/dashboards/{name}")
    out += [f"not in dashboards/: k8s/base/dashboards/{n}" for n in sorted(set(have) - set(want))]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if the copy differs")
    args = ap.parse_args()
    want = wanted()
    diff = differences(want)
    if args.check:
        for d in diff:
            print(f"  {d}")
        if diff:
            print(f"k8s/base/dashboards/ differs from dashboards/ ({len(diff)} files): "
                  "run `python3 k8s/sync-dashboards.py` and commit the copy")
            return 1
        print(f"k8s/base/dashboards/ is identical to dashboards/ ({len(want)} files)")
        return 0
    COPY.mkdir(exist_ok=True)
    for f in COPY.iterdir():
        if f.name not in want:
            f.unlink()
    for name, data in want.items():
        (COPY / name).write_bytes(data)
    print(f"k8s/base/dashboards/: {len(want)} files written" + (f" ({len(diff)} changed)" if diff else " (none changed)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
