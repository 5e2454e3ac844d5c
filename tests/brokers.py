"""Real brokers for the amqp and nats sink tests: the machine's RabbitMQ (127.0.0.1:5672,
guest/guest) and NATS with JetStream (127.0.0.1:4222), plus private nats-servers a test may kill.

Every helper makes uniquely named objects (queues, exchanges, streams) and removes them when done,
so tests never see each other's messages. Without a broker the test is skipped, unless CI is set
(scripts/test.sh sets it as root, after starting both): then it fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import pytest
import yaml

RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672/"
NATS_URL = "nats://127.0.0.1:4222"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _missing(what: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{what} is not running (scripts/test.sh starts it)")
    pytest.skip(f"{what} is not running")


def require_rabbitmq() -> str:
    if not _answers("127.0.0.1", 5672):
        _missing("RabbitMQ on 127.0.0.1:5672")
    return RABBITMQ_URL


def require_nats() -> str:
    if not _answers("127.0.0.1", 4222):
        _missing("nats-server on 127.0.0.1:4222")
    return NATS_URL


def require_nats_server_binary() -> str:
    path = shutil.which("nats-server") or (
        "/usr/sbin/nats-server" if os.path.exists("/usr/sbin/nats-server") else None)
    if path is None:
        _missing("the nats-server program")
    assert path is not None
    return path


async def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(interval)


# -- RabbitMQ ------------------------------------------------------------------------------------


@dataclass
class Delivered:
    routing_key: str
    message_id: str | None
    headers: dict[str, Any]
    content_type: str | None
    delivery_mode: int | None
    record: dict[str, Any]


@dataclass
class RabbitQueue:
    """A uniquely named, exclusive queue bound to ``exchange`` with ``binding``; collects what
    arrives. ``arguments`` are the queue's (e.g. ``x-max-length``)."""

    exchange: str = "amq.topic"
    binding: str = "#"
    arguments: dict[str, Any] | None = None
    name: str = field(default_factory=lambda: unique("amid-test-q"))
    delivered: list[Delivered] = field(default_factory=list)
    consume: bool = True

    async def __aenter__(self) -> Self:
        import aio_pika
        self._connection = await aio_pika.connect(RABBITMQ_URL, timeout=10)
        self._channel = await self._connection.channel()
        self._arrived = asyncio.Event()
        self.queue = await self._channel.declare_queue(
            self.name, exclusive=True, auto_delete=True, arguments=self.arguments)
        await self.queue.bind(self.exchange, self.binding)
        if self.consume:
            await self.queue.consume(self._on_message, no_ack=True)
        return self

    async def _on_message(self, message: Any) -> None:
        self.delivered.append(Delivered(
            message.routing_key, message.message_id, dict(message.headers or {}),
            message.content_type, message.delivery_mode, json.loads(message.body)))
        self._arrived.set()

    async def wait_for(self, n: int, timeout: float = 10.0) -> list[Delivered]:
        async with asyncio.timeout(timeout):
            while len(self.delivered) < n:
                self._arrived.clear()
                await self._arrived.wait()
        return self.delivered

    async def wait_quiet(self, quiet: float = 0.3, timeout: float = 20.0) -> list[Delivered]:
        """Return once nothing new arrived for ``quiet`` seconds (after a bounded wait)."""
        async with asyncio.timeout(timeout):
            while True:
                self._arrived.clear()
                try:
                    async with asyncio.timeout(quiet):
                        await self._arrived.wait()
                except TimeoutError:
                    return self.delivered

    async def message_count(self) -> int:
        declared = await self._channel.declare_queue(self.name, passive=True)
        return declared.declaration_result.message_count or 0

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self.queue.delete(if_unused=False, if_empty=False)
        finally:
            await self._connection.close()


