#!/usr/bin/env python3
"""A client pinned to one dispatchd node, for .ci/partition.sh (issue 16).

  partition_probe.py run BASE LOG STOPFILE [--once]   # e.g. http://10.232.0.1:33080
  partition_probe.py check LOG AFTER_MS LABEL [--closed] [--until UNTIL_MS]
  partition_probe.py ride BASE TOKEN GOFILE LOG

`ride` opens a rider session on BASE with TOKEN and, once GOFILE exists, asks for a ride
in it (the node may be stopped by then: the request waits in its socket); every frame
and the close go to LOG.

`run` registers a rider on BASE (retrying while BASE is not ready) and, until STOPFILE
exists, every 100 ms: asks `GET /v1/drivers/nearby` (answered from the node's memory)
and sends a rider `location` with a `req` on its WebSocket session (answered `ack` from
memory); when the session closes it opens it again every 300 ms (with --once: not after
a session that opened has closed, since a node that woke as a standby relays a new session
to the new leader, which may answer it). One JSON line per
event goes to LOG, each stamped with this machine's clock in Unix ms: what was sent
when, what came back, upgrades, closes.

`check` fails (exit 1) if BASE answered anything to a request sent at or after AFTER_MS
(a REST 200, an `ack` of a `req` sent then, a session opened by an upgrade sent then):
whatever is sent after that instant reaches the node after its local deadline, so it
must be refused. It also needs proof that the probe could see a violation (answers
before AFTER_MS) and that the node refused (an `unavailable` REST answer after it;
with --closed, its session closed with 1001). With --until, answers that came back at or
after UNTIL_MS are left out: in sharded mode a node that woke claims its shards again
under new leases, and what it answers from then on is served, not stale.
"""

import asyncio
import json
import os
import sys
import time
import urllib.error
import urllib.request

import websockets
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

LAT, LNG = 45.5017, -73.5673
TICK = 0.1


def now_ms():
    return time.time_ns() // 1_000_000


class Log:
    def __init__(self, path):
        self.f = open(path, "a", buffering=1)

    def __call__(self, **e):
        self.f.write(json.dumps(e) + "\n")


