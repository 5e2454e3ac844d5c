"""The AMI simulator server: sessions, event fan-out, calls, fault injection, streaming."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import ssl as ssl_module
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from random import Random
from typing import Any, Self, cast

from ..ami.address import split_host
from ..ami.protocol import Parser, RemoteProtocolError
from . import actions
from ._asterisk_text import AMI_BANNER
from .calls import Call, IdAllocator, prebuilt_call_events, template_for
from .channels import ChannelTracker, parse_event
from .model import ALL_CLASSES, EventFilter, OutEvent, SessionState, event_tv
from .stream import NumberedStream, StreamStats, WriteMode, numbered_pool

__all__ = ["AMISimulator", "FaultConfig", "SimSession", "SimUser", "SimulatorStats", "StreamStats",
           "parse_listen", "serve_forever"]

log = logging.getLogger(__name__)

_STREAM_SLICE = 256 * 1024


def _all() -> set[str]:
    return set(ALL_CLASSES)


@dataclass
class SimUser:
    """A manager.conf user: ``read``/``write`` are permission classes (default: all)."""

    username: str
    secret: str
    read: set[str] = field(default_factory=_all)
    write: set[str] = field(default_factory=_all)


DEFAULT_USERS = (SimUser("amid", "amidsecret"),
                 SimUser("limited", "limitedsecret", read={"call"}, write=set()))


@dataclass
class FaultConfig:
    """Misbehaviour to inject. The simulator's own copy applies to new sessions; each session
    has its own live copy (``session.faults``), see :meth:`AMISimulator.set_faults`."""

    ignore_pings: bool = False          # half-open simulation: Ping never answered, socket open
    stall: bool = False                 # send nothing at all (bytes dropped), socket open
    close_mid_message_after: int | None = None  # after N more events, send half of the next, close
    garbage: bytes | None = None        # raw bytes written before the next message, once


@dataclass
class SimulatorStats:
    connections: int = 0
    logins: int = 0
    failed_logins: int = 0
    actions: int = 0
    events_sent: int = 0
    bytes_sent: int = 0
    writes: int = 0                     # write() calls on the transports (one per event per-event)
    slow_readers_dropped: int = 0
    # Numbered streams by session (login) number; kept after the session ends.
    streams: dict[int, StreamStats] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready snapshot (what ``--stats-file`` and ``Action: AmidTestStats`` give)."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "streams"}
        data["time"] = time.time()
        data["streams"] = [s.as_dict() for s in self.streams.values()]
        return data


class SimSession(asyncio.Protocol):
    """One AMI client connection, as Asterisk's manager session sees it."""

    def __init__(self, sim: AMISimulator) -> None:
        self.sim = sim
        self.faults = replace(sim.faults)
        self.state = SessionState.CONNECTED
        self.user: SimUser | None = None
        self.event_mask: frozenset[str] = ALL_CLASSES
        self.filters: list[EventFilter] = []
        self.challenge: str | None = None
        self.session_id = f"0x{sim._rng.randrange(0x7f0000000000, 0x7fffffffffff):x}"
        self.login_time: float | None = None
        self.transport: asyncio.Transport | None = None
        self.local_address = ""
        self.remote_address = ""
        self.closed = asyncio.Event()
        self._parser = Parser(expect_banner=False)
        self._writable = asyncio.Event()
        self._writable.set()
        self._auth_failure: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None
        self.number: int | None = None            # login number (1, 2, ...), once logged in
        self.end_reason: str | None = None        # why the simulator ended it, if it did
        self.stream: StreamStats | None = None    # its numbered stream, if any
        self.events_out = 0                       # events sent outside a numbered stream

    # -- public, for tests -------------------------------------------------------------
    @property
    def username(self) -> str | None:
        return self.user.username if self.user else None

    @property
    def logged_in(self) -> bool:
        return self.state is SessionState.AUTHENTICATED

    @property
    def events_on(self) -> bool:
        return bool(self.event_mask)

    @property
    def event_classes(self) -> frozenset[str]:
        """Classes this session receives: the user's read permission ∩ the event mask."""
        if self.user is None:
            return frozenset()
        return self.event_mask & frozenset(self.user.read)

    def inject(self, data: bytes) -> None:
        """Write raw bytes into the stream right now (garbage, forged messages…)."""
        self._write(data)

    def close(self) -> None:
        """Close the connection (FIN after pending bytes)."""
        if self.transport is not None and self.state is not SessionState.CLOSED:
            self.state = SessionState.CLOSING
            self.transport.close()

    # -- asyncio.Protocol --------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop transports are not asyncio.Transport subclasses)
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=_STREAM_SLICE)
        proto = "TLS" if transport.get_extra_info("sslcontext") is not None else "TCP"
        self.local_address = _format_address(proto, transport.get_extra_info("sockname"))
        self.remote_address = _format_address(proto, transport.get_extra_info("peername"))
        self.sim._session_opened(self)
        self._write(AMI_BANNER)

    def data_received(self, data: bytes) -> None:
        if self.state in (SessionState.CLOSING, SessionState.CLOSED):
            return
        try:
            messages = self._parser.feed(data)
        except RemoteProtocolError as exc:
            log.info("simulator: closing session after bad input: %s", exc)
            self.close()
            return
        for msg in messages:
            if self.state in (SessionState.CLOSING, SessionState.CLOSED):
                break  # Asterisk stops reading once it decided to hang up on the client
            actions.handle(self.sim, self, msg)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = SessionState.CLOSED
        for timer in (self._auth_failure, self._write_timer):
            if timer is not None:
                timer.cancel()
        self._writable.set()  # wake a streamer so it sees the session is gone
        stream = self.stream
        if stream is not None:
            stream.open = False
            stream.ended_at = time.time()
            if stream.end is None:
                stream.end = self.end_reason or ("peer_reset" if exc is not None else "peer_closed")
        self.closed.set()
        self.sim._session_closed(self)

    @property
    def writing_paused(self) -> bool:
        """True while the transport's buffer is above its high-water mark (slow reader)."""
        return not self._writable.is_set()

    def pause_writing(self) -> None:
        self._writable.clear()
        timeout = self.sim.write_timeout
        if timeout is not None and self._write_timer is None:
            # Asterisk's writetimeout: a client that stops reading is dropped, mid-message.
            self._write_timer = asyncio.get_running_loop().call_later(timeout, self._drop_slow_reader)

    def resume_writing(self) -> None:
        self._writable.set()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _drop_slow_reader(self) -> None:
        self._write_timer = None
        self.sim.stats.slow_readers_dropped += 1
        self.end_reason = "write_timeout"
        if self.transport is not None:
            self.transport.abort()

    # -- output --------------------------------------------------------------------------
    def _write(self, data: bytes | memoryview) -> None:
        transport = self.transport
        if transport is None or self.state is SessionState.CLOSED or transport.is_closing():
            return
        transport.write(data)
        stats = self.sim.stats
        stats.bytes_sent += len(data)
        stats.writes += 1

    def send(self, data: bytes | memoryview) -> None:
        """Send a response or a message addressed to this session only (faults apply)."""
        faults = self.faults
        if faults.stall:
            return
        if faults.garbage:
            garbage, faults.garbage = faults.garbage, None
            self._write(garbage)
        self._write(data)

    def send_event(self, raw: bytes) -> None:
        """Send one event (counts for ``close_mid_message_after``)."""
        faults = self.faults
        if faults.stall or self.state is SessionState.CLOSED:
            return
        remaining = faults.close_mid_message_after
        if remaining is not None:
            if remaining <= 0:
                faults.close_mid_message_after = None
                self._write(raw[:len(raw) // 2])
                self.close()
                return
            faults.close_mid_message_after = remaining - 1
        self.send(raw)
        self.sim.stats.events_sent += 1
        self.events_out += 1
        if self.stream is not None:
            self.stream.other_events += 1

    def deliver(self, event: OutEvent) -> None:
        """Send a broadcast event if this session's permissions, mask and filters let it."""
        if self.state is not SessionState.AUTHENTICATED:
            return
        classes = event.classes
        if classes is None:
            if not self.event_mask:
                return
        elif not (classes & self.event_mask and self.user and classes & self.user.read):
            return
        if self.filters and not self._passes_filters(event):
            return
        self.send_event(event.raw)

    def _passes_filters(self, event: OutEvent) -> bool:
        includes = [f for f in self.filters if f.include]
        if includes and not any(f.matches(event) for f in includes):
            return False
        return not any(f.matches(event) for f in self.filters if not f.include)

    def fail_login_later(self, response: bytes, delay: float) -> None:
        """Asterisk sleeps ~1 s before answering a failed login, then hangs up."""
        self.state = SessionState.CLOSING

        def answer() -> None:
            self._auth_failure = None
            self.send(response)
            if self.transport is not None:
                self.transport.close()

        self._auth_failure = asyncio.get_running_loop().call_later(delay, answer)


def _format_address(proto: str, addr: object) -> str:
    if not isinstance(addr, tuple) or len(addr) < 2:
        return f"IPV4/{proto}/0.0.0.0/0"
    family = "IPV6" if ":" in str(addr[0]) else "IPV4"
    return f"{family}/{proto}/{addr[0]}/{addr[1]}"


class AMISimulator:
    """An AMI server that answers like Asterisk 22.10.1 (see tests/fixtures/README.md).

    ``call_rate`` starts that many calls per second by itself; ``call_spread`` is how many
    seconds one short call's events are spread over (0: all at once); ``long_call_hold`` is how
    long a ``Local/310@test`` call stays up. ``stream_on_login`` sends that many pre-built call
    events to every session right after its login (benchmarks). ``stream_rate`` gives every
    session that logs in with events on a numbered stream of that many events per second
    (``write_mode`` ``per-event``, as Asterisk writes, or ``chunked``; see
    :mod:`amid.simulator.stream`), accounted per session in ``stats.streams``.
    ``write_timeout`` (seconds, off by default; Asterisk's own is 0.1) drops a client whose
    socket stays full that long.

    Test hooks: :attr:`sessions`, :meth:`wait_for_sessions`, :attr:`faults` /
    :meth:`set_faults`, :attr:`stats`, :attr:`channels` (live channel state) and :attr:`ids`
    (``ids.next_seq`` / ``ids.next_uid`` pick the next channel sequence number and Uniqueid).
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0,
                 users: Iterable[SimUser] = DEFAULT_USERS,
                 ssl: ssl_module.SSLContext | None = None, auth_failure_delay: float = 1.0,
                 call_rate: float = 0.0, call_spread: float = 1.0, long_call_hold: float = 30.0,
                 stream_on_login: int = 0, stream_rate: float = 0.0,
                 write_mode: WriteMode = "per-event", write_timeout: float | None = None,
                 seed: int = 0) -> None:
        self.host = host
        self._requested_port = port
        self.users = {u.username: u for u in users}
        self.ssl = ssl
        self.auth_failure_delay = auth_failure_delay
        self.call_rate = call_rate
        self.call_spread = call_spread
        self.long_call_hold = long_call_hold
        self.stream_on_login = stream_on_login
        self.stream_rate = stream_rate
        self.write_mode: WriteMode = write_mode
        self._numbered_pool: list[bytes] | None = None
        self._streams_running = asyncio.Event()
        self._streams_running.set()
        self.write_timeout = write_timeout
        self.faults = FaultConfig()
        self.stats = SimulatorStats()
        self.sessions: list[SimSession] = []
        self.calls: set[Call] = set()
        self._call_of_channel: dict[str, Call] = {}
        self.channels = ChannelTracker()
        self.shutting_down = False  # `core stop gracefully`: every action is refused
        self.started_at = time.time()
        self.reloaded_at = self.started_at
        self._rng = Random(seed)
        self._seed = seed
        self.ids = IdAllocator(self._rng)
        self._server: asyncio.Server | None = None
        self._session_waiters: list[tuple] = []
        self._tasks: set[asyncio.Task] = set()
        self._call_timer: asyncio.TimerHandle | None = None
        self._prebuilt: tuple[bytes, list[int]] | None = None
        self._closing = False

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def port(self) -> int:
        """The bound TCP port (after :meth:`start`)."""
        if self._server is None or not self._server.sockets:
            return self._requested_port
        return self._server.sockets[0].getsockname()[1]

    async def start(self) -> None:
        """Listen. Returns once the socket is bound (see :attr:`port`)."""
        loop = asyncio.get_running_loop()
        self.started_at = self.reloaded_at = time.time()
        self._server = await loop.create_server(lambda: SimSession(self), self.host,
                                                self._requested_port, ssl=self.ssl)
        if self.call_rate > 0:
            self._call_timer = loop.call_later(1.0 / self.call_rate, self._auto_call)

    async def close(self, *, shutdown_event: bool = True, timeout: float = 5.0) -> None:
        """Stop: send ``Event: Shutdown`` (to sessions with system-class read and events on),
        close every connection and cancel every call, timer and task. Idempotent."""
        if self._closing:
            return
        self._closing = True
        if self._call_timer is not None:
            self._call_timer.cancel()
        if self._server is not None:
            self._server.close()
        for call in list(self.calls):
            call.cancel()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        shutdown = OutEvent(b"Event: Shutdown\r\nPrivilege: system,all\r\n"
                            b"Shutdown: Cleanly\r\nRestart: False\r\n\r\n")
        for session in list(self.sessions):
            if shutdown_event:
                session.deliver(shutdown)
            session.end_reason = session.end_reason or "server_closed"
            session.close()
        if self.sessions:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await asyncio.gather(*(s.closed.wait() for s in list(self.sessions)))
        for session in list(self.sessions):
            if session.transport is not None:
                session.transport.abort()
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._server.wait_closed()

    async def restart(self, *, down_for: float = 0.0, timeout: float = 5.0) -> None:
        """``core restart now``: ``Shutdown`` (``Restart: True``) to the sessions that get it,
        every connection closed, nobody listening for ``down_for`` seconds, then listening again
        on the same port. Calls, counters and session numbers carry on."""
        loop = asyncio.get_running_loop()
        port = self.port
        if self._server is not None:
            self._server.close()
        shutdown = OutEvent(b"Event: Shutdown\r\nPrivilege: system,all\r\n"
                            b"Shutdown: Cleanly\r\nRestart: True\r\n\r\n")
        sessions = list(self.sessions)
        for session in sessions:
            session.end_reason = "restart"
            session.deliver(shutdown)
            session.close()
        if sessions:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await asyncio.gather(*(s.closed.wait() for s in sessions))
        for session in sessions:
            if session.transport is not None:
                session.transport.abort()
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._server.wait_closed()
        if down_for > 0:
            await asyncio.sleep(down_for)
        self._requested_port = port
        self._server = await loop.create_server(lambda: SimSession(self), self.host, port,
                                                ssl=self.ssl)
        self.started_at = self.reloaded_at = time.time()

    async def shutdown_gracefully(self, timeout: float | None = None) -> None:
        """``core stop gracefully``: refuse every action (``Asterisk is shutting down``) from
        now on, let the live calls end by themselves, then :meth:`close`."""
        self.shutting_down = True
        if self._call_timer is not None:
            self._call_timer.cancel()
            self._call_timer = None
        calls = [c.finished.wait() for c in list(self.calls)]
        if calls:
            async with asyncio.timeout(timeout):
                await asyncio.gather(*calls)
        await self.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _session_opened(self, session: SimSession) -> None:
        self.stats.connections += 1
        self.sessions.append(session)
        self._notify_sessions()

    def _session_closed(self, session: SimSession) -> None:
        if session in self.sessions:
            self.sessions.remove(session)
        self._notify_sessions()

    def _notify_sessions(self) -> None:
        for ready, waiter in list(self._session_waiters):
            if not waiter.done() and ready():
                waiter.set_result(None)

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def wait_for_sessions(self, n: int = 1, *, logged_in: bool = True,
                                timeout: float = 5.0) -> list[SimSession]:
        """Wait until at least ``n`` sessions are open (and logged in, by default)."""
        def live() -> list[SimSession]:
            return [s for s in self.sessions if s.logged_in or not logged_in]

        def ready() -> bool:
            return len(live()) >= n

        if not ready():
            waiter = asyncio.get_running_loop().create_future()
            entry = (ready, waiter)
            self._session_waiters.append(entry)
            try:
                async with asyncio.timeout(timeout):
                    await waiter
            finally:
                self._session_waiters.remove(entry)
        return live()

    def set_faults(self, **changes: object) -> None:
        """Change fault settings for new sessions and every live session."""
        names = {f.name for f in fields(FaultConfig)}
        for key, value in changes.items():
            if key not in names:
                raise TypeError(f"unknown fault {key!r}")
            setattr(self.faults, key, value)
            for session in self.sessions:
                setattr(session.faults, key, value)

    # -- events -----------------------------------------------------------------------------
    async def broadcast(self, raw_event: bytes) -> None:
        """Push arbitrary event bytes to every logged-in session (masks and filters apply)."""
        self._broadcast(OutEvent(raw_event))

    def _broadcast(self, event: OutEvent) -> None:
        for session in list(self.sessions):
            session.deliver(event)

    def _emit_call_event(self, call: Call, raw: bytes) -> None:
        event = OutEvent(raw)
        fields_ = parse_event(raw)
        self.channels.apply(event.name, fields_)
        if event.name == "Newchannel":
            self._call_of_channel[fields_["Channel"]] = call
        elif event.name == "Hangup":
            self._call_of_channel.pop(fields_.get("Channel", ""), None)
        self._broadcast(event)

    def security_event(self, session: SimSession, name: str, *, severity: str, version: int = 1,
                       account: str = "", extra: Iterable[tuple[str, str]] = (),
                       session_tv: str = "1970-01-01T00:00:00.000+0000") -> None:
        """Broadcast a security-class event about ``session`` (SuccessfulAuth, InvalidPassword…)."""
        pairs = [("EventTV", event_tv()), ("Severity", severity), ("Service", "AMI"),
                 ("EventVersion", str(version)), ("AccountID", account),
                 ("SessionID", session.session_id), ("LocalAddress", session.local_address),
                 ("RemoteAddress", session.remote_address), *extra, ("SessionTV", session_tv)]
        body = "".join(f"{k}: {v}\r\n" for k, v in pairs)
        raw = f"Event: {name}\r\nPrivilege: security,all\r\n{body}\r\n"
        self._broadcast(OutEvent(raw.encode("utf-8", "surrogateescape")))

    # -- calls ------------------------------------------------------------------------------
    def originate(self, channel: str = "Local/200@test", *, exten: str | None = "100",
                  action_id: str | None = None) -> Call:
        """Start a call as ``Action: Originate`` would; returns it (``await call.finished.wait()``)."""
        template = template_for(channel, exten)
        call = Call(template, self.ids, self._emit_call_event, action_id=action_id,
                    spread=self.call_spread, hold=self.long_call_hold, on_done=self.calls.discard)
        self.calls.add(call)
        call.start()
        return call

    def _auto_call(self) -> None:
        self._call_timer = None
        if self._closing:
            return
        self.originate()
        # Fixed rate with +-20 % seeded jitter, so calls overlap like real traffic.
        delay = (1.0 / self.call_rate) * self._rng.uniform(0.8, 1.2)
        self._call_timer = asyncio.get_running_loop().call_later(delay, self._auto_call)

    def calls_of(self, channel_names: Iterable[str]) -> list[Call]:
        """The live calls owning these channels, in order of first mention."""
        out: list[Call] = []
        for name in channel_names:
            call = self._call_of_channel.get(name)
            if call is not None and call not in out:
                out.append(call)
        return out

    # -- authentication helpers ---------------------------------------------------------------
    @staticmethod
    def md5_key(challenge: str, secret: str) -> str:
        return hashlib.md5((challenge + secret).encode()).hexdigest()

    def new_challenge(self) -> str:
        return str(self._rng.randrange(100_000_000, 1_000_000_000))

    # -- streaming (benchmarks) -------------------------------------------------------------------
    def prebuilt_stream(self) -> tuple[bytes, list[int]]:
        """The pre-built call events that :meth:`stream_events` sends, rendered once: the bytes
        and the end offset of each event (benchmarks render them before their clock starts)."""
        if self._prebuilt is None:
            events = prebuilt_call_events(50, seed=self._seed)
            ends, total = [], 0
            for raw in events:
                total += len(raw)
                ends.append(total)
            self._prebuilt = (b"".join(events), ends)
        return self._prebuilt

    async def stream_events(self, n: int, *, sessions: Iterable[SimSession] | None = None) -> int:
        """Send ``n`` pre-built call events to each logged-in session with events on, as fast as
        each socket takes them (paused by the transport's high-water mark, never busy-looping).
        Returns the number of sessions streamed to. The events bypass the channel state."""
        targets = [s for s in (self.sessions if sessions is None else sessions)
                   if s.logged_in and s.events_on]
        tasks = [self._spawn(self._stream_to(s, n)) for s in targets]
        if tasks:
            await asyncio.gather(*tasks)
        return len(targets)

    def _start_stream_on_login(self, session: SimSession) -> None:
        session.number = self.stats.logins
        if self.stream_on_login > 0 and session.events_on:
            self._spawn(self._stream_to(session, self.stream_on_login))
        if self.stream_rate > 0 and session.events_on:
            self.start_numbered_stream(session)

    def start_numbered_stream(self, session: SimSession, rate: float | None = None,
                              write_mode: WriteMode | None = None) -> StreamStats:
        """Start a numbered stream to a logged-in session (``stream_rate`` does it at login)."""
        if session.number is None or session.stream is not None:
            raise RuntimeError("a numbered stream needs a logged-in session without one")
        if self._numbered_pool is None:
            self._numbered_pool = numbered_pool(seed=self._seed)
        rate = self.stream_rate if rate is None else rate
        mode = write_mode or self.write_mode
        stats = StreamStats(session=session.number, username=session.username or "",
                            peer=session.remote_address, rate=rate, write_mode=mode)
        stats.other_events = session.events_out
        stream = NumberedStream(session, self.stats, stats, self._numbered_pool, rate, mode,
                                self._streams_running)
        session.stream = stats
        self.stats.streams[session.number] = stats
        self._spawn(stream.run())
        return stats

    def pause_streams(self) -> None:
        """Hold every numbered stream (sessions stay open); :meth:`resume_streams` goes on."""
        self._streams_running.clear()

    def resume_streams(self) -> None:
        self._streams_running.set()

    def streams_sent(self) -> dict[int, int]:
        """Numbered events written in full, by session number."""
        return {number: s.sent for number, s in self.stats.streams.items()}

    def write_stats(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`SimulatorStats.as_dict` as JSON, atomically (a reader never sees half)."""
        target = Path(path)
        scratch = target.with_name(f".{target.name}.tmp")
        scratch.write_text(json.dumps(self.stats.as_dict(), indent=1))
        os.replace(scratch, target)

    async def _stream_to(self, session: SimSession, n: int) -> None:
        blob, ends = self.prebuilt_stream()
        pool = len(ends)
        fast = (not session.filters and not session.faults.stall
                and session.faults.close_mid_message_after is None
                and {"call", "dialplan", "cdr", "user"} <= session.event_classes)
        sent = 0
        while sent < n and session.state is SessionState.AUTHENTICATED:
            await session._writable.wait()
            if session.state is not SessionState.AUTHENTICATED:
                break
            start_idx = sent % pool
            count = min(n - sent, pool - start_idx)
            begin = ends[start_idx - 1] if start_idx else 0
            if fast:
                # Write slices of the pre-built blob, each ending on an event boundary.
                end_idx = start_idx
                limit = begin + _STREAM_SLICE
                while end_idx < start_idx + count - 1 and ends[end_idx] < limit:
                    end_idx += 1
                session.send(memoryview(blob)[begin:ends[end_idx]])
                written = end_idx - start_idx + 1
                self.stats.events_sent += written
            else:
                written = min(count, 64)
                for i in range(start_idx, start_idx + written):
                    lo = ends[i - 1] if i else 0
                    session.deliver(OutEvent(blob[lo:ends[i]]))
            sent += written
            # Let the loop breathe even when the socket never pushes back.
            await asyncio.sleep(0)


def parse_listen(listen: str) -> tuple[str, int]:
    """``127.0.0.1:5038``, ``[::1]:5038`` or ``:5038`` -> (host, port), read as every
    ``host:port`` of amid is (:mod:`amid.ami.address`)."""
    try:
        host, port = split_host(listen)
    except ValueError:
        port = None
    if port is None or not port.isdigit():
        raise ValueError(f"listen address must be HOST:PORT, got {listen!r}")
    if int(port) > 65535:  # the bind would wrap it silently (99999 listens on 34463)
        raise ValueError(f"port {port} is not in 0-65535")
    return host or "127.0.0.1", int(port)


async def serve_forever(listen: str, *, replay: str | None = None, speed: float | None = None,
                        close_at_end: bool = False, interactive: bool = True,
                        tls_cert: str | None = None,
                        tls_key: str | None = None, ready: Callable[[int], None] | None = None,
                        stats_file: str | None = None, stats_interval: float = 0.5,
                        **options: Any) -> None:
    """Run the simulator (or, with ``replay=FILE``, the replay server) on ``listen`` until
    cancelled; on cancellation it closes cleanly (Shutdown event to the sessions that get it).

    ``options`` go to :class:`AMISimulator` (``call_rate``, ``call_spread``, ``stream_rate``,
    ``write_mode``, ``users``…); ``ready(port)`` is called once the socket is bound.
    ``stats_file`` gets the simulator's counters and numbered streams as JSON every
    ``stats_interval`` seconds and once more after the last session closed.
    """
    from .replay import ReplayServer

    host, port = parse_listen(listen)
    ssl_context = None
    if tls_cert:
        ssl_context = ssl_module.create_default_context(ssl_module.Purpose.CLIENT_AUTH)
        ssl_context.load_cert_chain(tls_cert, tls_key)
    server: AMISimulator | ReplayServer
    if replay is not None:
        server = ReplayServer(replay, host=host, port=port, speed=speed,
                              close_at_end=close_at_end, ssl=ssl_context, interactive=interactive)
    else:
        server = AMISimulator(host=host, port=port, ssl=ssl_context, **options)
    await server.start()
    stats_writer: asyncio.Task[None] | None = None
    if stats_file is not None and isinstance(server, AMISimulator):
        stats_writer = asyncio.create_task(_write_stats_every(server, stats_file, stats_interval))
    try:
        if ready is not None:
            ready(server.port)
        await asyncio.Future()  # until cancelled
    finally:
        if stats_writer is not None:
            stats_writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stats_writer
        await asyncio.shield(server.close())
        if stats_file is not None and isinstance(server, AMISimulator):
            server.write_stats(stats_file)


async def _write_stats_every(sim: AMISimulator, path: str, interval: float) -> None:
    while True:
        sim.write_stats(path)
        await asyncio.sleep(interval)
