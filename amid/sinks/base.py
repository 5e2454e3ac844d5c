"""The one small interface every sink implements, and how third-party sinks are found.

A sink delivers batches of :class:`~amid.records.Record`. It never retries and never queues:
the :class:`~amid.sinks.delivery.SinkRunner` in front of it owns the queue, batching, retries,
the spool and the counters, so every sink gets the same delivery guarantees for free.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from importlib.metadata import entry_points
from typing import Any, Protocol, runtime_checkable

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
class Reopenable(Protocol):
    """Optional: a sink that reopens its files on SIGHUP (logrotate's ``postrotate``)."""

    def reopen(self) -> None:
        """Reopen before the next write."""


# A sink factory takes the sink's name and its type-specific options (the config keys the
# sink type owns, already validated by its own options model) and returns a Sink.
SinkFactory = Callable[[str, Mapping[str, Any]], Sink]


class PluginLoadError(Exception):
    """A sink type could not be loaded; the message names the plugin and why. ``type_name``
    is the sink type it would have provided (None when a built-in keeps the name)."""

    def __init__(self, message: str, type_name: str | None = None) -> None:
        super().__init__(message)
        self.type_name = type_name


def load_plugin_factories() -> tuple[dict[str, SinkFactory], list[PluginLoadError]]:
    """Return the sink factories registered in the ``amid.sinks`` entry-point group.

    A plugin that fails to import is reported in the second element, never raised, so one
    broken plugin cannot take the daemon down.
    """
    factories: dict[str, SinkFactory] = {}
    errors: list[PluginLoadError] = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            factory = ep.load()
        except Exception as exc:  # any import-time failure of third-party code
            errors.append(PluginLoadError(
                f"sink plugin {ep.name!r} ({ep.value}) failed to load: {type(exc).__name__}: {exc}",
                ep.name))
            continue
        if not callable(factory):
            errors.append(PluginLoadError(
                f"sink plugin {ep.name!r} ({ep.value}) is not callable", ep.name))
            continue
        factories[ep.name] = factory
    return factories, errors
