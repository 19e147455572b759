#!/usr/bin/env python3
"""A TCP relay that delays what it carries while a file exists, for .ci/partition.sh.

  delay_proxy.py LISTEN_HOST:PORT TARGET_HOST:PORT ONFILE MEAN_MS JITTER_MS

Every chunk read from either side is written to the other MEAN_MS +- JITTER_MS
(uniform) after it arrived while ONFILE exists, at once otherwise; order is kept (a
chunk never overtakes the one before it), as on a link with that latency. It stands in
for `tc netem delay` on kernels without sch_netem. Each direction buffers at most
1 MiB (then it stops reading until the backlog is written).
"""

import asyncio
import os
import random
import sys

LIMIT = 1 << 20


async def pipe(reader, writer, on, mean, jitter):
    q = asyncio.Queue()
    backlog = 0
    room = asyncio.Event()
    room.set()

    async def send():
        nonlocal backlog
        while True:
            due, data = await q.get()
            if data is None:
                break
            delay = due - asyncio.get_running_loop().time()
            if delay > 0:
                await asyncio.sleep(delay)
            writer.write(data)
            await writer.drain()
            backlog -= len(data)
            if backlog < LIMIT:
                room.set()
        writer.close()

    sender = asyncio.create_task(send())
    last = 0.0
    try:
        while True:
            await room.wait()
            data = await reader.read(65536)
            if not data:
                break
            now = asyncio.get_running_loop().time()
            d = (mean + random.uniform(-jitter, jitter)) / 1000 if os.path.exists(on) else 0.0
            last = max(now + d, last)
            backlog += len(data)
            if backlog >= LIMIT:
                room.clear()
            q.put_nowait((last, data))
    except (ConnectionError, OSError):
        pass
    q.put_nowait((0.0, None))
    try:
        await sender
    except (ConnectionError, OSError):
        pass


async def main(listen, target, on, mean, jitter):
    th, tp = target.rsplit(":", 1)

    async def relay(cr, cw):
        try:
            sr, sw = await asyncio.wait_for(asyncio.open_connection(th, int(tp)), 5)
        except (OSError, asyncio.TimeoutError):
            cw.close()
            return
        await asyncio.gather(pipe(cr, sw, on, mean, jitter), pipe(sr, cw, on, mean, jitter))

    lh, lp = listen.rsplit(":", 1)
    server = await asyncio.start_server(relay, lh, int(lp))
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    if len(sys.argv) != 6:
        sys.exit(__doc__)
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), float(sys.argv[5])))
