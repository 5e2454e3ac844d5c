"""One receive measurement in a fresh process: connect, log in, take EXPECT events through the
library's own event-handler API, print one JSON line.

    python -m benchmarks.receive_client LIB --port P --expect N [--verify DUMP]

Every handler does the same small job: read the event name and its ``Uniqueid`` field and count
the event. The clock runs from the connect call to the moment the handler saw the last expected
event; ``cpu`` is this process's CPU time over the same span (all threads). With ``--verify``
the handler also keeps every event, and after the clock stopped they are compared with the bytes
the server sent: each must carry every (key, value) exactly (``intact``). Keeping 40,000 events
alive costs every library memory and garbage-collector time, so verifying runs are not timed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

USER, SECRET = "amid", "amidsecret"
TIMEOUT = 120.0

Canonical = dict[str, list[str]]


def _canonical_pairs(pairs) -> Canonical:
    out: Canonical = {}
    for key, value in pairs:
        out.setdefault(key, []).append(value)
    return out


# ------------------------------------------------------------------------------------- amid

async def run_amid(port: int, expect: int, *, touch_field: bool, handler_api: bool, keep: bool, seen: list) -> tuple:
    from amid.ami.session import AMIClient
    done = asyncio.Event()
    count = [0]

    def on_event(event) -> None:
        event.name
        if touch_field:
            event.get("Uniqueid")  # decodes the fields (lazy until here)
        seen.append(event) if keep else None
        count[0] += 1
        if count[0] >= expect:
            done.set()

    client = AMIClient("127.0.0.1", port, username=USER, secret=SECRET, auth="plain",
                       ping_interval=0, reconnect=False, handler_queue_size=expect + 10)
    if handler_api:
        client.add_event_handler("*", on_event)
    else:
        client.add_listener(on_event)
    t0, c0 = time.perf_counter(), time.process_time()
    await client.connect()
    async with asyncio.timeout(TIMEOUT):
        await done.wait()
    t1, c1 = time.perf_counter(), time.process_time()
    await client.close(logoff_timeout=1.0)
    return t1 - t0, c1 - c0, count[0], lambda e: _canonical_pairs(e.fields)


# ------------------------------------------------------------------------------------- panoramisk

async def run_panoramisk(port: int, expect: int, keep: bool, seen: list) -> tuple:
    import logging

    from panoramisk import Manager
    logging.getLogger("panoramisk").setLevel(logging.CRITICAL)
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    count = [0]

    def on_event(manager, event) -> None:
        event.event
        event.get("Uniqueid")
        seen.append(event) if keep else None
        count[0] += 1
        if count[0] >= expect:
            done.set()

    manager = Manager(host="127.0.0.1", port=port, username=USER, secret=SECRET, loop=loop,
                      ping_delay=10_000, reconnect_timeout=10_000)
    manager.register_event("*", on_event)
    t0, c0 = time.perf_counter(), time.process_time()
    await manager.connect()
    async with asyncio.timeout(TIMEOUT):
        await done.wait()
    t1, c1 = time.perf_counter(), time.process_time()
    manager.on_disconnect = lambda *a: None
    manager.connection_lost = lambda exc: None  # no reconnect while we leave
    manager.close()

    def canonical(event) -> Canonical:
        out: Canonical = {}
        for key in event:
            if key == "content" and event[key] == "":
                continue  # panoramisk adds an empty body key to every message
            value = event[key]
            out[key] = list(value) if isinstance(value, list) else [value]
        return out
    return t1 - t0, c1 - c0, count[0], canonical


# ------------------------------------------------------------------------------------- python-ami

def run_python_ami(port: int, expect: int, keep: bool, seen: list) -> tuple:
    from asterisk.ami import AMIClient
    done = threading.Event()
    count = [0]

    def on_event(event, source) -> None:
        event.name
        event.keys.get("Uniqueid")
        seen.append(event) if keep else None
        count[0] += 1
        if count[0] >= expect:
            done.set()

    # ``timeout`` is also the socket's recv timeout: generous, the stream never idles that long.
    client = AMIClient(address="127.0.0.1", port=port, timeout=10)
    client.add_event_listener(on_event)
    t0, c0 = time.perf_counter(), time.process_time()
    client.login(username=USER, secret=SECRET)
    finished = done.wait(TIMEOUT)
    t1, c1 = time.perf_counter(), time.process_time()
    if not finished:
        raise TimeoutError(f"python-ami delivered {count[0]} of {expect} events")
    # disconnect() joins a reader thread that may sit in recv(): shut the socket down instead.
    client.finished.set()
    client._socket.shutdown(socket.SHUT_RDWR)

    def canonical(event) -> Canonical:
        out: Canonical = {"Event": [event.name]}
        for key, value in event.keys.items():
            out[key] = [value if isinstance(value, str) else repr(value)]
        return out
    return t1 - t0, c1 - c0, count[0], canonical


# ------------------------------------------------------------------------------------- basicami

async def run_basicami(port: int, expect: int, keep: bool, seen: list) -> tuple:
    from basicami import BasicAMI
    count = [0]
    t0, c0 = time.perf_counter(), time.process_time()
    ami = await BasicAMI.connect("127.0.0.1", port, USER, SECRET)
    async with asyncio.timeout(TIMEOUT):
        while count[0] < expect:
            for fields in await ami.get_events(timeout=1.0, max_events=10_000):
                fields.get("Event")
                fields.get("Uniqueid")
                seen.append(fields) if keep else None
                count[0] += 1
    t1, c1 = time.perf_counter(), time.process_time()
    await ami.close()
    return t1 - t0, c1 - c0, count[0], lambda f: {k: [v] for k, v in f.items()}


# ------------------------------------------------------------------------------------- main

RUNNERS: dict[str, Callable] = {
    "amid": lambda *a: run_amid(*a[:2], touch_field=True, handler_api=False, **a[2]),
    "amid-lazy": lambda *a: run_amid(*a[:2], touch_field=False, handler_api=False, **a[2]),
    "amid-handler": lambda *a: run_amid(*a[:2], touch_field=True, handler_api=True, **a[2]),
    "amid-uvloop": lambda *a: run_amid(*a[:2], touch_field=True, handler_api=False, **a[2]),
    "amid-proto": lambda *a: run_amid(*a[:2], touch_field=True, handler_api=False, **a[2]),
    "panoramisk": lambda *a: run_panoramisk(*a[:2], **a[2]),
    "python-ami": lambda *a: run_python_ami(*a[:2], **a[2]),
    "basicami": lambda *a: run_basicami(*a[:2], **a[2]),
}


def _expected(dump: Path) -> list[Canonical]:
    from amid.ami.protocol import Parser
    return [_canonical_pairs(m.fields) for m in Parser(expect_banner=False).feed(dump.read_bytes())]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("lib", choices=sorted(RUNNERS))
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--expect", type=int, required=True, help="events to wait for")
    p.add_argument("--verify", type=Path, default=None,
                   help="bytes of the last events sent; compared with what was delivered")
    args = p.parse_args(argv)
    runner = RUNNERS[args.lib]
    result: dict = {"lib": args.lib}
    try:
        if args.lib == "amid-proto":
            from benchmarks import prototypes
            prototypes.install()
        seen: list = []
        outcome = runner(args.port, args.expect, {"keep": args.verify is not None, "seen": seen})
        if asyncio.iscoroutine(outcome):
            if args.lib == "amid-uvloop":
                import uvloop
                outcome = uvloop.run(outcome)
            else:
                outcome = asyncio.run(outcome)
        elapsed, cpu, delivered, canonical = outcome
        result.update(seconds=elapsed, cpu=cpu, delivered=delivered)
        if args.verify is not None:
            expected = _expected(args.verify)
            tail = seen[len(seen) - len(expected):] if len(seen) >= len(expected) else seen
            intact = sum(1 for e, g in zip(expected, tail, strict=False) if canonical(g) == e)
            result.update(checked=len(expected), intact=intact)
            if intact < len(expected):
                bad = next(i for i, (e, g) in enumerate(zip(expected, tail, strict=False)) if canonical(g) != e)
                result["first_difference"] = {"expected": expected[bad], "got": canonical(tail[bad])}
    except Exception as exc:  # reported, not hidden: the table says why a peer has no figure
        result["error"] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(result, default=str), flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
