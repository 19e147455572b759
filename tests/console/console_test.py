#!/usr/bin/env python3
"""The operator's console (issue 18) in a real Chromium, against a real dispatchd.

Starts dispatchd (client and admin listeners apart, on loopback), puts three drivers and a
rider in motion over real WebSockets, and checks:
  - no admin route answers without the admin token (401), nor to a driver's or rider's
    token (403), and the live feed is refused the same way, with a clear close reason;
  - the page and its assets load without a token, with the strict security headers;
  - in Chromium (Debian's chromium and chromedriver, through Selenium): a wrong token is
    refused; the admin token logs in; the drivers appear on the map where they are; one
    turns the offered colour when offered the rider's trip; the trip is found by the
    rider's id, with its history; it is cancelled (after the confirmation), and the
    rider's app receives `cancelled`; a second cancel shows the server's 409 as said;
    the browser logged no error (a Content-Security-Policy violation would be one).
Screenshots go to --out (kept whether the test passes or fails).

    python3 tests/console/console_test.py --dispatchd target/debug/dispatchd --out /tmp/shots
    python3 tests/console/console_test.py ... --city loadgen-binary --screenshot docs/console.png
"""

import argparse
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from websockets.sync.client import connect

ADMIN = "adm_console_test_" + os.urandom(8).hex()
# Montreal, around Place des Arts: the drivers ~150-400 m apart, the pickup by driver 0.
HOME = (45.5080, -73.5680)
DRIVERS = [(45.5080, -73.5680, 90.0), (45.5105, -73.5650, 180.0), (45.5060, -73.5720, 270.0)]
PICKUP = {"lat": 45.5082, "lng": -73.5678}
DROPOFF = {"lat": 45.5200, "lng": -73.5800}
AVAILABLE, OFFERED = "#2e7d32", "#ef6c00"
TIMEOUT = 20


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


class Check(Exception):
    pass


def check(ok, what):
    if not ok:
        raise Check(what)


def http(method, url, token=None, body=None, timeout=10):
    """(status, headers, parsed JSON or raw bytes)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, headers, raw = r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        status, headers, raw = e.code, e.headers, e.read()
    try:
        return status, headers, json.loads(raw)
    except ValueError:
        return status, headers, raw


class Peer:
    """A WebSocket app (driver, rider or console feed) whose messages a thread queues."""

    def __init__(self, url, headers=None):
        self.ws = connect(url, additional_headers=headers or {}, open_timeout=10, close_timeout=5)
        self.inbox = queue.Queue()
        self.seen = []
        self.lock = threading.Lock()
        self.closed = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        try:
            for m in self.ws:
                self.inbox.put(json.loads(m))
        except Exception:  # noqa: BLE001 - the close is what is read below
            pass
        self.closed = (self.ws.close_code, self.ws.close_reason)
        self.inbox.put(None)

    def send(self, obj):
        with self.lock:
            self.ws.send(json.dumps(obj))

    def wait(self, pred, what, timeout=TIMEOUT):
        for m in self.seen:
            if m is not None and pred(m):
                return m
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                m = self.inbox.get(timeout=max(0.01, end - time.monotonic()))
            except queue.Empty:
                break
            self.seen.append(m)
            if m is not None and pred(m):
                return m
            if m is None:
                break
        raise Check(f"{what}: not received in {timeout} s (saw {self.seen[-5:]}, closed {self.closed})")

    def wait_closed(self, timeout=TIMEOUT):
        end = time.monotonic() + timeout
        while self.closed is None and time.monotonic() < end:
            time.sleep(0.05)
        check(self.closed is not None, "the server did not close the connection")
        return self.closed

    def close(self):
        try:
            self.ws.close()
        except Exception:  # noqa: BLE001
            pass


class Server:
    def __init__(self, binary, port, admin_port, extra=()):
        self.dir = tempfile.mkdtemp(prefix="dispatch-console-")
        self.base = f"http://127.0.0.1:{port}"
        self.admin = f"http://127.0.0.1:{admin_port}"
        self.log = open(os.path.join(self.dir, "dispatchd.log"), "w")
        self.proc = subprocess.Popen(
            [binary, "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin_port}",
             "--data-dir", os.path.join(self.dir, "data"), "--admin-token", ADMIN, *extra],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        end = time.monotonic() + 60
        while time.monotonic() < end:
            check(self.proc.poll() is None, f"dispatchd exited: see {self.log.name}")
            try:
                if http("GET", f"{self.base}/readyz", timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise Check("dispatchd not ready in 60 s")

    def stop(self, keep=False):
        """Stops dispatchd; its data directory and log are kept when `keep` (a failure)."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
        if keep:
            log("dispatchd's log and data kept in", self.dir)
        else:
            shutil.rmtree(self.dir, ignore_errors=True)


