"""The asyncio AMI client: connect, TLS, login, actions by ActionID, lists, pings, reconnect.

The read path is an :class:`asyncio.Protocol`: ``data_received`` feeds the sans-IO parser and
hands each message on without ever awaiting. Responses resolve the future of their ActionID;
events are stamped with an envelope and passed to *listeners* (synchronous, must not block:
the daemon's router) and queued for *handlers* (sync or async user callbacks run by
:class:`~amid.ami.dispatch.HandlerDispatcher`'s own task). So a slow or failing handler can
never stall the socket: Asterisk drops a client that stops reading for about 100 ms.

:class:`AMIClient` is over 400 lines (about 600) on purpose: it is the session's state machine
and its read path together (connect, login, pings, reconnect, and the per-read dispatch that the
C accelerator mirrors). Splitting the read path off would add an attribute hop per event on the
hottest loop of amid, and the read path is due to be reworked on its own. Everything else lives
beside it: who hears about events (handlers, listeners, state changes) in
:mod:`amid.ami.dispatch`, the ActionID table in :mod:`amid.ami.pending`, the settings in
:mod:`amid.ami.settings`, the pre-canned actions in :mod:`amid.ami.actions`, the backoff in
:mod:`amid.ami.backoff`, TLS in :mod:`amid.ami.tls`.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import logging
import random
import ssl as _ssl
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, Literal, Self

from amid.ami import _accel, address
from amid.ami.actions import CannedActions
from amid.ami.aio import cancel_and_wait, first_of
from amid.ami.backoff import Backoff
from amid.ami.dispatch import (
    CallbackErrors,
    EventHandler,
    HandlerDispatcher,
    Subscriptions,
    callable_name,
)
from amid.ami.errors import ActionTimeout, AMIConnectionError, AMIError, LoginError
from amid.ami.pending import PendingActions
from amid.ami.protocol import (
    DEFAULT_MAX_MESSAGE_BYTES,
    ActionIdGenerator,
    Event,
    Message,
    Parser,
    RemoteProtocolError,
    Response,
    encode_action,
)
from amid.ami.ratelog import RateLimitedLog
from amid.ami.settings import DEFAULT_PORT, SessionSettings
from amid.ami.stats import SessionStats
from amid.ami.tls import TlsSettings, client_context

__all__ = [
    "DEFAULT_PORT",
    "AMIClient",
    "AMIConnectionError",
    "AMIError",
    "ActionTimeout",
    "ConnectionState",
    "LoginError",
    "SessionSettings",
    "StateChange",
    "is_error",
    "is_success",
    "make_ssl_context",
    "parse_host",
]

log = logging.getLogger("amid.ami")

MAX_EVENT_NAMES = 1000
PEER_LOG_INTERVAL = 10.0  # seconds between log lines about one kind of garbage from a peer
_name_of = attrgetter("name")

# One generator for every client of the process, so ActionIDs never repeat across sessions
# (Asterisk broadcasts OriginateResponse events, with their ActionID, to every session).
_PROCESS_ACTION_IDS = ActionIdGenerator()


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
    """``"pbx"`` -> ``("pbx", 5038)``; ``"pbx:5039"``; ``"[::1]:5038"``; ``"::1"`` (see
    :func:`amid.ami.address.parse_host`)."""
    return address.parse_host(host, default_port)


def make_ssl_context(*, ca_file: str | None = None, verify: bool = True,
                     cert_file: str | None = None, key_file: str | None = None) -> _ssl.SSLContext:
    """A client TLS context: verification on by default, optional CA file and client cert
    (:func:`amid.ami.tls.client_context`)."""
    return client_context(TlsSettings(ca_file=ca_file, verify=verify, cert_file=cert_file,
                                      key_file=key_file))


# A read at least this large is a backlog being caught up: read again at once.
_COALESCE_BELOW = 64 * 1024


class _Wire(asyncio.Protocol):
    """One TCP/TLS connection; forwards bytes to the client and keeps what is per connection
    (the login's ActionID and whether it succeeded, recent malformed messages)."""

    def __init__(self, client: AMIClient, parser: Parser, max_malformed: int,
                 read_coalesce: float = 0.0) -> None:
        self.client = client
        self.parser = parser
        self.read_coalesce = read_coalesce
        self._resume_handle: asyncio.TimerHandle | None = None
        self.transport: asyncio.Transport | None = None
        self.banner = asyncio.get_running_loop().create_future()
        self.lost = asyncio.get_running_loop().create_future()
        self.close_reason: tuple[str, str] | None = None
        # Events are routed only once the Login response said Success: before that, a peer
        # (or something in between) has not proven to be the Asterisk we logged in to.
        self.login_action_id: str | None = None
        self.logged_in = False
        self.early_event_logged = False
        self.malformed: deque[float] = deque(maxlen=max_malformed + 1)  # monotonic times

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.client._on_data(self, data)
        if self.read_coalesce > 0 and len(data) < _COALESCE_BELOW and self.transport is not None:
            # Asterisk writes every event on its own: read at once, and a busy PBX costs one
            # trip through the loop, the router and each sink per event. Leaving the socket
            # for a millisecond or two lets the kernel gather them, so one read (and one sink
            # write) carries many. A large read means a backlog already: no pause then.
            self.transport.pause_reading()
            self._resume_handle = asyncio.get_running_loop().call_later(
                self.read_coalesce, self._resume_reading)

    def _resume_reading(self) -> None:
        self._resume_handle = None
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.resume_reading()

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if self._resume_handle is not None:
            self._resume_handle.cancel()
            self._resume_handle = None
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


class AMIClient(CannedActions):
    """An AMI session to one Asterisk, kept alive with pings and reconnected with backoff.

    >>> async with AMIClient("pbx.example.com", username="amid", secret="s3cret") as ami:
    ...     ami.add_event_handler("Hangup", on_hangup)
    ...     print((await ami.ping()).name)

    ``async with`` (or :meth:`connect`) makes the first connection and raises if it fails;
    :meth:`start` instead keeps trying in the background (what a daemon wants). The keyword
    arguments are those of :class:`~amid.ami.settings.SessionSettings` (see
    :meth:`from_settings`), plus ``ssl`` (True or an ``SSLContext``) with ``server_hostname``
    and the runtime pieces: ``stats``, ``rng`` (jitter), ``action_ids``, ``initial_epoch`` and
    ``outage_since`` (a replacement client continues its predecessor's epochs and outage).
    """

    def __init__(self, host: str, port: int | None = None, *, username: str, secret: str,
                 auth: Literal["md5", "plain"] = "md5", ssl: _ssl.SSLContext | bool | None = None,
                 server_hostname: str | None = None, name: str | None = None,
                 events: bool | str | Sequence[str] = True, filters: Sequence[str] = (),
                 ping_interval: float = 20.0, ping_timeout: float = 5.0,
                 connect_timeout: float = 10.0, action_timeout: float = 10.0,
                 list_timeout: float = 60.0, login_timeout: float = 10.0,
                 reconnect: bool = True, reconnect_min_delay: float = 1.0,
                 reconnect_max_delay: float = 60.0, reconnect_stable_after: float = 10.0,
                 default_port: int = DEFAULT_PORT,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, max_malformed: int = 100,
                 malformed_window: float = 60.0,
                 handler_queue_size: int = 10_000, action_ids: ActionIdGenerator | None = None,
                 stats: SessionStats | None = None, rng: Callable[[], float] = random.random,
                 initial_epoch: int = 0, outage_since: float | None = None,
                 read_coalesce: float = 0.0) -> None:
        tls = TlsSettings(server_hostname=server_hostname) if ssl else None
        settings = SessionSettings.for_address(
            host, port, default_port=default_port, username=username, secret=secret, auth=auth,
            tls=tls, name=name or "", events=events, filters=tuple(filters),
            ping_interval=ping_interval, ping_timeout=ping_timeout, connect_timeout=connect_timeout,
            action_timeout=action_timeout, list_timeout=list_timeout, login_timeout=login_timeout,
            reconnect=reconnect, reconnect_min_delay=reconnect_min_delay,
            reconnect_max_delay=reconnect_max_delay, reconnect_stable_after=reconnect_stable_after,
            max_message_bytes=max_message_bytes, max_malformed=max_malformed,
            malformed_window=malformed_window, handler_queue_size=handler_queue_size,
            read_coalesce=read_coalesce)
        self._setup(settings, ssl if isinstance(ssl, _ssl.SSLContext) else None, action_ids=action_ids,
                    stats=stats, rng=rng, initial_epoch=initial_epoch, outage_since=outage_since)

    @classmethod
    def from_settings(cls, settings: SessionSettings, *, ssl_context: _ssl.SSLContext | None = None,
                      action_ids: ActionIdGenerator | None = None, stats: SessionStats | None = None,
                      rng: Callable[[], float] = random.random, initial_epoch: int = 0,
                      outage_since: float | None = None) -> AMIClient:
        """A client for ``settings`` (its ``tls`` builds the TLS context unless ``ssl_context``
        is given)."""
        client = cls.__new__(cls)
        client._setup(settings, ssl_context, action_ids=action_ids, stats=stats, rng=rng,
                      initial_epoch=initial_epoch, outage_since=outage_since)
        return client

    def _setup(self, settings: SessionSettings, ssl_context: _ssl.SSLContext | None, *,
               action_ids: ActionIdGenerator | None, stats: SessionStats | None,
               rng: Callable[[], float], initial_epoch: int, outage_since: float | None) -> None:
        self.settings = settings
        self.host, self.port, self.name = settings.host, settings.port, settings.name
        self.username = settings.username
        if settings.tls is not None and ssl_context is None:
            ssl_context = client_context(settings.tls)
        self._ssl = ssl_context
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
        self._actions = PendingActions()
        self._errors = CallbackErrors(self.name, self.stats)
        self.subscriptions = Subscriptions(self.name, self._errors)
        self._handlers = HandlerDispatcher(self.name, self.stats, self._errors,
                                           queue_size=settings.handler_queue_size)
        # The read path iterates these lists directly (they are the registries' own).
        self._listeners = self.subscriptions.listeners.items
        self._batch_listeners = self.subscriptions.batch_listeners.items
        self._raw_listeners = self.subscriptions.raw_listeners.items
        self._peer_log = RateLimitedLog(log, PEER_LOG_INTERVAL)
        self._supervisor: asyncio.Task[None] | None = None
        self._ping_task: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()
        self._connected = asyncio.Event()
        self._disconnected_at: float | None = outage_since
        self._up_since = 0.0  # monotonic time of the last login
        self._last_shutdown_event = False
        self.last_error: str | None = None

    @property
    def ping_interval(self) -> float:
        return self.settings.ping_interval

    @property
    def ping_timeout(self) -> float:
        return self.settings.ping_timeout

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect and log in once, raising on failure; then keep the session alive in the
        background (reconnecting if ``reconnect``)."""
        self._handlers.start()
        lost = await self._connect_once()
        self._supervisor = asyncio.create_task(self._supervise(first_lost=lost),
                                               name=f"ami-supervisor-{self.name}")

    async def start(self) -> None:
        """Start connecting in the background; never raises for connection problems."""
        self._handlers.start()
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
        """Log off cleanly (bounded wait), close the socket, stop every task. Idempotent.

        A cancellation of the caller (e.g. an ``asyncio.timeout()`` around it) propagates; the
        session is closed by then all the same, only its tasks may still be finishing."""
        self._closing.set()
        # Nothing may follow the Logoff: Asterisk closes the socket after its Goodbye, and bytes
        # arriving then (a keepalive Ping) make the kernel answer with a reset, which throws
        # away whatever events were still unread on our side.
        if self._ping_task is not None:
            self._ping_task.cancel()
        wire = self._wire
        try:
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
        finally:
            if wire is not None:
                wire.abort("closed", "client closed the session")
            for task in (self._ping_task, self._supervisor):
                if task is not None:
                    task.cancel()
            self._closed()
        await cancel_and_wait(self._ping_task)
        await cancel_and_wait(self._supervisor)
        await self._handlers.close()
        self._errors.summarise()

    def _closed(self) -> None:
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
        self._handlers.add(event, handler)

    def remove_event_handler(self, event: str, handler: EventHandler) -> None:
        self._handlers.remove(event, handler)

    def add_listener(self, listener: Callable[[Event], None]) -> Callable[[], None]:
        """Call ``listener(event)`` synchronously on the read path for every event; returns a
        function that removes it.

        For the daemon's router: a listener must return at once (e.g. ``put_nowait``)."""
        return self.subscriptions.listeners.add(listener)

    def add_batch_listener(self, listener: Callable[[list[Event]], None]) -> Callable[[], None]:
        """Call ``listener(events)`` synchronously on the read path once per read, with every
        event that read completed, in order (after the per-event listeners saw them).

        The daemon's router is one: a call per read instead of per event. It must return at
        once and must not keep the list (it is not reused, but it is shared by all of them)."""
        return self.subscriptions.batch_listeners.add(listener)

    def add_raw_listener(self, listener: Callable[[bytes], None]) -> Callable[[], None]:
        """Call ``listener(data)`` with every chunk of bytes read (``amid tail --raw``)."""
        return self.subscriptions.raw_listeners.add(listener)

    def on_state_change(self, callback: Callable[[StateChange], None]) -> Callable[[], None]:
        return self.subscriptions.state_callbacks.add(callback)

    def state_changes(self) -> AsyncIterator[StateChange]:
        """Iterate over connection state changes from now on (up to ``CLOSED``)."""
        return self.subscriptions.state_changes(lambda change: change.state is ConnectionState.CLOSED)

    def events(self, maxsize: int = 10_000) -> AsyncIterator[Event]:
        """Iterate over every event from now on (bounded: the oldest are dropped, and
        counted, if the consumer falls behind by ``maxsize``)."""
        return self.subscriptions.events(self._closing, lambda: self.state is ConnectionState.CLOSED,
                                         self.stats, maxsize)

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

    async def _send(self, wire: _Wire, name: str, fields: Any, timeout: float | None,
                    action_id: str | None = None) -> Response:
        action_id = action_id or self._action_ids()
        data = encode_action(name, fields, action_id=action_id)
        assert wire.transport is not None
        self.stats.sent_actions_total += 1
        self.stats.sent_bytes_total += len(data)
        return await self._actions.wait(
            action_id, data, wire.transport.write, what=f"{name} from {self.name}",
            timeout=timeout if timeout is not None else self.settings.action_timeout,
            list_timeout=self.settings.list_timeout)

    # ------------------------------------------------------------------ connection

    async def _connect_once(self) -> asyncio.Future[tuple[str, str]]:
        """Open, read the banner, log in, apply mask and filters. Returns the lost-future."""
        loop = asyncio.get_running_loop()
        settings = self.settings
        self._set_state(ConnectionState.CONNECTING)
        parser = Parser(max_message_bytes=settings.max_message_bytes)
        server_hostname = None
        if self._ssl is not None:
            server_hostname = (settings.tls and settings.tls.server_hostname) or self.host
        try:
            async with asyncio.timeout(settings.connect_timeout):
                _, wire = await loop.create_connection(
                    lambda: _Wire(self, parser, settings.max_malformed, settings.read_coalesce), self.host, self.port,
                    ssl=self._ssl, server_hostname=server_hostname)
                self._wire = wire
                await wire.banner
        except TimeoutError:
            self._drop_wire()
            raise AMIConnectionError(
                f"no AMI banner from {self.host}:{self.port} within {settings.connect_timeout}s") from None
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
        self._up_since = time.monotonic()
        self._set_state(ConnectionState.CONNECTED, gap_start=gap_start,
                        gap_seconds=None if gap_start is None else max(0.0, now - gap_start))
        self._disconnected_at = None
        self._connected.set()
        if settings.ping_interval > 0:
            self._ping_task = asyncio.create_task(self._keepalive(wire), name=f"ami-ping-{self.name}")
        return wire.lost

    async def _login(self, wire: _Wire) -> None:
        settings = self.settings
        timeout = settings.login_timeout
        fields: list[tuple[str, Any]] = [("Username", settings.username)]
        waiting_for, waited = "Challenge", timeout  # what a timeout below is about
        try:
            if settings.auth == "md5":
                challenge = await self._send(wire, "Challenge", {"AuthType": "MD5"}, timeout)
                if not challenge.is_success or not challenge.get("Challenge"):
                    raise LoginError(f"MD5 challenge refused: {challenge.message or challenge.name}")
                key = hashlib.md5((challenge["Challenge"] + settings.secret).encode()).hexdigest()
                fields += [("AuthType", "MD5"), ("Key", key)]
            else:
                fields.append(("Secret", settings.secret))
            fields.append(("Events", settings.event_mask))
            # Asterisk waits ~1 s before it answers a failed login, so allow for that.
            waiting_for, waited = "Login", timeout + 2.0
            wire.login_action_id = self._action_ids()
            response = await self._send(wire, "Login", fields, waited, wire.login_action_id)
        except AMIConnectionError as exc:
            raise LoginError(f"connection lost during login: {exc}") from exc
        except ActionTimeout:
            raise LoginError(f"no answer to {waiting_for} within {waited:g}s") from None
        if not response.is_success:
            raise LoginError(response.message or response.name)
        for flt in settings.filters:
            result = await self._send(wire, "Filter", {"Operation": "Add", "Filter": flt}, timeout)
            if not result.is_success:
                log.warning("server %s refused filter %r: %s", self.name, flt, result.message,
                            extra={"server": self.name})

    def _drop_wire(self) -> None:
        wire, self._wire = self._wire, None
        if wire is not None and wire.transport is not None:
            wire.transport.abort()

    async def _supervise(self, first_lost: asyncio.Future[tuple[str, str]] | None) -> None:
        settings = self.settings
        backoff = Backoff(settings.reconnect_min_delay, settings.reconnect_max_delay, rng=self._rng)
        lost = first_lost
        while True:
            if lost is None:
                try:
                    lost = await self._connect_once()
                except LoginError as exc:
                    self.stats.login_failures_total += 1
                    self._connection_down("login_failed", f"login as {self.username!r} failed: {exc}")
                except AMIConnectionError as exc:
                    self._connection_down("connect_error", str(exc))
                except Exception as exc:  # e.g. LocalProtocolError: never let the supervisor die
                    self._connection_down("error", f"{type(exc).__name__}: {exc}")
            if lost is not None:
                await first_of(lost, self._closing.wait())
                if self._closing.is_set():
                    return
                reason, detail = lost.result()
                if reason == "eof" and self._last_shutdown_event:
                    reason, detail = "server_shutdown", "Asterisk is shutting down"
                lost = None
                self._connection_down(reason, detail)
                # Only a session that held counts as a success: a peer that accepts the login
                # and hangs up at once is retried ever more slowly, not at min_delay forever.
                if time.monotonic() - self._up_since >= settings.reconnect_stable_after:
                    backoff.reset()
            if self._closing.is_set() or not settings.reconnect:
                if not self._closing.is_set():
                    self._closing.set()  # iterators and waiters end as on close()
                    self._set_state(ConnectionState.CLOSED, reason="closed", detail="reconnect disabled")
                return
            delay = backoff.failure()
            log.info("reconnecting to %s in %.2fs", self.name, delay, extra={"server": self.name})
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
        self._actions.fail_all(exc)

    async def _keepalive(self, wire: _Wire) -> None:
        interval, timeout = self.settings.ping_interval, self.settings.ping_timeout
        while True:
            await asyncio.sleep(interval)
            started = time.monotonic()
            try:
                response = await self._send(wire, "Ping", (), timeout)
            except ActionTimeout:
                wire.abort("ping_timeout", f"no answer to Ping within {timeout}s")
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
        stats = self.stats
        stats.received_bytes_total += len(data)
        stats.reads_total += 1
        for raw_listener in self._raw_listeners:
            try:
                raw_listener(data)
            except Exception as exc:
                self._errors.failed(exc, f"raw listener {callable_name(raw_listener)}", "data")
        try:
            messages = wire.parser.feed(data)
        except RemoteProtocolError as exc:
            self._protocol_error(wire, exc)
            return
        if wire.parser.error is not None:
            # The messages completed before the garbage are delivered, then the link recycled.
            if wire.logged_in:
                self._dispatch_messages(messages)
            else:
                self._before_login(wire, messages)
            self._protocol_error(wire, wire.parser.error)
            return
        if wire.parser.banner is not None and not wire.banner.done():
            wire.banner.set_result(wire.parser.banner)
        if messages:
            if wire.logged_in:
                self._dispatch_messages(messages)
            else:
                self._before_login(wire, messages)

    def _before_login(self, wire: _Wire, messages: list[Message]) -> None:
        """Until the Login response says Success, only responses are taken: an event is not
        the logged-in Asterisk's yet, so it is counted (``event_before_login``), logged once
        per connection and not routed. What follows the Login response in the same read
        (Asterisk sends FullyBooted right after it) is routed as usual."""
        for index, msg in enumerate(messages):
            if wire.logged_in:
                self._dispatch_messages(messages[index:])
                return
            if type(msg) is Response:
                self._on_response(msg)
            elif type(msg) is Event:
                self.stats.protocol_errors_total["event_before_login"] += 1
                if not wire.early_event_logged:
                    wire.early_event_logged = True
                    log.warning("AMI %s: ignoring events sent before the login succeeded (the "
                                "first: %s); counted as event_before_login", self.name, msg.name,
                                extra={"server": self.name})
            elif self._malformed(msg):
                return

    def _malformed(self, msg: Message) -> bool:
        """Count and log (rate-limited) a message that is neither response nor event; drop the
        connection as a protocol error when more than ``max_malformed`` came within
        ``malformed_window`` seconds. True when it was dropped."""
        self.stats.protocol_errors_total["malformed_message"] += 1
        self._peer_log.log("malformed_message", logging.WARNING,
                           "AMI %s: ignoring a message that is neither response nor event: %r",
                           self.name, msg.raw[:80], extra={"server": self.name})
        wire = self._wire
        if wire is None:
            return False
        recent = wire.malformed
        now = time.monotonic()
        recent.append(now)
        window = self.settings.malformed_window
        if len(recent) == recent.maxlen and now - recent[0] <= window:
            wire.abort("protocol_error", f"{len(recent)} malformed messages within {window:g}s")
            return True
        return False

    def _protocol_error(self, wire: _Wire, exc: RemoteProtocolError) -> None:
        self.stats.protocol_errors_total[exc.kind] += 1
        wire.abort("protocol_error", str(exc))

    def _dispatch_messages(self, messages: list[Message]) -> None:
        now = time.time()
        stats = self.stats
        by_name = stats.events_by_name
        listeners = self._listeners
        want_handlers = self._handlers.active
        stamp_events = _accel.active.stamp_events  # the loop below, in C (see amid.ami._accel)
        if (stamp_events is not None and not listeners and not want_handlers and not self._actions.lists
                and self._batch_listeners and messages
                and stamp_events(messages, self.name, self.epoch, self._seq, now)):
            # The daemon's read path: only events, only batch listeners. The C accelerator
            # stamped them all as the loop below would; names are counted per distinct name.
            self._seq += len(messages)
            # Few events (a quiet PBX, one per read): count them as they come; many: in C.
            counts = (Counter(map(_name_of, messages)).items() if len(messages) > 8
                      else [(msg.name, 1) for msg in messages])
            for name, count in counts:
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
            self._call_batch_listeners(messages)  # type: ignore[arg-type]  # all Events: checked in C
            return
        server, epoch = self.name, self.epoch
        batch: list[Event] | None = [] if self._batch_listeners else None
        to_handlers = self._handlers.push
        actions = self._actions
        first_seq = self._seq
        for msg in messages:
            if type(msg) is Event:
                if actions.lists and actions.collect_list_event(msg, server, epoch):
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
                        self._errors.failed(exc, f"listener {callable_name(listener)}", name)
                if want_handlers:
                    to_handlers(msg)
                if batch is not None:
                    batch.append(msg)
            elif type(msg) is Response:
                self._on_response(msg)
            elif self._malformed(msg):
                break  # the connection is dropped: nothing after the garbage is taken
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
                self._errors.failed(exc, f"batch listener {callable_name(batch_listener)}",
                                    batch[0].name)

    def _on_response(self, response: Response) -> None:
        action_id = self._actions.on_response(response)
        if action_id is None:
            log.debug("AMI %s: response to an unknown ActionID %r", self.name, response.get("ActionID"))
            return
        wire = self._wire
        if wire is not None and action_id == wire.login_action_id and response.is_success:
            wire.logged_in = True  # from the next message on, events are routed

    # ------------------------------------------------------------------ state

    def _set_state(self, state: ConnectionState, *, reason: str | None = None, detail: str | None = None,
                   gap_start: float | None = None, gap_seconds: float | None = None) -> None:
        self.state = state
        change = StateChange(server=self.name, state=state, at=time.time(), epoch=self.epoch,
                             reason=reason, detail=detail, gap_start=gap_start, gap_seconds=gap_seconds)
        if state is ConnectionState.CONNECTED:
            log.info("AMI %s (%s:%d): connected and logged in as %r (epoch %d)", self.name, self.host,
                     self.port, self.username, self.epoch, extra={"server": self.name})
        self.subscriptions.publish_state(change)

    def __repr__(self) -> str:
        return f"AMIClient({self.name!r}, {self.host}:{self.port}, state={self.state.value})"
