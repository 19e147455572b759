#!/usr/bin/env python3
"""Checks the Grafana dashboards and Prometheus alerts in this folder against promtool and
a live dispatchd.

1. The dashboards' JSON is importable as it is: uid, title, schemaVersion, a `datasource`
   variable, every panel and target on `${datasource}`, no overlapping panels.
2. `promtool check rules alerts.yml` and `promtool test rules alerts_test.yml`.
3. Every dashboard expression, Grafana variables replaced, parses as a PromQL recording
   rule (`promtool check rules`).
4. A real dispatchd is started; one ride goes through over real WebSockets (plus a decline,
   a rider cancel, an offer expiry, a bad message and a location flood); `/metrics` is
   scraped and passes `promtool check metrics`.
5. Every metric the dashboards and alerts name is a sample name in that scrape, or, for
   cluster mode's series (`dispatch_cluster_*`, which a single node does not export), in
   the scrapes of two real nodes in cluster mode on a fresh PostgreSQL database when
   DISPATCH_TEST_DATABASE_URL names a server (CI's; needs psql): a pair in sharded mode
   (the default) and a pair in leader mode, each of which must export its own mode's
   series (MODE_SERIES). Without one those names
   are only warned about (KNOWN_MISSING) and left to k8s/check.py's live cluster. And
   the other way round: every `dispatch_` family in the scrape is on a dashboard or in an
   alert.

Needs: promtool on PATH (Debian's `prometheus` package), Python packages `websockets`
and `PyYAML`, and a built server (`cargo build --bin dispatchd`). Writes nothing in the
repository; exits non-zero on any failure.

    python3 dashboards/check.py [--binary target/debug/dispatchd] [--keep]
"""

import argparse
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DASHBOARDS = ["overview.json", "actors.json", "transport.json"]
ALERTS = "alerts.yml"
ALERT_TESTS = "alerts_test.yml"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Grafana's interval variables all become a plain range for parsing.
GRAFANA_RANGES = ["__rate_interval", "__interval", "__range", "__range_s", "__range_ms"]
METRIC_NAME = re.compile(r"\bdispatch_[a-zA-Z0-9_]*[a-zA-Z0-9]")
OFFER_TIMEOUT_MS = 2000
# Names the dashboards and alerts use that the server does not export yet, and why.
# Printed as a warning on every run so they stay in sight; remove an entry once the
# server exports the name (the check says so).
# Names a dashboard or alert may use that the server does not export yet, with why.
KNOWN_MISSING: dict[str, str] = {}
# Cluster mode's series (issue 16) exist only on a node started with --node-name, against
# PostgreSQL; this check scrapes one node with sled. k8s/check.py scrapes three real cluster
# nodes and fails on any of these names they do not export (its CLUSTER_METRICS).
_CLUSTER_ONLY = "exported only in cluster mode (--node-name); checked by k8s/check.py's live cluster"
KNOWN_MISSING.update({n: _CLUSTER_ONLY for n in [
    "dispatch_cluster_leader", "dispatch_cluster_epoch", "dispatch_cluster_takeovers_total",
    "dispatch_cluster_lease_renewals_failed_total", "dispatch_cluster_members",
    "dispatch_cluster_peer_up", "dispatch_cluster_auth_refusals_total", "dispatch_cluster_fenced_commits_total",
    "dispatch_cluster_relayed_sessions", "dispatch_cluster_relay_messages_total",
    "dispatch_cluster_relay_attach_seconds_bucket", "dispatch_cluster_relay_errors_total",
    "dispatch_cluster_tls_refusals_total",
    # The shard controller's: only with --cluster-mode sharded, the default (the cluster
    # scrape below runs a sharded pair, and a leader pair).
    "dispatch_cluster_shards_held", "dispatch_cluster_shards_unowned",
    "dispatch_cluster_shard_claims_total", "dispatch_cluster_shard_handoffs_total",
    "dispatch_cluster_shard_ends_total", "dispatch_cluster_shard_renewals_failed_total",
    "dispatch_cluster_shard_claim_errors_total", "dispatch_cluster_shard_claims_deferred_total",
]})
# Names built but not yet exported by dispatchd in any mode, excused even against the
# cluster scrape (the check says when one is exported). None now: the shard controller's
# series are exported with --cluster-mode sharded.
NOT_WIRED: dict[str, str] = {}


