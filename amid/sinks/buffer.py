"""SpoolBuffer: a sink's write-ahead disk buffer (``overflow: spool``), as the runner uses it.

The :class:`~amid.sinks.spool.Spool` is the on-disk format; this class is the head-of-line
logic on top of it, on the event loop:

* :meth:`append` takes a read's records in order while they fit under ``spool.max_bytes``;
  :meth:`write_now` hands them to the kernel with one ``write()`` (the runner calls it once per
  loop iteration), so a record the daemon has read survives ``kill -9`` from then on;
* a background task fsyncs at most ``fsync_interval`` after an append (what a power cut can
  take), and retries a write that failed (disk full) until it succeeds;
* :meth:`read` gives the next batch from the head (in a thread), :meth:`ack` confirms it once
  the sink delivered it; nothing leaves the spool before that.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from amid.records import Record
from amid.sinks.spool import DEFAULT_SEGMENT_BYTES, HEADER_SIZE, Spool, SpoolPosition

__all__ = ["SpoolBuffer", "SpoolRead"]

log = logging.getLogger("amid.sinks.delivery")

# At most this many records waiting: they were written a moment ago, read them on the loop.
INLINE_READ_EVENTS = 4096


class SpoolRead:
    """One batch read from the spool head: ``records`` to send, ``count`` frames read (records
    plus ``undecodable`` payloads), ``end`` the position that acknowledges all of them."""

    __slots__ = ("count", "end", "records", "undecodable")

    def __init__(self, end: SpoolPosition, count: int, records: list[Record],
                 undecodable: list[bytes]) -> None:
        self.end, self.count, self.records, self.undecodable = end, count, records, undecodable


class SpoolBuffer:
    """The runner's view of its spool: append on the loop, write at once, fsync on a timer."""

    def __init__(self, spool: Spool, *, name: str, fsync_interval: float) -> None:
        self._spool = spool
        self.name = name
        self.directory = spool.directory
        self._fsync_interval = fsync_interval
        #: Records in the spool that are not in flight (what ``amid_sink_spool_events`` shows).
        self.waiting = spool.events_pending
        self._dirty = asyncio.Event()
        self._write_failing = False
        self._sync_task = asyncio.create_task(self._sync_loop(), name=f"amid-spool-sync-{name}")
        self._log_extra = {"sink": name}

    @classmethod
    async def open(cls, directory: Path, *, name: str, max_bytes: int, fsync_interval: float,
                   spool_factory: Callable[..., Spool] = Spool) -> SpoolBuffer:
        """Open (and recover) the spool in ``directory``; raises OSError if it cannot.
        ``spool_factory`` (tests) builds the :class:`Spool` with the same arguments."""
        # Confirmed records stay on disk until their segment is left behind: segments of an
        # eighth of the cap keep the disk used within 1.125 x max_bytes.
        segment = min(DEFAULT_SEGMENT_BYTES, max(64 << 10, max_bytes // 8))
        spool = await asyncio.to_thread(spool_factory, directory, max_bytes=max_bytes,
                                        segment_bytes=segment)
        return cls(spool, name=name, fsync_interval=fsync_interval)

    @property
    def bytes_used(self) -> int:
        return self._spool.bytes_used

    @property
    def corrupt_records(self) -> int:
        return self._spool.corrupt_records_total

    @property
    def corrupt_bytes(self) -> int:
        return self._spool.corrupt_bytes_total

    def has_room(self) -> bool:
        return self._spool.free_bytes > HEADER_SIZE

    # -- the write end (on the loop) ------------------------------------------------------

    def append(self, records: Sequence[Record]) -> int:
        """Append the leading ``records`` that fit, in order; return how many were taken."""
        if not records:
            return 0
        payloads = Record.jsons(list(records))
        free = self._spool.free_bytes
        taken = 0
        for payload in payloads:
            need = HEADER_SIZE + len(payload)
            if need > free:
                break
            free -= need
            taken += 1
        if taken:
            self._spool.append(payloads[:taken] if taken < len(payloads) else payloads)
            self.waiting += taken
            self._dirty.set()
        return taken

    def write_now(self) -> None:
        """Hand what was appended to the kernel (one ``write()``, no fsync)."""
        try:
            self._spool.write()
        except OSError as exc:
            self._write_failed(exc)

    def _write_failed(self, exc: OSError) -> None:
        # Kept buffered: the sync task retries; the records are counted as spooled still.
        if not self._write_failing:
            log.error("sink %s: spool write failed (retrying): %s", self.name, exc,
                      extra=self._log_extra)
        self._write_failing = True
        self._dirty.set()

    async def _sync_loop(self) -> None:
        while True:
            await self._dirty.wait()
            await asyncio.sleep(self._fsync_interval)
            self._dirty.clear()
            try:
                await asyncio.to_thread(self._spool.sync)
            except OSError as exc:
                self._write_failed(exc)
                continue
            if self._write_failing:
                log.info("sink %s: spool writes work again", self.name, extra=self._log_extra)
            self._write_failing = False

    # -- the read end (in threads) --------------------------------------------------------

    async def read(self, max_events: int, max_bytes: int) -> SpoolRead | None:
        """The next batch from the head (None: the spool is empty). Raises OSError.

        A spool that keeps up holds only what was written a moment ago, in the page cache: that
        is read on the loop (a thread hop per batch would cost more than the read). A backlog
        may have to come from the disk: that is read in a thread."""
        if self.waiting <= INLINE_READ_EVENTS:
            read = _read_records(self._spool, max_events, max_bytes)
        else:
            read = await asyncio.to_thread(_read_records, self._spool, max_events, max_bytes)
        if read is not None:
            self.waiting -= read.count
        return read

    def returned(self, count: int) -> None:
        """A batch read earlier was not delivered: it is still at the head (never acked)."""
        self.waiting += count

    def lost(self, count: int) -> None:
        self.waiting -= count

    async def ack(self, end: SpoolPosition) -> None:
        """Confirm every record up to ``end``. Raises OSError (the caller retries).

        On the loop: it rewrites the cursor in place (no fsync; the sync task fsyncs it) and
        now and then unlinks a segment left behind."""
        self._spool.ack(end)
        self._dirty.set()

    async def close(self) -> int:
        """Stop the sync task, write and fsync what is buffered, release the directory.
        Returns how many records could not be written (they are lost with the process)."""
        self._sync_task.cancel()
        await asyncio.gather(self._sync_task, return_exceptions=True)
        try:
            await asyncio.to_thread(self._spool.close)
        except OSError as exc:
            lost = self._spool.lost_on_close
            log.error("sink %s: closing the spool failed (%d events could not be written): %s",
                      self.name, lost, exc, extra=self._log_extra)
            self.waiting -= lost
            return lost
        return 0


def _read_records(spool: Spool, max_events: int, max_bytes: int) -> SpoolRead | None:
    """Read and decode the next batch from the spool head (runs in a thread)."""
    items = spool.read_batch(max_events, max_bytes)
    if not items:
        return None
    records: list[Record] = []
    undecodable: list[bytes] = []
    for _, payload in items:
        try:
            records.append(Record.from_json(payload))
        except (ValueError, KeyError, TypeError):
            undecodable.append(payload)
    return SpoolRead(items[-1][0], len(items), records, undecodable)