class RabbitExchange:
    """A uniquely named topic exchange, deleted on exit."""

    def __init__(self, exchange_type: str = "topic") -> None:
        self.name = unique("amid-test-x")
        self.exchange_type = exchange_type

    async def __aenter__(self) -> Self:
        import aio_pika
        self._connection = await aio_pika.connect(RABBITMQ_URL, timeout=10)
        self._channel = await self._connection.channel()
        await self._channel.declare_exchange(self.name, self.exchange_type, durable=False)
        return self

    async def delete(self) -> None:
        if self._channel.is_closed:
            self._channel = await self._connection.channel()
        await self._channel.exchange_delete(self.name)

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self.delete()
        finally:
            await self._connection.close()


def rabbitmqctl(*args: str, timeout: float = 30.0) -> str:
    ctl = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    return subprocess.run([ctl, *args], check=True, capture_output=True, text=True,
                          timeout=timeout).stdout


async def close_rabbit_connections(name: str) -> int:
    """Close, from the broker's side, every connection whose client-given name is ``name``
    (what a broker restart does to a client); returns how many it closed."""
    # The plain listing: its pids are what close_connection takes (the JSON ones are not).
    listing = await asyncio.to_thread(rabbitmqctl, "list_connections", "-q",
                                      "--no-table-headers", "pid", "client_properties")
    pids = [line.split("\t", 1)[0] for line in listing.splitlines()
            if f'{{"connection_name","{name}"}}' in line]
    for pid in pids:
        await asyncio.to_thread(rabbitmqctl, "close_connection", pid, "test: broker restart")
    return len(pids)


# -- NATS ----------------------------------------------------------------------------------------


