#!/usr/bin/env python3
"""Checks that every alert rule in alerts.yml is tested, documented and routed.

1. Every rule has a severity the routing knows (`critical` or `warning`) and a
   `runbook_url` annotation naming its section of dashboards/README.md, and that section
   exists with its three parts: **What it means**, **What to check**, **What to do**.
   README.md has no runbook section for a rule that does not exist.
2. Every rule has a test case in alerts_test.yml that expects it to fire (a case that only
   expects silence proves nothing about the rule), and no test names an unknown rule;
   then `promtool test rules alerts_test.yml` (when promtool is installed: .ci/run
   installs it).
3. `amtool check-config alertmanager.yml`, and for every rule `amtool config routes test`
   with the rule's labels names the receiver of its severity (ROUTES below).
4. The inhibition rules, on a real Alertmanager (Debian's `prometheus-alertmanager` binary,
   on loopback with a temporary storage directory): a critical and a warning about one
   target are posted through the v2 API, and the API must report exactly the warnings
   that alertmanager.yml means to inhibit as inhibited (INHIBITED below).

Needs: PyYAML, amtool and prometheus-alertmanager (Debian's prometheus-alertmanager),
promtool optionally. Exits non-zero on any failure.

    python3 dashboards/check_alerting.py
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
ALERTS = os.path.join(HERE, "alerts.yml")
TESTS = os.path.join(HERE, "alerts_test.yml")
README = os.path.join(HERE, "README.md")
ALERTMANAGER = os.path.join(HERE, "alertmanager.yml")
# The receiver each severity must reach (alertmanager.yml's routes).
ROUTES = {"critical": "dispatch-oncall", "warning": "dispatch-team"}
RUNBOOK_PARTS = ["What it means", "What to check", "What to do"]
# Posted together to a live Alertmanager: which alerts it must report inhibited, by whom.
TARGET = {"job": "dispatchd", "instance": "10.0.0.1:9090"}
INHIBITION_CASES = [
    # (alerts posted, {inhibited alertname: inhibiting alertname})
    ([("DispatchdDown", "critical", {}), ("DispatchdNotReady", "warning", {}),
      ("DispatchStoreFlushSlow", "warning", {})],
     {"DispatchdNotReady": "DispatchdDown", "DispatchStoreFlushSlow": "DispatchdDown"}),
    ([("DispatchActorRestartsStorm", "critical", {"group": "cell"}),
      ("DispatchActorRestarts", "warning", {"group": "cell"}),
      ("DispatchActorRestarts", "warning", {"group": "trip"})],
     {"DispatchActorRestarts/cell": "DispatchActorRestartsStorm"}),
    # A rule that came in two severities: the critical hides its own warning.
    ([("DispatchMatchLatencyHigh", "critical", {}), ("DispatchMatchLatencyHigh", "warning", {})],
     {"DispatchMatchLatencyHigh": "DispatchMatchLatencyHigh"}),
    # A critical about one thing does not hide an unrelated warning.
    ([("DispatchPaymentProviderFailing", "critical", {}), ("DispatchMatchLatencyHigh", "warning", {})], {}),
    # Nor does a critical about another target.
    ([("DispatchdDown", "critical", {"instance": "10.0.0.2:9090"}), ("DispatchdNotReady", "warning", {})], {}),
]


def anchor(heading):
    """GitHub's anchor for a Markdown heading."""
    return re.sub(r"[^a-z0-9 _-]", "", heading.strip().lower()).replace(" ", "-")