def register_driver(srv, i):
    st, _, b = http("POST", f"{srv.base}/v1/drivers", body={
        "name": f"Driver {i}",
        "vehicle": {"make": "Toyota", "model": "Prius", "plate": f"CON{i:04d}", "color": "white",
                    "product": "economy", "seats": 4}})
    check(st == 201, f"register driver: {st} {b}")
    return b["driver_id"], b["token"]


def register_rider(srv):
    st, _, b = http("POST", f"{srv.base}/v1/riders", body={"name": "Rita Rider", "phone": "+1 514 555 0100"})
    check(st == 201, f"register rider: {st} {b}")
    return b["rider_id"], b["token"]


def ws_url(base, path):
    return base.replace("http://", "ws://") + path


# ---- Without the admin token, nothing --------------------------------------------------

def admin_routes(srv):
    st, _, spec = http("GET", f"{srv.admin}/admin/openapi.json", ADMIN)
    check(st == 200, f"openapi: {st}")
    routes = []
    for path, item in spec["paths"].items():
        if not path.startswith("/admin/") or path.startswith("/admin/console"):
            continue
        concrete = (path.replace("{id}", "trp_" + "0" * 32).replace("{cell}", "872b8e8b6ffffff"))
        for method in item:
            if method in ("get", "post", "put", "delete", "patch"):
                routes.append((method.upper(), concrete))
    check(len(routes) >= 15, f"only {len(routes)} admin routes in the spec")
    return routes


def no_data_without_the_token(srv, driver_token, rider_token):
    routes = admin_routes(srv)
    for method, path in routes:
        body = None if method == "GET" else {}
        for token, want, code in [(None, 401, "unauthorized"), ("not-a-token", 401, "unauthorized"),
                                  (driver_token, 403, "forbidden"), (rider_token, 403, "forbidden")]:
            st, _, b = http(method, f"{srv.admin}{path}", token, body)
            check(st == want and isinstance(b, dict) and b["error"]["code"] == code,
                  f"{method} {path} with token {token!r:.12}: {st} {b!r:.200}, expected {want} {code}")
    log(f"{len(routes)} admin routes: 401 without or with an unknown token, 403 to a driver's and a rider's")

    feed = ws_url(srv.admin, "/admin/v1/ws/live")
    cases = [
        ("a driver's token", {"type": "auth", "token": driver_token}, "forbidden"),
        ("a rider's token", {"type": "auth", "token": rider_token}, "forbidden"),
        ("an unknown token", {"type": "auth", "token": "nope"}, "unauthorized"),
        ("a view before the token", {"type": "view", "south": 0, "west": 0, "north": 1, "east": 1, "zoom": 3},
         "unauthorized"),
    ]
    for what, first, code in cases:
        p = Peer(feed)
        p.send(first)
        err = p.wait(lambda m: m.get("type") == "error", f"the feed's refusal of {what}")
        close_code, reason = p.wait_closed()
        check(err["code"] == code and close_code == 1008 and reason.startswith(f"{code}: "),
              f"feed with {what}: {err}, close {close_code} {reason!r}")
        check(not any(m and m.get("type") in ("welcome", "update") for m in p.seen), f"feed with {what} sent data")
    # A URL token is not read: the feed still waits for the auth message, then refuses.
    p = Peer(feed + f"?token={ADMIN}")
    close_code, reason = p.wait_closed(timeout=15)
    check(close_code == 1008 and reason.startswith("unauthorized"), f"feed with a URL token: {close_code} {reason!r}")
    log("the feed: 1008 'forbidden' to a driver's and a rider's token, 'unauthorized' otherwise; a URL token is ignored")

    # The console is served on the admin listener only.
    st, _, _ = http("GET", f"{srv.base}/admin/console")
    check(st == 404, f"/admin/console on the client listener: {st}")


