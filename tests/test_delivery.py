"""SinkRunner: queue bounds, overflow policies, batching, retries, spool, dead letters, stats."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from amid.records import Record, format_iso
from amid.sinks.base import Sink, SinkDisabled, SinkError, SinkRejected
from amid.sinks.delivery import RunnerSettings, SinkRunner, SinkStats
from amid.sinks.queue import SizedQueue
from amid.sinks.spool import Spool

BASE_TIME = 1_800_000_000.0


def make_record(n: int, *, pad: int = 0, received_at: float = BASE_TIME) -> Record:
    data = {"id": f"pbx1:run:1:{n}", "server": "pbx1", "epoch": 1, "seq": n,
            "received_at": format_iso(received_at), "event": "Newchannel",
            "fields": {"Event": "Newchannel", "Pad": "x" * pad}}
    return Record.from_json(json.dumps(data, separators=(",", ":")).encode())


def seqs(records: Sequence[Record]) -> list[int]:
    return [r.data["seq"] for r in records]


class ScriptedSink:
    """A real Sink: records what it got; can fail, reject, disable, or block until released."""

    def __init__(self, name: str = "test") -> None:
        self.name = name
        self.batches: list[list[Record]] = []   # confirmed batches
        self.attempts: list[list[int]] = []     # every send call, by seq
        self.send_failures: list[BaseException] = []   # raised by the next send calls, in order
        self.start_failures: list[BaseException] = []
        self.gate: asyncio.Event | None = None  # when set up, send waits for it ...
        self.gate_from_batch = 0                # ... once this many batches were confirmed
        self.starts = 0
        self.closes = 0
        self._changed = asyncio.Event()

    async def start(self) -> None:
        self._poke()
        if self.start_failures:
            raise self.start_failures.pop(0)
        self.starts += 1

    async def send(self, batch: Sequence[Record]) -> None:
        self.attempts.append(seqs(batch))
        self._poke()
        if self.gate is not None and len(self.batches) >= self.gate_from_batch:
            await self.gate.wait()
        if self.send_failures:
            raise self.send_failures.pop(0)
        self.batches.append(list(batch))
        self._poke()

    async def close(self) -> None:
        self.closes += 1

    def delivered(self) -> list[int]:
        return [s for batch in self.batches for s in seqs(batch)]

    def _poke(self) -> None:
        self._changed.set()

    async def until(self, condition: Callable[[], bool], timeout: float = 5.0) -> None:
        """Wait (bounded) until ``condition()`` holds, re-checking whenever the sink is called."""
        async with asyncio.timeout(timeout):
            while not condition():
                self._changed.clear()
                await self._changed.wait()


class RecordedSleep:
    """Injected retry sleep: records the delays, does not wait (but yields to the loop)."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        await asyncio.sleep(0)


def make_runner(sink: ScriptedSink, **overrides: Any) -> SinkRunner:
    params: dict[str, Any] = {
        "name": sink.name, "max_queue_events": 1000, "max_queue_bytes": 1 << 20,
        "overflow": "drop_newest", "spool_dir": None, "spool_max_bytes": 1 << 20,
        "spool_fallback": "drop_newest", "spool_fsync_interval": 0.005, "batch_max_events": 10,
        "batch_max_bytes": 1 << 20, "batch_max_wait": 0.0, "retry_min_delay": 0.001,
        "retry_max_delay": 0.004, "dead_letter_path": None, "sleep": RecordedSleep()}
    params.update(overrides)
    injected = {key: params.pop(key) for key in ("clock", "rng", "sleep", "wall_clock", "spool_factory")
                if key in params}
    return SinkRunner(sink, RunnerSettings(**params), **injected)


def assert_invariant(stats: SinkStats) -> None:
    assert stats.received_total == (
        stats.sent_total + sum(stats.dropped_total.values()) + stats.dead_lettered_total
        + stats.queue_events + stats.spool_events + stats.in_flight_events), stats


def other_tasks() -> set[asyncio.Task[Any]]:
    return {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}


def test_scripted_sink_satisfies_the_protocol() -> None:
    assert isinstance(ScriptedSink(), Sink)
    assert not inspect.iscoroutinefunction(SinkRunner.offer)


# -- batching --------------------------------------------------------------------------------

async def test_batches_respect_the_event_limit_and_keep_order() -> None:
    sink = ScriptedSink()
    runner = make_runner(sink, batch_max_events=10)
    for n in range(25):
        runner.offer(make_record(n))
    await runner.start()
    assert await runner.drain(5)
    assert [len(b) for b in sink.batches] == [10, 10, 5]
    assert sink.delivered() == list(range(25))
    assert runner.stats.sent_total == 25
    assert_invariant(runner.stats)
    await runner.close(1)


