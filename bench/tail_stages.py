"""Reads one bench/tail.sh run's directory and prints where request -> offer's time went.

Per request (dispatchd's `request to offer` debug lines, target dispatch_actors::stages):
the mean time of each stage for the requests around the median, the slowest 1 % and the
slowest 0.1 % by their time in the server (session hand-off -> reservation at the driver),
and each stage's share of it. The session's two last stages (queue, socket write) are only
in the histograms: their p50/p99 from /metrics' buckets over the steady window. Then the
off-CPU side over the steady window: run-queue wait per dispatchd and loadgen thread group
(schedstat), CPU and I/O pressure, the store's group commit stages, and the client's view
(loadgen's request_to_offer).

    python3 bench/tail_stages.py RUN_DIR
"""

import json
import re
import sys
from collections import defaultdict

out = sys.argv[1]
TRIP_STAGES = ["rider_queue", "rider", "trip_spawn", "first_commit", "search", "decide",
               "offer_commit", "reserve"]

rows = []
with open(f"{out}/run.log", errors="replace") as f:
    for line in f:
        if "request to offer" not in line:
            continue
        try:
            e = json.loads(line)
        except ValueError:
            continue
        fields = e.get("fields", e)
        spent = dict(kv.split("=") for kv in str(fields.get("stages_us", "")).split())
        rows.append((int(fields["total_us"]), {k: int(v) for k, v in spent.items()}))
rows.sort(key=lambda r: r[0])
n = len(rows)
if not n:
    sys.exit(f"no 'request to offer' lines in {out}/run.log")


def group(lo, hi):
    """Requests whose rank is in [lo, hi) of n (fractions)."""
    a, b = int(lo * n), max(int(lo * n) + 1, int(hi * n))
    return rows[a:b]


def q(p):
    return rows[min(n - 1, int(p * n))][0] / 1000


groups = [("p45-p55", group(0.45, 0.55)), ("slowest 1%", group(0.99, 1.0)),
          ("slowest 0.1%", group(0.999, 1.0))]
print(f"{n} requests offered; time in the server (hand-off -> reserved): "
      f"p50 {q(0.5):.2f} ms, p99 {q(0.99):.2f} ms, p99.9 {q(0.999):.2f} ms, max {rows[-1][0] / 1000:.2f} ms")
print(f"{'stage':<14}" + "".join(f"{name + ' (' + str(len(g)) + ')':>26}" for name, g in groups))


def row(key, label):
    """One line of the table: `key`'s mean time and share of the time in each group."""
    cells = []
    for _, g in groups:
        mean = sum(r[1].get(key, 0) for r in g) / len(g) / 1000
        share = sum(r[1].get(key, 0) for r in g) / max(1, sum(r[0] for r in g))
        cells.append(f"{mean:9.3f} ms {100 * share:5.1f} %")
    print(label + "".join(f"{c:>26}" for c in cells))


for s in TRIP_STAGES:
    row(s, f"{s:<14}")
print(f"{'total':<14}" + "".join(
    f"{sum(r[0] for r in g) / len(g) / 1000:9.3f} ms {100:5.1f} %".rjust(26) for _, g in groups))
# The two awaited commits by part (queue wait, write, fsync, wake until the trip ran again).
for c in ["first", "offer"]:
    for part in ["queue", "write", "fsync", "wake"]:
        k = f"{c}_{part}"
        row(k, f"  {k:<12}")
# Which stage is the largest in each slow request: how often each stage owns the tail.
owners = defaultdict(int)
for _, spent in group(0.99, 1.0):
    trip = {k: v for k, v in spent.items() if k in TRIP_STAGES}
    owners[max(trip, key=trip.get)] += 1
print("largest stage in each of the slowest 1 %:",
      ", ".join(f"{k} {v}" for k, v in sorted(owners.items(), key=lambda kv: -kv[1])))


def metrics(path):
    m = {}
    try:
        for line in open(path):
            if line.startswith("#") or not line.strip():
                continue
            k, v = line.rsplit(" ", 1)
            m[k] = float(v)
    except FileNotFoundError:
        pass
    return m


before, after = metrics(f"{out}/before.metrics"), metrics(f"{out}/after.metrics")