def runbook_sections(text):
    """{anchor: (heading, body)} of the ### headings under '## Runbooks'."""
    m = re.search(r"^## Runbooks\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    if not m:
        return {}
    parts = re.split(r"^### (.+)\n", m.group(1), flags=re.M)
    return {anchor(h): (h.strip(), body) for h, body in zip(parts[1::2], parts[2::2])}


def run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    return r.returncode, (r.stdout + r.stderr).strip()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(port, method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/api/v2{path}", data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        raw = r.read()
        return json.loads(raw) if raw else None


def check_inhibition(failures):
    """The inhibit rules of alertmanager.yml, as a real Alertmanager applies them."""
    exe = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
    if exe is None:
        failures.append("prometheus-alertmanager not installed (apt-get install prometheus-alertmanager)")
        return
    for alerts, want in INHIBITION_CASES:
        with tempfile.TemporaryDirectory(prefix="dispatchd-am-") as tmp:
            port = free_port()
            log = open(os.path.join(tmp, "log"), "wb")
            proc = subprocess.Popen(
                [exe, f"--config.file={ALERTMANAGER}", f"--storage.path={tmp}",
                 f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            try:
                deadline = time.monotonic() + 30
                while True:
                    try:
                        api(port, "GET", "/status")
                        break
                    except (OSError, urllib.error.URLError):
                        if proc.poll() is not None or time.monotonic() > deadline:
                            log.close()
                            failures.append("alertmanager did not start: "
                                            + open(os.path.join(tmp, "log")).read()[-1500:])
                            return
                        time.sleep(0.1)
                # The Alertmanager hands new alerts to its inhibitor asynchronously, in the
                # order posted. A control pair posted last (a critical and a warning of one
                # name, which the same-name rule inhibits) tells when the inhibitor has seen
                # every alert of the case, so that "nothing inhibited" is a real answer.
                control = [("InhibitionControl", "critical", {"instance": "control"}),
                           ("InhibitionControl", "warning", {"instance": "control"})]
                posted = []
                for name, severity, extra in alerts + control:
                    labels = {**TARGET, "alertname": name, "severity": severity, **extra}
                    posted.append({"labels": labels, "annotations": {"summary": name}})
                api(port, "POST", "/alerts", posted)
                deadline = time.monotonic() + 15
                while True:
                    listed = api(port, "GET", "/alerts?inhibited=true&silenced=true&active=true")
                    names = {a["fingerprint"]: a["labels"]["alertname"] for a in listed}
                    got = {}
                    for a in listed:
                        if a["status"]["inhibitedBy"]:
                            key = a["labels"]["alertname"] + (f"/{a['labels']['group']}" if "group" in a["labels"] else "")
                            # inhibitedBy holds fingerprints: map them back to alert names.
                            got[key] = sorted(names.get(f, f) for f in a["status"]["inhibitedBy"])
                    control_seen = got.pop("InhibitionControl", None) is not None
                    if control_seen or time.monotonic() > deadline:
                        break
                    time.sleep(0.1)
                if not control_seen:
                    failures.append("the Alertmanager never inhibited the control pair (same-name rule) within 15 s")
                    continue
                expected = {k: [v] for k, v in want.items()}
                what = ", ".join(f"{n}({s})" for n, s, _ in alerts)
                if got != expected:
                    failures.append(f"inhibition of [{what}]: inhibited {got}, want {expected}")
                else:
                    print(f"check: inhibition: [{what}] -> inhibited {got or 'nothing'}")
            finally:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                log.close()


def main():
    failures = []
    rules = [r for g in yaml.safe_load(open(ALERTS))["groups"] for r in g["rules"] if "alert" in r]
    names = [r["alert"] for r in rules]
    tests = yaml.safe_load(open(TESTS))
    sections = runbook_sections(open(README).read())

    # 1. severity, runbook_url, runbook section
    for r in rules:
        name = r["alert"]
        sev = r.get("labels", {}).get("severity")
        if sev not in ROUTES:
            failures.append(f"{name}: severity {sev!r}, want one of {sorted(ROUTES)}")
        url = r.get("annotations", {}).get("runbook_url", "")
        want_url = f"dashboards/README.md#{anchor(name)}"
        if url != want_url:
            failures.append(f"{name}: runbook_url {url!r}, want {want_url!r}")
        section = sections.get(anchor(name))
        if section is None:
            failures.append(f"{name}: no runbook section '### {name}' under '## Runbooks' in dashboards/README.md")
        else:
            missing = [p for p in RUNBOOK_PARTS if f"**{p}**" not in section[1]]
            if missing:
                failures.append(f"{name}: its runbook section lacks {', '.join(missing)}")
    stray = sorted(h for a, (h, _) in sections.items() if a not in {anchor(n) for n in names})
    if stray:
        failures.append(f"runbook sections for rules that alerts.yml does not have: {stray}")

    # 2. test cases
    firing, mentioned = set(), set()
    for t in tests.get("tests", []):
        for case in t.get("alert_rule_test", []):
            mentioned.add(case["alertname"])
            if case.get("exp_alerts"):
                firing.add(case["alertname"])
    untested = [n for n in names if n not in firing]
    if untested:
        failures.append(f"rules with no test case in alerts_test.yml that expects them to fire: {untested}")
    unknown = sorted(mentioned - set(names))
    if unknown:
        failures.append(f"alerts_test.yml tests rules that alerts.yml does not have: {unknown}")
    if shutil.which("promtool"):
        code, out = run(["promtool", "test", "rules", TESTS])
        if code != 0:
            failures.append(f"promtool test rules alerts_test.yml:\n{out}")
        else:
            print("check: promtool test rules alerts_test.yml: SUCCESS")
    else:
        print("check: WARNING promtool not installed: `promtool test rules` left to dashboards/check.py")
    print(f"check: {len(rules)} rules; {len(firing & set(names))} with a firing test case, "
          f"{len([n for n in names if anchor(n) in sections])} with a runbook section")

    # 3. amtool
    code, out = run(["amtool", "check-config", ALERTMANAGER])
    if code != 0:
        failures.append(f"amtool check-config alertmanager.yml:\n{out}")
    else:
        print("check: amtool check-config alertmanager.yml: SUCCESS")
    for r in rules:
        labels = {**TARGET, **r.get("labels", {}), "alertname": r["alert"]}
        want = ROUTES.get(labels.get("severity"), "?")
        code, out = run(["amtool", "config", "routes", "test", f"--config.file={ALERTMANAGER}",
                         f"--verify.receivers={want}", *[f"{k}={v}" for k, v in sorted(labels.items())]])
        got = [ln for ln in out.splitlines() if not ln.startswith("Warning:")][:1]
        if code != 0:
            failures.append(f"route of {r['alert']} ({labels.get('severity')}): {out}, want {want}")
        else:
            print(f"check: route {r['alert']} ({labels['severity']}) -> {got[0] if got else '?'}")

    # 4. inhibition on a live Alertmanager
    check_inhibition(failures)

    for f in failures:
        print(f"FAIL {f}")
    print(f"alerting: {len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