async def test_offer_many_queues_a_read_at_once_with_the_same_accounting() -> None:
    sink = ScriptedSink()
    runner = make_runner(sink, batch_max_events=10)
    records = [make_record(n) for n in range(25)]
    runner.offer_many(records[:20])
    runner.offer_many([])
    runner.offer_many(records[20:])
    stats = runner.stats
    assert stats.received_total == stats.queue_events == 25
    assert stats.queue_bytes == sum(r.size for r in records)
    await runner.start()
    assert await runner.drain(5)
    assert sink.delivered() == list(range(25)) and stats.queue_bytes == 0
    assert_invariant(stats)
    await runner.close(1)
    runner.offer_many(records[:2])  # closed: dropped and counted, as offer does
    assert stats.dropped_total["shutdown"] == 2
    assert_invariant(stats)


async def test_batches_respect_the_byte_limit_and_send_an_oversized_record_alone() -> None:
    sink = ScriptedSink()
    size = make_record(0).size
    runner = make_runner(sink, batch_max_events=100, batch_max_bytes=3 * size + 1)
    for n in range(7):
        runner.offer(make_record(n))
    runner.offer(make_record(7, pad=10 * size))
    runner.offer(make_record(8))
    await runner.start()
    assert await runner.drain(5)
    assert [seqs(b) for b in sink.batches] == [[0, 1, 2], [3, 4, 5], [6], [7], [8]]
    await runner.close(1)


async def test_a_partial_batch_waits_for_more_records_up_to_batch_max_wait() -> None:
    sink = ScriptedSink()
    runner = make_runner(sink, batch_max_events=3, batch_max_wait=30.0)
    await runner.start()
    await sink.until(lambda: sink.starts == 1)
    runner.offer(make_record(0))
    for _ in range(10):
        await asyncio.sleep(0)  # give the worker every chance to send a batch of one
    assert sink.attempts == []
    runner.offer(make_record(1))
    runner.offer(make_record(2))
    await sink.until(lambda: len(sink.batches) == 1)
    assert seqs(sink.batches[0]) == [0, 1, 2]
    runner.offer(make_record(3))
    assert await runner.drain(5), "drain does not wait for a full batch"
    assert sink.delivered() == [0, 1, 2, 3]
    await runner.close(1)


# -- the bounded queue and overflow policies -------------------------------------------------

async def test_offer_never_blocks_when_the_sink_is_stuck() -> None:
    sink = ScriptedSink()
    sink.gate = asyncio.Event()  # never released: send hangs
    runner = make_runner(sink, max_queue_events=50, batch_max_events=5)
    await runner.start()
    runner.offer(make_record(0))
    await sink.until(lambda: len(sink.attempts) == 1)
    for n in range(1, 10_001):
        runner.offer(make_record(n))   # plain calls: returning at all proves nothing awaited
    stats = runner.stats
    assert stats.queue_events == 50
    assert stats.dropped_total["queue_full"] == 10_000 - 50
    assert not runner.accepting
    assert_invariant(stats)
    await runner.close(0.01)
    assert stats.dropped_total["shutdown"] == 51   # the queue plus the batch in flight
    assert_invariant(stats)


@pytest.mark.parametrize("many", [False, True], ids=["offer", "offer_many"])
@pytest.mark.parametrize("policy, kept", [("drop_oldest", [3, 4, 5, 6, 7]),
                                          ("drop_newest", [0, 1, 2, 3, 4])])
async def test_overflow_drop_policies(policy: str, kept: list[int], many: bool) -> None:
    sink = ScriptedSink()
    runner = make_runner(sink, overflow=policy, max_queue_events=5)
    if many:  # a read that overflows the queue: the same policy, record by record
        runner.offer_many([make_record(n) for n in range(3)])
        runner.offer_many([make_record(n) for n in range(3, 8)])
    else:
        for n in range(8):
            runner.offer(make_record(n))
    assert runner.stats.dropped_total["queue_full"] == 3
    await runner.start()
    assert await runner.drain(5)
    assert sink.delivered() == kept
    assert_invariant(runner.stats)
    await runner.close(1)


