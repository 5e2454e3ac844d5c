"""The receiving ends of the end-to-end benchmark, run as their own process.

    python -m benchmarks.sink_peers

An aiohttp webhook receiver (counts the records of every POSTed JSON array and answers 200) and
a UDP syslog listener (counts datagrams). Prints ``webhook PORT`` and ``syslog PORT`` once
listening; on each ``stats`` line read from stdin prints ``stats WEBHOOK_EVENTS SYSLOG_MESSAGES``;
exits when stdin closes.
"""

from __future__ import annotations

import asyncio
import sys

from aiohttp import web


class Counts:
    webhook_events = 0
    webhook_requests = 0
    syslog_messages = 0


class _Syslog(asyncio.DatagramProtocol):
    def __init__(self, counts: Counts) -> None:
        self.counts = counts

    def datagram_received(self, data: bytes, addr) -> None:
        self.counts.syslog_messages += 1


async def main() -> None:
    counts = Counts()

    async def receive(request: web.Request) -> web.Response:
        body = await request.read()
        # One record per '{"id":' at the top of each array element: cheap and exact for
        # amid's records (the id is always the first key).
        counts.webhook_events += body.count(b'{"id":')
        counts.webhook_requests += 1
        return web.Response(status=200)

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/events", receive)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(lambda: _Syslog(counts), local_addr=("127.0.0.1", 0))
    print(f"webhook {site._server.sockets[0].getsockname()[1]}", flush=True)
    print(f"syslog {transport.get_extra_info('sockname')[1]}", flush=True)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        if line.strip() == b"stats":
            print(f"stats {counts.webhook_events} {counts.syslog_messages}", flush=True)
    transport.close()
    await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
