"""SinkRunner: the delivery machinery in front of every sink.

One runner per sink owns a bounded in-memory queue (:class:`~amid.sinks.queue.SizedQueue`),
the overflow policy, an optional write-ahead spool (:class:`~amid.sinks.buffer.SpoolBuffer`),
batching, retries with backoff, the dead-letter file and the counters. The AMI reader only ever
calls :meth:`SinkRunner.offer_many` (or :meth:`offer`), which never blocks or awaits, so a slow
or dead sink cannot delay the session or another sink. Its lifecycle is one
:class:`~amid.sinks.lifecycle.RunnerState` with a table of legal moves.

Head of the line:

* ``drop_oldest`` / ``drop_newest``: the memory queue. Records offered during one turn of the
  event loop are delivered together on the next turn: straight from the loop when the sink can
  deliver without waiting (:class:`~amid.sinks.base.SendsNowait`, a small file append), else by
  the worker task. A full queue drops by the policy, counted.
* ``spool`` (durable): every record goes to the spool first, written to the kernel within the
  same turn of the loop (it survives ``kill -9`` from then on; a power cut can take what was not
  yet fsynced, at most ``fsync_interval``). The worker reads batches back from the spool head
  and acknowledges them only after the sink confirmed them, so on restart delivery resumes in
  order with what was not confirmed. Only when the spool is full do records wait in the memory
  queue behind it (not durable there), bounded, and the spool's ``fallback`` applies to it.

Accounting invariant (checked by the tests at scrape time)::

    received_total == sent_total + sum(dropped_total.values()) + dead_lettered_total
                      + queue_events + spool_events + in_flight_events

``received_total`` includes records recovered from the spool when the runner starts (also shown
as ``recovered_total``), so the invariant holds across restarts. A runner replaced on reload by
:meth:`SinkRunner.detach` adds ``handed_over_total`` to the right-hand side.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

from amid.ami.aio import cancel_and_wait
from amid.ami.stats import Histogram
from amid.records import Record
from amid.sinks.attempts import Attempts, DropReport, write_dead_letters
from amid.sinks.base import ReportsTruncation, SendsNowait, Sink, SinkDisabled
from amid.sinks.buffer import SpoolBuffer
from amid.sinks.lifecycle import RunnerState, check_move
from amid.sinks.queue import SizedQueue
from amid.sinks.spool import Spool, SpoolPosition

__all__ = ["DELIVERY_LATENCY_BUCKETS", "DROP_REASONS", "RunnerSettings", "SinkRunner", "SinkStats"]

log = logging.getLogger("amid.sinks.delivery")

_T = TypeVar("_T")
Overflow = Literal["drop_oldest", "drop_newest", "spool"]
SpoolFallback = Literal["drop_oldest", "drop_newest"]

# 50 µs to 60 s: a healthy sink confirms in a fraction of a millisecond, one riding out an
# outage in minutes (those land in +Inf).
DELIVERY_LATENCY_BUCKETS = (0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05,
                            0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
# Why a runner drops events: the one list (amid.metrics exports each as a ``reason`` label, at 0
# until it happens). "spool_corrupt" only happens if spool files are damaged while the daemon
# runs; "spool_io" if the spool's last write at shutdown fails (disk full, I/O error).
DropReason = Literal["queue_full", "spool_full", "spool_corrupt", "spool_io", "disabled", "shutdown"]
DROP_REASONS: tuple[DropReason, ...] = get_args(DropReason)
HOPELESS_START_FAILURES = 3  # failed opens in a row after which shutdown stops waiting for a sink


@dataclass(frozen=True)
class RunnerSettings:
    """What a runner is told by the config (a sink's ``queue``, ``overflow``, ``spool``,
    ``batch``, ``retry`` and ``dead_letter`` keys)."""

    name: str
    max_queue_events: int = 100_000
    max_queue_bytes: int = 64 << 20
    overflow: Overflow = "drop_oldest"
    spool_dir: Path | None = None
    spool_max_bytes: int = 1 << 30
    spool_fallback: SpoolFallback = "drop_oldest"
    spool_fsync_interval: float = 0.1
    batch_max_events: int = 500
    batch_max_bytes: int = 1 << 20
    batch_max_wait: float = 0.0
    retry_min_delay: float = 0.5
    retry_max_delay: float = 30.0
    attempt_timeout: float | None = 120.0
    dead_letter_path: Path | None = None

    def __post_init__(self) -> None:
        if self.overflow not in ("drop_oldest", "drop_newest", "spool"):
            raise ValueError(f"unknown overflow policy {self.overflow!r}")
        if self.spool_fallback not in ("drop_oldest", "drop_newest"):
            raise ValueError(f"unknown spool fallback policy {self.spool_fallback!r}")
        if self.overflow == "spool" and self.spool_dir is None:
            raise ValueError("overflow 'spool' needs a spool_dir")
        if min(self.max_queue_events, self.max_queue_bytes, self.batch_max_events,
               self.batch_max_bytes) <= 0:
            raise ValueError("queue and batch limits must be positive")

    @classmethod
    def of_sink(cls, cfg: Any, spool_dir: Path | None) -> RunnerSettings:
        """From a validated ``SinkConfig`` (``spool_dir``: where its spool lives)."""
        return cls(name=cfg.name, max_queue_events=cfg.queue.max_events,
                   max_queue_bytes=cfg.queue.max_bytes, overflow=cfg.overflow,
                   spool_dir=spool_dir if cfg.overflow == "spool" else None,
                   spool_max_bytes=cfg.spool.max_bytes, spool_fallback=cfg.spool.fallback,
                   spool_fsync_interval=cfg.spool.fsync_interval,
                   batch_max_events=cfg.batch.max_events, batch_max_bytes=cfg.batch.max_bytes,
                   batch_max_wait=cfg.batch.max_wait, retry_min_delay=cfg.retry.min_delay,
                   retry_max_delay=cfg.retry.max_delay, attempt_timeout=cfg.retry.attempt_timeout,
                   dead_letter_path=cfg.dead_letter)


@dataclass
class SinkStats:
    """Counters of one sink, read by amid.metrics at scrape time (see the module invariant)."""

    state: str = "starting"    # a RunnerState value (new is shown as starting)
    received_total: int = 0    # offered, plus recovered from the spool at start
    sent_total: int = 0        # confirmed by sink.send
    received_bytes_total: int = 0  # Record.size of what was offered (queue accounting size)
    sent_bytes_total: int = 0      # JSON bytes of the records confirmed by sink.send
    discarded_total: int = 0   # events the sink's filter did not accept (counted by the router)
    spool_max_bytes: int = 0   # the configured cap, for fill ratios; 0 without a spool
    failed_attempts_total: int = 0
    retried_total: int = 0     # batches re-sent
    dropped_total: Counter[str] = field(default_factory=lambda: Counter({r: 0 for r in DROP_REASONS}))
    dead_lettered_total: int = 0
    in_flight_events: int = 0  # the batch being sent right now
    recovered_total: int = 0   # found in the spool when the runner started
    handed_over_total: int = 0  # given to a replacement runner by detach() (config reload)
    spool_corrupt_records_total: int = 0  # damaged spans skipped when the spool was opened
    truncated_total: int = 0   # messages the sink shortened to fit its transport (syslog udp)
    last_success_time: float | None = None  # unix time of the last confirmed send
    delivery_latency: Histogram = field(default_factory=lambda: Histogram(DELIVERY_LATENCY_BUCKETS))
    last_error: str | None = None
    # The sink's own counters its predecessors had counted (config reloads): amid.metrics adds
    # them to what the sink reports (ReportsCounters), so those counters never go back either.
    carried_operations: Counter[str] = field(default_factory=Counter)
    queue: SizedQueue | None = field(default=None, repr=False)
    spool: SpoolBuffer | None = field(default=None, repr=False)

    @property
    def queue_events(self) -> int:
        """In the in-memory queue right now."""
        return 0 if self.queue is None else self.queue.events

    @property
    def queue_bytes(self) -> int:
        return 0 if self.queue is None else self.queue.bytes

    @property
    def queue_max_events(self) -> int:
        """The queue's configured bounds (for fill ratios)."""
        return 0 if self.queue is None else self.queue.max_events

    @property
    def queue_max_bytes(self) -> int:
        return 0 if self.queue is None else self.queue.max_bytes

    @property
    def spool_events(self) -> int:
        """In the spool right now (not counting the batch in flight)."""
        return 0 if self.spool is None else self.spool.waiting

    @property
    def spool_bytes(self) -> int:
        """Bytes of the spool's unconfirmed records, framing included."""
        return 0 if self.spool is None else self.spool.bytes_used