class NatsStream:
    """A uniquely named JetStream stream capturing ``<name>.>`` (or ``subjects``); deleted on
    exit. ``prefix`` is the subject prefix to use in sink templates."""

    def __init__(self, url: str = NATS_URL, *, subjects: Iterable[str] | None = None,
                 create: bool = True, connect_options: dict[str, Any] | None = None,
                 **config: Any) -> None:
        self.url = url
        self.connect_options = connect_options or {}
        self.name = unique("AMIDTEST").replace("-", "_")
        self.prefix = self.name.lower()
        self.subjects = list(subjects) if subjects is not None else [f"{self.prefix}.>"]
        self.create = create
        self.config = config

    async def _connect(self) -> None:
        import nats

        async def quiet(_exc: Exception) -> None:  # a test may kill the server under it
            pass

        self.nc = await nats.connect(self.url, connect_timeout=5, allow_reconnect=False,
                                     error_cb=quiet, **self.connect_options)
        self.js = self.nc.jetstream()

    async def _ensure(self) -> None:
        """Connect again if the server went away since (a private server a test restarted)."""
        if not self.nc.is_connected:
            await self.nc.close()
            await self._connect()

    async def __aenter__(self) -> Self:
        await self._connect()
        if self.create:
            await self.js.add_stream(name=self.name, subjects=self.subjects, **self.config)
        return self

    async def count(self) -> int:
        await self._ensure()
        return (await self.js.stream_info(self.name)).state.messages

    async def messages(self) -> list[tuple[str, dict[str, str], dict[str, Any]]]:
        """Every message in the stream, in stream order: (subject, headers, record)."""
        from nats.js.api import AckPolicy, ConsumerConfig
        await self._ensure()
        expected = (await self.js.stream_info(self.name)).state.messages
        out: list[tuple[str, dict[str, str], dict[str, Any]]] = []
        if expected == 0:
            return out
        # An ephemeral pull consumer: a few fetches instead of one request per message.
        subscription = await self.js.pull_subscribe(
            self.subjects[0], stream=self.name, config=ConsumerConfig(ack_policy=AckPolicy.NONE))
        try:
            async with asyncio.timeout(30):
                while len(out) < expected:
                    for msg in await subscription.fetch(min(1000, expected - len(out)), timeout=5):
                        out.append((msg.subject, dict(msg.headers or {}), json.loads(msg.data)))
        finally:
            await subscription.unsubscribe()
        return out

    async def wait_for(self, n: int, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while await self.count() < n:
                await asyncio.sleep(0.05)

    async def __aexit__(self, *exc: object) -> None:
        try:
            from nats.js.errors import NotFoundError
            await self._ensure()
            try:
                await self.js.delete_stream(self.name)
            except NotFoundError:
                pass
        finally:
            await self.nc.close()


_LISTENING = re.compile(rb"Listening for client connections on [^\s]*:(\d+)")


class PrivateNatsServer:
    """A nats-server with JetStream of this test only (its own port and store), so it can be
    killed and restarted without touching the machine's shared one."""

    def __init__(self, directory: Path) -> None:
        self.binary = require_nats_server_binary()
        self.directory = directory
        self.store = directory / "jetstream"
        self.log = directory / "nats.log"
        self.port = 0
        self.extra_args: list[str] = []
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def start(self) -> None:
        port = str(self.port or -1)  # -1: the server picks a free port; restarts keep it
        self.directory.mkdir(parents=True, exist_ok=True)
        self.log.write_bytes(b"")
        self.process = await asyncio.create_subprocess_exec(
            self.binary, "-a", "127.0.0.1", "-p", port, "-js", "-sd", str(self.store),
            "-l", str(self.log), *self.extra_args, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        async with asyncio.timeout(15):
            while True:
                written = self.log.read_bytes()
                match = _LISTENING.search(written)
                if match and b"Server is ready" in written:
                    self.port = int(match.group(1))
                    break
                if self.process.returncode is not None:
                    raise RuntimeError(f"nats-server exited: {self.log.read_text()[-500:]}")
                await asyncio.sleep(0.02)

    async def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)
            async with asyncio.timeout(10):
                await self.process.wait()
        self.process = None


# -- amid end to end: the daemon in process, and `amid run` as a process ---------------------------


@contextlib.asynccontextmanager
async def sim_pair(count: int = 2) -> AsyncIterator[list[Any]]:
    """``count`` AMI simulators (one per PBX), closed on exit."""
    from amid.simulator import AMISimulator
    async with contextlib.AsyncExitStack() as stack:
        sims = [await stack.enter_async_context(
                    AMISimulator(call_spread=0.0, auth_failure_delay=0.05, seed=index + 1))
                for index in range(count)]
        yield sims


def daemon_config(tmp_path: Path, sims: list[Any], sinks: list[dict[str, Any]], *,
                  http_listen: str = "127.0.0.1:0", **extra: Any) -> Path:
    """An amid config reading ``sims`` as pbx1, pbx2, ... and writing to ``sinks``."""
    config = {
        "servers": [{"name": f"pbx{index + 1}", "host": "127.0.0.1", "port": sim.port,
                     "username": "amid", "secret": "amidsecret", "ping_interval": "1s",
                     "ping_timeout": "2s", "reconnect": {"min_delay": "50ms", "max_delay": "200ms"}}
                    for index, sim in enumerate(sims)],
        "sinks": sinks,
        "http": {"listen": http_listen},
        "state_dir": str(tmp_path / "state"),
        "shutdown_timeout": "5s",
        **extra,
    }
    path = tmp_path / "amid.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


async def start_daemon(path: Path, *, wait_ready: bool = True) -> tuple[Any, asyncio.Task[int]]:
    from amid.config import load
    from amid.service import Daemon, SinkTypes
    types = SinkTypes.discover()
    config = load(path, {}, sink_option_models=types.option_models)
    daemon = Daemon(config, config_path=str(path), environ={}, types=types, install_signals=False)
    task = asyncio.create_task(daemon.run())
    if wait_ready:
        async with asyncio.timeout(15):
            await daemon.ready.wait()
    else:
        await wait_until(lambda: daemon.sinks, timeout=15)
    return daemon, task


async def stop_daemon(daemon: Any, task: asyncio.Task[int]) -> None:
    daemon.request_stop()
    async with asyncio.timeout(20):
        await task


SPOOLED = {"overflow": "spool", "queue": {"max_events": 200},
           "batch": {"max_events": 100, "max_wait": "5ms"},
           "retry": {"min_delay": "20ms", "max_delay": "200ms", "attempt_timeout": "10s"}}


async def run_restart_mid_stream(tmp_path: Path, sink: dict[str, Any],
                                 interrupt: Callable[[str], Awaitable[int]],
                                 *, interruptions: int = 2) -> tuple[int, int]:
    """The daemon on one simulator reads a steady stream (100 events every 10 ms) while
    ``interrupt(sink name)`` takes the broker away ``interruptions`` times, each once the sink
    delivered 500 more records; it says how many connections it broke. Returns (events read,
    records the sink confirmed) once every read record was confirmed and the daemon stopped."""
    name = unique("bus")
    async with sim_pair(count=1) as sims:
        path = daemon_config(tmp_path, sims, [{"name": name, **SPOOLED, **sink}])
        daemon, task = await start_daemon(path)
        done = asyncio.Event()

        async def feed() -> None:
            while not done.is_set():
                await sims[0].stream_events(100)
                await asyncio.sleep(0.01)  # pacing, so the interruptions land mid-stream

        try:
            stats = daemon.sinks[name].runner.stats
            server = daemon.server_stats["pbx1"]
            feeding = asyncio.ensure_future(feed())
            for round_ in range(interruptions):
                await wait_until(lambda goal=500 * (round_ + 1): stats.sent_total >= goal,
                                 timeout=30)
                assert await interrupt(name) > 0, f"nothing was interrupted in round {round_}"
            await wait_until(lambda: stats.sent_total >= 500 * (interruptions + 1), timeout=30)
            done.set()
            await asyncio.wait_for(feeding, 30)
            await wait_until(lambda: stats.sent_total >= server.events_total
                             and stats.spool_events == 0 and stats.queue_events == 0, timeout=60)
            assert sum(stats.dropped_total.values()) == 0, stats.dropped_total
            return server.events_total, stats.sent_total
        finally:
            done.set()
            await stop_daemon(daemon, task)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def seqs_by_run(ids: Iterable[str]) -> dict[tuple[str, str, str], list[int]]:
    """Record ids ``server:run:epoch:seq`` grouped per connection, seqs sorted."""
    groups: dict[tuple[str, str, str], list[int]] = {}
    for record_id in ids:
        server, run, epoch, seq = record_id.rsplit(":", 3)
        groups.setdefault((server, run, epoch), []).append(int(seq))
    return {key: sorted(seqs) for key, seqs in groups.items()}


class KillRun:
    """``amid run`` as a process on one simulator: killed with SIGKILL mid-stream, restarted,
    stopped cleanly. :meth:`verify` checks what reached the broker against what it had read."""

    def __init__(self, tmp_path: Path, sim: Any, sink: dict[str, Any]) -> None:
        self.tmp_path = tmp_path
        self.sim = sim
        self.port = free_port()
        self.batch_max_events = SPOOLED["batch"]["max_events"]  # type: ignore[index]
        self.path = daemon_config(tmp_path, [sim], [{"name": "bus", **SPOOLED, **sink}],
                                  http_listen=f"127.0.0.1:{self.port}")
        self.process: asyncio.subprocess.Process | None = None
        self.read_before_kill = 0     # events amid reported read, just before the kill
        self.read_after_restart = 0   # events the restarted amid read (all of them delivered)

    async def _start(self) -> None:
        amid = Path(sys.executable).with_name("amid")
        with (self.tmp_path / "amid.log").open("ab") as log:  # the child keeps its own copy
            self.process = await asyncio.create_subprocess_exec(
                str(amid), "run", "--config", str(self.path), "--log-level", "warning",
                stdout=subprocess.DEVNULL, stderr=log)
        await wait_until(lambda: self._ready(), timeout=20, interval=0.1)

    def _ready(self) -> bool:
        assert self.process is not None
        if self.process.returncode is not None:
            raise RuntimeError(f"amid exited: {(self.tmp_path / 'amid.log').read_text()[-800:]}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as conn:
                conn.sendall(b"GET /readyz HTTP/1.0\r\n\r\n")
                return b" 200 " in conn.recv(64).split(b"\r\n", 1)[0]
        except OSError:
            return False

    async def _samples(self) -> Any:
        from promparse import scrape
        return await scrape(self.port)

    async def _metric(self, name: str, **labels: str) -> float:
        from promparse import total
        return total(await self._samples(), name, **labels)

    async def go(self) -> None:
        await self._start()
        streaming = asyncio.ensure_future(self.sim.stream_events(20_000))
        try:
            async with asyncio.timeout(30):
                while await self._metric("amid_sink_sent_events_total", sink="bus") < 1000:
                    await asyncio.sleep(0.02)
            self.read_before_kill = int(await self._metric("amid_ami_received_events_total"))
            await self.kill()
        finally:
            await asyncio.wait_for(streaming, 30)
        await self._start()
        await self.sim.stream_events(500)
        async with asyncio.timeout(60):
            while True:
                samples = await self._samples()
                from promparse import total
                read = total(samples, "amid_ami_received_events_total")
                if (read >= 500 and total(samples, "amid_sink_queue_events", sink="bus") == 0
                        and total(samples, "amid_sink_spool_events", sink="bus") == 0
                        and total(samples, "amid_sink_in_flight_events", sink="bus") == 0):
                    break
                await asyncio.sleep(0.05)
        self.read_after_restart = int(read)
        await self.stop()

    async def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)
            async with asyncio.timeout(10):
                await self.process.wait()

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(20):
                await self.process.wait()
        self.process = None

    def verify(self, delivered_ids: set[str]) -> None:
        groups = seqs_by_run(delivered_ids)
        assert len(groups) == 2, sorted(groups)   # one connection per amid run
        for seqs in groups.values():
            assert seqs == list(range(seqs[0], seqs[-1] + 1)), "a gap: records were lost"
        first, second = sorted(groups.values(), key=len, reverse=True)
        # Every record the first run had read before it was killed reached the broker, and
        # everything the second one read.
        assert len(first) >= self.read_before_kill, (len(first), self.read_before_kill)
        assert len(second) == self.read_after_restart


@contextlib.asynccontextmanager
async def check_kill_run(tmp_path: Path, sink: dict[str, Any]) -> AsyncIterator[KillRun]:
    async with sim_pair(count=1) as sims:
        run = KillRun(tmp_path, sims[0], sink)
        try:
            yield run
        finally:
            await run.kill()


FLEET_EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "fleet" / "fleet.py"


async def run_fleet_example(*args: str, timeout: float = 90.0) -> str:
    """Run examples/fleet/fleet.py (three simulators, three `amid run`, one consumer) and
    return its output; it must exit 0 within ``timeout``."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(FLEET_EXAMPLE), *args, "--timeout", str(timeout - 15),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        async with asyncio.timeout(timeout):
            output, _ = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    text = output.decode()
    assert process.returncode == 0, text[-2000:]
    return text


class TlsProxy:
    """A TLS endpoint on 127.0.0.1 (port 0) that forwards every connection in plain TCP to
    ``target``: the machine's broker, reached over TLS as a TLS listener of it would be."""

    def __init__(self, server_context: ssl.SSLContext, target: tuple[str, int]) -> None:
        self.context = server_context
        self.target = target
        self.port = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.context)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, ssl.SSLError):
                pass
            finally:
                dst.close()

        tasks = [asyncio.ensure_future(pipe(reader, up_writer)),
                 asyncio.ensure_future(pipe(up_reader, writer))]
        self._tasks.update(tasks)
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.difference_update(tasks)

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()
