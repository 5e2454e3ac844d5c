"""A real full disk: the file sink and the spool on a small tmpfs, through the real SinkRunner.

The filesystem is a size-limited tmpfs mounted in a private mount namespace (``unshare -m``, as
root) by a helper process; the test reaches it through ``/proc/<helper>/root``, so nothing is
mounted in the test's own namespace and the mount vanishes with the helper. A ballast file fills
the disk; deleting it is "space returns". Writes then fail the way they do on a real disk: a
short write that stops at the last free page, then ENOSPC.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import select
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest
from sink_contract import make_records

from amid.records import Record
from amid.sinks import file as file_sink
from amid.sinks.delivery import RunnerSettings, SinkRunner, SinkStats

DISK_BYTES = 1 << 20
PAGE = 4096


def need(reason: str) -> NoReturn:
    """A missing capability fails in CI (where it is installed and we are root), else skips."""
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


class SmallDisk:
    """A tmpfs of ``DISK_BYTES`` seen through a helper process's root (see the module doc)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ballast = root / "ballast"

    def free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def fill(self, leave: int) -> None:
        """Take all free space but ``leave`` bytes (a multiple of the page size)."""
        with open(self.ballast, "ab") as ballast:
            ballast.write(b"\0" * (self.free_bytes() - leave))
        assert self.free_bytes() == leave

    def make_room(self) -> None:
        self.ballast.unlink()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    unshare = shutil.which("unshare")
    if unshare is None or os.geteuid() != 0:
        need("a private tmpfs needs unshare(1) (util-linux) and root")
    mountpoint = tmp_path / "disk"
    mountpoint.mkdir()
    # The helper mounts, says so, then waits for its stdin to close (also when pytest dies).
    helper = subprocess.Popen(
        [unshare, "--mount", "--propagation", "private", "sh", "-c",
         'mount -t tmpfs -o size="$1" amid-small-disk "$0" && echo mounted && exec cat',
         str(mountpoint), str(DISK_BYTES)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert helper.stdout is not None and helper.stdin is not None and helper.stderr is not None
    try:
        ready, _, _ = select.select([helper.stdout], [], [], 10)
        if not ready or helper.stdout.readline() != b"mounted\n":
            helper.kill()
            helper.wait(timeout=10)
            need(f"cannot mount a tmpfs in a private namespace here: "
                 f"{helper.stderr.read().decode().strip()}")
        disk = SmallDisk(Path(f"/proc/{helper.pid}/root{mountpoint}"))
        assert disk.free_bytes() == DISK_BYTES   # the tmpfs, not the filesystem under it
        yield disk
    finally:
        helper.stdin.close()
        try:
            helper.wait(timeout=10)
        except subprocess.TimeoutExpired:
            helper.kill()
            helper.wait()
        helper.stdout.close()
        helper.stderr.close()


class RetryGate:
    """The runner's sleep between retries: parks each retry until the test lets some through,
    so the test can look at the file while nothing writes to it."""

    def __init__(self) -> None:
        self.permits = 0
        self.parked = 0
        self._changed = asyncio.Condition()

    async def __call__(self, delay: float) -> None:
        async with self._changed:
            self.parked += 1
            self._changed.notify_all()
            await self._changed.wait_for(lambda: self.permits > 0)
            self.permits -= 1
            self.parked -= 1
            self._changed.notify_all()

    async def release(self, count: int) -> None:
        async with self._changed:
            self.permits += count
            self._changed.notify_all()

    async def wait_parked(self, when: Callable[[], bool] = lambda: True) -> None:
        async with asyncio.timeout(10), self._changed:
            await self._changed.wait_for(lambda: self.parked > 0 and when())


async def quick_sleep(delay: float) -> None:
    await asyncio.sleep(min(delay, 0.02))


def make_runner(sink: file_sink.FileSink, sleep: Callable[[float], Any], **overrides: Any) -> SinkRunner:
    params: dict[str, Any] = {
        "name": sink.name, "max_queue_events": 10_000, "max_queue_bytes": 16 << 20,
        "overflow": "drop_newest", "spool_dir": None, "spool_max_bytes": 1 << 20,
        "spool_fallback": "drop_newest", "spool_fsync_interval": 0.01, "batch_max_events": 20,
        "batch_max_bytes": 1 << 20, "batch_max_wait": 0.0, "retry_min_delay": 0.01,
        "retry_max_delay": 0.05, "dead_letter_path": None, "sleep": sleep}
    params.update(overrides)
    del params["sleep"]
    return SinkRunner(sink, RunnerSettings(**params), sleep=sleep)


def whole_json_lines(path: Path) -> list[str]:
    """The ids in a JSON Lines file; fails on a torn line, a NUL byte or a missing final LF."""
    raw = path.read_bytes()
    assert b"\0" not in raw
    assert raw == b"" or raw.endswith(b"\n"), f"torn last line: {raw[-80:]!r}"
    return [json.loads(line)["id"] for line in raw.splitlines()]


def stream(count: int, *, start: int = 0) -> list[Record]:
    return make_records(count, prefix="ev", start=start, fields={"Padding": "p" * 150})


def settled(stats: SinkStats) -> int:
    """Records the runner has accounted for as sent or dropped (everything else it still holds)."""
    return stats.sent_total + sum(stats.dropped_total.values()) + stats.dead_lettered_total


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


async def test_disk_full_mid_batch_leaves_whole_lines_and_each_record_once(small_disk, caplog):
    caplog.set_level(logging.INFO)
    path = small_disk.root / "events.jsonl"
    sink = file_sink.create("disk-file", {"path": str(path)})
    gate = RetryGate()
    runner = make_runner(sink, gate)
    records = stream(300)
    await runner.start()
    try:
        assert await runner.wait_opened(5)
        small_disk.fill(leave=3 * PAGE)           # room for about two of the 20-record batches
        runner.offer_many(records)

        await gate.wait_parked()                  # a batch failed part-way; its retry is held
        assert runner.stats.state == "retrying" and runner.stats.failed_attempts_total == 1
        written = whole_json_lines(path)
        assert 0 < len(written) < len(records) and written == [r.id for r in records[:len(written)]]
        assert path.stat().st_size > 2 * PAGE     # the batch did go in part of the way
        failures = [r for r in caplog.records if "No space left on device (ENOSPC)" in r.getMessage()]
        assert failures and str(path) in failures[0].getMessage()
        assert failures[0].levelno == logging.WARNING and "retrying" in failures[0].getMessage()

        await gate.release(3)                     # three more attempts on the full disk
        await gate.wait_parked(lambda: runner.stats.failed_attempts_total == 4)
        assert whole_json_lines(path) == written  # failed retries add nothing, not even a torn line

        small_disk.make_room()
        await gate.release(1000)
        await until(lambda: runner.stats.sent_total == len(records))
    finally:
        await gate.release(1000)
        await runner.close(5)
    assert whole_json_lines(path) == [r.id for r in records]   # each record once, in order
    assert runner.stats.state == "closed" and sum(runner.stats.dropped_total.values()) == 0
    assert sink.stats.completed_writes_total >= 1 and sink.stats.taken_back_total == 0
    assert any("delivered after 4 failed attempts" in r.getMessage() for r in caplog.records)


async def test_copytruncate_during_the_outage_keeps_each_record_once_across_both_files(
        small_disk, tmp_path):
    # logrotate copytruncate while a batch is unfinished: its whole records went into the copy,
    # the file is emptied; the retry must write only the rest, at the new end.
    path = small_disk.root / "events.jsonl"
    sink = file_sink.create("disk-file", {"path": str(path)})
    gate = RetryGate()
    runner = make_runner(sink, gate)
    records = stream(300)
    copy = tmp_path / "events.jsonl.1"
    await runner.start()
    try:
        assert await runner.wait_opened(5)
        small_disk.fill(leave=3 * PAGE)
        runner.offer_many(records)
        await gate.wait_parked()
        shutil.copyfile(path, copy)
        os.truncate(path, 0)
        small_disk.make_room()
        await gate.release(1000)
        await until(lambda: runner.stats.sent_total == len(records))
    finally:
        await gate.release(1000)
        await runner.close(5)
    assert whole_json_lines(copy) + whole_json_lines(path) == [r.id for r in records]
    assert whole_json_lines(path)[0] != records[0].id   # the copy took the first lines


async def test_batch_given_up_at_shutdown_on_a_full_disk_is_taken_back(small_disk):
    # The runner counts the batch in flight as dropped ("shutdown"): the whole records of it
    # that went in before the disk filled must not stay in the file as well.
    path = small_disk.root / "events.jsonl"
    sink = file_sink.create("disk-file", {"path": str(path)})
    gate = RetryGate()
    runner = make_runner(sink, gate)
    records = stream(300)
    await runner.start()
    try:
        assert await runner.wait_opened(5)
        small_disk.fill(leave=3 * PAGE)
        runner.offer_many(records)
        await gate.wait_parked()
        in_file_before = whole_json_lines(path)
    finally:
        await runner.close(0.2)
        await gate.release(1000)
    stats = runner.stats
    assert stats.sent_total + stats.dropped_total["shutdown"] == len(records)
    assert whole_json_lines(path) == [r.id for r in records[:stats.sent_total]]
    assert len(in_file_before) > stats.sent_total          # whole records of the lost batch...
    assert sink.stats.taken_back_total == 1                # ...were taken back at close


async def test_spool_on_the_full_disk_keeps_every_record_until_space_returns(small_disk):
    path = small_disk.root / "events.jsonl"
    sink = file_sink.create("disk-file", {"path": str(path)})
    runner = make_runner(sink, quick_sleep, overflow="spool", spool_dir=small_disk.root / "spool",
                         max_queue_events=20, spool_max_bytes=512 << 10)
    records = stream(300)
    await runner.start()
    try:
        assert await runner.wait_opened(5)
        small_disk.fill(leave=3 * PAGE)
        runner.offer_many(records)
        await until(lambda: "No space left" in (runner.stats.last_error or ""))
        stats = runner.stats
        assert stats.received_total == settled(stats) + (
            stats.queue_events + stats.spool_events + stats.in_flight_events)
        small_disk.make_room()
        await until(lambda: runner.stats.sent_total == len(records))
    finally:
        await runner.close(5)
    assert whole_json_lines(path) == [r.id for r in records]
    assert sum(runner.stats.dropped_total.values()) == 0


async def test_spool_on_the_full_disk_at_shutdown_loses_nothing_silently(small_disk):
    """Stopped while the disk is still full: every record is in the file, in the spool for the
    next run, or counted dropped (``spool_io``), never silently lost nor written twice."""
    path = small_disk.root / "events.jsonl"
    spool_dir = small_disk.root / "spool"
    records = stream(300)

    first_sink = file_sink.create("disk-file", {"path": str(path)})
    first = make_runner(first_sink, quick_sleep, overflow="spool", spool_dir=spool_dir,
                        max_queue_events=20, spool_max_bytes=512 << 10)
    await first.start()
    try:
        assert await first.wait_opened(5)
        small_disk.fill(leave=3 * PAGE)
        first.offer_many(records)
        await until(lambda: "No space left" in (first.stats.last_error or ""))
    finally:
        await first.close(0.2)
    before = first.stats
    assert before.received_total == settled(before) + before.spool_events  # nothing unaccounted

    small_disk.make_room()
    second_sink = file_sink.create("disk-file", {"path": str(path)})
    second = make_runner(second_sink, quick_sleep, overflow="spool", spool_dir=spool_dir,
                         max_queue_events=20, spool_max_bytes=512 << 10)
    await second.start()
    try:
        assert second.stats.recovered_total == before.spool_events
        await until(lambda: second.stats.sent_total == before.spool_events)
    finally:
        await second.close(5)
    ids = whole_json_lines(path)
    assert len(ids) == len(set(ids))
    offered = [r.id for r in records]
    assert ids == [i for i in offered if i in set(ids)]              # in order
    assert len(ids) == before.sent_total + second.stats.sent_total
    assert len(records) - len(ids) == sum(before.dropped_total.values())   # every miss counted