def page_headers(srv):
    for path in ["/admin/console", "/admin/console/app.js", "/admin/console/vendor/leaflet.js"]:
        st, h, _ = http("GET", f"{srv.admin}{path}")
        check(st == 200, f"{path}: {st}")
        csp = h.get("Content-Security-Policy", "")
        check("default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
              and "frame-ancestors 'none'" in csp, f"{path}: CSP {csp!r}")
        check(h.get("X-Frame-Options") == "DENY", f"{path}: X-Frame-Options {h.get('X-Frame-Options')}")
        check(h.get("X-Content-Type-Options") == "nosniff", f"{path}: nosniff")
        check(h.get("Referrer-Policy") == "no-referrer", f"{path}: Referrer-Policy")
    log("page and assets: 200 without a token, CSP without inline, DENY, nosniff, no-referrer")


def feed_bounds(srv):
    """Eight feeds at most: the ninth upgrade is 503, counted; a bad view is a typed error."""
    feed = ws_url(srv.admin, "/admin/v1/ws/live")
    before = bound_hits(srv, "console_feeds")
    open_feeds = []
    try:
        for _ in range(8):
            p = Peer(feed)
            p.send({"type": "auth", "token": ADMIN})
            p.wait(lambda m: m.get("type") == "welcome", "the feed's welcome")
            open_feeds.append(p)
        try:
            extra = Peer(feed)
            extra.close()
            raise Check("a ninth feed was accepted")
        except Check:
            raise
        except Exception as e:  # noqa: BLE001 - websockets' InvalidStatus
            check("503" in str(e), f"the ninth feed: {e}")
        check(bound_hits(srv, "console_feeds") == before + 1, "the refused feed was not counted")
        p = open_feeds[0]
        p.send({"type": "view", "south": 46, "west": -74, "north": 45, "east": -73, "zoom": 12})
        err = p.wait(lambda m: m.get("type") == "error", "the bad view's error")
        check(err["code"] == "bad_request" and "south <= north" in err["message"], f"bad view: {err}")
        p.send({"type": "view", "south": 45.4, "west": -73.7, "north": 45.6, "east": -73.4, "zoom": 12})
        u = p.wait(lambda m: m.get("type") == "update", "an update")
        check(u["mode"] == "cells" and u["resolution"] == 7 and not u["truncated"], f"update: {str(u)[:200]}")
    finally:
        for p in open_feeds:
            p.close()
    # The slots come back when the feeds close.
    end = time.monotonic() + 10
    while True:
        try:
            p = Peer(feed)
            p.close()
            break
        except Exception:  # noqa: BLE001
            check(time.monotonic() < end, "feed slots not released after their feeds closed")
            time.sleep(0.2)
    log("feeds: the ninth is 503 and counted; a bad view is bad_request; an update in cells mode")


# ---- The browser ------------------------------------------------------------------------

def browser(out_dir):
    opts = webdriver.ChromeOptions()
    opts.binary_location = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    profile = tempfile.mkdtemp(prefix="console-chromium-")
    for a in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1400,900"]:
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver"))
    d = webdriver.Chrome(options=opts, service=service)
    d.set_page_load_timeout(30)
    d.set_script_timeout(30)
    return d, profile


def shot(d, out_dir, name):
    path = os.path.join(out_dir, f"{name}.png")
    d.save_screenshot(path)
    log("screenshot", path)


def until(d, fn, what, timeout=TIMEOUT):
    try:
        return WebDriverWait(d, timeout, poll_frequency=0.2).until(lambda _: fn())
    except TimeoutException:
        raise Check(f"{what}: not within {timeout} s") from None


MARKERS_JS = """
const c = window.dispatchConsole;
if (!c || !c.map) return null;
const box = c.map.getContainer().getBoundingClientRect();
const out = {};
for (const [id, e] of c.drivers) {
  const ll = e.marker.getLatLng();
  const want = c.map.latLngToContainerPoint(ll);
  const el = e.marker.getElement();
  const r = el ? el.getBoundingClientRect() : null;
  out[id] = {lat: ll.lat, lng: ll.lng, fill: el ? el.getAttribute('fill') : null,
             want: [want.x + box.left, want.y + box.top],
             drawn: r ? [r.left + r.width / 2, r.top + r.height / 2] : null};
}
return out;
"""


