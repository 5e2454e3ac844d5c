"""The peer contenders of the tail benchmark: `amid tail` done with another AMI library.

    python -m benchmarks.tail_clients LIB --port P --secret-file F --count N

Each logs in, prints every event as one JSON object per line on stdout (the event's fields as
the library hands them over, ``json.dumps`` of its dict), and exits after the Nth event, as
``amid tail --count N`` does. Each is written the way the library's documentation shows:
panoramisk registers an event handler for ``*`` on its asyncio ``Manager``; python-ami
(asterisk-ami) adds an event listener to its ``AMIClient``, whose reader thread calls it.
``print`` to stdout with Python's default buffering (block-buffered on a pipe): the kindest
choice for these clients, and what a script of this kind does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import threading
from pathlib import Path
from typing import Any

USER = "amid"
TIMEOUT = 120.0


async def tail_panoramisk(port: int, secret: str, count: int) -> None:
    import logging

    from panoramisk import Manager  # type: ignore[import-untyped]
    logging.getLogger("panoramisk").setLevel(logging.CRITICAL)
    done = asyncio.Event()
    seen = 0

    def on_event(manager: Any, event: Any) -> None:
        nonlocal seen
        if seen >= count:
            return
        print(json.dumps(dict(event)))
        seen += 1
        if seen >= count:
            sys.stdout.flush()  # the last lines out now, not when the process ends
            done.set()

    manager = Manager(host="127.0.0.1", port=port, username=USER, secret=secret,
                      loop=asyncio.get_running_loop(), ping_delay=10_000, reconnect_timeout=10_000)
    manager.register_event("*", on_event)
    await manager.connect()
    async with asyncio.timeout(TIMEOUT):
        await done.wait()
    manager.on_disconnect = lambda *a: None
    manager.connection_lost = lambda exc: None  # no reconnect while we leave
    manager.close()


def tail_python_ami(port: int, secret: str, count: int) -> None:
    from asterisk.ami import AMIClient  # type: ignore[import-untyped]
    done = threading.Event()
    seen = 0

    def on_event(event: Any, source: Any) -> None:
        nonlocal seen
        if seen >= count:
            return
        print(json.dumps({"Event": event.name, **event.keys}))
        seen += 1
        if seen >= count:
            sys.stdout.flush()  # the last lines out now, not when the process ends
            done.set()

    # ``timeout`` is also the socket's recv timeout: generous, the stream never idles that long.
    client = AMIClient(address="127.0.0.1", port=port, timeout=10)
    client.add_event_listener(on_event)
    client.login(username=USER, secret=secret)
    if not done.wait(TIMEOUT):
        raise TimeoutError(f"python-ami printed {seen} of {count} events")
    # disconnect() joins a reader thread that may sit in recv(): shut the socket down instead.
    client.finished.set()
    client._socket.shutdown(socket.SHUT_RDWR)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("lib", choices=("panoramisk", "python-ami"))
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--secret-file", type=Path, required=True)
    p.add_argument("--count", type=int, required=True, help="exit after N events")
    args = p.parse_args(argv)
    secret = args.secret_file.read_text().strip()
    if args.lib == "panoramisk":
        asyncio.run(tail_panoramisk(args.port, secret, args.count))
    else:
        tail_python_ami(args.port, secret, args.count)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