class Failure(Exception):
    pass


class Skip(Exception):
    pass


def say(msg):
    print(f"check: {msg}", flush=True)


# ---------------------------------------------------------------- dashboards (static)


def walk_panels(panels):
    """Every panel, rows' nested panels included (collapsed rows keep them inside)."""
    for p in panels or []:
        yield p
        yield from walk_panels(p.get("panels"))


def check_dashboard(name, d, uids):
    """Structural checks of one dashboard; returns its (panel title, refId, expr) list."""
    problems = []
    for key in ["uid", "title", "schemaVersion", "time", "refresh", "panels", "templating"]:
        if key not in d:
            problems.append(f"no `{key}`")
    if "__inputs" in d:
        problems.append("`__inputs` present: a plain import would ask for inputs")
    if not isinstance(d.get("schemaVersion"), int) or d.get("schemaVersion", 0) < 36:
        problems.append(f"schemaVersion {d.get('schemaVersion')!r}: want Grafana 10/11 (>= 36)")
    uid = d.get("uid", "")
    if not uid or len(uid) > 40 or not re.fullmatch(r"[A-Za-z0-9_-]+", uid):
        problems.append(f"uid {uid!r}: want 1 to 40 of [A-Za-z0-9_-]")
    if uid in uids:
        problems.append(f"uid {uid!r} also used by {uids[uid]}")
    uids[uid] = name

    variables = {v.get("name"): v for v in d.get("templating", {}).get("list", [])}
    ds = variables.get("datasource")
    if not ds or ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        problems.append("no templating variable `datasource` of type datasource, query prometheus")
    for vname, v in variables.items():
        if v.get("type") == "query" and v.get("datasource") != DATASOURCE:
            problems.append(f"variable {vname}: datasource is not {DATASOURCE}")

    exprs = []
    ids = set()
    boxes = []
    for p in walk_panels(d.get("panels")):
        title = p.get("title", "?")
        pid = p.get("id")
        if pid in ids:
            problems.append(f"panel id {pid} used twice")
        ids.add(pid)
        g = p.get("gridPos") or {}
        if not all(isinstance(g.get(k), int) for k in "xywh") or g["x"] + g["w"] > 24:
            problems.append(f"panel {title!r}: bad gridPos {g}")
        else:
            box = (g["x"], g["y"], g["x"] + g["w"], g["y"] + g["h"])
            for other, otitle in boxes:
                if box[0] < other[2] and other[0] < box[2] and box[1] < other[3] and other[1] < box[3]:
                    problems.append(f"panel {title!r} overlaps {otitle!r}")
            boxes.append((box, title))
        if p.get("type") == "row":
            continue
        if p.get("datasource") != DATASOURCE:
            problems.append(f"panel {title!r}: datasource {p.get('datasource')!r}, want {DATASOURCE}")
        targets = p.get("targets") or []
        if not targets:
            problems.append(f"panel {title!r}: no targets")
        refs = set()
        for t in targets:
            ref = t.get("refId")
            if not ref or ref in refs:
                problems.append(f"panel {title!r}: missing or repeated refId {ref!r}")
            refs.add(ref)
            if t.get("datasource") != DATASOURCE:
                problems.append(f"panel {title!r} {ref}: datasource {t.get('datasource')!r}, want {DATASOURCE}")
            expr = t.get("expr", "")
            if not expr.strip():
                problems.append(f"panel {title!r} {ref}: empty expr")
                continue
            exprs.append((title, ref, expr))
    return problems, exprs, set(variables)


def substitute(expr, variables):
    """Grafana variables to something PromQL parses: ranges to 5m, others to `.*` (they
    only ever stand in regex matchers here). Unknown variables are an error."""
    def repl(m):
        var = m.group(1) or m.group(2) or m.group(3)
        var = var.split(":")[0]
        if var in GRAFANA_RANGES:
            return "5m"
        if var in variables:
            return ".*"
        raise Failure(f"unknown Grafana variable ${var} in: {expr}")
    return re.sub(r"\$\{([^}]+)\}|\[\[([^\]]+)\]\]|\$([A-Za-z_][A-Za-z0-9_]*)", repl, expr)


