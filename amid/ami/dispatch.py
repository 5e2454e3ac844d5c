"""Who hears about what the session receives: event handlers (run by their own task, outside
the read path) and the read path's synchronous subscribers (listeners, batch listeners, raw
listeners, state callbacks), plus the one place their failures are counted and logged."""

from __future__ import annotations

import asyncio
import fnmatch
import inspect
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any, Generic, TypeVar

from amid.ami.aio import cancel_and_wait, first_of
from amid.ami.protocol import Event
from amid.ami.ratelog import RateLimitedLog
from amid.ami.stats import SessionStats

__all__ = ["CallbackErrors", "EventHandler", "HandlerDispatcher", "Subscriptions", "callable_name"]

log = logging.getLogger("amid.ami")

EventHandler = Callable[[Event], Any]
T = TypeVar("T")

MAX_HANDLER_CACHE = 1024
HANDLER_ERROR_REPORT_INTERVAL = 10.0  # seconds between lines about one failing callback


def callable_name(fn: Any) -> str:
    """How a callback is named in log lines."""
    return repr(getattr(fn, "__qualname__", fn))


class CallbackErrors:
    """Counts every failure of a user callback (handler, listener) in ``stats`` and logs it
    without flooding: the first failure of each (callback, exception type) with its traceback,
    then at most one line per ``interval`` for it, with the number held back; a summary of what
    no line reported yet when the session closes. (A handler that fails on every event at
    40k events/s would otherwise write 40k tracebacks a second.)"""

    def __init__(self, server: str, stats: SessionStats, *,
                 interval: float = HANDLER_ERROR_REPORT_INTERVAL) -> None:
        self.server = server
        self.stats = stats
        self._log = RateLimitedLog(log, interval, max_keys=100)

    def failed(self, exc: Exception, what: str, event_name: str) -> None:
        self.stats.handler_errors_total += 1
        self._log.log((what, type(exc)), logging.ERROR,
                      "AMI %s: %s failed on %s (further failures like it are counted, not logged "
                      "one by one)", self.server, what, event_name, exc_info=exc,
                      extra={"server": self.server})

    def summarise(self) -> None:
        """Log how many failures no line has mentioned yet (at close)."""
        held_back = self._log.take_suppressed()
        if held_back:
            log.error("AMI %s: %d more handler failures", self.server, held_back,
                      extra={"server": self.server})


class _Registry(Generic[T]):
    """An ordered list of callbacks; the read path iterates ``items`` directly."""

    __slots__ = ("items",)

    def __init__(self) -> None:
        self.items: list[T] = []

    def add(self, callback: T) -> Callable[[], None]:
        self.items.append(callback)

        def unsubscribe() -> None:
            if callback in self.items:
                self.items.remove(callback)
        return unsubscribe


class Subscriptions:
    """The synchronous subscribers of one session, called on the read path (they must return
    at once), and the state-change fan-out. Each ``add`` returns a function that undoes it."""

    def __init__(self, server: str, errors: CallbackErrors) -> None:
        self.server = server
        self.errors = errors
        self.listeners: _Registry[Callable[[Event], None]] = _Registry()
        self.batch_listeners: _Registry[Callable[[list[Event]], None]] = _Registry()
        self.raw_listeners: _Registry[Callable[[bytes], None]] = _Registry()
        self.state_callbacks: _Registry[Callable[[Any], None]] = _Registry()
        self._state_queues: list[asyncio.Queue[Any]] = []

    # -- state changes -------------------------------------------------------------------

    def publish_state(self, change: Any) -> None:
        for callback in self.state_callbacks.items:
            try:
                callback(change)
            except Exception:
                log.exception("state callback failed", extra={"server": self.server})
        for queue in self._state_queues:
            if queue.full():
                queue.get_nowait()  # a consumer that stopped reading loses the oldest
            queue.put_nowait(change)

    async def state_changes(self, is_last: Callable[[Any], bool]) -> AsyncIterator[Any]:
        """Every change published from now on, up to and including the one ``is_last`` accepts."""
        queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=1000)
        self._state_queues.append(queue)
        try:
            while True:
                change = await queue.get()
                yield change
                if is_last(change):
                    return
        finally:
            self._state_queues.remove(queue)

    # -- events, as an iterator ----------------------------------------------------------

    async def events(self, closing: asyncio.Event, is_closed: Callable[[], bool], stats: SessionStats,
                     maxsize: int) -> AsyncIterator[Event]:
        """Every event from now on, through a buffer of ``maxsize`` (the oldest dropped and
        counted as ``handler_dropped_total`` when the consumer falls behind), until closed."""
        buffer: deque[Event] = deque()
        wakeup = asyncio.Event()

        def push(event: Event) -> None:
            if len(buffer) >= maxsize:
                buffer.popleft()
                stats.handler_dropped_total += 1
            buffer.append(event)
            wakeup.set()

        unsubscribe = self.listeners.add(push)
        try:
            while True:
                while buffer:
                    yield buffer.popleft()
                if is_closed():
                    return
                wakeup.clear()
                await first_of(closing.wait(), wakeup.wait())
                if closing.is_set() and not buffer:
                    return
        finally:
            unsubscribe()