async def test_queue_is_bounded_in_bytes_too() -> None:
    sink = ScriptedSink()
    size = make_record(0).size
    runner = make_runner(sink, max_queue_events=1000, max_queue_bytes=3 * size)
    for n in range(6):
        runner.offer(make_record(n))
    assert runner.stats.queue_events == 3
    assert runner.stats.queue_bytes == 3 * size
    assert runner.stats.dropped_total["queue_full"] == 3
    assert_invariant(runner.stats)
    await runner.close(0)


async def test_drop_warnings_are_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    runner = make_runner(ScriptedSink(), max_queue_events=1, clock=lambda: now[0])
    caplog.set_level(logging.WARNING, logger="amid.sinks.delivery")
    for n in range(50):
        runner.offer(make_record(n))
    warnings = [r for r in caplog.records if "dropped" in r.getMessage()]
    assert len(warnings) == 1
    now[0] += 10.0
    runner.offer(make_record(50))
    warnings = [r for r in caplog.records if "dropped" in r.getMessage()]
    assert len(warnings) == 2
    assert "49 (queue_full)" in warnings[1].getMessage(), "says how many since the last warning"
    assert runner.stats.dropped_total["queue_full"] == 50
    await runner.close(0)


# -- retries ---------------------------------------------------------------------------------

@pytest.mark.parametrize("rng_value", [0.0, 0.3, 0.999])
def test_backoff_never_goes_below_min_delay_and_is_always_jittered(rng_value: float) -> None:
    runner = make_runner(ScriptedSink(), rng=lambda: rng_value, retry_min_delay=0.5,
                         retry_max_delay=30.0)
    delays = [runner._attempts.backoff(attempt, None) for attempt in range(12)]
    assert all(0.5 <= d <= 30.0 for d in delays), delays
    other = make_runner(ScriptedSink(), rng=lambda: (rng_value + 0.5) % 1, retry_min_delay=0.5,
                        retry_max_delay=30.0)
    assert all(a != b for a, b in zip(delays, [other._attempts.backoff(n, None) for n in range(12)], strict=False)), \
        "every delay, the first and the capped ones included, depends on the jitter"

async def test_retry_resends_the_same_batch_with_jittered_backoff_and_retry_after(
        caplog: pytest.LogCaptureFixture) -> None:
    sink = ScriptedSink()
    sink.send_failures = [SinkError("503", retry_after=7.0), SinkError("reset"),
                          RuntimeError("plugin bug"), RuntimeError("plugin bug again"),
                          SinkError("reset")] + [SinkError("x")] * 5
    sleep = RecordedSleep()
    runner = make_runner(sink, sleep=sleep, rng=lambda: 0.5, retry_min_delay=1.0,
                         retry_max_delay=4.0)
    caplog.set_level(logging.WARNING, logger="amid.sinks.delivery")
    for n in range(3):
        runner.offer(make_record(n))
    await runner.start()
    assert await runner.drain(5)
    assert sink.attempts == [[0, 1, 2]] * 11, "the same batch, again and again"
    assert sleep.delays[:5] == [7.5, 3.0, 3.0, 3.0, 3.0], \
        "Retry-After (7) plus jitter up to min_delay, then halfway in [ceiling/2, ceiling], ceiling = min(4, 2**n)"
    assert all(1.0 <= d <= 4.0 for d in sleep.delays[1:])
    stats = runner.stats
    assert (stats.failed_attempts_total, stats.retried_total, stats.sent_total) == (10, 10, 3)
    assert stats.state == "ok"
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1, "an unexpected exception type is logged with traceback once"
    assert_invariant(stats)
    await runner.close(1)


async def test_an_attempt_that_never_returns_is_abandoned_and_retried() -> None:
    sink = ScriptedSink()
    sink.gate = asyncio.Event()  # send hangs, like a plugin stuck on a dead connection
    runner = make_runner(sink, attempt_timeout=0.05)
    await runner.start()
    try:
        runner.offer(make_record(1))
        await sink.until(lambda: runner.stats.failed_attempts_total >= 1)
        assert runner.stats.state == "retrying"
        assert "no answer within attempt_timeout (0.05s)" in (runner.stats.last_error or "")
        sink.gate.set()
        await sink.until(lambda: sink.delivered() == [1])
        assert len(sink.attempts) >= 2
        assert_invariant(runner.stats)
    finally:
        await runner.close(5)


async def test_a_start_that_never_returns_is_abandoned_and_retried() -> None:
    class HangsOnFirstStart(ScriptedSink):
        hung = False

        async def start(self) -> None:
            if not self.hung:
                self.hung = True
                await asyncio.Event().wait()  # e.g. open() on a hung NFS mount
            await super().start()

    sink = HangsOnFirstStart()
    runner = make_runner(sink, attempt_timeout=0.05)
    await runner.start()
    try:
        runner.offer(make_record(1))
        await sink.until(lambda: sink.delivered() == [1])
        assert runner.stats.failed_attempts_total == 0  # start failures are not send attempts
        assert "no answer within attempt_timeout" in (runner.stats.last_error or "")
        assert runner.sink_opened
    finally:
        await runner.close(5)


