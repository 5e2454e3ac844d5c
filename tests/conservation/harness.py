"""The conservation harness: a real ``amid run`` subprocess between the simulator and real receivers.

    async with Harness(tmp_path, stream_rate=2000) as h:   # simulator, receivers, config
        await h.start_amid()                                # `amid run` subprocess, ready
        ...                                                 # inject faults: h.sim, h.webhook,
                                                            # h.syslog, h.amid.kill() ...
        await h.stop_amid()                                 # settle, final scrape, SIGTERM
        h.check(...)                                        # the oracle, for every sink

The simulator runs in the test's loop (its faults and counters are plain calls); amid is its own
process, so ``kill -9`` is real. Sinks: a JSON Lines file, a webhook (``tests/http_receiver.py``,
aiohttp) and syslog over TCP to :class:`SyslogReceiver` (RFC 6587 octet counting, able to reset
its connections), each ``overflow: spool`` unless the test says otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import aiohttp
import yaml
from http_receiver import HttpReceiver
from promparse import Samples, scrape, total

from amid.simulator import AMISimulator
from amid.simulator.stream import StreamStats

from .oracle import SessionBound, SinkReport, check, numbered, parse_jsonl

__all__ = ["AmidProcess", "Harness", "SyslogReceiver"]

SINKS = ("file", "webhook", "syslog")
_PORT_LINE = re.compile(rb"metrics and health on http://[^ ]*:(\d+)/metrics")


# -- a syslog receiver over TCP that can reset ---------------------------------------------------
class _SyslogConnection(asyncio.Protocol):
    def __init__(self, receiver: SyslogReceiver) -> None:
        self.receiver = receiver
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.receiver.connections.add(self)

    def data_received(self, data: bytes) -> None:
        self.receiver.messages += self.frames(data)

    def frames(self, data: bytes) -> list[bytes]:
        """The whole messages ``data`` completes (RFC 6587 octet counting: "LEN SP MSG")."""
        buffer = self.buffer
        buffer += data
        out = []
        while True:
            space = buffer.find(b" ")
            if space < 0 or not buffer[:space].isdigit():
                break
            length = int(buffer[:space])
            if len(buffer) < space + 1 + length:
                break
            out.append(bytes(buffer[space + 1:space + 1 + length]))
            del buffer[:space + 1 + length]
        return out

    def take_unread(self) -> list[bytes]:
        """The whole messages still in the kernel's receive buffer: TCP acknowledged them to
        the sender, and a crash now loses them (what only an application-level ack, RELP, can
        tell the sender)."""
        assert self.transport is not None
        fd = self.transport.get_extra_info("socket").fileno()
        # Peeked, not read: reading would open the TCP window, and what the sender then wrote
        # before the reset would be acknowledged and lost without being counted here.
        with socket.socket(fileno=os.dup(fd)) as sock:
            try:
                data = sock.recv(1 << 24, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except OSError:  # BlockingIOError: nothing waiting
                data = b""
        return self.frames(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.receiver.connections.discard(self)


class SyslogReceiver:
    """RFC 6587 octet-counted syslog over TCP on 127.0.0.1; keeps every whole message received."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.acknowledged_lost: list[bytes] = []   # acked by TCP, lost by a reset (see reset)
        self.connections: set[_SyslogConnection] = set()
        self.port = 0
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _SyslogConnection(self), "127.0.0.1",
                                                self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def reset(self, *, stall_for: float = 0.2, down_for: float = 0.0) -> None:
        """Crash and restart: stop reading for ``stall_for`` seconds (what the sender writes
        meanwhile fills this side's receive buffer, acknowledged by TCP, then waits
        unacknowledged in the sender's), then stop listening and reset every connection (RST),
        and listen again on the same port after ``down_for`` seconds.

        The whole messages left in the receive buffer are lost to the receiver but were
        acknowledged to the sender: plain TCP cannot tell it more (RELP can). They are kept in
        :attr:`acknowledged_lost` and count as delivered; what the sender still held
        unacknowledged is its to send again."""
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.pause_reading()
        await asyncio.sleep(stall_for)
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            transport = connection.transport
            if transport is not None:
                self.acknowledged_lost += connection.take_unread()
                sock = transport.get_extra_info("socket")
                if sock is not None:  # linger 0: close sends RST, as a crashed receiver's kernel does
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                transport.abort()
        await asyncio.sleep(down_for)
        await self.start()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.abort()

    def records(self) -> tuple[list[dict[str, Any]], int]:
        """The record JSON of every message (the MSG part), and how many were not records."""
        records, bad = [], 0
        for message in self.messages + self.acknowledged_lost:
            start = message.find(b'{"id":')
            try:
                records.append(json.loads(message[start:]))
            except ValueError:
                bad += 1
        return records, bad