def markers(d):
    return d.execute_script(MARKERS_JS) or {}


def console_flow(srv, drivers, rider, out_dir):
    d, profile = browser(out_dir)
    try:
        d.get(f"{srv.admin}/admin/console")
        # A wrong token is refused, with the server's own words.
        d.find_element(By.ID, "token").send_keys("adm_wrong_token")
        d.find_element(By.ID, "login-button").click()
        until(d, lambda: "401 unauthorized" in d.find_element(By.ID, "login-error").text, "the refusal")
        check(d.find_element(By.ID, "console").get_attribute("hidden") is not None, "console shown to a wrong token")
        check(d.execute_script("return sessionStorage.length") == 0, "a refused token was kept")
        shot(d, out_dir, "01-refused")
        log("wrong token refused:", d.find_element(By.ID, "login-error").text)

        tok = d.find_element(By.ID, "token")
        tok.clear()
        tok.send_keys(ADMIN)
        d.find_element(By.ID, "login-button").click()
        until(d, lambda: d.execute_script("return (window.dispatchConsole || {}).updates > 0"), "the first update")
        check(d.execute_script("return document.cookie") == "", "a cookie was set")
        # Zoomed in on the drivers: exact positions.
        d.execute_script(f"window.dispatchConsole.map.setView([{HOME[0]}, {HOME[1]}], 16)")
        ids = [i for i, _ in drivers]
        until(d, lambda: set(ids) <= set(markers(d)), "the three drivers on the map")
        until(d, lambda: all(markers(d)[i]["fill"] == AVAILABLE for i in ids), "the drivers in the available colour")
        m = markers(d)
        for (i, _), (lat, lng, _h) in zip(drivers, DRIVERS):
            check(abs(m[i]["lat"] - lat) < 1e-6 and abs(m[i]["lng"] - lng) < 1e-6,
                  f"{i} at {m[i]['lat']},{m[i]['lng']}, sent {lat},{lng}")
            dx = m[i]["drawn"][0] - m[i]["want"][0]
            dy = m[i]["drawn"][1] - m[i]["want"][1]
            check(abs(dx) <= 3 and abs(dy) <= 3, f"{i} drawn {m[i]['drawn']}, its place is {m[i]['want']}")
        shot(d, out_dir, "02-drivers")
        log("three drivers drawn at their positions, available colour")

        # The rider requests; the nearest driver is offered the trip and changes colour.
        rider_id, rider_ws = rider
        rider_ws.send({"type": "request_ride", "req": 1, "pickup": PICKUP, "dropoff": DROPOFF, "product": "economy"})
        trip = rider_ws.wait(lambda x: x.get("req") == 1, "the request's reply")
        check(trip["type"] == "trip_update", f"request refused: {trip}")
        trip_id = trip["trip"]["trip_id"]
        offered_id, offered_ws = drivers[0][0], drivers[0][1]
        offered_ws.wait(lambda x: x.get("type") == "offer" and x["trip_id"] == trip_id, "the offer")
        until(d, lambda: markers(d)[offered_id]["fill"] == OFFERED, "the offered driver's colour")
        others = [markers(d)[i]["fill"] for i in ids[1:]]
        check(others == [AVAILABLE, AVAILABLE], f"the other drivers: {others}")
        until(d, lambda: d.execute_script(
            "return window.dispatchConsole.lastUpdate.riders.some(r => r.trip_id === arguments[0])", trip_id),
            "the waiting rider on the map")
        shot(d, out_dir, "03-offered")
        log(f"{offered_id} turned the offered colour for {trip_id}")

        # Find the trip by the rider's id; open it; its history is there.
        d.find_element(By.ID, "search-q").send_keys(rider_id)
        d.find_element(By.ID, "search-button").click()
        link = until(d, lambda: d.find_elements(By.CSS_SELECTOR, f'#results a[data-trip="{trip_id}"]'), "the trip found")
        link[0].click()
        until(d, lambda: d.find_element(By.ID, "trip-id").text == trip_id, "the trip opened")
        check(d.find_element(By.ID, "trip-state").text == "dispatching", "state shown")
        history = d.find_elements(By.CSS_SELECTOR, "#trip-history li")
        check(len(history) >= 1 and "dispatching" in history[0].text, f"history: {[h.text for h in history]}")

        # Cancel it, after the confirmation; the rider's app hears it.
        d.find_element(By.ID, "cancel-reason").send_keys("console test")
        d.find_element(By.ID, "cancel-trip").click()
        until(d, lambda: d.find_element(By.ID, "confirm").get_attribute("open") is not None, "the confirmation")
        check(trip_id in d.find_element(By.ID, "confirm-text").text, "the confirmation names the trip")
        shot(d, out_dir, "04-confirm")
        d.find_element(By.ID, "confirm-yes").click()
        until(d, lambda: "is cancelled" in d.find_element(By.ID, "action-result").text, "the cancel done")
        got = rider_ws.wait(lambda x: x.get("type") == "trip_update" and x["trip"]["state"] == "cancelled",
                            "the rider's cancelled update")
        check(got["trip"]["cancelled_by"] == "admin", f"cancelled_by {got['trip']['cancelled_by']}")
        until(d, lambda: d.find_element(By.ID, "trip-state").text == "cancelled", "the trip shown cancelled")
        log("trip found by rider id, cancelled with confirmation; the rider received cancelled (by admin)")

        # Again: the server's 409, shown as it said it.
        d.find_element(By.ID, "cancel-trip").click()
        until(d, lambda: d.find_element(By.ID, "confirm").get_attribute("open") is not None, "the confirmation")
        d.find_element(By.ID, "confirm-yes").click()
        until(d, lambda: d.find_element(By.ID, "action-error").text.startswith("409 conflict: "), "the 409 shown")
        st, _, b = http("POST", f"{srv.admin}/admin/trips/{trip_id}/cancel", ADMIN, {"reason": "again"})
        shown = d.find_element(By.ID, "action-error").text
        check(shown == f"409 {b['error']['code']}: {b['error']['message']}", f"shown {shown!r}, server said {b}")
        shot(d, out_dir, "05-conflict")
        log("second cancel: shown as the server said it:", shown)

        errors = [e for e in d.get_log("browser") if e["level"] == "SEVERE"
                  and "401" not in e["message"] and "409" not in e["message"]]
        check(not errors, f"the browser logged errors: {errors}")
        log("no error in the browser's log (no CSP violation)")
    except BaseException:
        try:
            shot(d, out_dir, "failure")
            print(d.get_log("browser"), file=sys.stderr)
        except Exception:  # noqa: BLE001
            pass
        raise
    finally:
        d.quit()
        shutil.rmtree(profile, ignore_errors=True)


