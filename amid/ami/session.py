"""The asyncio AMI client: connect, TLS, login, actions by ActionID, lists, pings, reconnect.

The read path is an :class:`asyncio.Protocol`: ``data_received`` feeds the sans-IO parser and
hands each message on without ever awaiting. Responses resolve the future of their ActionID;
events are stamped with an envelope and passed to *listeners* (synchronous, must not block:
the daemon's router) and queued for *handlers* (sync or async user callbacks run by a separate
dispatcher task). So a slow or failing handler can never stall the socket: Asterisk drops a
client that stops reading for about 100 ms.
"""

from __future__ import annotations

import asyncio
import enum
import fnmatch
import hashlib
import inspect
import logging
import random
import ssl as _ssl
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, Literal

from amid._accel import speedups as _speedups
from amid.ami.address import split_host
from amid.ami.protocol import (ActionIdGenerator, DEFAULT_MAX_MESSAGE_BYTES, Event, Parser, RemoteProtocolError, Response, encode_action)
from amid.ami.stats import SessionStats

__all__ = [
    "AMIClient", "AMIConnectionError", "AMIError", "ActionTimeout", "ConnectionState",
    "DEFAULT_PORT", "LoginError", "StateChange", "is_error", "is_success", "make_ssl_context",
    "parse_host",
]

log = logging.getLogger("amid.ami")

DEFAULT_PORT = 5038
MAX_EVENT_NAMES = 1000
MAX_HANDLER_CACHE = 1024
_name_of = attrgetter("name")

# The optional C accelerator (see amid._accel); the dispatch loop does the same without it.
_stamp_events = _speedups.stamp_events if _speedups is not None else None

# One generator for every client of the process, so ActionIDs never repeat across sessions
# (Asterisk broadcasts OriginateResponse events, with their ActionID, to every session).
_PROCESS_ACTION_IDS = ActionIdGenerator()

EventHandler = Callable[[Event], Any]


class AMIError(Exception):
    """Base class of session errors."""


class AMIConnectionError(AMIError):
    """Not connected, or the connection was lost while waiting."""


HANDLER_ERROR_REPORT_INTERVAL = 10.0  # seconds between summaries of repeated handler failures


def _callable_name(fn: Any) -> str:
    return repr(getattr(fn, "__qualname__", fn))


class LoginError(AMIError):
    """Asterisk refused the login (Asterisk says the same for bad user, secret or key)."""


class ActionTimeout(AMIError, TimeoutError):
    """No (complete) answer to an action within its timeout."""


class ConnectionState(enum.Enum):
    IDLE = "idle"
    CONNECTING = "connecting"
    LOGGING_IN = "logging_in"
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"   # lost; a reconnect is scheduled unless closing
    CLOSED = "closed"


@dataclass(frozen=True)
class StateChange:
    """One connection state transition, as seen by callbacks and :meth:`AMIClient.state_changes`.

    On ``CONNECTED`` after an outage, ``gap_start``/``gap_seconds`` tell how long no event could
    be received. On ``DISCONNECTED``, ``reason`` is a short bounded label (``eof``,
    ``ping_timeout``, ``protocol_error``, ``connect_error``, ``login_failed``,
    ``server_shutdown``, ``error``, ``closed``) and ``detail`` the human text.
    """

    server: str
    state: ConnectionState
    at: float
    epoch: int
    reason: str | None = None
    detail: str | None = None
    gap_start: float | None = None
    gap_seconds: float | None = None


def is_success(response: Response | None) -> bool:
    """The seed API's ``resp_is_success``."""
    return response is not None and response.is_success


def is_error(response: Response | None) -> bool:
    """The seed API's ``resp_is_error``."""
    return response is not None and response.is_error


