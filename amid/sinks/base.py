"""The one small interface every sink implements, and its optional capabilities.

A sink delivers batches of :class:`~amid.records.Record`. It never retries and never queues:
the :class:`~amid.sinks.delivery.SinkRunner` in front of it owns the queue, batching, retries,
the spool and the counters, so every sink gets the same delivery guarantees for free.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

from amid.records import Record

log = logging.getLogger("amid.sinks")

ENTRY_POINT_GROUP = "amid.sinks"


class SinkError(Exception):
    """A delivery attempt failed and may succeed later (the runner retries).

    ``retry_after`` is the peer's own hint in seconds (e.g. HTTP ``Retry-After``), or None.
    """

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class SinkRejected(SinkError):
    """The peer refused this batch for good (e.g. HTTP 400): retrying cannot help.

    The runner writes the batch to the sink's dead-letter file and counts it.
    """


class SinkDisabled(SinkError):
    """The peer said this sink must stop for good (e.g. HTTP 410 Gone)."""


@runtime_checkable
class Sink(Protocol):
    """What a sink is. Implementations need no base class."""

    name: str

    async def start(self) -> None:
        """Open files/connections. May raise SinkError; the runner retries start too."""

    async def send(self, batch: Sequence[Record]) -> None:
        """Deliver every record of ``batch`` or raise; return only once delivered."""

    async def close(self) -> None:
        """Release resources. Must be idempotent."""


@runtime_checkable
class SendsNowait(Protocol):
    """Optional: a sink that can often deliver a batch at once, without awaiting (a small
    append to an open file). The runner tries this first on its hot path, which saves the
    wake-up of its worker task and a timer for every AMI read."""

    def send_nowait(self, batch: Sequence[Record]) -> bool:
        """Deliver ``batch`` now and return True, or do nothing and return False (the runner
        then calls :meth:`Sink.send`). May raise SinkError like ``send``; never blocks long."""


@runtime_checkable
class BatchDefaults(Protocol):
    """Optional, on a sink type's ``Options``: how long its batches wait unless the config says
    (the webhook: an HTTP request costs far more than a file write)."""

    default_batch_max_wait: ClassVar[float]


@runtime_checkable
class Reopenable(Protocol):
    """Optional: a sink that reopens its files on SIGHUP (logrotate's ``postrotate``)."""

    def reopen(self) -> None:
        """Reopen before the next write."""


@runtime_checkable
class ReportsTruncation(Protocol):
    """Optional: a sink that shortens records to fit its transport (syslog over udp or unix).
    The runner carries the count into ``amid_sink_truncated_events_total``."""

    @property
    def truncated_total(self) -> int:
        """Records shortened since the sink was built (never decreases)."""


@runtime_checkable
class ReportsCounters(Protocol):
    """Optional: a sink that counts what only it can see (file reopens and fsyncs, syslog
    reconnects). The metrics collector exports each as
    ``amid_sink_operations_total{sink,type,operation}``."""

    def sink_counters(self) -> Mapping[str, int]:
        """Counts since the sink was built, by a short fixed operation name (a bounded set per
        sink type, e.g. ``reopen``, ``fsync``, ``reconnect``)."""


# A sink factory takes the sink's name and its type-specific options (the config keys the
# sink type owns, already validated by its own options model) and returns a Sink.
SinkFactory = Callable[[str, Mapping[str, Any]], Sink]