def drive(srv):
    """Three drivers online at known places, moving a little every 2 s; a rider connected."""
    drivers = []
    for i, (lat, lng, heading) in enumerate(DRIVERS):
        did, tok = register_driver(srv, i)
        p = Peer(ws_url(srv.base, "/v1/ws/driver"), {"Authorization": f"Bearer {tok}"})
        p.send({"type": "go_online", "req": 1})
        p.wait(lambda m: m.get("req") == 1 and m["type"] == "ack", "go_online")
        p.send({"type": "location", "req": 2, "lat": lat, "lng": lng, "heading": heading,
                "ts": int(time.time() * 1000)})
        p.wait(lambda m: m.get("req") == 2 and m["type"] == "ack", "location")
        drivers.append((did, p, tok))
    stop = threading.Event()

    def ping():
        while not stop.wait(2):
            for (_, p, _), (lat, lng, heading) in zip(drivers, DRIVERS):
                try:
                    p.send({"type": "location", "lat": lat, "lng": lng, "heading": heading,
                            "ts": int(time.time() * 1000)})
                except Exception:  # noqa: BLE001
                    pass

    threading.Thread(target=ping, daemon=True).start()
    rid, rtok = register_rider(srv)
    rider = Peer(ws_url(srv.base, "/v1/ws/rider"), {"Authorization": f"Bearer {rtok}"})
    rider.wait(lambda m: m.get("type") == "welcome", "the rider's welcome")
    return drivers, (rid, rider, rtok), stop