# ---------------------------------------------------------------- promtool


def promtool(args, stdin=None):
    r = subprocess.run(["promtool", *args], input=stdin, capture_output=True, text=True)
    return r.returncode, (r.stdout + r.stderr).strip()


# ---------------------------------------------------------------- the server


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method, url, body=None, token=None, timeout=10):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


class Server:
    def __init__(self, binary, tmp):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(tmp, "server.log")
        self.log = open(self.log_path, "wb")
        args = [binary, "--listen", f"127.0.0.1:{self.port}",
                "--data-dir", os.path.join(tmp, "data"),
                "--admin-token", secrets.token_hex(16),
                "--offer-timeout-ms", str(OFFER_TIMEOUT_MS)]
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env={**os.environ, "NO_COLOR": "1"})

    def wait_ready(self, timeout=30):
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.proc.poll() is not None:
                raise Failure(f"dispatchd exited with {self.proc.returncode} before ready")
            try:
                status, _ = http("GET", f"{self.base}/readyz", timeout=2)
                if status == 200:
                    return time.monotonic() - start
            except OSError:
                pass
            time.sleep(0.1)
        raise Failure(f"/readyz not 200 within {timeout} s")

    def stop(self):
        """SIGTERM and wait; returns the exit code, or None if it had to be killed."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                self.log.close()
                return None
        self.log.close()
        return self.proc.returncode

    def log_tail(self, n=30):
        try:
            with open(self.log_path, errors="replace") as f:
                return re.sub(r"\x1b\[[0-9;]*m", "", "".join(f.readlines()[-n:]))
        except OSError:
            return ""


# What each cluster mode's scrape must show of the names above (the other mode need not):
# the shard controller's series in sharded mode (the default), the lease of the one leader
# in leader mode. Checked against each mode's own scrape, not only the union of both.
MODE_SERIES = {
    "sharded": ["dispatch_cluster_shards_held", "dispatch_cluster_shards_unowned",
                "dispatch_cluster_shard_claims_total", "dispatch_cluster_shard_ends_total",
                "dispatch_cluster_shard_renewals_failed_total", "dispatch_cluster_fenced_commits_total",
                "dispatch_cluster_members",
                "dispatch_cluster_peer_up"],
    "leader": ["dispatch_cluster_leader", "dispatch_cluster_epoch", "dispatch_cluster_takeovers_total",
               "dispatch_cluster_lease_renewals_failed_total", "dispatch_cluster_fenced_commits_total",
               "dispatch_cluster_members",
               "dispatch_cluster_peer_up"],
}


def cluster_scrape(binary, tmp, database_url, mode):
    """Two real nodes in cluster mode (--node-name, --cluster-listen, each other as peers,
    --cluster-mode `mode`, always said) on a fresh database of `database_url`'s server: once
    one leads (leader mode; both serve their shards in sharded mode) and both count two
    members, the union of the sample names of their /metrics."""
    if not shutil.which("psql"):
        raise Failure("DISPATCH_TEST_DATABASE_URL is set but psql is not on PATH (apt-get install postgresql-client)")
    db = f"dispatch_dashcheck_{os.getpid()}_{secrets.token_hex(4)}"
    r = subprocess.run(["psql", database_url, "-v", "ON_ERROR_STOP=1", "-qc", f"CREATE DATABASE {db}"],
                       capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise Failure(f"CREATE DATABASE {db}: {r.stderr.strip()}")
    m = re.match(r"(postgres(?:ql)?://[^?]*/)[^/?]*(\?.*)?$", database_url)
    if not m:
        raise Failure("DISPATCH_TEST_DATABASE_URL is not a postgres:// URL")
    url = f"{m.group(1)}{db}{m.group(2) or ''}"
    cookie = os.path.join(tmp, "cluster-cookie")
    with open(cookie, "w") as f:
        f.write(secrets.token_hex(16))
    nodes = [(free_port(), free_port()) for _ in range(2)]
    peers = ",".join(f"127.0.0.1:{c}" for _, c in nodes)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCH_")}
    env.update(NO_COLOR="1", DISPATCH_STORE="postgres", DISPATCH_DATABASE_URL=url)
    procs = []
    try:
        for i, (port, cport) in enumerate(nodes):
            log = open(os.path.join(tmp, f"cluster-{mode}-n{i}.log"), "wb")
            procs.append(subprocess.Popen(
                [binary, "--listen", f"127.0.0.1:{port}", "--data-dir", os.path.join(tmp, f"cluster-{mode}-n{i}"),
                 "--node-name", f"n{i}", "--cluster-listen", f"127.0.0.1:{cport}", "--cluster-peers", peers,
                 "--cluster-cookie-file", cookie, "--cluster-mode", mode], stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env=env))
        deadline = time.monotonic() + 60
        while True:
            texts, ready = [], 0
            for port, _ in nodes:
                try:
                    ready += http("GET", f"http://127.0.0.1:{port}/readyz", timeout=2)[0] == 200
                    texts.append(http("GET", f"http://127.0.0.1:{port}/metrics", timeout=2)[1])
                except OSError:
                    texts.append("")
            members = [value(parse_scrape(t), "dispatch_cluster_members") for t in texts]
            if ready == (1 if mode == "leader" else 2) and members == [2, 2]:
                break
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise Failure(f"two cluster nodes ({mode} mode): not ready and two members each within 60 s "
                              f"(ready {ready}, members {members}; logs in {tmp}/cluster-{mode}-n*.log)")
            time.sleep(0.2)
        names = set()
        for t in texts:
            names |= set(parse_scrape(t))
        return names
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        subprocess.run(["psql", database_url, "-qc", f"DROP DATABASE IF EXISTS {db}"],
                       capture_output=True, timeout=30)


class Session:
    """One WebSocket session; messages not yet waited for stay in the inbox."""

    def __init__(self, server, role, token):
        from websockets.sync.client import connect
        self.name = role
        self.stack = contextlib.ExitStack()
        self.ws = self.stack.enter_context(
            connect(f"ws://127.0.0.1:{server.port}/v1/ws/{role}",
                    additional_headers={"Authorization": f"Bearer {token}"},
                    open_timeout=10))
        self.req = 0
        self.inbox = []
        self.seen = []

    def wait(self, pred, what, timeout=10.0):
        deadline = time.monotonic() + timeout
        while True:
            for i, m in enumerate(self.inbox):
                if pred(m):
                    return self.inbox.pop(i)
            left = deadline - time.monotonic()
            if left <= 0:
                raise Failure(f"{self.name}: no {what} within {timeout} s; last frames: {self.seen[-6:]}")
            try:
                m = json.loads(self.ws.recv(timeout=left))
            except TimeoutError:
                continue
            self.seen.append(m)
            self.inbox.append(m)

    def send(self, msg):
        self.ws.send(json.dumps(msg))

    def call(self, msg, expect_error=None, timeout=10.0):
        self.req += 1
        req = self.req
        self.send({**msg, "req": req})
        reply = self.wait(lambda m: m.get("req") == req, f"reply to {msg['type']}", timeout)
        if expect_error:
            if reply.get("type") != "error" or reply.get("code") != expect_error:
                raise Failure(f"{self.name}: {msg['type']} answered {reply}, want error {expect_error}")
        elif reply.get("type") == "error":
            raise Failure(f"{self.name}: {msg} answered {reply}")
        return reply

    def close(self):
        try:
            self.stack.close()
        except Exception:
            pass


def trip_update(tid, state):
    return lambda m: (m.get("type") == "trip_update" and m["trip"]["trip_id"] == tid
                      and m["trip"]["state"] == state)


def typed(kind, tid):
    return lambda m: m.get("type") == kind and m.get("trip_id") == tid


def drive(server):
    """One full ride, then a decline, a rider cancel and an expiry. Returns what it saw and
    the sessions, still open (so the scrape sees them)."""
    base = server.base
    status, body = http("POST", f"{base}/v1/riders", {"name": "CI Rider", "phone": "+15555550100"})
    if status != 201:
        raise Failure(f"POST /v1/riders: {status} {body}")
    rider_token = json.loads(body)["token"]
    vehicle = {"make": "Toyota", "model": "Prius", "plate": "CI-0001", "color": "white",
               "product": "economy", "seats": 4}
    status, body = http("POST", f"{base}/v1/drivers", {"name": "CI Driver", "vehicle": vehicle})
    if status != 201:
        raise Failure(f"POST /v1/drivers: {status} {body}")
    driver_token = json.loads(body)["token"]

    here = {"lat": 40.7484, "lng": -73.9857}
    pickup = {"lat": 40.7490, "lng": -73.9850}
    dropoff = {"lat": 40.7580, "lng": -73.9855}

    driver = Session(server, "driver", driver_token)
    welcome = driver.wait(lambda m: m.get("type") == "welcome", "welcome")
    driver.call({"type": "go_online"})
    driver.call({"type": "location", **here, "heading": 90, "speed_mps": 0,
                 "ts": int(time.time() * 1000)})
    # The driver is searchable once the index has it.
    deadline = time.monotonic() + 10
    query = f"lat={pickup['lat']}&lng={pickup['lng']}&radius_m=2000&limit=5&product=economy"
    while True:
        status, body = http("GET", f"{base}/v1/drivers/nearby?{query}", token=rider_token)
        if status == 200 and json.loads(body)["drivers"]:
            break
        if time.monotonic() > deadline:
            raise Failure(f"driver never showed in /v1/drivers/nearby: {status} {body}")
        time.sleep(0.05)

    rider = Session(server, "rider", rider_token)
    rider.wait(lambda m: m.get("type") == "welcome", "welcome")
    ride = {"type": "request_ride", "pickup": pickup, "dropoff": dropoff, "product": "economy"}
    seen = {"driver_welcome_status": welcome.get("status")}

    # 1. A full ride.
    reply = rider.call(ride)
    tid = reply["trip"]["trip_id"]
    if reply.get("type") != "trip_update" or reply["trip"]["state"] != "dispatching":
        raise Failure(f"request_ride answered {reply}")
    offer = driver.wait(typed("offer", tid), f"offer of {tid}")
    driver.call({"type": "accept", "trip_id": tid})
    rider.wait(trip_update(tid, "driver_assigned"), "driver_assigned")
    for step, state in [("arrived", "driver_arrived"), ("start_trip", "in_progress"),
                        ("complete_trip", "completed")]:
        driver.call({"type": step, "trip_id": tid})
        rider.wait(trip_update(tid, state), state)
    receipt = rider.wait(typed("receipt", tid), "receipt")
    seen["ride"] = (f"{tid} completed: offer eta {offer.get('pickup_eta_s')} s, receipt "
                    f"{receipt['fare_cents']} {receipt['currency']}, {receipt['distance_m']} m")

    # 2. Declined: the only driver passes, so no driver is found.
    tid = rider.call(ride)["trip"]["trip_id"]
    driver.wait(typed("offer", tid), f"offer of {tid}")
    driver.call({"type": "decline", "trip_id": tid})
    rider.wait(trip_update(tid, "no_driver_found"), "no_driver_found after decline")

    # 3. The rider cancels while the offer is open: the offer is withdrawn.
    tid = rider.call(ride)["trip"]["trip_id"]
    driver.wait(typed("offer", tid), f"offer of {tid}")
    rider.call({"type": "cancel_ride", "trip_id": tid, "reason": "ci"})
    rider.wait(trip_update(tid, "cancelled"), "cancelled")
    driver.wait(typed("offer_expired", tid), "offer_expired after cancel")

    # 4. The driver lets the offer time out.
    tid = rider.call(ride)["trip"]["trip_id"]
    driver.wait(typed("offer", tid), f"offer of {tid}")
    driver.wait(typed("offer_expired", tid), "offer_expired", timeout=OFFER_TIMEOUT_MS / 1000 + 10)
    rider.wait(trip_update(tid, "no_driver_found"), "no_driver_found after expiry")

    # 5. A message of an unknown type, and a location flood past the rate limit.
    driver.call({"type": "no_such_message"}, expect_error="unknown_type")
    for _ in range(25):
        driver.send({"type": "location", **here, "ts": int(time.time() * 1000)})
    driver.wait(lambda m: m.get("type") == "error" and m.get("code") == "rate_limited",
                "rate_limited after a location flood")
    seen["extra"] = "decline -> no_driver_found, rider cancel -> offer withdrawn, expiry -> no_driver_found, unknown_type, rate_limited"
    return seen, [driver, rider]


# ---------------------------------------------------------------- scrape


def parse_scrape(text):
    """{sample name: [(labels text, value)]}"""
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)", line)
        if m:
            samples.setdefault(m.group(1), []).append((m.group(2) or "", float(m.group(3))))
    return samples


def value(samples, name, **labels):
    for lbls, v in samples.get(name, []):
        if all(f'{k}="{val}"' in lbls for k, val in labels.items()):
            return v
    return None


# ---------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--binary", default=os.path.join(ROOT, "target", "debug", "dispatchd"))
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (scrape, server log)")
    args = ap.parse_args()

    failures = []
    passed = 0

    def step(name, fn):
        nonlocal passed
        try:
            fn()
            passed += 1
        except Failure as e:
            failures.append(f"{name}: {e}")
            print(f"FAIL {name}: {e}", flush=True)
        except Skip as e:
            print(f"SKIP {name}: {e}", flush=True)

    if not shutil.which("promtool"):
        print("FAIL: promtool not on PATH (apt-get install prometheus)", file=sys.stderr)
        return 1
    say(promtool(["--version"])[1].splitlines()[0])

    # 1. Dashboards' structure.
    exprs = []  # (dashboard, panel, refId, expr as written, expr substituted)
    def dashboards():
        uids = {}
        problems = []
        panels = 0
        for name in DASHBOARDS:
            with open(os.path.join(HERE, name)) as f:
                try:
                    d = json.load(f)
                except json.JSONDecodeError as e:
                    problems.append(f"{name}: not JSON: {e}")
                    continue
            p, found, variables = check_dashboard(name, d, uids)
            problems += [f"{name}: {x}" for x in p]
            panels += sum(1 for q in walk_panels(d.get("panels")) if q.get("type") != "row")
            for title, ref, expr in found:
                try:
                    exprs.append((name, title, ref, expr, substitute(expr, variables)))
                except Failure as e:
                    problems.append(f"{name}: panel {title!r} {ref}: {e}")
        if problems:
            raise Failure("\n  " + "\n  ".join(problems))
        say(f"dashboards: {len(DASHBOARDS)} files, {panels} panels, {len(exprs)} expressions: structure ok")
    step("dashboards", dashboards)

    # 2. Alerts.
    alert_exprs = []
    def alerts():
        import yaml
        code, out = promtool(["check", "rules", os.path.join(HERE, ALERTS)])
        if code != 0:
            raise Failure(f"promtool check rules {ALERTS}:\n{out}")
        say(f"promtool check rules {ALERTS}: {out.splitlines()[-1].strip()}")
        with open(os.path.join(HERE, ALERTS)) as f:
            for g in yaml.safe_load(f)["groups"]:
                for r in g["rules"]:
                    alert_exprs.append((r.get("alert") or r.get("record"), str(r["expr"])))
        code, out = promtool(["test", "rules", os.path.join(HERE, ALERT_TESTS)])
        if code != 0:
            raise Failure(f"promtool test rules {ALERT_TESTS}:\n{out}")
        say(f"promtool test rules {ALERT_TESTS}: {out.splitlines()[-1].strip()}")
    step("alerts", alerts)

    tmp = tempfile.mkdtemp(prefix="dispatchd-dashcheck-")

    # 3. Dashboard expressions parse.
    def parse_exprs():
        rules = [{"record": f"dash:check:{i}", "expr": e[4]} for i, e in enumerate(exprs)]
        path = os.path.join(tmp, "dashboard-exprs.rules.yml")
        with open(path, "w") as f:  # JSON is YAML
            json.dump({"groups": [{"name": "dashboard-exprs", "rules": rules}]}, f, indent=1)
        code, out = promtool(["check", "rules", path])
        if code != 0:
            where = "\n".join(f"  dash:check:{i} = {e[0]} / {e[1]} / {e[2]}: {e[3]}"
                              for i, e in enumerate(exprs) if f"\"dash:check:{i}\"" in out)
            raise Failure(f"promtool check rules (dashboard expressions):\n{out}\n{where}")
        say(f"dashboard expressions: {len(rules)} parse as recording rules (promtool check rules: {out.splitlines()[-1].strip()})")
    step("dashboard expressions", parse_exprs)

    # 4. The live server.
    samples = {}
    early = {}
    server = None
    sessions = []
    def live():
        nonlocal server, samples, early, sessions
        if not os.access(args.binary, os.X_OK):
            raise Failure(f"no server binary at {args.binary} (cargo build --bin dispatchd)")
        server = Server(args.binary, tmp)
        took = server.wait_ready()
        say(f"server: {os.path.relpath(args.binary, ROOT)} ready on {server.base} after {took:.1f} s")
        status, text = http("GET", f"{server.base}/metrics")
        if status != 200:
            raise Failure(f"GET /metrics at start: {status}")
        early = parse_scrape(text)
        seen, sessions = drive(server)
        say(f"ride: {seen['ride']}")
        say(f"ride: also {seen['extra']}")
        status, text = http("GET", f"{server.base}/metrics")
        if status != 200:
            raise Failure(f"GET /metrics: {status}")
        scrape_path = os.path.join(tmp, "scrape.txt")
        with open(scrape_path, "w") as f:
            f.write(text)
        samples = parse_scrape(text)
        say(f"scrape: {sum(len(v) for v in samples.values())} samples of {len(samples)} names ({len(text)} bytes)")
    step("live server", live)

    cluster_names = set()
    def cluster():
        nonlocal cluster_names
        database_url = os.environ.get("DISPATCH_TEST_DATABASE_URL")
        if not database_url:
            raise Skip("no DISPATCH_TEST_DATABASE_URL: cluster mode's series are not checked here (k8s/check.py does)")
        if not os.access(args.binary, os.X_OK):
            raise Failure(f"no server binary at {args.binary}")
        # The default mode first.
        for mode in ("sharded", "leader"):
            names = cluster_scrape(args.binary, tmp, database_url, mode)
            absent = [n for n in MODE_SERIES[mode] if n not in names]
            if absent:
                raise Failure(f"two nodes in {mode} cluster mode do not export {', '.join(absent)}")
            cluster_names |= names
            say(f"cluster: two nodes in {mode} cluster mode on PostgreSQL export {len(names)} names, "
                f"{len([n for n in names if n.startswith('dispatch_cluster_')])} of them dispatch_cluster_*")
    step("cluster scrape", cluster)

    def lint():
        if not samples:
            raise Skip("no scrape (the live server step failed)")
        with open(os.path.join(tmp, "scrape.txt")) as f:
            code, out = promtool(["check", "metrics"], stdin=f.read())
        if code != 0 or out:
            raise Failure(f"promtool check metrics (exit {code}):\n{out}")
        say("promtool check metrics: no problems")
    step("promtool check metrics", lint)

    def names():
        if not samples:
            raise Skip("no scrape (the live server step failed)")
        used = {}
        for e in exprs:
            for n in METRIC_NAME.findall(e[4]):
                used.setdefault(n, set()).add(e[0])
        for alert, expr in alert_exprs:
            for n in METRIC_NAME.findall(expr):
                used.setdefault(n, set()).add(ALERTS)
        excused = {n for n in KNOWN_MISSING if not (cluster_names and n.startswith("dispatch_cluster_"))}
        excused |= set(NOT_WIRED)
        for n, why in sorted(NOT_WIRED.items()):
            if n in samples or n in cluster_names:
                say(f"names: {n} is exported now: remove it from NOT_WIRED in check.py")
            elif n in used:
                say(f"WARNING names: {n} is not exported yet: {why}")
        missing = sorted(n for n in used if n not in samples and n not in cluster_names and n not in excused)
        for n, why in sorted(KNOWN_MISSING.items()):
            if n in cluster_names:
                continue
            if n in samples:
                say(f"names: {n} is exported now: remove it from KNOWN_MISSING in check.py")
            elif n in used:
                say(f"WARNING names: {n} is not in the scrape (known): {why}")
        def family(n):
            for suffix in ("_bucket", "_sum", "_count"):
                if n.endswith(suffix) and n[: -len(suffix)] + "_bucket" in samples:
                    return n[: -len(suffix)]
            return n
        used_families = {family(n) for n in used}
        unused = sorted({family(n) for n in samples if n.startswith("dispatch_")} - used_families)
        late = sorted(n for n in used if n in samples and n not in early)
        # Every family the server exports is on a dashboard or in an alert: a metric
        # no one can see is one an operator cannot act on.
        if unused:
            raise Failure(f"in the scrape but on no dashboard or alert: {', '.join(unused)}")
        if late:
            say(f"WARNING names: absent from the scrape before any traffic (not pre-initialised): {', '.join(late)}")
        if missing:
            raise Failure("named by dashboards or alerts but not in the scrape:\n  " +
                          "\n  ".join(f"{n} ({', '.join(sorted(used[n]))})" for n in missing))
        known = len([n for n in used if n not in samples and n not in cluster_names])
        in_cluster = len([n for n in used if n not in samples and n in cluster_names])
        if in_cluster:
            say(f"names: {in_cluster} cluster-mode names used by dashboards and alerts are in the cluster nodes' scrapes")
        say(f"names: {len(used) - known} of the {len(used)} metric names used by dashboards and alerts are in the scrape"
            + (f"; {known} known missing" if known else ""))
    step("metric names", names)

    def counts():
        """What the rides must have counted (PROTOCOL.md's outcomes, one each)."""
        if not samples:
            raise Skip("no scrape (the live server step failed)")
        want = [
            ("dispatch_trips_finished_total", {"state": "completed"}, 1),
            ("dispatch_trips_finished_total", {"state": "cancelled"}, 1),
            ("dispatch_trips_finished_total", {"state": "no_driver_found"}, 2),
            ("dispatch_offers_total", {"outcome": "accepted"}, 1),
            ("dispatch_offers_total", {"outcome": "declined"}, 1),
            ("dispatch_offers_total", {"outcome": "expired"}, 1),
            ("dispatch_offers_total", {"outcome": "withdrawn"}, 1),
            ("dispatch_request_to_accept_seconds_count", {}, 1),
            ("dispatch_pickup_eta_seconds_count", {}, 1),
            ("dispatch_ws_sessions", {"role": "driver"}, 1),
            ("dispatch_ws_sessions", {"role": "rider"}, 1),
        ]
        wrong = []
        shown = []
        for name, labels, v in want:
            got = value(samples, name, **labels)
            label = name + ("{" + ",".join(f'{k}="{x}"' for k, x in labels.items()) + "}" if labels else "")
            shown.append(f"{label}={got if got is None else int(got)}")
            if got != v:
                wrong.append(f"{label} = {got}, want {v}")
        offers = value(samples, "dispatch_offers_total", outcome="sent")
        firsts = value(samples, "dispatch_request_to_offer_seconds_count")
        shown.append(f"offers sent={offers}, request_to_offer count={firsts}")
        if offers is None or offers < 4:
            wrong.append(f"dispatch_offers_total{{outcome=\"sent\"}} = {offers}, want >= 4")
        if firsts != 4:
            wrong.append(f"dispatch_request_to_offer_seconds_count = {firsts}, want 4 (four requests, each offered)")
        say("counts: " + "; ".join(shown))
        if wrong:
            raise Failure("the rides were not counted as expected:\n  " + "\n  ".join(wrong))
    step("ride counts", counts)

    for s in sessions:
        s.close()
    if server:
        code = server.stop()
        if code is None:
            failures.append("dispatchd did not stop within 20 s of SIGTERM (killed)")
            print("FAIL stop: dispatchd did not stop within 20 s of SIGTERM (killed)", flush=True)
        else:
            say(f"server: stopped on SIGTERM, exit code {code}")
            if code != 0:
                failures.append(f"dispatchd exited {code} on SIGTERM")
        if failures:
            print("--- server log (tail) ---\n" + server.log_tail() + "--- end of log ---", flush=True)

    if failures or args.keep:
        say(f"kept {tmp} (scrape.txt, server.log, dashboard-exprs.rules.yml)")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    total = passed + len(failures)
    print(f"dashboards: {total - len(failures)} passed, {len(failures)} failed", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
