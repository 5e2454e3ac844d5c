"""A sink's delivery attempts, and what the runner says about them.

Sinks never retry themselves: :class:`Attempts` does, for every sink alike. Each start or send is
bounded by ``retry.attempt_timeout``; a failure is counted, logged once per streak (an unexpected
exception type once with its traceback) and retried after amid's one backoff
(:mod:`amid.ami.backoff`). :class:`DropReport` turns drops into one warning per interval with the
counts by reason; :func:`write_dead_letters` appends refused records to the dead-letter file.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

from amid.ami.backoff import backoff_delay
from amid.records import Record
from amid.sinks.base import Sink, SinkDisabled, SinkError, SinkRejected

__all__ = ["RETRY_AFTER_CAP", "Attempts", "DropReport", "write_dead_letters"]

log = logging.getLogger("amid.sinks.delivery")

_T = TypeVar("_T")
# A peer's Retry-After is honoured, but an absurd value must not park a sink for days.
RETRY_AFTER_CAP = 3600.0
DROP_WARNING_INTERVAL = 10.0


class _Settings(Protocol):
    @property
    def retry_min_delay(self) -> float: ...
    @property
    def retry_max_delay(self) -> float: ...
    @property
    def attempt_timeout(self) -> float | None: ...
    @property
    def dead_letter_path(self) -> Path | None: ...


class _Stats(Protocol):
    failed_attempts_total: int
    retried_total: int
    last_error: str | None


class Attempts:
    """Start and send attempts against one sink, retried until they settle.

    ``on_failure`` is called on every failed attempt (the runner moves its state to retrying);
    ``sleep`` and ``rng`` are injected by tests.
    """

    def __init__(self, sink: Sink, settings: _Settings, stats: _Stats, *, name: str,
                 on_failure: Callable[[], None], sleep: Callable[[float], Awaitable[None]],
                 rng: Callable[[], float]) -> None:
        self._sink = sink
        self._settings = settings
        self._stats = stats
        self._name = name
        self._on_failure = on_failure
        self._sleep = sleep
        self._rng = rng
        self._logged_exception_types: set[type] = set()
        self._log_extra = {"sink": name}
        self.start_failures = 0  # failed start attempts so far (until the sink opens)

    async def start(self) -> SinkDisabled | None:
        """Open the sink, retrying until it opens (None) or the peer disables it (returned)."""
        attempt = 0
        while True:
            try:
                await self.bounded(self._sink.start())
                return None
            except SinkDisabled as exc:
                return exc
            except SinkError as exc:
                self.note_failure(exc, attempt, "start")
                retry_after = exc.retry_after
            except Exception as exc:  # a buggy plugin must not kill the worker
                self.note_failure(exc, attempt, "start", unexpected=True)
                retry_after = None
            self.start_failures += 1
            await self._sleep(self.backoff(attempt, retry_after))
            attempt += 1

    async def send(self, records: Sequence[Record], first_error: Exception | None = None
                   ) -> Literal["sent", "rejected"] | SinkDisabled:
        """Send one batch until it is confirmed ("sent"), refused for good ("rejected") or the
        sink is disabled (the SinkDisabled, returned). ``first_error``: the outcome of an
        attempt already made elsewhere (the runner's hot path), counted as the first failure."""
        attempt = 0
        while True:
            try:
                if first_error is not None:
                    error, first_error = first_error, None
                    raise error
                await self.bounded(self._sink.send(records))
                if attempt:
                    log.info("sink %s: delivered after %d failed attempts", self._name, attempt,
                             extra=self._log_extra)
                return "sent"
            except SinkDisabled as exc:
                return exc
            except SinkRejected as exc:
                self._stats.last_error = f"rejected: {exc}"
                log.error("sink %s: batch of %d events rejected (%s); writing it to the dead-letter "
                          "file %s", self._name, len(records), exc, self._settings.dead_letter_path,
                          extra=self._log_extra)
                return "rejected"
            except SinkError as exc:
                retry_after = exc.retry_after
                self.note_failure(exc, attempt, "send")
            except Exception as exc:  # a buggy plugin must not kill the worker: retry
                retry_after = None
                self.note_failure(exc, attempt, "send", unexpected=True)
            self._stats.failed_attempts_total += 1
            await self._sleep(self.backoff(attempt, retry_after))
            attempt += 1
            self._stats.retried_total += 1

    async def io(self, func: Callable[..., Awaitable[_T]], *args: Any) -> _T:
        """Await a spool call, retrying I/O errors (disk full) with backoff."""
        attempt = 0
        while True:
            try:
                return await func(*args)
            except OSError as exc:
                self.note_failure(exc, attempt, "spool")
                await self._sleep(self.backoff(attempt, None))
                attempt += 1

    async def bounded(self, attempt: Awaitable[None]) -> None:
        """Await one start or send attempt, giving up after ``attempt_timeout``.

        Built-in sinks bound their own network waits; this guards against one (a plugin, a file
        on a hung NFS mount) that never returns, which would otherwise wedge the worker silently.
        """
        timeout = self._settings.attempt_timeout
        deadline = asyncio.timeout(timeout)
        try:
            async with deadline:
                await attempt
        except TimeoutError:
            if deadline.expired():
                raise SinkError(f"no answer within attempt_timeout ({timeout:g}s)") from None
            raise

    def note_failure(self, exc: BaseException, attempt: int, what: str, *,
                     unexpected: bool = False) -> None:
        self._on_failure()
        self._stats.last_error = f"{what}: {type(exc).__name__}: {exc}"
        if unexpected and type(exc) not in self._logged_exception_types:
            # Once per exception type, with the traceback: a bug in a sink deserves one.
            self._logged_exception_types.add(type(exc))
            log.error("sink %s: unexpected error in %s (retrying)", self._name, what,
                      exc_info=exc, extra=self._log_extra)
        elif attempt == 0:
            log.warning("sink %s: %s failed, retrying: %s", self._name, what, self._stats.last_error,
                        extra=self._log_extra)

    def backoff(self, attempt: int, retry_after: float | None) -> float:
        """amid's one backoff: capped exponential, jittered, never below ``retry.min_delay``, at
        least the peer's Retry-After (capped)."""
        settings = self._settings
        return backoff_delay(attempt + 1, settings.retry_min_delay, settings.retry_max_delay,
                             self._rng(), retry_after, RETRY_AFTER_CAP)


class DropReport:
    """Drops, one warning per ``DROP_WARNING_INTERVAL`` with how many by reason since the last."""

    def __init__(self, name: str, dropped_total: Counter[str], clock: Callable[[], float]) -> None:
        self._name = name
        self._dropped_total = dropped_total
        self._clock = clock
        self._unreported: Counter[str] = Counter()
        self._last_warning: float | None = None

    def drop(self, count: int, reason: str) -> None:
        self._dropped_total[reason] += count
        self._unreported[reason] += count
        now = self._clock()
        if self._last_warning is None or now - self._last_warning >= DROP_WARNING_INTERVAL:
            self.report(now)

    def report(self, now: float | None = None) -> None:
        if not self._unreported:
            return
        detail = ", ".join(f"{n} ({reason})" for reason, n in sorted(self._unreported.items()))
        log.warning("sink %s dropped events since the last warning: %s", self._name, detail,
                    extra={"sink": self._name})
        self._unreported.clear()
        self._last_warning = self._clock() if now is None else now


async def write_dead_letters(name: str, path: Path | None, lines: list[bytes]) -> None:
    """Append refused records to the dead-letter file (in a thread), or say they are only counted."""
    extra = {"sink": name}
    if path is None:
        log.error("sink %s: %d events rejected and no dead_letter_path is set; they are only counted",
                  name, len(lines), extra=extra)
        return
    try:
        await asyncio.to_thread(_append_lines, path, lines)
    except OSError as exc:
        log.error("sink %s: writing %d events to the dead-letter file %s failed: %s",
                  name, len(lines), path, exc, extra=extra)


def _append_lines(path: Path, lines: list[bytes]) -> None:
    """Append one line per payload and fsync (runs in a thread)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        data = b"".join(line + b"\n" for line in lines)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