def open_on_city(d, srv, timeout=180):
    """Logs in and waits until the feed shows a loadgen city's cells."""
    d.get(f"{srv.admin}/admin/console")
    d.find_element(By.ID, "token").send_keys(ADMIN)
    d.find_element(By.ID, "login-button").click()
    until(d, lambda: d.execute_script(
        "const c = window.dispatchConsole; return c.lastUpdate && c.lastUpdate.cells.length > 5"),
        "the city's cells", timeout=timeout)


def city_screenshot(args, srv):
    """A loadgen city running, the console zoomed out over it, saved as --screenshot."""
    lg = subprocess.Popen(
        [args.city, "--url", ws_url(srv.base, ""), "--drivers", str(args.city_drivers),
         "--riders", str(args.city_riders), "--request-rate", str(args.city_request_rate),
         "--duration", f"{args.city_seconds}s", "--demand-csv", "loadgen/data/montreal_carshare_zones.csv"],
        stdout=subprocess.DEVNULL, stderr=open(os.path.join(args.out, "loadgen.log"), "w"))
    try:
        d, profile = browser(args.out)
        try:
            open_on_city(d, srv)
            # Downtown Montreal at zoom 12: H3 cells of resolution 7 shaded by drivers and requests.
            d.execute_script("window.dispatchConsole.map.setView([45.515, -73.6], 12)")
            time.sleep(8)
            d.set_window_size(1200, 760)
            time.sleep(3)
            d.save_screenshot(args.screenshot)
            log("city screenshot", args.screenshot)
        finally:
            d.quit()
            shutil.rmtree(profile, ignore_errors=True)
    finally:
        lg.send_signal(signal.SIGINT)
        try:
            lg.wait(20)
        except subprocess.TimeoutExpired:
            lg.kill()


FRAMES_JS = """
const c = window.dispatchConsole;
c.frames = [];
let last = performance.now();
const tick = (t) => { c.frames.push(t - last); last = t; if (c.frames.length < 100000) requestAnimationFrame(tick); };
requestAnimationFrame(tick);
"""

STATS_JS = """
const c = window.dispatchConsole;
const q = (xs, p) => { if (!xs.length) return null; const s = [...xs].sort((a, b) => a - b); return s[Math.min(s.length - 1, Math.floor(p * s.length))]; };
const f = c.frames || [], r = c.renders.map(x => x.ms), b = c.renders.map(x => x.bytes);
const u = c.lastUpdate || {};
return {frames: f.length, frame_p50_ms: q(f, 0.5), frame_p99_ms: q(f, 0.99), frame_max_ms: q(f, 1),
        renders: r.length, render_p50_ms: q(r, 0.5), render_max_ms: q(r, 1), bytes_max: q(b, 1),
        updates: c.updates, mode: u.mode, cells: (u.cells || []).length, drivers: (u.drivers || []).length,
        truncated: u.truncated, zoom: c.map.getZoom()};
"""


def bound_hits(srv, bound):
    st, _, text = http("GET", f"{srv.admin}/metrics")
    text = text.decode() if isinstance(text, bytes) else str(text)
    for line in text.splitlines():
        if line.startswith("dispatch_bound_hits_total") and f'bound="{bound}"' in line:
            return int(float(line.split()[-1]))
    return 0