async def test_shutdown_does_not_wait_for_a_sink_that_never_opened() -> None:
    sink = ScriptedSink()
    sink.start_failures = [SinkError("cannot open")] * 100_000
    runner = make_runner(sink, sleep=asyncio.sleep, retry_min_delay=0.01, retry_max_delay=0.01)
    await runner.start()
    runner.offer(make_record(1))
    await sink.until(lambda: len(sink.start_failures) <= 100_000 - 3)
    async with asyncio.timeout(10):  # not the 60 s drain window
        await runner.close(60)
    assert runner.stats.dropped_total["shutdown"] == 1
    assert_invariant(runner.stats)


async def test_shutdown_waits_for_a_sink_that_failed_to_open_once() -> None:
    sink = ScriptedSink()
    sink.start_failures = [SinkError("not yet")]  # the second attempt opens it
    gate = asyncio.Event()

    async def slow_retry(delay: float) -> None:  # the retry comes once shutdown has begun
        await gate.wait()

    runner = make_runner(sink, sleep=slow_retry)
    await runner.start()
    runner.offer(make_record(1))
    await sink.until(lambda: runner.stats.state == "retrying")
    closing = asyncio.create_task(runner.close(30))
    await asyncio.sleep(0)
    gate.set()
    async with asyncio.timeout(10):
        await closing
    assert sink.delivered() == [1] and runner.stats.dropped_total["shutdown"] == 0


async def test_sink_start_failures_are_retried_in_the_worker() -> None:
    sink = ScriptedSink()
    sink.start_failures = [SinkError("refused"), OSError("boom")]
    sleep = RecordedSleep()
    runner = make_runner(sink, sleep=sleep)
    runner.offer(make_record(0))
    await runner.start()
    assert await runner.drain(5)
    assert sink.starts == 1 and len(sleep.delays) == 2
    assert sink.delivered() == [0]
    await runner.close(1)


# -- rejected and disabled -------------------------------------------------------------------

async def test_rejected_batches_go_to_the_dead_letter_file(tmp_path: Path) -> None:
    sink = ScriptedSink()
    sink.send_failures = [SinkRejected("400 bad request")]
    dead = tmp_path / "dead" / "letters.jsonl"
    runner = make_runner(sink, batch_max_events=2, dead_letter_path=dead)
    records = [make_record(n) for n in range(5)]
    for record in records:
        runner.offer(record)
    await runner.start()
    assert await runner.drain(5)
    lines = dead.read_bytes().splitlines()
    assert lines == [records[0].json, records[1].json]
    assert [json.loads(line)["seq"] for line in lines] == [0, 1]
    assert sink.delivered() == [2, 3, 4], "delivery continues after a rejection"
    assert runner.stats.dead_lettered_total == 2
    assert_invariant(runner.stats)
    await runner.close(1)


