#!/usr/bin/env python3
"""Checks loadgen ack logs against a leader's store (issue 16; bench/failover.sh and
.ci/partition.sh).

  ackcheck.py BASE ADMIN_TOKEN ACKLOG [ACKLOG...]

1. Every `trip_update` a client was told (trip, version, state) is in that trip's history
   in the store (`GET /admin/trips/{id}`): nothing acknowledged was lost.
2. Every trip's history has versions 1..n, each once: no trip in two states.
3. No trip with two drivers: between a move to `driver_assigned` and the trip's return to
   `dispatching` (or its end), every driver move is by the driver who accepted, and no
   second driver accepts.
4. No driver in two trips: the times each driver held a trip (its accept to the trip's
   release or end, by the store's `at`) never overlap across trips.
Exit 1 on any violation (each printed, the first 20).
"""

import json
import sys
import urllib.request
from collections import defaultdict
from datetime import datetime

HELD = {"driver_assigned", "driver_arrived", "in_progress"}


def get(base, token, path):
    req = urllib.request.Request(base + path, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


def ms(at):
    return datetime.fromisoformat(at.replace("Z", "+00:00")).timestamp() * 1000


def all_trip_ids(base, token):
    ids, cursor = [], None
    while True:
        page = get(base, token, "/admin/trips?limit=1000" + (f"&cursor={cursor}" if cursor else ""))
        ids += [t["trip_id"] for t in page["trips"]]
        cursor = page.get("next_cursor")
        if not cursor:
            return ids


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    base, token, logs = sys.argv[1], sys.argv[2], sys.argv[3:]
    seen = defaultdict(dict)
    for log in logs:
        for line in open(log):
            e = json.loads(line)
            if e.get("kind") == "trip_update":
                seen[e["trip_id"]][e["version"]] = e["state"]
    problems = []
    trips = set(all_trip_ids(base, token)) | set(seen)
    held = defaultdict(list)  # driver -> [(from_ms, to_ms, trip)]
    for trip in sorted(trips):
        t = get(base, token, f"/admin/trips/{trip}")
        history = sorted(t["history"], key=lambda h: h["version"])
        versions = [h["version"] for h in history]
        if versions != list(range(1, len(versions) + 1)):
            problems.append(f"trip {trip}: versions {versions} are not 1..n, each once")
        by_version = {h["version"]: h["to"] for h in history}
        for v, state in seen.get(trip, {}).items():
            if by_version.get(v) != state:
                problems.append(f"trip {trip}: told v{v} {state}, the store has {by_version.get(v)}")
        driver, since = None, None
        for h in history:
            d = h.get("driver_id")
            if h["to"] == "driver_assigned" and h.get("from") != "driver_assigned":
                if driver is not None:
                    problems.append(f"trip {trip}: {d} accepted v{h['version']} while {driver} held it")
                driver, since = d, ms(h["at"])
            elif d is not None and driver is not None and d != driver:
                problems.append(f"trip {trip}: {d} moved v{h['version']} while {driver} held it")
            if h["to"] not in HELD and driver is not None:
                held[driver].append((since, ms(h["at"]), trip))
                driver = None
        if driver is not None:
            held[driver].append((since, float("inf"), trip))
    for driver, spans in held.items():
        spans.sort()
        for (a0, a1, ta), (b0, b1, tb) in zip(spans, spans[1:]):
            if b0 < a1:
                problems.append(f"driver {driver} held {ta} and {tb} at once")
    told = sum(len(v) for v in seen.values())
    print(f"ackcheck: {told} trip versions of {len(seen)} trips acknowledged to clients, "
          f"{len(trips)} trips in the store, {sum(len(s) for s in held.values())} driver holds; "
          f"{len(problems)} problems")
    for p in problems[:20]:
        print("   ", p)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