# -- amid run as a subprocess -----------------------------------------------------------------------
class AmidProcess:
    """One ``amid run`` process: started, scraped, signalled, killed."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None
        self.metrics_port = 0

    async def start(self, *, timeout: float = 15.0) -> None:
        start = self._launch()
        async with asyncio.timeout(timeout):
            while True:
                if not self.running:
                    raise AssertionError(f"amid exited {self.returncode}: {self.tail_log()}")
                port = self._metrics_port_in_log(start)
                if port:
                    self.metrics_port = port
                    break
                await asyncio.sleep(0.02)
            while not await self._ready():
                await asyncio.sleep(0.05)

    def _launch(self) -> int:
        """Start the process (its log appended to ``log``); the log's size before it started."""
        amid = Path(sys.executable).with_name("amid")
        env = {k: v for k, v in os.environ.items() if not k.startswith("AMID_")}
        with open(self.log, "ab") as log:
            log.write(b"--- start\n")
            start = log.tell()
            self.process = subprocess.Popen([str(amid), "run", "--config", str(self.config)],
                                            stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                            env=env)
        return start

    def _metrics_port_in_log(self, start: int) -> int:
        with open(self.log, "rb") as log:
            log.seek(start)
            found = _PORT_LINE.search(log.read())
        return int(found.group(1)) if found else 0

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    async def _ready(self) -> bool:
        try:
            async with aiohttp.ClientSession() as session, \
                    session.get(f"http://127.0.0.1:{self.metrics_port}/readyz",
                                timeout=aiohttp.ClientTimeout(total=2)) as response:
                return response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    def tail_log(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    async def scrape(self) -> Samples:
        return await scrape(self.metrics_port)

    def signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    async def wait(self, timeout: float = 20.0) -> int:
        assert self.process is not None
        async with asyncio.timeout(timeout):
            while self.process.poll() is None:
                await asyncio.sleep(0.02)
        return self.process.returncode

    async def kill(self) -> None:
        """``kill -9``."""
        self.signal(signal.SIGKILL)
        await self.wait()

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0


def sink_idle(samples: Samples, sink: str) -> bool:
    """Nothing queued, in flight or spooled, and every record received accounted for (a
    restarted process also sends what its spool held, which it did not receive itself)."""
    busy = sum(total(samples, name, sink=sink) for name in (
        "amid_sink_queue_events", "amid_sink_in_flight_events", "amid_sink_spool_events"))
    accounted = sum(total(samples, name, sink=sink) for name in (
        "amid_sink_sent_events_total", "amid_sink_dropped_events_total", "amid_sink_dead_lettered_events_total"))
    return busy == 0 and accounted >= total(samples, "amid_sink_received_events_total", sink=sink)


@dataclass
class Harness:
    """Simulator + receivers + config for ``amid run`` processes, and the oracle over them."""

    directory: Path
    stream_rate: float = 2000.0
    sinks: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # per-sink overrides
    server: Mapping[str, Any] = field(default_factory=dict)               # server overrides
    sim: AMISimulator = field(init=False)
    webhook: HttpReceiver = field(init=False)
    syslog: SyslogReceiver = field(init=False)
    amid: AmidProcess = field(init=False)
    kills: int = 0
    final: Samples | None = None            # the last scrape before a graceful stop
    read_before_kill: dict[int, int] = field(default_factory=dict)   # session -> events read
    _first_session: int = 1                 # the first simulator session of the amid running now

    async def __aenter__(self) -> Self:
        self.sim = AMISimulator(stream_rate=self.stream_rate, auth_failure_delay=0.05)
        await self.sim.start()
        self.webhook = HttpReceiver()
        await self.webhook.start()
        self.syslog = SyslogReceiver()
        await self.syslog.start()
        self.config = self.directory / "amid.yaml"
        self.events_file = self.directory / "events.jsonl"
        self.write_config()
        self.amid = AmidProcess(self.config, self.directory / "amid.log")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.amid.running:
            self.amid.signal(signal.SIGKILL)
            await self.amid.wait()
        await self.syslog.stop()
        await self.webhook.stop()
        await self.sim.close()

    def write_config(self, **changes: Any) -> None:
        retry = {"min_delay": "50ms", "max_delay": "300ms"}
        batch = {"max_wait": "5ms"}
        sinks: dict[str, dict[str, Any]] = {
            "file": {"name": "file", "type": "file", "path": str(self.events_file),
                     "overflow": "spool", "retry": retry, "batch": batch},
            "webhook": {"name": "webhook", "type": "webhook", "url": self.webhook.url,
                        "timeout": "1s", "overflow": "spool", "retry": retry, "batch": batch},
            "syslog": {"name": "syslog", "type": "syslog",
                       "address": f"tcp://127.0.0.1:{self.syslog.port}", "overflow": "spool",
                       "retry": retry, "batch": batch},
        }
        for name, override in self.sinks.items():
            sinks[name].update(override)
        config = {
            "servers": [{"name": "pbx1", "host": "127.0.0.1", "port": self.sim.port,
                         "username": "amid", "secret": "amidsecret", "ping_interval": "1s",
                         "ping_timeout": "2s",  # a busy machine must not look like a dead peer
                         "reconnect": {"min_delay": "50ms", "max_delay": "300ms"}, **self.server}],
            "sinks": list(sinks.values()),
            "http": {"listen": "127.0.0.1:0"},
            "state_dir": str(self.directory / "state"),
            "shutdown_timeout": "10s",
            "start_timeout": "10s",
            **changes,
        }
        self.config.write_text(yaml.safe_dump(config))

    # -- amid's lifecycle ------------------------------------------------------------------------
    async def start_amid(self) -> None:
        self._first_session = max(self.sim.stats.streams, default=0) + 1
        await self.amid.start()

    async def wait_sent(self, n: int, *, session: int | None = None, timeout: float = 15.0) -> None:
        """Until the simulator wrote ``n`` numbered events to the session (default: the newest)."""
        async with asyncio.timeout(timeout):
            while True:
                streams = self.sim.stats.streams
                number = session if session is not None else max(streams, default=None)
                if number is not None and number in streams and streams[number].sent >= n:
                    return
                await asyncio.sleep(0.01)

    async def wait_session(self, number: int, *, timeout: float = 15.0) -> None:
        """Until the simulator's session ``number`` logged in (amid connected again)."""
        async with asyncio.timeout(timeout):
            while number not in self.sim.stats.streams:
                await asyncio.sleep(0.01)

    async def kill_amid(self) -> None:
        """``kill -9`` amid, noting just before what it had provably read of its open session."""
        with contextlib.suppress(Exception):
            samples = await self.amid.scrape()
            read = int(total(samples, "amid_ami_received_events_total"))
            mine = {n: s for n, s in self.sim.stats.streams.items() if n >= self._first_session}
            open_now = [n for n, s in mine.items() if s.open]
            if len(open_now) == 1:
                # Sessions of this process that ended were read to their end.
                earlier = sum(s.sent + s.other_events for s in mine.values() if not s.open)
                self.read_before_kill[open_now[0]] = read - earlier
        await self.amid.kill()
        self.kills += 1

    async def settle(self, *, timeout: float = 30.0) -> Samples:
        """Hold the streams and wait until every sink is idle and amid read everything sent."""
        self.sim.pause_streams()
        previous = -1.0
        async with asyncio.timeout(timeout):
            while True:
                samples = await self.amid.scrape()
                received = total(samples, "amid_ami_received_events_total")
                if received == previous and all(sink_idle(samples, s) for s in SINKS):
                    return samples
                previous = received
                await asyncio.sleep(0.1)

    async def stop_amid(self, *, settle: bool = True) -> int:
        """SIGTERM amid (after settling and a final scrape, by default); its exit code."""
        if settle:
            self.final = await self.settle()
        self.amid.signal(signal.SIGTERM)
        code = await self.amid.wait()
        self.sim.resume_streams()
        return code

    async def restart_amid(self) -> None:
        """Start amid again (same config, state and files): its spool is delivered first."""
        await self.start_amid()

    # -- what the sinks got ------------------------------------------------------------------------
    def delivered(self) -> dict[str, tuple[list[dict[str, Any]], int]]:
        """Per sink: the records delivered and the number of torn/undecodable ones."""
        file_records, torn = parse_jsonl(self.events_file.read_bytes()
                                         if self.events_file.exists() else b"")
        return {"file": (file_records, len(torn)),
                "webhook": (self.webhook.delivered_records, 0),
                "syslog": self.syslog.records()}

    async def wait_delivered(self, *, timeout: float = 30.0,
                             sinks: tuple[str, ...] = SINKS) -> None:
        """Until every sink has every numbered event the ended sessions must deliver
        (after a restart of amid that drains its spool)."""
        async with asyncio.timeout(timeout):
            while True:
                bounds = self.bounds()
                delivered = self.delivered()
                closed = {n for n, s in self.sim.stats.streams.items() if not s.open}
                if all(_covers(delivered[s][0], bounds, closed) for s in sinks):
                    return
                await asyncio.sleep(0.1)

    def bounds(self, spoil_after_garbage: bool = True) -> dict[int, SessionBound]:
        """What each session sent and what a sink must hold of it (see the oracle)."""
        out = {}
        for number, stream in self.sim.stats.streams.items():
            out[number] = _bound(stream, self.read_before_kill.get(number), spoil_after_garbage)
        return out

    def check(self, *, sinks: tuple[str, ...] = SINKS, max_duplicates: int | None = None,
              expect_drops: bool = False) -> dict[str, SinkReport]:
        """The oracle over every sink. Drops are read from the final scrape (a killed process
        has none: a spooled sink has nothing to drop); ``max_duplicates`` defaults to one batch
        per kill."""
        reports = {}
        delivered = self.delivered()
        bounds = self.bounds()
        for sink in sinks:
            records, torn = delivered[sink]
            dropped = int(total(self.final, "amid_sink_dropped_events_total", sink=sink)) \
                if self.final is not None else 0
            if not expect_drops:
                assert dropped == 0, f"sink {sink}: {dropped} dropped"
            limit = max_duplicates if max_duplicates is not None else 500 * self.kills
            reports[sink] = check(sink, records, bounds, dropped=dropped, max_duplicates=limit,
                                  torn=torn)
        return reports


def _bound(stream: StreamStats, read: int | None, spoil_after_garbage: bool) -> SessionBound:
    spoiled = frozenset(n + 1 for n in stream.garbage_after) if spoil_after_garbage else frozenset()
    if stream.open:  # still streaming: nothing ended it yet (settle holds it; Logoff next)
        must = stream.sent
    elif stream.end in ("logoff", "close_mid_message", "half_open", "restart", "server_closed"):
        must = stream.sent          # amid read up to the end of what the simulator sent
    elif stream.garbage_after:
        must = stream.garbage_after[0]   # amid may drop the connection at the garbage
    elif read is not None:
        must = max(0, min(stream.sent, read - stream.other_events))
    else:
        must = 0
    return SessionBound(sent=stream.sent, must_deliver=must, spoiled=spoiled,
                        other=stream.other_events)


def _covers(records: list[dict[str, Any]], bounds: Mapping[int, SessionBound],
            closed: set[int] | None = None) -> bool:
    got: dict[int, set[int]] = {}
    for record in records:
        key = numbered(record)
        if key is not None:
            got.setdefault(key[0], set()).add(key[1])
    return all(len(got.get(s, set()) | b.spoiled) >= b.must_deliver for s, b in bounds.items()
               if not closed or s in closed)

