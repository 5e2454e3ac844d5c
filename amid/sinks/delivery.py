"""SinkRunner: the delivery machinery in front of every sink.

One runner per sink owns a bounded in-memory queue (bounded in events and bytes), the overflow
policy, an optional disk spool, batching, retries with backoff, the dead-letter file and the
counters. The AMI reader only ever calls :meth:`SinkRunner.offer`, which never blocks or
awaits, so a slow or dead sink cannot delay the session or another sink.

Ordering with a spool. The runner is in one of two modes:

* ``MEMORY``: the queue is the head of the line (the normal case).
* ``SPOOL``: the spool is the head of the line; the queue holds only records newer than
  everything spooled. It is entered when the queue overflows (the whole queue moves to the
  spool, oldest first), when records are recovered from the spool on start, and when the sink
  is disabled. New records are appended behind the spool, and the queue only takes records
  once the spool is full. The worker returns to ``MEMORY`` once the spool is empty.

A memory batch that is being sent while the queue overflows is also copied to the spool head
("shadowed"), so if it is never confirmed (sink disabled, shutdown) it is still first in line
after a restart; if it is confirmed, its copy is skipped without being sent again.

Accounting invariant (checked by the metrics tests at scrape time)::

    received_total == sent_total + sum(dropped_total.values()) + dead_lettered_total
                      + queue_events + spool_events + in_flight_events

``received_total`` includes records recovered from the spool when the runner starts
(also shown as ``recovered_total``), so the invariant holds across restarts. A runner
replaced on reload by :meth:`SinkRunner.detach` adds ``handed_over_total`` to the right-hand side.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import random
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from itertools import repeat, starmap
from operator import attrgetter
from pathlib import Path
from typing import Any, Literal, TypeVar

from amid.ami.stats import Histogram
from amid.records import Record
from amid.sinks.base import Sink, SinkDisabled, SinkError, SinkRejected
from amid.sinks.spool import DEFAULT_SEGMENT_BYTES, HEADER_SIZE, Spool, SpoolFull, SpoolPosition

__all__ = ["DELIVERY_LATENCY_BUCKETS", "DROP_REASONS", "SinkRunner", "SinkStats"]

log = logging.getLogger("amid.sinks.delivery")

_T = TypeVar("_T")
Overflow = Literal["drop_oldest", "drop_newest", "spool"]
SpoolFallback = Literal["drop_oldest", "drop_newest"]

# 50 µs to 60 s: a healthy sink confirms in a fraction of a millisecond, one riding out an
# outage in minutes (those land in +Inf).
DELIVERY_LATENCY_BUCKETS = (0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05,
                            0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
# "spool_corrupt" only happens if spool files are damaged while the daemon runs; "spool_io"
# if the spool's last write at shutdown fails (disk full, I/O error).
DROP_REASONS = ("queue_full", "spool_full", "disabled", "shutdown", "spool_corrupt", "spool_io")
DROP_WARNING_INTERVAL = 10.0
# A peer's Retry-After is honoured, but an absurd value must not park a sink for days.
RETRY_AFTER_CAP = 3600.0
# Records skipped per spool read when discarding already-delivered shadow copies.
_SKIP_READ_EVENTS = 4096


@dataclass
class SinkStats:
    """Counters of one sink, read by amid.metrics at scrape time (see the module invariant)."""

    state: str = "starting"    # starting | ok | retrying | disabled | closed
    received_total: int = 0    # offered, plus recovered from the spool at start
    sent_total: int = 0        # confirmed by sink.send
    received_bytes_total: int = 0  # Record.size of what was offered (queue accounting size)
    sent_bytes_total: int = 0      # JSON bytes of the records confirmed by sink.send
    discarded_total: int = 0   # events the sink's filter did not accept (counted by the router)
    queue_max_events: int = 0  # the configured bounds, for fill ratios
    queue_max_bytes: int = 0
    spool_max_bytes: int = 0   # 0 without a spool
    failed_attempts_total: int = 0
    retried_total: int = 0     # batches re-sent
    dropped_total: Counter = field(default_factory=lambda: Counter({r: 0 for r in DROP_REASONS}))
    dead_lettered_total: int = 0
    queue_events: int = 0      # in the in-memory queue right now
    queue_bytes: int = 0
    spool_events: int = 0      # in the spool right now (not counting the batch in flight)
    spool_bytes: int = 0
    in_flight_events: int = 0  # the batch being sent right now
    recovered_total: int = 0   # found in the spool when the runner started
    handed_over_total: int = 0  # given to a replacement runner by detach() (config reload)
    spool_corrupt_records_total: int = 0  # damaged spans skipped when the spool was opened
    truncated_total: int = 0   # messages the sink shortened to fit its transport (syslog udp)
    last_success_time: float | None = None  # unix time of the last confirmed send
    delivery_latency: Histogram = field(default_factory=lambda: Histogram(DELIVERY_LATENCY_BUCKETS))
    last_error: str | None = None


class _Mode(enum.Enum):
    MEMORY = "memory"  # the queue is the head of the line
    SPOOL = "spool"    # the spool is the head; the queue only holds newer records


class _Outcome(enum.Enum):
    SENT = "sent"
    REJECTED = "rejected"
    DISABLED = "disabled"


@dataclass
class _Batch:
    records: list[Record]
    spool_end: SpoolPosition | None = None  # set when read from the spool: ack up to here
    shadowed: bool = False                  # a memory batch whose copy sits at the spool head


HOPELESS_START_FAILURES = 3  # failed opens in a row after which shutdown stops waiting for a sink


class SinkRunner:
    """Queue, spool, batching, retry, dead letters and stats in front of one :class:`Sink`.

    ``clock`` (monotonic seconds) paces the drop warnings; ``rng`` gives the jitter in [0, 1);
    ``sleep`` waits between retries; ``wall_clock`` (unix seconds) times delivery latency.
    """

    def __init__(self, sink: Sink, *, name: str, max_queue_events: int, max_queue_bytes: int,
                 overflow: Overflow, spool_dir: Path | None, spool_max_bytes: int,
                 spool_fallback: SpoolFallback, spool_fsync_interval: float,
                 batch_max_events: int, batch_max_bytes: int, batch_max_wait: float,
                 retry_min_delay: float, retry_max_delay: float, dead_letter_path: Path | None,
                 attempt_timeout: float | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 rng: Callable[[], float] = random.random,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 wall_clock: Callable[[], float] = time.time) -> None:
        if overflow not in ("drop_oldest", "drop_newest", "spool"):
            raise ValueError(f"unknown overflow policy {overflow!r}")
        if spool_fallback not in ("drop_oldest", "drop_newest"):
            raise ValueError(f"unknown spool fallback policy {spool_fallback!r}")
        if overflow == "spool" and spool_dir is None:
            raise ValueError("overflow 'spool' needs a spool_dir")
        if min(max_queue_events, max_queue_bytes, batch_max_events, batch_max_bytes) <= 0:
            raise ValueError("queue and batch limits must be positive")
        self._sink = sink
        self._sink_truncated_seen = 0  # the sink's own truncated_total at the last look
        self.name = name
        self._max_queue_events = max_queue_events
        self._max_queue_bytes = max_queue_bytes
        self._overflow = overflow
        self._spool_dir = spool_dir
        self._spool_max_bytes = spool_max_bytes
        self._spool_fallback = spool_fallback
        self._fsync_interval = spool_fsync_interval
        self._batch_max_events = batch_max_events
        self._batch_max_bytes = batch_max_bytes
        self._batch_max_wait = batch_max_wait
        self._retry_min_delay = retry_min_delay
        self._retry_max_delay = retry_max_delay
        self._attempt_timeout = attempt_timeout
        self._dead_letter_path = dead_letter_path
        self._clock = clock
        self._rng = rng
        self._sleep = sleep
        self._wall_clock = wall_clock

        self.stats = SinkStats(queue_max_events=max_queue_events, queue_max_bytes=max_queue_bytes,
                               spool_max_bytes=spool_max_bytes if overflow == "spool" else 0)
        self._queue: deque[Record] = deque()
        self._mode = _Mode.MEMORY
        self._spool: Spool | None = None
        self._spool_skip = 0            # delivered shadow copies at the spool head
        self._in_flight: _Batch | None = None
        self._started = False
        self.sink_opened = False  # sink.start() has succeeded (readiness: a sink that never opened is not)
        self._start_failures = 0  # failed start attempts so far, while it has never opened
        self._start_settled = asyncio.Event()  # the sink opened, or the worker gave up
        self._disabled = False
        self._draining = False
        self._closing = False           # close() has begun
        self._closed = False            # offers are refused from here on
        self._closed_event = asyncio.Event()
        self._wakeup = asyncio.Event()      # set by offer: there is something new
        self._progress = asyncio.Event()    # set by the worker after each batch or when idle
        self._spool_dirty = asyncio.Event() # set when the spool has records to fsync
        self._worker: asyncio.Task[None] | None = None
        self._sync_task: asyncio.Task[None] | None = None
        self._unreported_drops: Counter[str] = Counter()
        self._last_drop_warning: float | None = None
        self._logged_exception_types: set[type] = set()
        self._log_extra = {"sink": name}

    # -- the hot path ----------------------------------------------------------------------

    def offer(self, record: Record) -> None:
        """Queue ``record`` for delivery. Never blocks or awaits; drops are counted."""
        self.stats.received_total += 1
        self.stats.received_bytes_total += record.size
        if self._closed:
            self._drop(1, "shutdown")
            return
        if self._disabled and self._spool is None:
            self._drop(1, "disabled")
            return
        if self._mode is _Mode.SPOOL:
            self._push(record)
            self._spill()
            self._enforce_queue_bounds(self._spool_fallback, "spool_full")
        elif self._queue_fits(record.size):
            self._push(record)
        elif self._overflow == "spool" and self._spool is not None:
            self._enter_spool_mode()
            self._push(record)
            self._spill()
            self._enforce_queue_bounds(self._spool_fallback, "spool_full")
        else:
            # Not started yet with a spool policy: the spool is not open, use its fallback.
            policy = self._spool_fallback if self._overflow == "spool" else self._overflow
            self._push(record)
            self._enforce_queue_bounds(policy, "queue_full")
        self._wakeup.set()

    def offer_many(self, records: list[Record]) -> None:
        """:meth:`offer` each record, in order; all at once when they fit the queue (the
        daemon's read path hands over every event of one read this way)."""
        if not records:
            return
        if self._mode is _Mode.MEMORY and not self._closed and not self._disabled:
            count = len(records)
            size = sum(map(_size_of, records))
            if self._queue_fits(size, count):
                stats = self.stats
                stats.received_total += count
                stats.received_bytes_total += size
                self._queue.extend(records)
                stats.queue_events += count
                stats.queue_bytes += size
                self._wakeup.set()
                return
        offer = self.offer
        for record in records:
            offer(record)

    def adopt(self, records: Sequence[Record]) -> None:
        """Put records a predecessor handed over (config reload, see :meth:`detach`) at the head
        of the queue, so they leave before anything offered since. Never blocks; the queue
        bounds and the overflow policy apply as for :meth:`offer`."""
        if not records:
            return
        self.stats.received_total += len(records)
        for record in reversed(records):
            self._queue.appendleft(record)
            self.stats.queue_events += 1
            self.stats.queue_bytes += record.size
        policy = self._spool_fallback if self._overflow == "spool" else self._overflow
        self._enforce_queue_bounds(policy, "queue_full")
        self._wakeup.set()

    def continue_counters(self, previous: SinkStats) -> None:
        """Carry a predecessor's counters over (config reload), so the sink's Prometheus
        counters do not restart at zero because its settings changed. What the predecessor
        still held is counted as received again when this runner adopts it or recovers it from
        the spool, so only what it settled (sent, dropped, dead-lettered) carries as received."""
        stats = self.stats
        stats.received_total += (previous.sent_total + sum(previous.dropped_total.values())
                                 + previous.dead_lettered_total)
        stats.sent_total += previous.sent_total
        stats.received_bytes_total += previous.received_bytes_total
        stats.sent_bytes_total += previous.sent_bytes_total
        stats.discarded_total += previous.discarded_total
        stats.failed_attempts_total += previous.failed_attempts_total
        stats.retried_total += previous.retried_total
        stats.dropped_total.update(previous.dropped_total)
        stats.dead_lettered_total += previous.dead_lettered_total
        stats.truncated_total += previous.truncated_total
        stats.delivery_latency.add(previous.delivery_latency)
        if stats.last_success_time is None:
            stats.last_success_time = previous.last_success_time

    def _queue_fits(self, size: int, count: int = 1) -> bool:
        """Whether ``count`` more records of ``size`` bytes in all stay within the bounds."""
        return (self.stats.queue_events + count <= self._max_queue_events
                and self.stats.queue_bytes + size <= self._max_queue_bytes)

    def _push(self, record: Record) -> None:
        self._queue.append(record)
        self.stats.queue_events += 1
        self.stats.queue_bytes += record.size

    def _popleft(self) -> Record:
        record = self._queue.popleft()
        self.stats.queue_events -= 1
        self.stats.queue_bytes -= record.size
        return record

    def _enforce_queue_bounds(self, policy: SpoolFallback, reason: str) -> None:
        """After a push, bring the queue back within its bounds by ``policy``."""
        stats = self.stats
        if self._queue and self._queue[-1].size > self._max_queue_bytes:
            policy = "drop_newest"  # a record bigger than the whole queue must not evict it all
        while self._queue and (stats.queue_events > self._max_queue_events
                               or stats.queue_bytes > self._max_queue_bytes):
            if policy == "drop_newest":
                record = self._queue.pop()
                stats.queue_events -= 1
                stats.queue_bytes -= record.size
            else:
                self._popleft()
            self._drop(1, reason)

    def _enter_spool_mode(self) -> None:
        """Make the spool the head of the line, moving memory records into it in order."""
        assert self._spool is not None
        self._mode = _Mode.SPOOL
        batch = self._in_flight
        if batch is not None and batch.spool_end is None and not batch.shadowed:
            payloads = [r.json for r in batch.records]
            try:
                self._spool.append(payloads)
            except SpoolFull:
                pass  # not shadowed: if it is never confirmed it goes behind the spool
            else:
                batch.shadowed = True
                self._spool_skip += len(payloads)
                self._spool_dirty.set()
        self._spill()

    def _spill(self) -> None:
        """Move records from the queue head into the spool while they fit (order kept)."""
        spool = self._spool
        if spool is None or not self._queue:
            return
        free = spool.free_bytes
        payloads: list[bytes] = []
        for record in self._queue:
            need = HEADER_SIZE + len(record.json)  # exact: record.size is only an estimate
            if need > free:
                break
            free -= need
            payloads.append(record.json)
        if not payloads:
            return
        try:
            spool.append(payloads)
        except SpoolFull:  # cannot happen while this loop is the only appender; stay safe
            return
        for _ in payloads:
            self._popleft()
        self.stats.spool_events += len(payloads)
        self.stats.spool_bytes = spool.bytes_used
        self._spool_dirty.set()

    # -- drops -----------------------------------------------------------------------------

    def _drop(self, count: int, reason: str) -> None:
        self.stats.dropped_total[reason] += count
        self._unreported_drops[reason] += count
        now = self._clock()
        if self._last_drop_warning is None or now - self._last_drop_warning >= DROP_WARNING_INTERVAL:
            self._report_drops(now)

    def _report_drops(self, now: float) -> None:
        if not self._unreported_drops:
            return
        detail = ", ".join(f"{n} ({reason})" for reason, n in sorted(self._unreported_drops.items()))
        log.warning("sink %s dropped events since the last warning: %s", self.name, detail,
                    extra=self._log_extra)
        self._unreported_drops.clear()
        self._last_drop_warning = now

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def accepting(self) -> bool:
        """Whether the sink can take records without dropping them (for /readyz)."""
        if not self._started or self._closing or self._disabled:
            return False
        if self._worker is None or self._worker.done():
            return False
        queue_has_room = (self.stats.queue_events < self._max_queue_events
                          and self.stats.queue_bytes < self._max_queue_bytes)
        if self._spool is not None:
            return queue_has_room or self._spool.free_bytes > HEADER_SIZE
        return queue_has_room

    async def start(self) -> None:
        """Open the spool (delivering what it holds first) and start the worker task.

        The sink's own ``start()`` runs inside the worker and is retried there, so a peer that
        is down at boot does not stop the daemon. Raises OSError if the spool cannot be opened.
        """
        if self._started:
            return
        if self._closing:
            raise RuntimeError(f"sink {self.name} is closed")
        if self._overflow == "spool":
            assert self._spool_dir is not None
            # Confirmed records stay on disk until their segment is left behind: segments of
            # an eighth of the cap keep the disk used within 1.125 x max_bytes.
            segment = min(DEFAULT_SEGMENT_BYTES, max(64 << 10, self._spool_max_bytes // 8))
            spool = await asyncio.to_thread(Spool, self._spool_dir, max_bytes=self._spool_max_bytes,
                                            segment_bytes=segment)
            if self._closing:  # detached while the spool opened: release it for the successor
                await asyncio.to_thread(spool.close)
                raise RuntimeError(f"sink {self.name} is closed")
            self._spool = spool
            recovered = spool.events_pending
            self.stats.received_total += recovered
            self.stats.recovered_total = recovered
            self.stats.spool_events += recovered
            self.stats.spool_bytes = spool.bytes_used
            # What this open found (a damaged span is skipped, not removed: every open finds it
            # again, so this is set, not added, and a reload does not carry it over).
            self.stats.spool_corrupt_records_total = spool.corrupt_records_total
            if spool.corrupt_records_total:
                log.warning("sink %s: spool %s had %d damaged records (%d bytes), skipped",
                            self.name, self._spool_dir, spool.corrupt_records_total,
                            spool.corrupt_bytes_total, extra=self._log_extra)
            if recovered:
                log.info("sink %s: %d spooled events from a previous run are delivered first",
                         self.name, recovered, extra=self._log_extra)
                self._enter_spool_mode()  # records offered before start() queue behind them
            self._sync_task = asyncio.create_task(self._sync_loop(), name=f"amid-spool-sync-{self.name}")
        self._worker = asyncio.create_task(self._run(), name=f"amid-sink-{self.name}")
        self._started = True

    async def drain(self, timeout: float) -> bool:
        """Deliver what is queued (and spooled) within ``timeout``; True if all was delivered.

        Offers keep being accepted meanwhile; the worker stops waiting for fuller batches.
        """
        self._draining = True
        self._wakeup.set()
        try:
            async with asyncio.timeout(timeout):
                while not self._is_empty():
                    if self._disabled or self._worker is None or self._worker.done():
                        return False
                    self._progress.clear()
                    await self._progress.wait()
        except TimeoutError:
            return self._is_empty()
        finally:
            self._draining = False
        return True

    def _is_empty(self) -> bool:
        stats = self.stats
        # _spool_skip: delivered copies still at the spool head; left there, a restart would
        # send them again.
        return (stats.queue_events == 0 and stats.spool_events == 0 and stats.in_flight_events == 0
                and self._spool_skip == 0)

    async def close(self, timeout: float) -> None:
        """Drain for up to ``timeout``, spool what is left (spool policy) or count it dropped
        ("shutdown"), close the spool and the sink, and cancel every task. Idempotent.
        """
        await self._shut_down(timeout, hand_over=False)

    async def detach(self, timeout: float) -> list[Record]:
        """Like :meth:`close`, but return the undelivered in-memory records, oldest first,
        instead of dropping them, so a replacement runner (config reload) can take them over.

        With the spool policy they are spooled as on close and the list is empty: the
        replacement opens the same spool directory and delivers them first, in order. The
        records handed over are counted in ``stats.handed_over_total``.
        """
        return await self._shut_down(timeout, hand_over=True)

    async def _shut_down(self, timeout: float, *, hand_over: bool) -> list[Record]:
        if self._closing:
            await self._closed_event.wait()
            return []
        self._closing = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        leftovers: list[Record] = []
        try:
            # A sink that has failed to open again and again since it started will not deliver
            # within the drain window either: it does not hold the shutdown up. (One failure
            # alone is not enough: the next attempt may be about to succeed.)
            hopeless = not self.sink_opened and self._start_failures >= HOPELESS_START_FAILURES
            if self._worker is not None and not self._worker.done() and not hopeless:
                await self.drain(timeout)
            await self._cancel_tasks()
            self._closed = True
            if self._in_flight is not None:
                self._return_in_flight(self._in_flight)
            if self._spool is not None:
                self._enter_spool_mode()
                if self._queue:
                    self._drop(len(self._queue), "spool_full")
                    self._clear_queue()
                try:
                    await asyncio.to_thread(self._spool.close)
                except OSError as exc:
                    lost = self._spool.lost_on_close
                    log.error("sink %s: closing the spool failed (%d events could not be "
                              "written): %s", self.name, lost, exc, extra=self._log_extra)
                    if lost:
                        self.stats.spool_events -= lost
                        self._drop(lost, "spool_io")
                self.stats.spool_bytes = self._spool.bytes_used
            if self._queue and hand_over:
                leftovers = list(self._queue)
                self.stats.handed_over_total += len(leftovers)
                self._clear_queue()
            elif self._queue:
                self._drop(len(self._queue), "shutdown")
                self._clear_queue()
            try:
                async with asyncio.timeout(max(deadline - loop.time(), 1.0)):
                    await self._sink.close()
            except Exception as exc:  # a plugin's close must not break shutdown
                log.error("sink %s: close failed: %s: %s", self.name, type(exc).__name__, exc,
                          extra=self._log_extra)
            self._report_drops(self._clock())
            self.stats.state = "closed"
        finally:
            self._closed_event.set()
        return leftovers

    def _clear_queue(self) -> None:
        self._queue.clear()
        self.stats.queue_events = 0
        self.stats.queue_bytes = 0

    async def _cancel_tasks(self) -> None:
        for task in (self._worker, self._sync_task):
            if task is not None and not task.done():
                task.cancel()
        for task in (self._worker, self._sync_task):
            if task is not None:
                try:
                    await task
                except asyncio.CancelledError:
                    pass
                except Exception:  # already logged by the task itself
                    pass

    def _return_in_flight(self, batch: _Batch) -> None:
        """An unconfirmed batch goes back where it came from, still first in line."""
        count = len(batch.records)
        if batch.spool_end is not None:
            self.stats.spool_events += count           # never acked: still in the spool
        elif batch.shadowed:
            self.stats.spool_events += count           # its copy at the spool head now counts
            self._spool_skip -= count
        else:
            for record in reversed(batch.records):
                self._queue.appendleft(record)
                self.stats.queue_events += 1
                self.stats.queue_bytes += record.size
        self._in_flight = None
        self.stats.in_flight_events = 0

    # -- the worker ------------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            if not await self._start_sink():
                return
            self.sink_opened = True
            self._start_settled.set()
            self.stats.state = "ok"
            while True:
                batch = await self._next_batch()
                outcome = await self._send_with_retry(batch.records)
                if outcome is _Outcome.DISABLED:
                    return
                count = len(batch.records)
                self._in_flight = None
                self.stats.in_flight_events = 0
                if outcome is _Outcome.SENT:
                    now = self._wall_clock()
                    _observe_latencies(self.stats.delivery_latency, now, batch.records)
                    self.stats.sent_total += count
                    self.stats.sent_bytes_total += sum(len(record.json) for record in batch.records)
                    self.stats.last_success_time = now
                    self.stats.state = "ok"
                else:
                    self.stats.dead_lettered_total += count
                    await self._write_dead_letters([r.json for r in batch.records])
                if batch.spool_end is not None:
                    await self._ack_spool(batch.spool_end)
                self._progress.set()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("sink %s: delivery worker failed", self.name, extra=self._log_extra)
            self.stats.state = "disabled"
            self.stats.last_error = "delivery worker failed (see log)"
            raise
        finally:
            self._start_settled.set()
            self._progress.set()

    async def wait_opened(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the sink to open; return whether it did."""
        try:
            async with asyncio.timeout(timeout):
                await self._start_settled.wait()
        except TimeoutError:
            pass
        return self.sink_opened

    async def _start_sink(self) -> bool:
        attempt = 0
        while True:
            try:
                await self._bounded(self._sink.start())
                return True
            except SinkDisabled as exc:
                self._disable(exc)
                return False
            except SinkError as exc:
                self._note_failure(exc, attempt, "start")
                retry_after = exc.retry_after
            except Exception as exc:  # a buggy plugin must not kill the worker
                self._note_failure(exc, attempt, "start", unexpected=True)
                retry_after = None
            self._start_failures += 1
            await self._sleep(self._backoff(attempt, retry_after))
            attempt += 1

    async def _next_batch(self) -> _Batch:
        """Wait for records, then take the next batch from the head of the line."""
        while True:
            while True:
                self._wakeup.clear()
                if self._mode is _Mode.SPOOL and self._spool_skip == 0 and self.stats.spool_events == 0:
                    self._mode = _Mode.MEMORY
                if self._pending_events():
                    break
                self._progress.set()  # idle: drain() may be waiting
                await self._wakeup.wait()
            await self._wait_for_full_batch()
            if self._mode is _Mode.MEMORY:
                return self._take_from_queue()
            batch = await self._take_from_spool()
            if batch is not None:
                return batch

    def _pending_events(self) -> int:
        if self._mode is _Mode.SPOOL:
            return self.stats.spool_events + self._spool_skip
        return self.stats.queue_events

    def _batch_is_full(self) -> bool:
        if self._mode is _Mode.SPOOL:
            return (self.stats.spool_events >= self._batch_max_events
                    or self.stats.spool_bytes >= self._batch_max_bytes)
        return (self.stats.queue_events >= self._batch_max_events
                or self.stats.queue_bytes >= self._batch_max_bytes)

    async def _wait_for_full_batch(self) -> None:
        """Give a partial batch up to ``batch_max_wait`` to fill (woken by offer, no polling)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._batch_max_wait
        while not self._draining and not self._batch_is_full():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._wakeup.wait()
            except TimeoutError:
                return

    def _take_from_queue(self) -> _Batch:
        stats = self.stats
        if stats.queue_events <= self._batch_max_events and stats.queue_bytes <= self._batch_max_bytes:
            # The usual case, a queue that never backs up: it is the batch, taken at once.
            records = list(self._queue)
            self._queue.clear()
            stats.queue_events = 0
            stats.queue_bytes = 0
            return self._set_in_flight(records)
        queue = self._queue
        take = min(len(queue), self._batch_max_events)
        if stats.queue_bytes <= self._batch_max_bytes:
            # A backlog of small records (the usual one): the first max_events fit by bytes.
            records = list(starmap(queue.popleft, repeat((), take)))  # `take` poplefts, in C
            size = sum(map(_size_of, records))
        else:
            records = []
            size = 0
            for record in queue:
                if len(records) == take or (records and size + record.size > self._batch_max_bytes):
                    break
                records.append(record)
                size += record.size
            for _ in records:
                queue.popleft()
        stats.queue_events -= len(records)
        stats.queue_bytes -= size
        return self._set_in_flight(records)

    def _set_in_flight(self, records: list[Record]) -> _Batch:
        batch = _Batch(records)
        self._in_flight = batch
        self.stats.in_flight_events = len(records)
        return batch

    async def _take_from_spool(self) -> _Batch | None:
        """Read the next batch from the spool head (None: nothing deliverable was there)."""
        spool = self._spool
        assert spool is not None
        while self._spool_skip:
            items = await self._spool_io(spool.read_batch, min(self._spool_skip, _SKIP_READ_EVENTS),
                                         1 << 62)
            if not items:
                self._spool_skip = 0
                break
            await self._ack_spool(items[-1][0])
            self._spool_skip -= len(items)
        if self.stats.spool_events == 0:
            return None
        read = await self._spool_io(_read_records, spool, self._batch_max_events,
                                    self._batch_max_bytes)
        if read is None:
            log.error("sink %s: spool %s lost %d events (files damaged while running)",
                      self.name, self._spool_dir, self.stats.spool_events, extra=self._log_extra)
            self._drop(self.stats.spool_events, "spool_corrupt")
            self.stats.spool_events = 0
            return None
        end, count, records, undecodable = read
        self.stats.spool_events -= count
        self.stats.spool_bytes = spool.bytes_used
        if undecodable:
            log.error("sink %s: %d spooled payloads are not records; dead-lettered",
                      self.name, len(undecodable), extra=self._log_extra)
            self.stats.dead_lettered_total += len(undecodable)
            await self._write_dead_letters(undecodable)
        if not records:
            await self._ack_spool(end)
            return None
        batch = _Batch(records, spool_end=end)
        self._in_flight = batch
        self.stats.in_flight_events = len(records)
        return batch

    async def _ack_spool(self, end: SpoolPosition) -> None:
        assert self._spool is not None
        await self._spool_io(self._spool.ack, end)
        self.stats.spool_bytes = self._spool.bytes_used

    async def _spool_io(self, func: Callable[..., _T], *args: Any) -> _T:
        """Run a blocking spool call in a thread, retrying I/O errors with backoff."""
        attempt = 0
        while True:
            try:
                return await asyncio.to_thread(func, *args)
            except OSError as exc:
                self._note_failure(exc, attempt, "spool")
                await self._sleep(self._backoff(attempt, None))
                attempt += 1

    async def _send_with_retry(self, records: Sequence[Record]) -> _Outcome:
        """Send one batch until it is confirmed, rejected, or the sink is disabled."""
        attempt = 0
        while True:
            try:
                await self._bounded(self._sink.send(records))
                self._note_truncated()
                if attempt:
                    log.info("sink %s: delivered after %d failed attempts", self.name, attempt,
                             extra=self._log_extra)
                return _Outcome.SENT
            except SinkDisabled as exc:
                self._disable(exc)
                return _Outcome.DISABLED
            except SinkRejected as exc:
                self.stats.last_error = f"rejected: {exc}"
                log.error("sink %s: batch of %d events rejected (%s); writing it to the dead-letter file %s",
                          self.name, len(records), exc, self._dead_letter_path, extra=self._log_extra)
                return _Outcome.REJECTED
            except SinkError as exc:
                retry_after = exc.retry_after
                self._note_failure(exc, attempt, "send")
            except Exception as exc:  # a buggy plugin must not kill the worker: retry
                retry_after = None
                self._note_failure(exc, attempt, "send", unexpected=True)
            self.stats.failed_attempts_total += 1
            await self._sleep(self._backoff(attempt, retry_after))
            attempt += 1
            self.stats.retried_total += 1

    async def _bounded(self, attempt: Awaitable[None]) -> None:
        """Await one start or send attempt, giving up after ``attempt_timeout``.

        Built-in sinks bound their own network waits; this guards against one (a plugin, a file
        on a hung NFS mount) that never returns, which would otherwise wedge the worker silently.
        """
        deadline = asyncio.timeout(self._attempt_timeout)
        try:
            async with deadline:
                await attempt
        except TimeoutError:
            if deadline.expired():
                raise SinkError(f"no answer within attempt_timeout ({self._attempt_timeout:g}s)") from None
            raise

    def _note_truncated(self) -> None:
        # A sink that shortens messages to fit its transport (syslog over udp or unix) counts
        # them in its own ``stats.truncated_total``; the runner carries that over for metrics.
        total = getattr(getattr(self._sink, "stats", None), "truncated_total", None)
        if type(total) is int and total > self._sink_truncated_seen:
            self.stats.truncated_total += total - self._sink_truncated_seen
            self._sink_truncated_seen = total

    def _note_failure(self, exc: BaseException, attempt: int, what: str, *,
                      unexpected: bool = False) -> None:
        self.stats.state = "retrying"
        self.stats.last_error = f"{what}: {type(exc).__name__}: {exc}"
        if unexpected and type(exc) not in self._logged_exception_types:
            # Once per exception type, with the traceback: a bug in a sink deserves one.
            self._logged_exception_types.add(type(exc))
            log.error("sink %s: unexpected error in %s (retrying)", self.name, what,
                      exc_info=exc, extra=self._log_extra)
        elif attempt == 0:
            log.warning("sink %s: %s failed, retrying: %s", self.name, what, self.stats.last_error,
                        extra=self._log_extra)

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        """Capped exponential backoff with full jitter, but at least the peer's Retry-After."""
        ceiling = min(self._retry_max_delay, self._retry_min_delay * 2 ** min(attempt, 40))
        delay = self._rng() * ceiling
        if retry_after is not None:
            delay = max(delay, min(retry_after, RETRY_AFTER_CAP))
        return delay

    def _disable(self, exc: SinkDisabled) -> None:
        """Stop delivering for good; keep spooling (spool policy) so a restart loses nothing."""
        self._disabled = True
        self.stats.state = "disabled"
        self.stats.last_error = f"disabled: {exc}"
        if self._in_flight is not None:
            self._return_in_flight(self._in_flight)
        if self._spool is not None:
            self._enter_spool_mode()
            what = "new events are spooled until an operator fixes it and restarts"
        else:
            if self._queue:
                self._drop(len(self._queue), "disabled")
                self._clear_queue()
            what = "new events are dropped (reason 'disabled')"
        log.error("SINK %s DISABLED by its peer: %s; %s", self.name, exc, what,
                  extra=self._log_extra)
        self._progress.set()

    async def _write_dead_letters(self, lines: list[bytes]) -> None:
        if self._dead_letter_path is None:
            log.error("sink %s: %d events rejected and no dead_letter_path is set; "
                      "they are only counted", self.name, len(lines), extra=self._log_extra)
            return
        try:
            await asyncio.to_thread(_append_lines, self._dead_letter_path, lines)
        except OSError as exc:
            log.error("sink %s: writing %d events to the dead-letter file %s failed: %s",
                      self.name, len(lines), self._dead_letter_path, exc, extra=self._log_extra)

    async def _sync_loop(self) -> None:
        """fsync spooled records at most ``spool_fsync_interval`` after they were appended."""
        assert self._spool is not None
        failing = False
        while True:
            await self._spool_dirty.wait()
            await asyncio.sleep(self._fsync_interval)
            self._spool_dirty.clear()
            try:
                await asyncio.to_thread(self._spool.sync)
            except OSError as exc:
                if not failing:
                    log.error("sink %s: spool write failed (retrying): %s", self.name, exc,
                              extra=self._log_extra)
                failing = True
                self._spool_dirty.set()
                continue
            if failing:
                log.info("sink %s: spool writes work again", self.name, extra=self._log_extra)
            failing = False
            self.stats.spool_bytes = self._spool.bytes_used


_size_of = attrgetter("size")


def _observe_latencies(histogram: Histogram, now: float, records: Sequence[Record]) -> None:
    # Events of one AMI read share their receive time: observe each run of them once.
    last: float | None = None
    run = 0
    for record in records:
        received = record.received_at
        if received == last:
            run += 1
            continue
        if run:
            histogram.observe(max(0.0, now - last), run)  # type: ignore[operator]
        last, run = received, 1
    if run:
        histogram.observe(max(0.0, now - last), run)  # type: ignore[operator]


def _read_records(spool: Spool, max_events: int, max_bytes: int
                  ) -> tuple[SpoolPosition, int, list[Record], list[bytes]] | None:
    """Read and decode the next batch from the spool head (runs in a thread).

    Returns (position to ack, records read, decoded records, undecodable payloads), or None
    when the spool is empty.
    """
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
    return items[-1][0], len(items), records, undecodable


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