class HandlerDispatcher:
    """Event handlers by name (case-insensitive), glob or ``*`` (every event no other handler
    took), sync or async, run one event at a time by a task of their own. The read path only
    appends to a bounded queue (:meth:`push`): when handlers fall behind by ``queue_size``
    events the oldest are dropped and counted, so a slow handler never stalls the socket."""

    def __init__(self, server: str, stats: SessionStats, errors: CallbackErrors, *,
                 queue_size: int = 10_000) -> None:
        self.server = server
        self.stats = stats
        self.errors = errors
        self.queue_size = queue_size
        #: True while any handler is registered: the read path's one check.
        self.active = False
        self._exact: dict[str, list[EventHandler]] = {}
        self._glob: list[tuple[str, EventHandler]] = []
        self._any: list[EventHandler] = []
        self._cache: dict[str, tuple[EventHandler, ...]] = {}
        self._queue: deque[Event] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._drop_log = RateLimitedLog(log, HANDLER_ERROR_REPORT_INTERVAL)

    # -- registration --------------------------------------------------------------------

    def add(self, event: str, handler: EventHandler) -> None:
        if event == "*":
            self._any.append(handler)
        elif any(c in event for c in "*?["):
            self._glob.append((event.lower(), handler))
        else:
            self._exact.setdefault(event.lower(), []).append(handler)
        self._changed()
        self.start()

    def remove(self, event: str, handler: EventHandler) -> None:
        """Undo :meth:`add`; ValueError if that handler was not added for ``event``."""
        if event == "*":
            self._any.remove(handler)
        elif any(c in event for c in "*?["):
            self._glob.remove((event.lower(), handler))
        else:
            handlers = self._exact.get(event.lower(), [])
            handlers.remove(handler)
            if not handlers:
                del self._exact[event.lower()]
        self._changed()

    def _changed(self) -> None:
        self._cache.clear()
        self.active = bool(self._exact or self._glob or self._any)

    def handlers_for(self, name: str) -> tuple[EventHandler, ...]:
        key = name.lower()
        found = self._cache.get(key)
        if found is None:
            matched = list(self._exact.get(key, ()))
            matched += [h for pattern, h in self._glob if fnmatch.fnmatchcase(key, pattern)]
            found = tuple(matched) if matched else tuple(self._any)
            if len(self._cache) >= MAX_HANDLER_CACHE:  # names come from the wire
                self._cache.clear()
            self._cache[key] = found
        return found

    # -- running -------------------------------------------------------------------------

    def push(self, event: Event) -> None:
        """Queue ``event`` for the handlers (the read path: never blocks)."""
        if len(self._queue) >= self.queue_size:
            self._queue.popleft()
            self.stats.handler_dropped_total += 1
            self._drop_log.log("dropped", logging.WARNING,
                               "AMI %s: event handlers are too slow; %d events dropped so far",
                               self.server, self.stats.handler_dropped_total,
                               extra={"server": self.server})
        self._queue.append(event)
        self._wakeup.set()

    def start(self) -> None:
        """Start the handler task if there are handlers and a running loop (else it starts
        at the session's connect/start)."""
        if self._task is not None or not self.active:
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return
        self._task = asyncio.create_task(self._run(), name=f"ami-handlers-{self.server}")

    async def close(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def _run(self) -> None:
        queue = self._queue
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while queue:
                event = queue.popleft()
                for handler in self.handlers_for(event.name):
                    try:
                        result = handler(event)
                        if inspect.isawaitable(result):
                            await result
                    except asyncio.CancelledError:
                        raise
                    except Exception as exc:
                        self.errors.failed(exc, f"handler {callable_name(handler)}", event.name)