def parse_host(host: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """``"pbx"`` -> ``("pbx", 5038)``; ``"pbx:5039"``; ``"[::1]:5038"``; ``"::1"``. Raises
    ValueError for a port that is not a number or stray text; :class:`AMIClient` checks the
    port's range itself."""
    addr, port_text = split_host(host)
    if port_text is None:
        return addr, default_port
    if not port_text.isdigit():
        raise ValueError(f"invalid port {port_text!r} in {host!r}")
    return addr, int(port_text)


def make_ssl_context(*, ca_file: str | None = None, verify: bool = True,
                     cert_file: str | None = None, key_file: str | None = None) -> _ssl.SSLContext:
    """A client TLS context: verification on by default, optional CA file and client cert."""
    ctx = _ssl.create_default_context(cafile=ca_file)
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = _ssl.CERT_NONE
    if cert_file:
        ctx.load_cert_chain(cert_file, key_file)
    return ctx


class _Pending:
    """An action waiting for its response and, for list actions, for its list to complete."""

    __slots__ = ("response", "complete", "events", "listing", "first")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.response: asyncio.Future[Response] = loop.create_future()
        self.complete: asyncio.Future[Response] = loop.create_future()
        self.events: list[Event] = []
        self.listing = False  # the response said "EventList: start"; counted in _lists
        self.first: Response | None = None

    def fail(self, exc: Exception) -> None:
        for fut in (self.response, self.complete):
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()  # retrieved: nobody may be waiting any more


class _Wire(asyncio.Protocol):
    """One TCP/TLS connection; forwards bytes to the client, owns nothing else."""

    def __init__(self, client: "AMIClient", parser: Parser) -> None:
        self.client = client
        self.parser = parser
        self.transport: asyncio.Transport | None = None
        self.banner = asyncio.get_running_loop().create_future()
        self.lost = asyncio.get_running_loop().create_future()
        self.close_reason: tuple[str, str] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.client._on_data(self, data)

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if self.close_reason is None:
            if exc is None:
                self.close_reason = ("eof", "server closed the connection")
            else:
                self.close_reason = ("error", f"{type(exc).__name__}: {exc}")
        if not self.banner.done():
            self.banner.set_exception(AMIConnectionError(
                f"connection closed before the banner ({self.close_reason[1]})"))
            self.banner.exception()  # mark retrieved
        if not self.lost.done():
            self.lost.set_result(self.close_reason)
        # Whoever waits for an answer on this connection learns now, not at its timeout.
        self.client._wire_lost(self)

    def abort(self, reason: str, detail: str) -> None:
        if self.close_reason is None:
            self.close_reason = (reason, detail)
        if self.transport is not None:
            self.transport.abort()


class AMIClient:
    """An AMI session to one Asterisk, kept alive with pings and reconnected with backoff.

    >>> async with AMIClient("pbx.example.com", username="amid", secret="s3cret") as ami:
    ...     ami.add_event_handler("Hangup", on_hangup)
    ...     print((await ami.ping()).name)

    ``async with`` (or :meth:`connect`) makes the first connection and raises if it fails;
    :meth:`start` instead keeps trying in the background (what a daemon wants).
    """

    def __init__(self, host: str, port: int | None = None, *, username: str, secret: str,
                 auth: Literal["md5", "plain"] = "md5", ssl: _ssl.SSLContext | bool | None = None,
                 server_hostname: str | None = None, name: str | None = None,
                 events: bool | str | Sequence[str] = True, filters: Sequence[str] = (),
                 ping_interval: float = 20.0, ping_timeout: float = 5.0,
                 connect_timeout: float = 10.0, action_timeout: float = 10.0,
                 list_timeout: float = 60.0, login_timeout: float = 10.0,
                 reconnect: bool = True, reconnect_min_delay: float = 1.0,
                 reconnect_max_delay: float = 60.0, default_port: int = DEFAULT_PORT,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 handler_queue_size: int = 10_000, action_ids: ActionIdGenerator | None = None,
                 stats: SessionStats | None = None, rng: Callable[[], float] = random.random,
                 initial_epoch: int = 0, outage_since: float | None = None) -> None:
        if port is None:
            self.host, self.port = parse_host(host, default_port)
        else:
            self.host, self.port = host, port
        if not 0 < self.port < 65536:  # the socket layer would wrap it silently (99999 -> 34463)
            raise ValueError(f"port {self.port} is not in 1-65535")
        self.name = name or f"{self.host}:{self.port}"
        self.username = username
        self._secret = secret
        if auth not in ("md5", "plain"):
            raise ValueError(f"auth must be 'md5' or 'plain', not {auth!r}")
        self.auth = auth
        self._ssl = make_ssl_context() if ssl is True else (ssl or None)
        self.server_hostname = server_hostname
        self.event_mask = _event_mask(events)
        self.filters = list(filters)
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.connect_timeout = connect_timeout
        self.action_timeout = action_timeout
        self.list_timeout = list_timeout
        self.login_timeout = login_timeout
        self.reconnect = reconnect
        self.reconnect_min_delay = reconnect_min_delay
        self.reconnect_max_delay = reconnect_max_delay
        self.max_message_bytes = max_message_bytes
        self.stats = stats if stats is not None else SessionStats()
        self._rng = rng
        self._action_ids = action_ids or _PROCESS_ACTION_IDS

        self.state = ConnectionState.IDLE
        # A replacement client (config reload) continues its predecessor's epochs, so record
        # ids (server:run:epoch:seq) never repeat, and reports the outage as a gap.
        self.epoch = initial_epoch
        self.banner: str | None = None
        self._seq = 0
        self._wire: _Wire | None = None
        self._pending: dict[str, _Pending] = {}
        self._lists = 0  # pending actions that collect list events
        self._listeners: list[Callable[[Event], None]] = []
        self._raw_listeners: list[Callable[[bytes], None]] = []
        self._batch_listeners: list[Callable[[list[Event]], None]] = []
        self._state_callbacks: list[Callable[[StateChange], None]] = []
        self._state_queues: list[asyncio.Queue[StateChange]] = []
        self._handlers_exact: dict[str, list[EventHandler]] = {}
        self._handlers_glob: list[tuple[str, EventHandler]] = []
        self._handlers_any: list[EventHandler] = []
        self._handler_cache: dict[str, tuple[EventHandler, ...]] = {}
        self._handler_queue: deque[Event] = deque()
        self._handler_queue_size = handler_queue_size
        self._handler_wakeup = asyncio.Event()
        # Handler failures: the first of each (handler, exception type) is logged with its
        # traceback, the rest as a count at most every HANDLER_ERROR_REPORT_INTERVAL seconds.
        self._handler_errors_logged: set[tuple[str, type]] = set()
        self._handler_errors_unlogged = 0
        self._handler_errors_reported_at = 0.0
        self._dispatcher: asyncio.Task | None = None
        self._supervisor: asyncio.Task | None = None
        self._ping_task: asyncio.Task | None = None
        self._closing = asyncio.Event()
        self._connected = asyncio.Event()
        self._disconnected_at: float | None = outage_since
        self._last_shutdown_event = False
        self.last_error: str | None = None

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> "AMIClient":
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect and log in once, raising on failure; then keep the session alive in the
        background (reconnecting if ``reconnect``)."""
        self._ensure_dispatcher()
        lost = await self._connect_once()
        self._supervisor = asyncio.create_task(self._supervise(first_lost=lost),
                                               name=f"ami-supervisor-{self.name}")

    async def start(self) -> None:
        """Start connecting in the background; never raises for connection problems."""
        self._ensure_dispatcher()
        if self._supervisor is None:
            self._supervisor = asyncio.create_task(self._supervise(first_lost=None),
                                                   name=f"ami-supervisor-{self.name}")

    async def wait_connected(self, timeout: float | None = None) -> bool:
        """Wait until logged in; False if ``timeout`` passed first."""
        try:
            async with asyncio.timeout(timeout):
                await self._connected.wait()
            return True
        except TimeoutError:
            return False

    @property
    def connected(self) -> bool:
        return self.state is ConnectionState.CONNECTED

    async def close(self, *, logoff_timeout: float = 2.0) -> None:
        """Log off cleanly (bounded wait), close the socket, stop every task. Idempotent."""
        self._closing.set()
        # Nothing may follow the Logoff: Asterisk closes the socket after its Goodbye, and bytes
        # arriving then (a keepalive Ping) make the kernel answer with a reset, which throws
        # away whatever events were still unread on our side.
        if self._ping_task is not None:
            self._ping_task.cancel()
        wire = self._wire
        if wire is not None and self.state is ConnectionState.CONNECTED and wire.transport is not None \
                and not wire.lost.done():
            try:
                await self.send_action("Logoff", timeout=logoff_timeout)
            except (AMIError, OSError) as exc:
                log.info("AMI %s: no Goodbye to Logoff: %s", self.name, exc, extra={"server": self.name})
            try:
                async with asyncio.timeout(logoff_timeout):
                    await asyncio.shield(wire.lost)
            except TimeoutError:
                log.info("AMI %s: server did not close %ss after Logoff", self.name, logoff_timeout,
                         extra={"server": self.name})
        if wire is not None:
            wire.abort("closed", "client closed the session")
        for task in (self._ping_task, self._supervisor, self._dispatcher):
            if task is not None and not task.done():
                task.cancel()
        for task in (self._ping_task, self._supervisor, self._dispatcher):
            if task is not None:
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass
        if self._handler_errors_unlogged:  # the tail of a burst the summaries did not cover
            log.error("AMI %s: %d more handler failures", self.name, self._handler_errors_unlogged,
                      extra={"server": self.name})
            self._handler_errors_unlogged = 0
        if self.stats.up:  # a connection we ended ourselves: a disconnect too, reason "closed"
            self.stats.disconnects_total["closed"] += 1
        self.stats.up = False
        self._connected.clear()
        if self.state is not ConnectionState.CLOSED:
            self._set_state(ConnectionState.CLOSED, reason="closed", detail="client closed the session")
        self._fail_pending(AMIConnectionError("session closed"))

    # ------------------------------------------------------------------ registration

    def add_event_handler(self, event: str, handler: EventHandler) -> None:
        """Call ``handler(event)`` for events named ``event`` (case-insensitive; globs such as
        ``Dial*`` work). ``"*"`` receives every event no other handler took. Handlers may be
        sync or async; they run outside the read path, and an exception is logged, counted and
        otherwise ignored."""
        if event == "*":
            self._handlers_any.append(handler)
        elif any(c in event for c in "*?["):
            self._handlers_glob.append((event.lower(), handler))
        else:
            self._handlers_exact.setdefault(event.lower(), []).append(handler)
        self._handler_cache.clear()
        self._ensure_dispatcher()

    def remove_event_handler(self, event: str, handler: EventHandler) -> None:
        if event == "*":
            self._handlers_any.remove(handler)
        elif any(c in event for c in "*?["):
            self._handlers_glob.remove((event.lower(), handler))
        else:
            self._handlers_exact.get(event.lower(), []).remove(handler)
        self._handler_cache.clear()

    def add_listener(self, listener: Callable[[Event], None]) -> None:
        """Call ``listener(event)`` synchronously on the read path for every event.

        For the daemon's router: a listener must return at once (e.g. ``put_nowait``)."""
        self._listeners.append(listener)

    def add_batch_listener(self, listener: Callable[[list[Event]], None]) -> None:
        """Call ``listener(events)`` synchronously on the read path once per read, with every
        event that read completed, in order (after the per-event listeners saw them).

        The daemon's router is one: a call per read instead of per event. It must return at
        once and must not keep the list (it is not reused, but it is shared by all of them)."""
        self._batch_listeners.append(listener)

    def add_raw_listener(self, listener: Callable[[bytes], None]) -> None:
        """Call ``listener(data)`` with every chunk of bytes read (``amid tail --raw``)."""
        self._raw_listeners.append(listener)

    def on_state_change(self, callback: Callable[[StateChange], None]) -> None:
        self._state_callbacks.append(callback)

    async def state_changes(self) -> AsyncIterator[StateChange]:
        """Iterate over connection state changes from now on."""
        queue: asyncio.Queue[StateChange] = asyncio.Queue(maxsize=1000)
        self._state_queues.append(queue)
        try:
            while True:
                change = await queue.get()
                yield change
                if change.state is ConnectionState.CLOSED:
                    return
        finally:
            self._state_queues.remove(queue)

    async def events(self, maxsize: int = 10_000) -> AsyncIterator[Event]:
        """Iterate over every event from now on (bounded: the oldest are dropped, and
        counted, if the consumer falls behind by ``maxsize``)."""
        buffer: deque[Event] = deque()
        wakeup = asyncio.Event()
        stats = self.stats

        def push(ev: Event) -> None:
            if len(buffer) >= maxsize:
                buffer.popleft()
                stats.handler_dropped_total += 1
            buffer.append(ev)
            wakeup.set()

        self._listeners.append(push)
        try:
            while True:
                while buffer:
                    yield buffer.popleft()
                if self.state is ConnectionState.CLOSED:
                    return
                wakeup.clear()
                closing = asyncio.ensure_future(self._closing.wait())
                waiter = asyncio.ensure_future(wakeup.wait())
                try:
                    await asyncio.wait((closing, waiter), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    closing.cancel()
                    waiter.cancel()
                if self._closing.is_set() and not buffer:
                    return
        finally:
            self._listeners.remove(push)

    # ------------------------------------------------------------------ actions

    async def send_action(self, name: str, fields: Mapping[str, Any] | Iterable[tuple[str, Any]] | None = None,
                          *, timeout: float | None = None) -> Response:
        """Send an action and return its response, correlated by ActionID only.

        If Asterisk answers with a list (``EventList: start``), the list events are collected
        up to the list-complete event into ``response.events`` (bounded by ``list_timeout``).
        Raises :class:`AMIConnectionError` when not connected or the connection drops, and
        :class:`ActionTimeout` when no complete answer arrives in time.
        """
        wire = self._wire
        if wire is None or wire.transport is None or self.state not in (
                ConnectionState.CONNECTED, ConnectionState.LOGGING_IN):
            raise AMIConnectionError(f"not connected to {self.name}")
        return await self._send(wire, name, fields or (), timeout)

    async def _send(self, wire: _Wire, name: str, fields: Any, timeout: float | None) -> Response:
        action_id = self._action_ids()
        data = encode_action(name, fields, action_id=action_id)
        pending = _Pending(asyncio.get_running_loop())
        self._pending[action_id] = pending
        try:
            assert wire.transport is not None
            wire.transport.write(data)
            self.stats.sent_actions_total += 1
            self.stats.sent_bytes_total += len(data)
            try:
                async with asyncio.timeout(timeout if timeout is not None else self.action_timeout):
                    response = await pending.response
            except TimeoutError:
                raise ActionTimeout(f"no response to {name} from {self.name}") from None
            if response.is_list_start:
                try:
                    async with asyncio.timeout(self.list_timeout):
                        await pending.complete
                except TimeoutError:
                    raise ActionTimeout(
                        f"list of {name} from {self.name} not complete after {self.list_timeout}s "
                        f"({len(pending.events)} events)") from None
            return response
        finally:
            if self._pending.pop(action_id, None) is not None and pending.listing:
                self._lists -= 1

    # Pre-canned actions (the seed's "precanned functions").

    async def ping(self) -> Response:
        return await self.send_action("Ping")

    async def command(self, command: str) -> Response:
        """Run a CLI command; its lines are in ``response.output``."""
        return await self.send_action("Command", {"Command": command})

    async def originate(self, channel: str, *, exten: str | None = None, context: str | None = None,
                        priority: int | str | None = None, application: str | None = None,
                        data: str | None = None, timeout_ms: int | None = None,
                        caller_id: str | None = None, variables: Mapping[str, str] | None = None,
                        account: str | None = None, async_: bool = True,
                        extra: Mapping[str, str] | None = None) -> Response:
        fields: list[tuple[str, Any]] = [("Channel", channel)]
        for key, value in (("Exten", exten), ("Context", context), ("Priority", priority),
                           ("Application", application), ("Data", data), ("Timeout", timeout_ms),
                           ("CallerID", caller_id), ("Account", account)):
            if value is not None:
                fields.append((key, value))
        for var, value in (variables or {}).items():
            fields.append(("Variable", f"{var}={value}"))
        fields.append(("Async", "true" if async_ else "false"))
        fields.extend((extra or {}).items())
        return await self.send_action("Originate", fields)

    async def hangup(self, channel: str, cause: int | None = None) -> Response:
        fields: dict[str, Any] = {"Channel": channel}
        if cause is not None:
            fields["Cause"] = cause
        return await self.send_action("Hangup", fields)

    async def status(self, channel: str | None = None, variables: Sequence[str] = ()) -> Response:
        """``Status``: one ``Status`` event per channel in ``response.events``."""
        fields: dict[str, Any] = {}
        if channel:
            fields["Channel"] = channel
        if variables:
            fields["Variables"] = ",".join(variables)
        return await self.send_action("Status", fields)

    async def core_show_channels(self) -> Response:
        return await self.send_action("CoreShowChannels")

    async def getvar(self, variable: str, channel: str | None = None) -> Response:
        fields = {"Variable": variable, **({"Channel": channel} if channel else {})}
        return await self.send_action("Getvar", fields)

    # ------------------------------------------------------------------ connection

    async def _connect_once(self) -> asyncio.Future:
        """Open, read the banner, log in, apply mask and filters. Returns the lost-future."""
        loop = asyncio.get_running_loop()
        self._set_state(ConnectionState.CONNECTING)
        parser = Parser(max_message_bytes=self.max_message_bytes)
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, wire = await loop.create_connection(
                    lambda: _Wire(self, parser), self.host, self.port, ssl=self._ssl,
                    server_hostname=(self.server_hostname or self.host) if self._ssl else None)
                self._wire = wire
                await wire.banner
        except TimeoutError:
            self._drop_wire()
            raise AMIConnectionError(
                f"no AMI banner from {self.host}:{self.port} within {self.connect_timeout}s") from None
        except (OSError, _ssl.SSLError) as exc:
            self._drop_wire()
            raise AMIConnectionError(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
        except AMIConnectionError:
            self._drop_wire()
            raise
        self.banner = parser.banner
        # A new connection is a new epoch from its first byte on: Asterisk sends events
        # (FullyBooted...) in the same read as the Login response, before _login returns.
        self.epoch += 1
        self._seq = 0
        self._last_shutdown_event = False
        self._set_state(ConnectionState.LOGGING_IN)
        try:
            await self._login(wire)
        except BaseException:
            wire.abort("login_failed", "login failed")
            self._drop_wire()
            raise
        stats = self.stats
        stats.up = True
        stats.connects_total += 1
        gap_start = self._disconnected_at
        now = time.time()
        self._set_state(ConnectionState.CONNECTED, gap_start=gap_start,
                        gap_seconds=None if gap_start is None else max(0.0, now - gap_start))
        self._disconnected_at = None
        self._connected.set()
        if self.ping_interval > 0:
            self._ping_task = asyncio.create_task(self._keepalive(wire), name=f"ami-ping-{self.name}")
        return wire.lost

    async def _login(self, wire: _Wire) -> None:
        timeout = self.login_timeout
        fields: list[tuple[str, Any]] = [("Username", self.username)]
        waiting_for, waited = "Challenge", timeout  # what a timeout below is about
        try:
            if self.auth == "md5":
                challenge = await self._send(wire, "Challenge", {"AuthType": "MD5"}, timeout)
                if not challenge.is_success or not challenge.get("Challenge"):
                    raise LoginError(f"MD5 challenge refused: {challenge.message or challenge.name}")
                key = hashlib.md5((challenge["Challenge"] + self._secret).encode()).hexdigest()
                fields += [("AuthType", "MD5"), ("Key", key)]
            else:
                fields.append(("Secret", self._secret))
            fields.append(("Events", self.event_mask))
            # Asterisk waits ~1 s before it answers a failed login, so allow for that.
            waiting_for, waited = "Login", timeout + 2.0
            response = await self._send(wire, "Login", fields, waited)
        except AMIConnectionError as exc:
            raise LoginError(f"connection lost during login: {exc}") from exc
        except ActionTimeout:
            raise LoginError(f"no answer to {waiting_for} within {waited:g}s") from None
        if not response.is_success:
            raise LoginError(response.message or response.name)
        for flt in self.filters:
            result = await self._send(wire, "Filter", {"Operation": "Add", "Filter": flt}, timeout)
            if not result.is_success:
                log.warning("server %s refused filter %r: %s", self.name, flt, result.message,
                            extra={"server": self.name})

    def _drop_wire(self) -> None:
        wire, self._wire = self._wire, None
        if wire is not None and wire.transport is not None:
            wire.transport.abort()

    async def _supervise(self, first_lost: asyncio.Future | None) -> None:
        failures = 0
        lost = first_lost
        while True:
            if lost is None:
                try:
                    lost = await self._connect_once()
                    failures = 0
                except LoginError as exc:
                    self.stats.login_failures_total += 1
                    self._connection_down("login_failed", f"login as {self.username!r} failed: {exc}")
                except AMIConnectionError as exc:
                    self._connection_down("connect_error", str(exc))
                except Exception as exc:  # e.g. LocalProtocolError: never let the supervisor die
                    self._connection_down("error", f"{type(exc).__name__}: {exc}")
            if lost is not None:
                closing = asyncio.ensure_future(self._closing.wait())
                try:
                    await asyncio.wait((lost, closing), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    closing.cancel()
                if self._closing.is_set():
                    return
                reason, detail = lost.result()
                if reason == "eof" and self._last_shutdown_event:
                    reason, detail = "server_shutdown", "Asterisk is shutting down"
                lost = None
                self._connection_down(reason, detail)
            if self._closing.is_set() or not self.reconnect:
                if not self._closing.is_set():
                    self._closing.set()  # iterators and waiters end as on close()
                    self._set_state(ConnectionState.CLOSED, reason="closed", detail="reconnect disabled")
                return
            failures += 1
            cap = min(self.reconnect_max_delay, self.reconnect_min_delay * 2 ** min(failures - 1, 30))
            delay = self.reconnect_min_delay + self._rng() * max(0.0, cap - self.reconnect_min_delay)
            log.info("reconnecting to %s in %.1fs", self.name, delay, extra={"server": self.name})
            try:
                async with asyncio.timeout(delay):
                    await self._closing.wait()
                return
            except TimeoutError:
                pass

    def _connection_down(self, reason: str, detail: str) -> None:
        wire = self._wire
        self._wire = None
        if wire is not None and wire.transport is not None:
            wire.transport.abort()
        if self._ping_task is not None:
            self._ping_task.cancel()
            self._ping_task = None
        self._connected.clear()
        was_up = self.stats.up
        self.stats.up = False
        self.stats.disconnects_total[reason] += 1
        self.last_error = detail
        if was_up:
            self._disconnected_at = time.time()
        level = logging.ERROR if reason in ("login_failed", "protocol_error") else logging.WARNING
        log.log(level, "AMI %s (%s:%d): %s: %s", self.name, self.host, self.port, reason, detail,
                extra={"server": self.name})
        self._fail_pending(AMIConnectionError(f"connection to {self.name} lost: {detail}"))
        self._set_state(ConnectionState.DISCONNECTED, reason=reason, detail=detail)

    def _wire_lost(self, wire: _Wire) -> None:
        if wire is self._wire:
            reason = wire.close_reason[1] if wire.close_reason else "connection lost"
            self._fail_pending(AMIConnectionError(f"connection to {self.name} lost: {reason}"))

    def _fail_pending(self, exc: Exception) -> None:
        for pending in self._pending.values():
            pending.fail(exc)
        self._pending.clear()
        self._lists = 0

    async def _keepalive(self, wire: _Wire) -> None:
        while True:
            await asyncio.sleep(self.ping_interval)
            started = time.monotonic()
            try:
                response = await self._send(wire, "Ping", (), self.ping_timeout)
            except ActionTimeout:
                wire.abort("ping_timeout", f"no answer to Ping within {self.ping_timeout}s")
                return
            except AMIConnectionError:
                return
            rtt = time.monotonic() - started
            self.stats.ping_rtt.observe(rtt)
            self.stats.last_pong_time = time.time()
            if not response.is_success:
                # e.g. "Asterisk is shutting down": the link is alive, say why in the log.
                log.info("Ping to %s answered %s: %s", self.name, response.name, response.message,
                         extra={"server": self.name})

    # ------------------------------------------------------------------ read path

    def _on_data(self, wire: _Wire, data: bytes) -> None:
        self.stats.received_bytes_total += len(data)
        for raw_listener in self._raw_listeners:
            try:
                raw_listener(data)
            except Exception as exc:
                self._handler_failed(exc, f"raw listener {_callable_name(raw_listener)}", "data")
        try:
            messages = wire.parser.feed(data)
        except RemoteProtocolError as exc:
            self._protocol_error(wire, exc)
            return
        if wire.parser.error is not None:
            # The messages completed before the garbage are delivered, then the link recycled.
            self._dispatch_messages(messages)
            self._protocol_error(wire, wire.parser.error)
            return
        if wire.parser.banner is not None and not wire.banner.done():
            wire.banner.set_result(wire.parser.banner)
        if messages:
            self._dispatch_messages(messages)

    def _protocol_error(self, wire: _Wire, exc: RemoteProtocolError) -> None:
        self.stats.protocol_errors_total[exc.kind] += 1
        wire.abort("protocol_error", str(exc))

    def _dispatch_messages(self, messages: list) -> None:
        now = time.time()
        stats = self.stats
        by_name = stats.events_by_name
        listeners = self._listeners
        want_handlers = bool(self._handlers_exact or self._handlers_glob or self._handlers_any)
        if (_stamp_events is not None and not listeners and not want_handlers and not self._lists
                and self._batch_listeners and messages
                and _stamp_events(messages, self.name, self.epoch, self._seq, now)):
            # The daemon's read path: only events, only batch listeners. The C accelerator
            # stamped them all as the loop below would; names are counted per distinct name.
            self._seq += len(messages)
            for name, count in Counter(map(_name_of, messages)).items():
                if name in by_name:
                    by_name[name] += count
                elif len(by_name) < MAX_EVENT_NAMES:
                    by_name[name] = count
                else:
                    by_name["other"] += count
                if name == "Shutdown":
                    self._last_shutdown_event = True
            stats.events_total += len(messages)
            stats.last_event_time = now
            self._call_batch_listeners(messages)
            return
        server, epoch = self.name, self.epoch
        batch: list[Event] | None = [] if self._batch_listeners else None
        first_seq = self._seq
        for msg in messages:
            if type(msg) is Event:
                if self._lists and self._collect_list_event(msg):
                    continue
                seq = self._seq = self._seq + 1
                msg.server = server
                msg.epoch = epoch
                msg.seq = seq
                msg.received_at = now
                name = msg.name
                if name in by_name:
                    by_name[name] += 1
                elif len(by_name) < MAX_EVENT_NAMES:
                    by_name[name] = 1
                else:  # names come from the wire (UserEvent, forged AppData): bound the set
                    by_name["other"] += 1
                if name == "Shutdown":
                    self._last_shutdown_event = True
                for listener in listeners:
                    try:
                        listener(msg)
                    except Exception as exc:
                        self._handler_failed(exc, f"listener {_callable_name(listener)}", name)
                if want_handlers:
                    self._queue_for_handlers(msg)
                if batch is not None:
                    batch.append(msg)
            elif type(msg) is Response:
                self._on_response(msg)
            else:
                stats.protocol_errors_total["malformed_message"] += 1
                log.warning("AMI %s: ignoring a message that is neither response nor event: %r",
                            self.name, msg.raw[:80], extra={"server": self.name})
        if self._seq != first_seq:  # counted once per read: every event of it got ``now``
            stats.events_total += self._seq - first_seq
            stats.last_event_time = now
        if batch:
            self._call_batch_listeners(batch)

    def _call_batch_listeners(self, batch: list[Event]) -> None:
        for batch_listener in self._batch_listeners:
            try:
                batch_listener(batch)
            except Exception as exc:
                self._handler_failed(exc, f"batch listener {_callable_name(batch_listener)}",
                                     batch[0].name)

    def _on_response(self, response: Response) -> None:
        action_id = response.get("ActionID")
        pending = self._pending.get(action_id) if action_id is not None else None
        if pending is None or pending.response.done():
            log.debug("AMI %s: response to an unknown ActionID %r", self.name, action_id)
            return
        pending.first = response
        pending.response.set_result(response)
        if response.is_list_start:
            pending.listing = True
            self._lists += 1
        else:
            pending.complete.set_result(response)

    def _collect_list_event(self, event: Event) -> bool:
        action_id = event.get("ActionID")
        if action_id is None:
            return False
        pending = self._pending.get(action_id)
        if pending is None or not pending.listing or pending.complete.done():
            return False
        response = pending.first
        event.server = self.name
        event.epoch = self.epoch
        event.received_at = time.time()
        if (event.get("EventList") or "").lower() == "complete":
            response.events = pending.events
            response.list_complete = event
            pending.complete.set_result(response)
        else:
            pending.events.append(event)
        return True

    # ------------------------------------------------------------------ handlers

    def _ensure_dispatcher(self) -> None:
        if self._dispatcher is None and (self._handlers_exact or self._handlers_glob or self._handlers_any):
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                return  # started at connect()/start()
            self._dispatcher = asyncio.create_task(self._dispatch(), name=f"ami-handlers-{self.name}")

    def _handlers_for(self, name: str) -> tuple[EventHandler, ...]:
        key = name.lower()
        found = self._handler_cache.get(key)
        if found is None:
            matched = list(self._handlers_exact.get(key, ()))
            matched += [h for pattern, h in self._handlers_glob if fnmatch.fnmatchcase(key, pattern)]
            found = tuple(matched) if matched else tuple(self._handlers_any)
            if len(self._handler_cache) >= MAX_HANDLER_CACHE:  # names come from the wire
                self._handler_cache.clear()
            self._handler_cache[key] = found
        return found

    def _queue_for_handlers(self, event: Event) -> None:
        if len(self._handler_queue) >= self._handler_queue_size:
            self._handler_queue.popleft()
            self.stats.handler_dropped_total += 1
            if self.stats.handler_dropped_total % 1000 == 1:
                log.warning("AMI %s: event handlers are too slow; %d events dropped so far",
                            self.name, self.stats.handler_dropped_total, extra={"server": self.name})
        self._handler_queue.append(event)
        self._handler_wakeup.set()

    async def _dispatch(self) -> None:
        queue = self._handler_queue
        while True:
            await self._handler_wakeup.wait()
            self._handler_wakeup.clear()
            while queue:
                event = queue.popleft()
                for handler in self._handlers_for(event.name):
                    try:
                        result = handler(event)
                        if inspect.isawaitable(result):
                            await result
                    except asyncio.CancelledError:
                        raise
                    except Exception as exc:
                        self._handler_failed(exc, f"handler {_callable_name(handler)}", event.name)

    def _handler_failed(self, exc: Exception, what: str, event_name: str) -> None:
        """Count a failing handler or listener; log it without flooding the log (a handler that
        fails on every event at 40k events/s would otherwise write 40k tracebacks a second)."""
        self.stats.handler_errors_total += 1
        key = (what, type(exc))
        if key not in self._handler_errors_logged and len(self._handler_errors_logged) < 100:
            self._handler_errors_logged.add(key)
            log.error("AMI %s: %s failed on %s (further failures like it are counted, not "
                      "logged one by one)", self.name, what, event_name, exc_info=exc,
                      extra={"server": self.name})
            return
        self._handler_errors_unlogged += 1
        now = time.monotonic()
        if now - self._handler_errors_reported_at >= HANDLER_ERROR_REPORT_INTERVAL:
            log.error("AMI %s: %d more handler failures, the last: %s on %s: %s: %s", self.name,
                      self._handler_errors_unlogged, what, event_name, type(exc).__name__, exc,
                      extra={"server": self.name})
            self._handler_errors_unlogged = 0
            self._handler_errors_reported_at = now

    # ------------------------------------------------------------------ state

    def _set_state(self, state: ConnectionState, *, reason: str | None = None, detail: str | None = None,
                   gap_start: float | None = None, gap_seconds: float | None = None) -> None:
        self.state = state
        change = StateChange(server=self.name, state=state, at=time.time(), epoch=self.epoch,
                             reason=reason, detail=detail, gap_start=gap_start, gap_seconds=gap_seconds)
        if state is ConnectionState.CONNECTED:
            log.info("AMI %s (%s:%d): connected and logged in as %r (epoch %d)", self.name, self.host,
                     self.port, self.username, self.epoch, extra={"server": self.name})
        for callback in self._state_callbacks:
            try:
                callback(change)
            except Exception:
                log.exception("state callback failed", extra={"server": self.name})
        for queue in self._state_queues:
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(change)

    def __repr__(self) -> str:
        return f"AMIClient({self.name!r}, {self.host}:{self.port}, state={self.state.value})"


def _event_mask(events: bool | str | Sequence[str]) -> str:
    if events is True:
        return "on"
    if events is False:
        return "off"
    if isinstance(events, str):
        return events
    return ",".join(events) if events else "off"

