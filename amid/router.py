"""Routing: every event goes to every sink whose filter accepts it, without ever waiting.

The router runs on the AMI read path (it is a session *listener*): it builds one
:class:`~amid.records.Record` per event (its JSON is encoded later, by the first sink worker
that needs it) and offers it to each accepting sink's runner, which only appends to a bounded
queue. Filtering on the event name is cached per name, so the common case costs one dict
lookup per sink.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from amid.ami.protocol import Event
from amid.records import Record

__all__ = ["EventFilter", "Router"]


class _Discards(Protocol):
    discarded_total: int  # events the route's filter did not accept (a sink's SinkStats)


class _Offer(Protocol):
    @property
    def stats(self) -> _Discards: ...

    def offer(self, record: Record) -> None: ...

    def offer_many(self, records: list[Record]) -> None: ...


def _globs(patterns: Sequence[str]) -> re.Pattern[str] | None:
    if not patterns:
        return None
    return re.compile("|".join(fnmatch.translate(p) for p in patterns), re.IGNORECASE)


class EventFilter:
    """``include`` / ``exclude`` globs on the event name (case-insensitive) and ``match``
    globs on field values (every listed field must be present and match)."""

    def __init__(self, include: Sequence[str] = ("*",), exclude: Sequence[str] = (),
                 match: Mapping[str, str | Sequence[str]] | None = None) -> None:
        self._include = _globs(include)
        self._exclude = _globs(exclude)
        self._match = {key: _globs([v] if isinstance(v, str) else list(v))
                       for key, v in (match or {}).items()}
        self._by_name: dict[str, bool] = {}
        #: Every event passes (the default filter): routing skips the per-event check.
        self.accepts_all = (list(include) == ["*"] and not exclude and not match)

    def accepts_name(self, name: str) -> bool:
        verdict = self._by_name.get(name)
        if verdict is None:
            verdict = (self._include is not None and self._include.fullmatch(name) is not None
                       and (self._exclude is None or self._exclude.fullmatch(name) is None))
            if len(self._by_name) < 4096:  # names come from the wire: bound the cache
                self._by_name[name] = verdict
        return verdict

    def accepts_fields(self, get: Callable[[str], str | None]) -> bool:
        for key, pattern in self._match.items():
            value = get(key)
            if value is None or pattern is None or pattern.fullmatch(value) is None:
                return False
        return True

    def accepts(self, event: Event) -> bool:
        return self.accepts_name(event.name) and (not self._match or self.accepts_fields(event.get))

    def accepts_record(self, record: Record) -> bool:
        if not self.accepts_name(record.name):
            return False
        if not self._match:
            return True
        fields = record.data.get("fields", {})
        lowered = {k.lower(): v for k, v in fields.items()}

        def get(key: str) -> str | None:
            value = lowered.get(key.lower())
            return value[0] if isinstance(value, list) else value
        return self.accepts_fields(get)


class Router:
    """Fans events out to sink runners. ``run_id`` makes record ids unique across restarts."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self._routes: list[tuple[EventFilter, _Offer]] = []

    def set_routes(self, routes: Sequence[tuple[EventFilter, _Offer]]) -> None:
        """Replace the routes at once (config reload)."""
        self._routes = list(routes)

    @property
    def routes(self) -> list[tuple[EventFilter, _Offer]]:
        return list(self._routes)

    def on_event(self, event: Event) -> None:
        """Route one event (a session listener, or code that injects events)."""
        self.on_events([event])

    def on_events(self, events: list[Event]) -> None:
        """Session batch listener: every event of one read at once, in order (the daemon's
        read path). Records are made once and shared by the sinks; each sink takes its
        accepted ones in one call. Never blocks."""
        run = self.run_id
        records = Record.of_events(events, run)
        for flt, runner in self._routes:
            if flt.accepts_all:
                runner.offer_many(records)
            else:
                accepts = flt.accepts
                accepted = [record for record, event in zip(records, events, strict=False) if accepts(event)]
                runner.stats.discarded_total += len(records) - len(accepted)
                runner.offer_many(accepted)

    def emit(self, record: Record) -> None:
        """Route a record amid made itself (e.g. ``AmidGap``)."""
        for flt, runner in self._routes:
            if flt.accepts_record(record):
                runner.offer(record)
            else:
                runner.stats.discarded_total += 1