def perf(args):
    """15,000 drivers from loadgen, with and without the console open, alternating."""
    import resource
    resource.setrlimit(resource.RLIMIT_NOFILE, (20000, 20000))
    extra = ["--register-rate-per-s", "1000000", "--register-burst", "1000000"]
    results = []
    for rnd in range(args.perf_rounds):
        for side in ("without", "with"):
            srv = Server(args.dispatchd, args.port, args.port + 1, extra)
            report = os.path.join(args.out, f"perf-{side}-{rnd}.json")
            lg = subprocess.Popen(
                [args.perf, "--url", ws_url(srv.base, ""), "--drivers", "15000", "--riders", "2000",
                 "--request-rate", "50", "--duration", "60s", "--drain", "20s", "--ping-interval-ms", "4000",
                 "--time-scale", "30", "--demand-csv", "loadgen/data/montreal_carshare_zones.csv", "--seed", "1",
                 "--workers", "2", "--source-ips", "127.0.0.2-127.0.0.9", "--connect-concurrency", "256",
                 "--json", report, "--quiet"],
                stdout=subprocess.DEVNULL, stderr=open(report + ".log", "w"))
            page = None
            try:
                if side == "with" and args.perf_feed_only:
                    # The feed alone (no browser on this machine): its server-side cost.
                    time.sleep(20)
                    p = Peer(ws_url(srv.admin, "/admin/v1/ws/live"))
                    p.send({"type": "auth", "token": ADMIN})
                    p.send({"type": "view", "south": 45.40, "west": -73.80, "north": 45.62, "east": -73.45, "zoom": 12})
                    lg.wait(600)
                    ups = [m for m in list(p.seen) + list(p.inbox.queue) if m and m.get("type") == "update"]
                    page = {"updates": len(ups), "bytes_max": max(len(json.dumps(u)) for u in ups),
                            "cells_max": max(len(u["cells"]) for u in ups)}
                    p.close()
                elif side == "with":
                    d, profile = browser(args.out)
                    try:
                        open_on_city(d, srv)
                        d.execute_script(FRAMES_JS)
                        page = {}
                        # The whole city (cells), then zoomed in on its busiest part (drivers).
                        for zoom in (11, 12, 15):
                            d.execute_script(f"window.dispatchConsole.map.setZoom({zoom})")
                            time.sleep(15)
                            page[zoom] = d.execute_script(STATS_JS)
                        d.execute_script("window.dispatchConsole.map.setZoom(12)")
                        lg.wait(600)
                    finally:
                        d.quit()
                        shutil.rmtree(profile, ignore_errors=True)
                else:
                    lg.wait(600)
                truncations = bound_hits(srv, "console_feed_items")
            finally:
                if lg.poll() is None:
                    lg.kill()
                srv.stop()
            r = json.load(open(report))
            lat = r["latency"]["request_to_offer"]
            row = {"side": side, "round": rnd, "p50_ms": lat["p50_ms"], "p99_ms": lat["p99_ms"],
                   "matched": r["trips"]["matched"], "truncations": truncations, "page": page}
            log(json.dumps(row))
            results.append(row)
    print(json.dumps(results, indent=1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dispatchd", required=True)
    ap.add_argument("--out", required=True, help="screenshots directory")
    ap.add_argument("--port", type=int, default=55550)
    ap.add_argument("--city", help="a loadgen binary: take the README's screenshot instead")
    ap.add_argument("--city-drivers", type=int, default=1500)
    ap.add_argument("--city-riders", type=int, default=300)
    ap.add_argument("--city-request-rate", type=float, default=5.0)
    ap.add_argument("--city-seconds", type=int, default=120)
    ap.add_argument("--screenshot", default="docs/console.png")
    ap.add_argument("--perf", help="a loadgen binary: 15,000 drivers with and without the console open")
    ap.add_argument("--perf-rounds", type=int, default=2)
    ap.add_argument("--perf-feed-only", action="store_true", help="a Python feed client instead of Chromium")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    began = time.monotonic()
    if args.perf:
        perf(args)
        return
    # A city registers every driver and rider from this host: lift the registration limit.
    extra = ["--register-rate-per-s", "1000000", "--register-burst", "1000000"] if args.city else []
    srv = Server(args.dispatchd, args.port, args.port + 1, extra)
    failed = True
    try:
        if args.city:
            city_screenshot(args, srv)
            failed = False
            return
        drivers, (rid, rider, rtok), stop = drive(srv)
        try:
            page_headers(srv)
            no_data_without_the_token(srv, drivers[0][2], rtok)
            feed_bounds(srv)
            console_flow(srv, [(i, p) for i, p, _ in drivers], (rid, rider), args.out)
        finally:
            stop.set()
            for _, p, _ in drivers:
                p.close()
            rider.close()
        failed = False
    finally:
        srv.stop(keep=failed)
    log(f"console test passed in {time.monotonic() - began:.1f} s")


if __name__ == "__main__":
    try:
        main()
    except Check as e:
        print(f"FAILED: {e}", file=sys.stderr)
        sys.exit(1)
