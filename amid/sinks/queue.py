"""SizedQueue: a FIFO of records bounded in events and in bytes.

The one place that counts a sink's queued records and their bytes: the runner never updates
those counters by hand, and the metrics read them from here.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from itertools import repeat, starmap
from operator import attrgetter

from amid.records import Record

__all__ = ["SizedQueue"]

_size_of = attrgetter("size")


class SizedQueue:
    """Records in order, with their count and total ``size`` kept exact.

    The bounds are not enforced here (the owner decides what to drop and how to count it):
    :meth:`fits` says whether more would stay within them, :meth:`over` whether they are
    exceeded now.
    """

    __slots__ = ("_items", "bytes", "events", "max_bytes", "max_events")

    def __init__(self, max_events: int, max_bytes: int) -> None:
        if max_events <= 0 or max_bytes <= 0:
            raise ValueError("queue limits must be positive")
        self.max_events = max_events
        self.max_bytes = max_bytes
        self._items: deque[Record] = deque()
        self.events = 0
        self.bytes = 0

    def __len__(self) -> int:
        return self.events

    def __bool__(self) -> bool:
        return self.events > 0

    def __iter__(self) -> Iterator[Record]:
        return iter(self._items)

    def fits(self, size: int, count: int = 1) -> bool:
        """Whether ``count`` more records of ``size`` bytes in all stay within the bounds."""
        return self.events + count <= self.max_events and self.bytes + size <= self.max_bytes

    def has_room(self) -> bool:
        """Whether one more small record would still fit (readiness)."""
        return self.events < self.max_events and self.bytes < self.max_bytes

    def over(self) -> bool:
        """Whether the bounds are exceeded right now."""
        return self.events > self.max_events or self.bytes > self.max_bytes

    @property
    def newest(self) -> Record:
        return self._items[-1]

    @property
    def oldest(self) -> Record:
        return self._items[0]

    def push(self, record: Record) -> None:
        self._items.append(record)
        self.events += 1
        self.bytes += record.size

    def extend(self, records: list[Record], size: int | None = None) -> None:
        """Append ``records`` (``size``: their total, when the caller has it already)."""
        self._items.extend(records)
        self.events += len(records)
        self.bytes += sum(map(_size_of, records)) if size is None else size

    def push_front(self, records: Iterable[Record]) -> None:
        """Put ``records`` before everything queued, in their order."""
        items = list(records)
        self._items.extendleft(reversed(items))
        self.events += len(items)
        self.bytes += sum(map(_size_of, items))

    def popleft(self) -> Record:
        record = self._items.popleft()
        self.events -= 1
        self.bytes -= record.size
        return record

    def pop(self) -> Record:
        record = self._items.pop()
        self.events -= 1
        self.bytes -= record.size
        return record

    def take(self, max_events: int, max_bytes: int) -> list[Record]:
        """The oldest records up to ``max_events`` and ``max_bytes`` (at least one)."""
        items = self._items
        if self.events <= max_events and self.bytes <= max_bytes:
            # The usual case, a queue that never backs up: all of it, at once.
            records = list(items)
            items.clear()
            self.events = self.bytes = 0
            return records
        count = min(self.events, max_events)
        if self.bytes <= max_bytes:
            # A backlog of small records: the first ``count`` fit by bytes.
            records = list(starmap(items.popleft, repeat((), count)))  # ``count`` poplefts, in C
            size = sum(map(_size_of, records))
        else:
            records = []
            size = 0
            for record in items:
                if len(records) == count or (records and size + record.size > max_bytes):
                    break
                records.append(record)
                size += record.size
            for _ in records:
                items.popleft()
        self.events -= len(records)
        self.bytes -= size
        return records

    def clear(self) -> list[Record]:
        """Remove and return everything, oldest first."""
        records = list(self._items)
        self._items.clear()
        self.events = self.bytes = 0
        return records