def hist(name, label):
    """(count, buckets) of one labelled histogram's window (after - before)."""
    pat = re.compile(rf'^{name}_bucket\{{(?:{label},)?le="([^"]+)"(?:,{label})?\}}$')
    b = []
    for k, v in after.items():
        mm = pat.match(k)
        if mm:
            le = float("inf") if mm.group(1) == "+Inf" else float(mm.group(1))
            b.append((le, v - before.get(k, 0)))
    b.sort()
    return (b[-1][1] if b else 0), b


def hq(buckets, total, p):
    for le, c in buckets:
        if c >= p * total:
            return le
    return float("inf")


def show(name, label, what):
    total, b = hist(name, label)
    if total:
        print(f"  {what:<34} {total:7.0f} observed; p50 <= {1000 * hq(b, total, 0.5):g} ms,"
              f" p99 <= {1000 * hq(b, total, 0.99):g} ms, p99.9 <= {1000 * hq(b, total, 0.999):g} ms")


print("steady window, from /metrics (bucket bounds):")
for s in ["session_queue", "socket_write"] + TRIP_STAGES:
    show("dispatch_request_offer_stage_seconds", f'stage="{s}"', f"stage {s}")
for c in ["first", "offer"]:
    for part in ["queue", "write", "fsync", "wake"]:
        show("dispatch_request_offer_commit_seconds", f'commit="{c}",part="{part}"', f"{c} commit {part}")
for s in ["queue_wait", "write", "fsync"]:
    show("dispatch_store_commit_stage_seconds", f'stage="{s}"', f"group commit {s}")
show("dispatch_store_flush_seconds", "", "group commit (write + fsync)")
for g in ["session", "rider", "trip", "driver", "cell"]:
    show("dispatch_actor_handling_seconds", f'group="{g}"', f"handling, {g}")


def snap(path):
    d = {"threads": {}}
    for line in open(path):
        w = line.split()
        if w[0] == "thread":
            d["threads"][(w[1], w[2], len(d["threads"]))] = tuple(int(x) for x in w[3:6])
        else:
            d[w[0]] = line.split(" ", 1)[1].strip()
    return d


a, z = snap(f"{out}/before"), snap(f"{out}/after")
secs = float(z["time"]) - float(a["time"])
print(f"off-CPU over the window ({secs:.0f} s; load before: {a['load']}; after: {z['load']}):")
print(f"  CPU pressure before: {a['cpu_pressure']}; after: {z['cpu_pressure']}")
print(f"  I/O pressure before: {a['io_pressure']}; after: {z['io_pressure']}")
dpid = next(iter(a["threads"]))[0]
by = defaultdict(lambda: [0, 0, 0])
# Threads are matched by pid and name in order (a thread's name is not unique).
za = defaultdict(list)
for (pid, name, _), v in z["threads"].items():
    za[(pid, name)].append(v)
aa = defaultdict(list)
for (pid, name, _), v in a["threads"].items():
    aa[(pid, name)].append(v)
for key, vs in za.items():
    for i, v in enumerate(vs):
        b = aa[key][i] if i < len(aa[key]) else (0, 0, 0)
        who = ("dispatchd " if key[0] == dpid else "loadgen ") + re.sub(r"[-_]?\d+$", "", key[1])
        for j in range(3):
            by[who][j] += v[j] - b[j]
for who, (run, wait, slices) in sorted(by.items(), key=lambda kv: -kv[1][0]):
    if run + wait == 0:
        continue
    per = wait / max(1, slices) / 1000
    print(f"  {who:<32} on CPU {run / 1e9 / secs:5.2f} cores, waiting on a run queue "
          f"{wait / 1e9 / secs:5.2f} (= {100 * wait / max(1, run + wait):4.1f} % of its runnable time; "
          f"{per:7.1f} µs per timeslice, {slices / secs:7.0f} timeslices/s)")
io = lambda d: dict(kv.split(": ") for kv in re.findall(r"\w+: \d+", d["io"]))
ia, iz = io(a), io(z)
print("  dispatchd I/O: " + ", ".join(
    f"{k} {(int(iz[k]) - int(ia[k])) / secs:,.0f}/s" for k in ["syscw", "write_bytes"] if k in iz))
try:
    r = json.load(open(f"{out}/run.json"))
    l = r["latency"]["request_to_offer"]
    print(f"client (loadgen) request -> offer: p50 {l['p50_ms']:.2f} ms, p99 {l['p99_ms']:.2f} ms,"
          f" p99.9 {l['p999_ms']:.2f} ms; matched {r['trips']['matched']}")
except (OSError, KeyError, ValueError) as e:
    print(f"no loadgen report: {e}")