class _Batch:
    __slots__ = ("records", "spool_count", "spool_end")

    def __init__(self, records: list[Record], spool_end: SpoolPosition | None = None,
                 spool_count: int = 0) -> None:
        self.records = records
        self.spool_end = spool_end      # read from the spool: ack up to here once settled
        self.spool_count = spool_count  # frames that ack covers


class _Handoff:
    """A batch the hot path took but could not settle: the worker goes on from here."""

    __slots__ = ("batch", "error")

    def __init__(self, batch: _Batch, error: Exception | None) -> None:
        self.batch, self.error = batch, error


class SinkRunner:
    """Queue, spool, batching, retry, dead letters and stats in front of one :class:`Sink`.

    ``clock`` (monotonic seconds) paces the drop warnings; ``rng`` gives the jitter in [0, 1);
    ``sleep`` waits between retries; ``wall_clock`` (unix seconds) times delivery latency.

    Why this class is about 500 lines: what is its own (the head of the line, memory or spool;
    the lifecycle; the worker loop and the hot path that stands in for it; shutdown and
    hand-over) shares the same few pieces of state on every record, and each split tried passed
    them all back and forth. What stands alone lives apart: the queue (:mod:`.queue`), the
    spool's head of line (:mod:`.buffer`), the state table (:mod:`.lifecycle`), the attempts,
    retries, drop reports and dead letters (:mod:`.attempts`).
    """

    def __init__(self, sink: Sink, settings: RunnerSettings, *,
                 clock: Callable[[], float] = time.monotonic,
                 rng: Callable[[], float] = random.random,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 wall_clock: Callable[[], float] = time.time,
                 spool_factory: Callable[..., Spool] = Spool) -> None:
        self._sink = sink
        self._nowait = sink if isinstance(sink, SendsNowait) else None
        self._truncating = sink if isinstance(sink, ReportsTruncation) else None
        self._sink_truncated_seen = 0  # the sink's own truncated_total at the last look
        self.settings = settings
        self.name = settings.name
        self._clock, self._rng, self._sleep, self._wall_clock = clock, rng, sleep, wall_clock
        self._spool_factory = spool_factory

        self._queue = SizedQueue(settings.max_queue_events, settings.max_queue_bytes)
        self.stats = SinkStats(
            queue=self._queue,
            spool_max_bytes=settings.spool_max_bytes if settings.overflow == "spool" else 0)
        self._state = RunnerState.NEW
        self._spool: SpoolBuffer | None = None
        self._in_flight: _Batch | None = None
        self._handoff: _Handoff | None = None
        self.sink_opened = False  # sink.start() has succeeded (readiness: a sink that never opened is not)
        self._start_settled = asyncio.Event()  # the sink opened, or the worker gave up
        self.disabled = asyncio.Event()  # set once the peer said stop for good (SinkDisabled)
        self._draining = False    # someone waits for the queue to empty: no batch waits to fill
        self._closed_event = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._kicked = False      # a turn of the loop will deliver what was offered
        self._parked = False      # the worker waits for records (the hot path may deliver)
        self._wakeup = asyncio.Event()      # the worker has something to do
        self._progress = asyncio.Event()    # set by the worker after each batch or when idle
        self._worker: asyncio.Task[None] | None = None
        self._drops = DropReport(self.name, self.stats.dropped_total, clock)
        self._drop = self._drops.drop
        self._attempts = Attempts(sink, settings, self.stats, name=self.name,
                                  on_failure=lambda: self._health(RunnerState.RETRYING),
                                  sleep=sleep, rng=rng)
        self._log_extra = {"sink": self.name}

    # -- state -----------------------------------------------------------------------------

    @property
    def state(self) -> RunnerState:
        return self._state

    def _move(self, new: RunnerState) -> None:
        self._state = check_move(self._state, new)
        self.stats.state = "starting" if new is RunnerState.NEW else new.value

    def _health(self, new: RunnerState) -> None:
        """An attempt's outcome (OK / RETRYING) moves the state only while delivering."""
        if self._state is not new and self._state.delivering:
            self._move(new)

    # -- the hot path ----------------------------------------------------------------------

    def offer(self, record: Record) -> None:
        """Queue ``record`` for delivery. Never blocks or awaits; drops are counted."""
        self.offer_many([record])

    def offer_many(self, records: list[Record]) -> None:
        """Queue ``records`` in order (the daemon's read path hands over every event of one
        read this way). Never blocks or awaits; drops are counted by reason."""
        if not records:
            return
        count = len(records)
        size = sum(map(_size_of, records))
        self.stats.received_total += count
        self.stats.received_bytes_total += size
        state = self._state
        if state is RunnerState.CLOSED:
            self._drop(count, "shutdown")
            return
        if self._spool is not None:
            taken = self._spool.append(records) if not self._queue else 0
            if taken < count:  # the spool is full: wait behind it in memory, bounded
                self._queue.extend(records[taken:])
                self._enforce_queue_bounds(self.settings.spool_fallback, "spool_full")
            self._kick()
            return
        if state is RunnerState.DISABLED:
            self._drop(count, "disabled")
            return
        self._queue.extend(records, size)
        if self._queue.over():
            # Not started yet with a spool policy: the spool is not open, use its fallback.
            policy = (self.settings.spool_fallback if self.settings.overflow == "spool"
                      else self.settings.overflow)
            self._enforce_queue_bounds(policy, "queue_full")
        self._kick()

    def adopt(self, records: Sequence[Record]) -> None:
        """Put records a predecessor handed over (config reload, see :meth:`detach`) at the head
        of the queue, so they leave before anything offered since. Never blocks; the queue
        bounds and the overflow policy apply as for :meth:`offer`."""
        if not records:
            return
        self.stats.received_total += len(records)
        self._queue.push_front(records)
        policy = self.settings.spool_fallback if self.settings.overflow == "spool" else self.settings.overflow
        self._enforce_queue_bounds(policy, "queue_full")
        self._kick()

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
        stats.carried_operations.update(previous.carried_operations)
        if stats.last_success_time is None:
            stats.last_success_time = previous.last_success_time

    def _enforce_queue_bounds(self, policy: SpoolFallback, reason: DropReason) -> None:
        """After a push, bring the queue back within its bounds by ``policy``."""
        queue = self._queue
        if queue and queue.newest.size > queue.max_bytes:
            policy = "drop_newest"  # a record bigger than the whole queue must not evict it all
        dropped = 0
        while queue and queue.over():
            if policy == "drop_newest":
                queue.pop()
            else:
                queue.popleft()
            dropped += 1
        if dropped:
            self._drop(dropped, reason)

    def _kick(self) -> None:
        """Deliver what was offered on the next turn of the loop (once per turn, however many
        reads it held): write the spool, then send at once or wake the worker."""
        if self._kicked or self._loop is None:
            return
        self._kicked = True
        self._loop.call_soon(self._on_kick)

    def _on_kick(self) -> None:
        self._kicked = False
        spool = self._spool
        if spool is not None:
            spool.write_now()
        elif not self._queue:
            return  # the worker took it already: waking it again would only race the hot path
        elif (self._parked and self._nowait is not None and self._handoff is None
              and self.settings.batch_max_wait <= 0):
            self._send_now()
            return
        self._wakeup.set()

    def _send_now(self) -> None:
        """The hot path: the worker is idle and the sink can deliver without waiting."""
        assert self._nowait is not None
        batch = self._take_from_queue()
        try:
            done = self._nowait.send_nowait(batch.records)
        except Exception as exc:  # the worker counts it and retries with backoff
            self._handoff = _Handoff(batch, exc)
            self._wakeup.set()
            return
        if not done:
            self._handoff = _Handoff(batch, None)
            self._wakeup.set()
            return
        self._settle(batch, sent=True)
        if self._queue:
            self._kick()  # more than one batch's worth arrived: the next turn takes the rest
        self._progress.set()

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def accepting(self) -> bool:
        """Whether the sink can take records without dropping them (for /readyz)."""
        if not self._state.delivering or self._worker is None or self._worker.done():
            return False
        if self._spool is not None:
            return self._queue.has_room() or self._spool.has_room()
        return self._queue.has_room()

    async def start(self) -> None:
        """Open the spool (delivering what it holds first) and start the worker task.

        The sink's own ``start()`` runs inside the worker and is retried there, so a peer that
        is down at boot does not stop the daemon. Raises OSError if the spool cannot be opened.
        """
        if self._state is not RunnerState.NEW:
            if self._state in (RunnerState.CLOSING, RunnerState.CLOSED):
                raise RuntimeError(f"sink {self.name} is closed")
            return
        self._loop = asyncio.get_running_loop()
        settings = self.settings
        if settings.overflow == "spool":
            assert settings.spool_dir is not None
            spool = await SpoolBuffer.open(settings.spool_dir, name=self.name,
                                           spool_factory=self._spool_factory,
                                           max_bytes=settings.spool_max_bytes,
                                           fsync_interval=settings.spool_fsync_interval)
            if self._state is not RunnerState.NEW:  # detached while it opened: let the successor have it
                await spool.close()
                raise RuntimeError(f"sink {self.name} is closed")
            self._open_spool(spool)
        self._move(RunnerState.STARTING)
        self._worker = asyncio.create_task(self._run(), name=f"amid-sink-{self.name}")
        self._kick()

    def _open_spool(self, spool: SpoolBuffer) -> None:
        self._spool = self.stats.spool = spool
        recovered = spool.waiting
        self.stats.received_total += recovered
        self.stats.recovered_total = recovered
        # What this open found (a damaged span is skipped, not removed: every open finds it
        # again, so this is set, not added, and a reload does not carry it over).
        self.stats.spool_corrupt_records_total = spool.corrupt_records
        if spool.corrupt_records:
            log.warning("sink %s: spool %s had %d damaged records (%d bytes), skipped",
                        self.name, spool.directory, spool.corrupt_records, spool.corrupt_bytes,
                        extra=self._log_extra)
        if recovered:
            log.info("sink %s: %d spooled events from a previous run are delivered first",
                     self.name, recovered, extra=self._log_extra)
        # Records offered before start() go behind what the spool holds, in order.
        self._spill()

    def _spill(self) -> None:
        """Move records waiting in memory into the spool while they fit (order kept)."""
        if self._spool is None or not self._queue:
            return
        waiting = list(self._queue)
        taken = self._spool.append(waiting)
        for _ in range(taken):
            self._queue.popleft()
        if taken:
            self._kick()  # to the kernel within this turn of the loop

    async def drain(self, timeout: float) -> bool:
        """Deliver what is queued (and spooled) within ``timeout``; True if all was delivered.

        Offers keep being accepted meanwhile; the worker stops waiting for fuller batches.
        """
        self._draining = True
        self._wakeup.set()
        try:
            async with asyncio.timeout(timeout):
                while not self._is_empty():
                    if (self._state is RunnerState.DISABLED or self._worker is None
                            or self._worker.done()):
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
        return stats.queue_events == 0 and stats.spool_events == 0 and stats.in_flight_events == 0

    async def close(self, timeout: float) -> None:
        """Drain for up to ``timeout``, leave what is left in the spool (spool policy) or count
        it dropped ("shutdown"), close the spool and the sink, and cancel every task.
        Idempotent."""
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
        if self._state in (RunnerState.CLOSING, RunnerState.CLOSED):
            await self._closed_event.wait()
            return []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # A sink that has failed to open again and again since it started will not deliver
        # within the drain window either: it does not hold the shutdown up. (One failure alone
        # is not enough: the next attempt may be about to succeed.)
        hopeless = not self.sink_opened and self._attempts.start_failures >= HOPELESS_START_FAILURES
        drain = (self._state.delivering and self._worker is not None and not self._worker.done()
                 and not hopeless)
        self._move(RunnerState.CLOSING)
        leftovers: list[Record] = []
        try:
            if drain:
                await self.drain(timeout)
            if self._worker is not None:
                await cancel_and_wait(self._worker)
            self._move(RunnerState.CLOSED)
            if self._handoff is not None:
                self._handoff = None  # its batch is the one in flight
            if self._in_flight is not None:
                self._return_in_flight(self._in_flight)
            if self._spool is not None:
                self._spill()
                if self._queue:
                    self._drop(len(self._queue), "spool_full")
                    self._queue.clear()
                lost = await self._spool.close()
                if lost:
                    self._drop(lost, "spool_io")
            if self._queue and hand_over:
                leftovers = self._queue.clear()
                self.stats.handed_over_total += len(leftovers)
            elif self._queue:
                self._drop(len(self._queue), "shutdown")
                self._queue.clear()
            try:
                async with asyncio.timeout(max(deadline - loop.time(), 1.0)):
                    await self._sink.close()
            except Exception as exc:  # a plugin's close must not break shutdown
                log.error("sink %s: close failed: %s: %s", self.name, type(exc).__name__, exc,
                          extra=self._log_extra)
            self._drops.report()
        finally:
            self._closed_event.set()
        return leftovers

    def _return_in_flight(self, batch: _Batch) -> None:
        """An unconfirmed batch goes back where it came from, still first in line."""
        if batch.spool_end is not None:
            assert self._spool is not None
            self._spool.returned(batch.spool_count)  # never acked: still in the spool
        else:
            self._queue.push_front(batch.records)
        self._in_flight = None
        self.stats.in_flight_events = 0

    # -- the worker ------------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            disabled = await self._attempts.start()
            if disabled is not None:
                self._disable(disabled)
                return
            self.sink_opened = True
            self._start_settled.set()
            self._health(RunnerState.OK)
            while True:
                batch, handoff = await self._next_batch()
                if not await self._deliver(batch, handoff):
                    return
                self._progress.set()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("sink %s: delivery worker failed", self.name, extra=self._log_extra)
            if self._state.delivering:
                self._move(RunnerState.DISABLED)
            self.stats.last_error = "delivery worker failed (see log)"
            raise
        finally:
            self._start_settled.set()
            self._progress.set()

    async def _deliver(self, batch: _Batch, handoff: _Handoff | None) -> bool:
        """Send one batch until settled; False once the sink is disabled."""
        outcome = await self._attempts.send(batch.records, handoff.error if handoff else None)
        if isinstance(outcome, SinkDisabled):
            self._disable(outcome)
            return False
        if outcome == "rejected":
            self.stats.dead_lettered_total += len(batch.records)
            await write_dead_letters(self.name, self.settings.dead_letter_path,
                                     [r.json for r in batch.records])
        if batch.spool_end is not None:
            await self._ack_spool(batch.spool_end)
        self._settle(batch, sent=outcome == "sent")
        return True

    def _settle(self, batch: _Batch, *, sent: bool) -> None:
        self._in_flight = None
        self.stats.in_flight_events = 0
        if sent:
            now = self._wall_clock()
            _observe_latencies(self.stats.delivery_latency, now, batch.records)
            self.stats.sent_total += len(batch.records)
            self.stats.sent_bytes_total += sum(map(len, map(_json_of, batch.records)))
            self.stats.last_success_time = now
            self._health(RunnerState.OK)
            self._note_truncated()

    async def wait_opened(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the sink to open; return whether it did."""
        try:
            async with asyncio.timeout(timeout):
                await self._start_settled.wait()
        except TimeoutError:
            pass
        return self.sink_opened

    async def _next_batch(self) -> tuple[_Batch, _Handoff | None]:
        """Wait for records, then take the next batch from the head of the line."""
        while True:
            while True:
                self._wakeup.clear()
                if self._handoff is not None:
                    handoff, self._handoff = self._handoff, None
                    return handoff.batch, handoff
                if self._pending_events():
                    break
                self._progress.set()  # idle: drain() may be waiting
                self._parked = True
                try:
                    await self._wakeup.wait()
                finally:
                    self._parked = False
            await self._wait_for_full_batch()
            if self._spool is None:
                return self._take_from_queue(), None
            batch = await self._take_from_spool()
            if batch is not None:
                return batch, None

    def _pending_events(self) -> int:
        if self._spool is not None:
            return self._spool.waiting
        return self._queue.events

    def _batch_is_full(self) -> bool:
        settings = self.settings
        if self._spool is not None:
            return (self.stats.spool_events >= settings.batch_max_events
                    or self.stats.spool_bytes >= settings.batch_max_bytes)
        return (self._queue.events >= settings.batch_max_events
                or self._queue.bytes >= settings.batch_max_bytes)

    async def _wait_for_full_batch(self) -> None:
        """Give a partial batch up to ``batch_max_wait`` to fill (woken by offers, no polling)."""
        if self.settings.batch_max_wait <= 0:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.batch_max_wait
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
        records = self._queue.take(self.settings.batch_max_events, self.settings.batch_max_bytes)
        batch = self._in_flight = _Batch(records)
        self.stats.in_flight_events = len(records)
        return batch

    async def _take_from_spool(self) -> _Batch | None:
        """Read the next batch from the spool head (None: nothing deliverable was there)."""
        spool = self._spool
        assert spool is not None
        read = await self._attempts.io(spool.read, self.settings.batch_max_events,
                                    self.settings.batch_max_bytes)
        if read is None:
            if spool.waiting:
                log.error("sink %s: spool %s lost %d events (files damaged while running)",
                          self.name, spool.directory, spool.waiting, extra=self._log_extra)
                self._drop(spool.waiting, "spool_corrupt")
                spool.lost(spool.waiting)
            return None
        self._spill()  # room may have been made by the last ack
        if read.undecodable:
            log.error("sink %s: %d spooled payloads are not records; dead-lettered",
                      self.name, len(read.undecodable), extra=self._log_extra)
            self.stats.dead_lettered_total += len(read.undecodable)
            await write_dead_letters(self.name, self.settings.dead_letter_path, read.undecodable)
        if not read.records:
            await self._ack_spool(read.end)
            return None
        batch = self._in_flight = _Batch(read.records, read.end, read.count)
        self.stats.in_flight_events = len(read.records)
        return batch

    async def _ack_spool(self, end: SpoolPosition) -> None:
        assert self._spool is not None
        await self._attempts.io(self._spool.ack, end)
        self._spill()

    def _note_truncated(self) -> None:
        # A sink that shortens messages to fit its transport (syslog over udp or unix) counts
        # them itself; the runner carries that over into its stats, which survive a reload.
        if self._truncating is None:
            return
        total = self._truncating.truncated_total
        if total > self._sink_truncated_seen:
            self.stats.truncated_total += total - self._sink_truncated_seen
            self._sink_truncated_seen = total

    def _disable(self, exc: SinkDisabled) -> None:
        """Stop delivering for good; keep spooling (spool policy) so a restart loses nothing."""
        if self._state.delivering:  # while closing, the worker just stops
            self._move(RunnerState.DISABLED)
        self.disabled.set()
        self.stats.last_error = f"disabled: {exc}"
        if self._in_flight is not None:
            self._return_in_flight(self._in_flight)
        if self._spool is not None:
            self._spill()
            what = "new events are spooled until an operator fixes it and restarts"
        else:
            if self._queue:
                self._drop(len(self._queue), "disabled")
                self._queue.clear()
            what = "new events are dropped (reason 'disabled')"
        log.error("SINK %s DISABLED by its peer: %s; %s", self.name, exc, what,
                  extra=self._log_extra)
        self._progress.set()

_size_of = attrgetter("size")
_json_of = attrgetter("json")


def _observe_latencies(histogram: Histogram, now: float, records: Sequence[Record]) -> None:
    # Events of one AMI read share their receive time: observe each run of them once.
    last: float | None = None
    run = 0
    for record in records:
        received = record.received_at
        if received == last:
            run += 1
            continue
        if run and last is not None:
            histogram.observe(max(0.0, now - last), run)
        last, run = received, 1
    if run and last is not None:
        histogram.observe(max(0.0, now - last), run)