def http(method, url, body=None, token=None, timeout=1.0):
    """(status, json-or-text); status 0 when nothing came back in time."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("content-type", "application/json")
    if token:
        req.add_header("authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read() or b"null")
        except ValueError:
            return e.code, None
    except (OSError, ValueError) as e:
        return 0, str(e)


def register(base, log, stop):
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not os.path.exists(stop):
        st, v = http("POST", f"{base}/v1/riders", {"name": "Probe", "phone": "+15145550100"})
        if st == 201:
            log(kind="registered", at=now_ms(), rider=v["rider_id"])
            return v["token"]
        time.sleep(0.2)
    sys.exit(f"partition_probe: cannot register a rider on {base}")


async def rest_loop(base, token, log, stop):
    url = f"{base}/v1/drivers/nearby?lat={LAT}&lng={LNG}&radius_m=3000&limit=5"
    while not os.path.exists(stop):
        sent = now_ms()
        st, v = await asyncio.to_thread(http, "GET", url, None, token)
        code = v.get("error", {}).get("code") if isinstance(v, dict) and st != 200 else None
        log(kind="rest", sent=sent, at=now_ms(), status=st, code=code)
        await asyncio.sleep(TICK)


async def read_all(ws, log):
    """Logs every frame of `ws` until it closes, then the close."""
    try:
        async for m in ws:
            f = json.loads(m)
            log(kind="frame", at=now_ms(), type=f.get("type"), req=f.get("req"))
    except ConnectionClosed:
        pass
    log(kind="close", at=now_ms(), code=ws.close_code, reason=ws.close_reason)


async def ws_loop(base, token, log, stop, once):
    url = base.replace("http://", "ws://") + "/v1/ws/rider"
    req = 0
    opened = False
    while not os.path.exists(stop) and not (once and opened):
        sent = now_ms()
        try:
            async with connect(
                url,
                additional_headers={"authorization": f"Bearer {token}"},
                open_timeout=2,
                close_timeout=1,
                ping_interval=None,
            ) as ws:
                first = json.loads(await asyncio.wait_for(ws.recv(), 2))
                log(kind="upgrade", sent=sent, at=now_ms(), ok=True, first=first.get("type"))
                opened = True

                r = asyncio.create_task(read_all(ws, log))
                while not r.done() and not os.path.exists(stop):
                    req += 1
                    msg = {"type": "location", "lat": LAT, "lng": LNG, "ts": now_ms(), "req": req}
                    log(kind="send", sent=now_ms(), req=req)
                    try:
                        await ws.send(json.dumps(msg))
                    except ConnectionClosed:
                        break
                    await asyncio.sleep(TICK)
                await asyncio.wait_for(r, 3) if not os.path.exists(stop) else r.cancel()
        except InvalidStatus as e:
            log(kind="upgrade", sent=sent, at=now_ms(), ok=False, status=e.response.status_code)
        except (OSError, TimeoutError, asyncio.TimeoutError, ConnectionClosed,
                websockets.exceptions.InvalidHandshake) as e:
            log(kind="upgrade", sent=sent, at=now_ms(), ok=False, status=0, error=str(e)[:200])
        await asyncio.sleep(0.3)


def run(base, path, stop, once=False):
    log = Log(path)
    token = register(base, log, stop)

    async def both():
        await asyncio.gather(rest_loop(base, token, log, stop), ws_loop(base, token, log, stop, once))

    asyncio.run(both())


def check(path, after, label, closed, until=None):
    events = [json.loads(line) for line in open(path)]
    if until is not None:
        events = [e for e in events if e["kind"] not in ("rest", "frame", "upgrade") or e["at"] < until]
    sent_of = {e["req"]: e["sent"] for e in events if e["kind"] == "send"}
    answered = []  # (what, sent) of every answer the node gave
    for e in events:
        if e["kind"] == "rest" and e["status"] == 200:
            answered.append(("GET /v1/drivers/nearby 200", e["sent"]))
        elif e["kind"] == "frame" and e["req"] in sent_of:
            answered.append((f"{e['type']} to location req {e['req']}", sent_of[e["req"]]))
        elif e["kind"] == "upgrade" and e["ok"]:
            answered.append(("WebSocket session opened", e["sent"]))
    before = [a for a in answered if a[1] < after]
    late = [a for a in answered if a[1] >= after]
    refused = [e for e in events if e["kind"] == "rest" and e["sent"] >= after
               and e["status"] == 503 and e["code"] == "unavailable"]
    closes = [e for e in events if e["kind"] == "close"]
    last_ok = max((s for _, s in before), default=None)
    rel = lambda t: "none" if t is None else f"{t - after:+d} ms"
    first_unavailable = min((e["sent"] for e in events if e["kind"] == "rest"
                             and e["code"] == "unavailable" and e["sent"] > (last_ok or 0)),
                            default=None)
    print(f"{label}: {len(before)} answers to requests sent before the bound, {len(late)} after it; "
          f"relative to the bound: last answered request sent at {rel(last_ok)}, first request "
          f"answered `unavailable` sent at {rel(first_unavailable)}; session closes: "
          f"{[(c['code'], c['reason'], rel(c['at'])) for c in closes]}")
    ok = True
    if late:
        print(f"{label}: FAIL: the node answered {len(late)} requests sent after the bound, e.g. "
              f"{[(w, rel(s)) for w, s in late[:5]]}")
        ok = False
    if not before:
        print(f"{label}: FAIL: the node answered nothing before the bound (the probe saw nothing)")
        ok = False
    if not refused:
        print(f"{label}: FAIL: no `unavailable` answer after the bound")
        ok = False
    if closed and not any(c["code"] == 1001 for c in closes):
        print(f"{label}: FAIL: the node's session was not closed with 1001")
        ok = False
    return ok


def ride(base, token, go, path):
    log = Log(path)

    async def session():
        url = base.replace("http://", "ws://") + "/v1/ws/rider"
        async with connect(url, additional_headers={"authorization": f"Bearer {token}"},
                           open_timeout=10, ping_interval=None) as ws:
            log(kind="welcome", at=now_ms(), first=json.loads(await ws.recv()).get("type"))
            while not os.path.exists(go):
                await asyncio.sleep(0.02)
            await ws.send(json.dumps({"type": "request_ride", "req": 1, "product": "economy",
                                      "pickup": {"lat": LAT, "lng": LNG},
                                      "dropoff": {"lat": LAT + 0.01, "lng": LNG + 0.01}}))
            log(kind="send", sent=now_ms(), req=1)
            await read_all(ws, log)

    try:
        asyncio.run(asyncio.wait_for(session(), 120))
    except Exception as e:  # noqa: BLE001 - recorded, the script checks the store
        log(kind="error", at=now_ms(), error=f"{type(e).__name__}: {e}")


def main():
    if len(sys.argv) in (5, 6) and sys.argv[1] == "run" and sys.argv[5:] in ([], ["--once"]):
        run(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:] == ["--once"])
    elif len(sys.argv) in (5, 6, 7, 8) and sys.argv[1] == "check":
        rest = sys.argv[5:]
        closed = "--closed" in rest
        until = int(rest[rest.index("--until") + 1]) if "--until" in rest[:-1] else None
        if len(rest) != int(closed) + 2 * (until is not None):
            sys.exit(__doc__)
        sys.exit(0 if check(sys.argv[2], int(sys.argv[3]), sys.argv[4], closed, until) else 1)
    elif len(sys.argv) == 6 and sys.argv[1] == "ride":
        ride(*sys.argv[2:])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