async def test_disabled_sink_stops_loudly_and_drops_with_reason(
        caplog: pytest.LogCaptureFixture) -> None:
    sink = ScriptedSink()
    sink.send_failures = [SinkDisabled("410 Gone")]
    runner = make_runner(sink, batch_max_events=2)
    caplog.set_level(logging.ERROR, logger="amid.sinks.delivery")
    for n in range(5):
        runner.offer(make_record(n))
    await runner.start()
    assert await runner.drain(5), "nothing is left: the queue was dropped as 'disabled'"
    stats = runner.stats
    assert stats.state == "disabled"
    assert not runner.accepting
    assert stats.dropped_total["disabled"] == 5
    runner.offer(make_record(5))
    assert stats.dropped_total["disabled"] == 6
    assert sink.attempts == [[0, 1]]
    assert any("DISABLED" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
    assert_invariant(stats)
    await runner.close(1)
    assert stats.state == "closed"
    assert_invariant(stats)


# -- spool -----------------------------------------------------------------------------------

def spool_runner(sink: ScriptedSink, spool_dir: Path, **overrides: Any) -> SinkRunner:
    params: dict[str, Any] = {"overflow": "spool", "spool_dir": spool_dir, "max_queue_events": 3}
    params.update(overrides)
    return make_runner(sink, **params)


def records_on_disk(spool_dir: Path) -> list[int]:
    """Sequence numbers of every record in the spool's segment files, read as another process
    would (the bytes the kernel has, no fsync needed): what survives ``kill -9``."""
    from amid.sinks.spool import parse_frames
    seqs = []
    for number, segment in enumerate(sorted(spool_dir.glob("*.seg"))):
        data = segment.read_bytes()
        seqs += [Record.from_json(f.payload).data["seq"]
                 for f in parse_frames(data, number, 0, final=True) if f.payload is not None]
    return seqs


async def test_the_spool_is_write_ahead_every_record_reaches_the_kernel_in_the_same_turn(
        tmp_path: Path) -> None:
    sink = ScriptedSink()
    sink.gate = asyncio.Event()
    runner = spool_runner(sink, tmp_path, batch_max_events=4)
    await runner.start()
    runner.offer(make_record(0))
    await sink.until(lambda: len(sink.attempts) == 1)   # record 0 is in flight, blocked
    for n in range(1, 30):
        runner.offer_many([make_record(n)])
    await asyncio.sleep(0)  # one turn of the loop: the write is due by its end
    assert records_on_disk(tmp_path) == list(range(30)), \
        "every record offered is in the kernel's hands (the one in flight too, until acked)"
    stats = runner.stats
    assert stats.spool_events == 29 and stats.queue_events == 0, "nothing waits in memory"
    assert runner.accepting
    assert_invariant(stats)
    sink.gate.set()
    assert await runner.drain(5)
    assert sink.delivered() == list(range(30)), "in order, each once"
    assert stats.spool_events == 0 and stats.sent_total == 30
    assert_invariant(stats)
    runner.offer(make_record(30))
    assert (stats.spool_events, stats.queue_events) == (1, 0), "the spool stays the head of the line"
    assert await runner.drain(5)
    assert sink.delivered()[-1] == 30
    await runner.close(1)


async def test_spooled_and_queued_records_survive_a_restart_in_order(tmp_path: Path) -> None:
    down = ScriptedSink()
    down.gate = asyncio.Event()   # the peer hangs: nothing is ever confirmed
    first = spool_runner(down, tmp_path, max_queue_events=10, batch_max_events=4)
    await first.start()
    for n in range(8):            # spooled at once (write-ahead), never confirmed
        first.offer(make_record(n))
    await down.until(lambda: len(down.attempts) == 1)
    await first.close(0.01)
    assert first.stats.spool_events == 8
    assert first.stats.dropped_total.total() == 0
    assert_invariant(first.stats)
    assert other_tasks() == set(), "every task is cancelled on close"

    up = ScriptedSink()
    second = spool_runner(up, tmp_path, max_queue_events=10, batch_max_events=4)
    second.offer(make_record(100))   # offered before start: queued behind the spooled ones
    await second.start()
    assert second.stats.recovered_total == 8
    second.offer(make_record(101))
    assert await second.drain(5)
    assert up.delivered() == list(range(8)) + [100, 101]
    assert_invariant(second.stats)
    await second.close(1)


async def test_a_spooled_record_leaves_the_spool_only_after_send_returned(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20)
    spool.append([make_record(n).json for n in range(6)])
    spool.close()
    sink = ScriptedSink()
    sink.gate = asyncio.Event()
    sink.gate_from_batch = 1          # the first batch is confirmed, the second hangs
    runner = spool_runner(sink, tmp_path, batch_max_events=2)
    await runner.start()
    await sink.until(lambda: len(sink.attempts) == 2)
    assert sink.delivered() == [0, 1]
    stats = runner.stats
    assert (stats.recovered_total, stats.sent_total, stats.in_flight_events, stats.spool_events) == (6, 2, 2, 2)
    assert_invariant(stats)
    await runner.close(0.01)
    assert stats.spool_events == 4
    assert_invariant(stats)
    reopened = Spool(tmp_path, max_bytes=1 << 20)
    assert [Record.from_json(p).data["seq"] for _, p in reopened.read_batch(100, 1 << 20)] == [2, 3, 4, 5]
    reopened.close()


@pytest.mark.parametrize("fallback", ["drop_newest", "drop_oldest"])
async def test_spool_full_applies_the_fallback_and_counts_it(tmp_path: Path, fallback: str) -> None:
    sink = ScriptedSink()
    sink.gate = asyncio.Event()
    frame = make_record(0).size + 12
    runner = spool_runner(sink, tmp_path, spool_max_bytes=5 * frame, spool_fallback=fallback,
                          max_queue_events=2, batch_max_events=1)
    await runner.start()
    runner.offer(make_record(0))
    await sink.until(lambda: len(sink.attempts) == 1)
    for n in range(1, 20):
        runner.offer(make_record(n))
    stats = runner.stats
    assert stats.dropped_total["spool_full"] == 19 - 2 - (5 - 1), "5 frames: 1 shadow + 4 records"
    assert stats.queue_events == 2
    assert not runner.accepting
    assert_invariant(stats)
    sink.gate.set()
    assert await runner.drain(5)
    delivered = sink.delivered()
    assert delivered == sorted(delivered) and len(delivered) == len(set(delivered))
    tail = [18, 19] if fallback == "drop_oldest" else [5, 6]
    assert delivered == [0, 1, 2, 3, 4] + tail
    assert_invariant(stats)
    await runner.close(1)


async def test_disabled_spooled_sink_keeps_everything_for_the_next_start(tmp_path: Path) -> None:
    sink = ScriptedSink()
    sink.send_failures = [SinkDisabled("410 Gone")]
    runner = spool_runner(sink, tmp_path, max_queue_events=100, batch_max_events=3)
    for n in range(5):
        runner.offer(make_record(n))
    await runner.start()
    assert not await runner.drain(5)
    assert runner.stats.state == "disabled"
    runner.offer(make_record(5))
    assert runner.stats.dropped_total["disabled"] == 0
    assert runner.stats.spool_events == 6
    assert_invariant(runner.stats)
    await runner.close(1)

    fixed = ScriptedSink()
    again = spool_runner(fixed, tmp_path, max_queue_events=100)
    await again.start()
    assert await again.drain(5)
    assert fixed.delivered() == [0, 1, 2, 3, 4, 5]
    await again.close(1)


async def test_undecodable_spool_payloads_are_dead_lettered(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", max_bytes=1 << 20)
    spool.append([make_record(0).json, b"not json", make_record(2).json])
    spool.close()
    sink = ScriptedSink()
    runner = spool_runner(sink, tmp_path / "spool", dead_letter_path=tmp_path / "dead.jsonl")
    await runner.start()
    assert await runner.drain(5)
    assert sink.delivered() == [0, 2]
    assert (tmp_path / "dead.jsonl").read_bytes() == b"not json\n"
    assert_invariant(runner.stats)
    await runner.close(1)


# -- stats, readiness and lifecycle ----------------------------------------------------------

async def test_latency_and_last_success_are_recorded() -> None:
    sink = ScriptedSink()
    runner = make_runner(sink, wall_clock=lambda: BASE_TIME + 2.0)
    for n in range(4):
        runner.offer(make_record(n))
    await runner.start()
    assert await runner.drain(5)
    latency = runner.stats.delivery_latency
    assert latency.count == 4 and latency.sum == pytest.approx(8.0)
    assert latency.buckets[-1] == 60.0
    assert runner.stats.last_success_time == BASE_TIME + 2.0
    await runner.close(1)


async def test_accepting_follows_the_lifecycle() -> None:
    sink = ScriptedSink()
    runner = make_runner(sink)
    assert not runner.accepting
    await runner.start()
    assert runner.accepting
    await runner.close(1)
    assert not runner.accepting
    runner.offer(make_record(0))
    assert runner.stats.dropped_total["shutdown"] == 1
    assert_invariant(runner.stats)


async def test_drain_times_out_while_the_sink_is_stuck() -> None:
    sink = ScriptedSink()
    sink.gate = asyncio.Event()
    runner = make_runner(sink)
    runner.offer(make_record(0))
    await runner.start()
    assert not await runner.drain(0.01)
    sink.gate.set()
    assert await runner.drain(5)
    await runner.close(1)


async def test_close_is_idempotent_and_cancels_every_task(tmp_path: Path) -> None:
    sink = ScriptedSink()
    sink.gate = asyncio.Event()
    runner = spool_runner(sink, tmp_path)
    await runner.start()
    runner.offer(make_record(0))
    await sink.until(lambda: len(sink.attempts) == 1)
    await asyncio.gather(runner.close(0.01), runner.close(0.01))
    await runner.close(0.01)
    assert sink.closes == 1
    assert runner.stats.state == "closed"
    assert other_tasks() == set()
    assert_invariant(runner.stats)


async def test_detach_hands_undelivered_records_to_a_replacement() -> None:
    stuck = ScriptedSink()
    stuck.gate = asyncio.Event()
    old = make_runner(stuck, batch_max_events=2)
    for n in range(5):
        old.offer(make_record(n))
    await old.start()
    await stuck.until(lambda: len(stuck.attempts) == 1)
    leftovers = await old.detach(0.01)
    assert seqs(leftovers) == [0, 1, 2, 3, 4], "the unconfirmed batch first, then the queue"
    stats = old.stats
    assert stats.handed_over_total == 5 and stats.dropped_total.total() == 0
    assert stats.received_total == stats.sent_total + stats.handed_over_total
    assert stuck.closes == 1 and other_tasks() == set()

    fresh_sink = ScriptedSink()
    fresh = make_runner(fresh_sink)
    await fresh.start()
    for record in leftovers:
        fresh.offer(record)
    assert await fresh.drain(5)
    assert fresh_sink.delivered() == [0, 1, 2, 3, 4]
    await fresh.close(1)


async def test_detach_of_a_spooled_sink_leaves_everything_in_the_spool(tmp_path: Path) -> None:
    stuck = ScriptedSink()
    stuck.gate = asyncio.Event()
    old = spool_runner(stuck, tmp_path, max_queue_events=100)
    await old.start()
    for n in range(5):
        old.offer(make_record(n))
    assert await old.detach(0.01) == []
    assert old.stats.spool_events == 5
    fresh_sink = ScriptedSink()
    fresh = spool_runner(fresh_sink, tmp_path, max_queue_events=100)
    await fresh.start()
    assert await fresh.drain(5)
    assert fresh_sink.delivered() == [0, 1, 2, 3, 4]
    await fresh.close(1)


async def test_a_record_bigger_than_the_queue_does_not_evict_it() -> None:
    sink = ScriptedSink()
    size = make_record(0).size
    runner = make_runner(sink, overflow="drop_oldest", max_queue_bytes=3 * size)
    runner.offer(make_record(0))
    runner.offer(make_record(1))
    runner.offer(make_record(2, pad=10 * size))
    assert runner.stats.queue_events == 2
    assert runner.stats.dropped_total["queue_full"] == 1
    await runner.start()
    assert await runner.drain(5)
    assert sink.delivered() == [0, 1]
    await runner.close(1)


async def test_records_the_spool_cannot_write_at_shutdown_are_counted_dropped(tmp_path):
    import errno
    import functools
    disk = {"full": False}

    def write(fd: int, data: object) -> int:  # a disk that fills up, injected as the spool's writer
        if disk["full"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return os.write(fd, data)  # type: ignore[arg-type]

    sink = ScriptedSink()
    sink.gate = asyncio.Event()  # the peer is down: everything waits
    runner = make_runner(sink, overflow="spool", spool_dir=tmp_path / "sp", max_queue_events=2,
                         spool_fsync_interval=10.0, spool_factory=functools.partial(Spool, write=write))
    await runner.start()
    disk["full"] = True
    for n in range(10):
        runner.offer(make_record(n))
    await runner.close(0.01)
    stats = runner.stats
    assert_invariant(stats)
    lost = stats.dropped_total["spool_io"]
    assert lost > 0 and stats.spool_events + lost + stats.in_flight_events <= 10
    again = make_runner(ScriptedSink(), overflow="spool", spool_dir=tmp_path / "sp")
    await again.start()
    assert again.stats.recovered_total == stats.spool_events  # what it counted as spooled is there
    await again.close(1.0)


async def test_a_small_spool_uses_segments_that_keep_its_disk_use_near_the_cap(tmp_path):
    runner = make_runner(ScriptedSink(), overflow="spool", spool_dir=tmp_path / "sp",
                         spool_max_bytes=1 << 20)
    await runner.start()
    assert runner._spool._spool.segment_bytes == (1 << 20) // 8
    await runner.close(1.0)


async def test_spilling_sizes_records_by_their_json_not_the_estimate(tmp_path):
    from amid.ami.protocol import Event
    sink = ScriptedSink()
    sink.gate = asyncio.Event()
    runner = make_runner(sink, overflow="spool", spool_dir=tmp_path / "sp", max_queue_events=2,
                         spool_max_bytes=30_000, spool_fallback="drop_newest")
    await runner.start()
    for n in range(12):  # control characters: the JSON is about 4x the estimate
        event = Event(b"Event: UserEvent\r\nData: " + b"\x01" * 2000)
        event.server, event.epoch, event.seq, event.received_at = "pbx1", 1, n, BASE_TIME
        runner.offer(Record.of_event(event, "run"))
        await asyncio.sleep(0)
    stats = runner.stats
    # 12 KB each: two fit in 30 KB. Sized by the estimate (2.8 KB), the spool refused the
    # whole spill and every record went to the fallback while the spool stayed empty.
    assert stats.spool_events + stats.in_flight_events >= 1 and 0 < stats.spool_bytes <= 30_000
    assert_invariant(stats)
    sink.gate.set()
    await runner.close(1.0)


def test_a_queued_record_costs_about_the_size_it_is_counted_at() -> None:
    """The queue's byte bound is a memory bound: what a read's records hold in memory (their
    Event, its bytes, the Record) stays within the size they are counted at."""
    import time
    import tracemalloc

    from amid.ami.protocol import Parser
    from amid.simulator.calls import prebuilt_call_events
    blob = b"".join(prebuilt_call_events(50))
    parser = Parser(expect_banner=False)
    queue = SizedQueue(10**9, 1 << 40)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        seq = 0
        while queue.events < 20_000:
            events = parser.feed(blob)
            for event in events:
                event.server, event.epoch, event.seq, event.received_at = "pbx1", 1, seq, time.time()
                seq += 1
            queue.extend(Record.of_events(events, "run"))
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held <= queue.bytes * 1.15, (held, queue.bytes)


async def test_the_spool_is_fsynced_within_its_interval_of_an_append(tmp_path: Path) -> None:
    """What a power cut can take is bounded: records written ahead are fsynced (write segments
    and rolled ones alike) by the sync task after ``fsync_interval``; nothing waits on the loop."""
    from amid.sinks.buffer import SpoolBuffer
    spool = await SpoolBuffer.open(tmp_path, name="s", max_bytes=1 << 20, fsync_interval=0.01)
    try:
        for n in range(3):
            spool.append([make_record(n)])
            spool.write_now()
            assert spool._spool.needs_sync and spool._spool.unwritten == 0, "in the kernel, not yet on disk"
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 5
            while spool._spool.needs_sync:
                assert loop.time() < deadline, "the sync task never fsynced"
                await asyncio.sleep(0.005)
    finally:
        await spool.close()


class NowaitSink(ScriptedSink):
    """A sink that can deliver without awaiting (as the file sink's small appends): the runner's
    hot path. ``nowait`` says what send_nowait does next: "take", "decline" or an exception."""

    def __init__(self) -> None:
        super().__init__()
        self.nowait: list[object] = []
        self.nowait_batches: list[list[int]] = []

    def send_nowait(self, batch: Sequence[Record]) -> bool:
        outcome = self.nowait.pop(0) if self.nowait else "take"
        if isinstance(outcome, BaseException):
            raise outcome
        if outcome == "decline":
            return False
        self.nowait_batches.append(seqs(batch))
        self.batches.append(list(batch))
        self._poke()
        return True


async def test_an_idle_runner_delivers_through_send_nowait_without_waking_its_worker() -> None:
    sink = NowaitSink()
    runner = make_runner(sink)
    await runner.start()
    runner.offer(make_record(0))      # the worker opens the sink and sends this one, then idles
    await sink.until(lambda: sink.delivered() == [0])
    assert sink.attempts == [[0]]
    runner.offer_many([make_record(1), make_record(2)])
    runner.offer_many([make_record(3)])   # the same turn of the loop: one batch
    await sink.until(lambda: sink.delivered() == [0, 1, 2, 3])
    assert sink.nowait_batches == [[1, 2, 3]], "one delivery for the turn, on the loop"
    assert sink.attempts == [[0]], "send() was not needed again"
    assert runner.stats.sent_total == 4 and runner.stats.in_flight_events == 0
    assert_invariant(runner.stats)
    await runner.close(1)


async def test_a_batch_send_nowait_declines_or_fails_goes_to_the_worker_and_is_retried() -> None:
    sink = NowaitSink()
    runner = make_runner(sink)
    await runner.start()
    runner.offer(make_record(0))
    await sink.until(lambda: sink.delivered() == [0])
    sink.nowait = ["decline"]
    runner.offer(make_record(1))
    await sink.until(lambda: sink.delivered() == [0, 1])
    assert sink.attempts == [[0], [1]], "declined: the worker sent it with send()"
    sink.nowait = [SinkError("disk full")]
    runner.offer(make_record(2))
    await sink.until(lambda: sink.delivered() == [0, 1, 2])
    assert sink.attempts == [[0], [1], [2]], "failed on the hot path: retried by the worker"
    assert (runner.stats.failed_attempts_total, runner.stats.retried_total) == (1, 1)
    assert sink.nowait_batches == []
    assert_invariant(runner.stats)
    await runner.close(1)
