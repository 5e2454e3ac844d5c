"""The disk spool: framing, segments, acks, the size cap, and recovery from damage and kill -9."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from amid.sinks.spool import (
    HEADER_SIZE,
    MAGIC,
    Spool,
    SpoolFull,
    SpoolLocked,
    SpoolPosition,
    encode_frame,
    parse_frames,
)


def payloads(n: int, start: int = 0) -> list[bytes]:
    return [b'{"n":%d,"pad":"%s"}' % (i, b"x" * (i % 7)) for i in range(start, start + n)]


def read_all(spool: Spool) -> list[bytes]:
    return [p for _, p in spool.read_batch(1 << 30, 1 << 40)]


def segments(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*.seg"))


def test_append_read_ack_round_trip(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=200)
    data = payloads(20)
    spool.append(data[:5])
    spool.append(data[5:], sync=True)
    assert spool.events_pending == 20
    assert spool.bytes_used == sum(HEADER_SIZE + len(p) for p in data)
    assert len(segments(tmp_path)) > 1, "segments roll at segment_bytes"

    first = spool.read_batch(3, 1 << 20)
    assert [p for _, p in first] == data[:3]
    assert [p for _, p in spool.read_batch(3, 1 << 20)] == data[:3], "reading does not consume"

    spool.ack(first[-1][0])
    assert spool.events_pending == 17
    assert read_all(spool) == data[3:]

    everything = spool.read_batch(100, 1 << 20)
    spool.ack(everything[-1][0])
    assert spool.events_pending == 0
    assert spool.bytes_used == 0
    assert len(segments(tmp_path)) == 1, "fully acked segments are deleted"
    spool.close()


def test_read_batch_byte_limit_returns_at_least_one_record(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20)
    big = b"y" * 1000
    spool.append([b"a" * 10, b"b" * 10, b"c" * 10, big, b"d"])
    assert [p for _, p in spool.read_batch(10, 25)] == [b"a" * 10, b"b" * 10]
    spool.ack(spool.read_batch(3, 1 << 20)[-1][0])
    assert [p for _, p in spool.read_batch(10, 25)] == [big], "an oversized record comes alone"
    spool.close()


def test_reopen_keeps_unacked_records_only(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=150)
    spool.append(payloads(12))
    batch = spool.read_batch(7, 1 << 20)
    spool.ack(batch[-1][0])
    spool.close()

    reopened = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=150)
    assert reopened.events_pending == 5
    assert read_all(reopened) == payloads(12)[7:]
    assert reopened.corrupt_records_total == 0
    reopened.close()


def test_segment_numbers_stay_monotonic_after_everything_was_acked(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=100)
    spool.append(payloads(10))
    spool.ack(spool.read_batch(100, 1 << 20)[-1][0])
    last = segments(tmp_path)[-1]
    spool.close()
    for seg in tmp_path.glob("*.seg"):
        seg.unlink()
    reopened = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=100)
    reopened.append([b"new"])
    assert segments(tmp_path)[-1] > last
    assert read_all(reopened) == [b"new"]
    reopened.close()


def test_size_cap_raises_spool_full_and_ack_frees_room(tmp_path: Path) -> None:
    frame = HEADER_SIZE + 10
    spool = Spool(tmp_path, max_bytes=3 * frame)
    spool.append([b"0" * 10, b"1" * 10])
    assert spool.can_append(10) and not spool.can_append(11)
    with pytest.raises(SpoolFull):
        spool.append([b"2" * 10, b"3" * 10])   # all or nothing
    assert spool.events_pending == 2
    spool.append([b"2" * 10])
    with pytest.raises(SpoolFull):
        spool.append([b"x"])
    spool.ack(spool.read_batch(1, 1 << 20)[-1][0])
    spool.append([b"3" * 10])
    assert read_all(spool) == [b"1" * 10, b"2" * 10, b"3" * 10]
    spool.close()


def test_second_open_of_the_same_directory_is_refused(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20)
    with pytest.raises(SpoolLocked):
        Spool(tmp_path, max_bytes=1 << 20)
    spool.close()
    Spool(tmp_path, max_bytes=1 << 20).close()


def test_damaged_cursor_file_means_redelivery_not_loss(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20)
    spool.append(payloads(4))
    spool.ack(spool.read_batch(2, 1 << 20)[-1][0])
    spool.close()
    (tmp_path / "cursor").write_bytes(b"garbage")
    reopened = Spool(tmp_path, max_bytes=1 << 20)
    assert read_all(reopened) == payloads(4)
    reopened.close()


# -- damage on disk ----------------------------------------------------------------------

def _write_ten(directory: Path) -> tuple[Path, list[int]]:
    """Ten records in one segment; returns the segment path and each record's start offset."""
    spool = Spool(directory, max_bytes=1 << 20)
    spool.append(payloads(10))
    spool.close()
    [segment] = directory.glob("*.seg")
    starts, offset = [], 0
    for p in payloads(10):
        starts.append(offset)
        offset += HEADER_SIZE + len(p)
    assert segment.stat().st_size == offset
    return segment, starts


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["truncate_mid_record", "truncate_mid_header", "flip_last_payload",
                                    "flip_last_magic", "append_garbage"])
def test_damaged_tail_is_recovered_record_by_record(tmp_path: Path, damage: str) -> None:
    segment, starts = _write_ten(tmp_path)
    size = segment.stat().st_size
    if damage == "truncate_mid_record":
        os.truncate(segment, starts[9] + HEADER_SIZE + 3)
    elif damage == "truncate_mid_header":
        os.truncate(segment, starts[9] + 5)
    elif damage == "flip_last_payload":
        _flip(segment, size - 2)
    elif damage == "flip_last_magic":
        _flip(segment, starts[9])
    else:
        with segment.open("ab") as f:
            f.write(b"\x00garbage" + MAGIC + b"\xff\xff")
    expected = payloads(10) if damage == "append_garbage" else payloads(9)

    spool = Spool(tmp_path, max_bytes=1 << 20)
    assert spool.corrupt_records_total == 1
    assert spool.corrupt_bytes_total > 0
    assert spool.events_pending == len(expected)
    assert read_all(spool) == expected
    assert segment.stat().st_size == (size if damage == "append_garbage" else starts[9]), \
        "the damaged tail is truncated"
    spool.append([b"after"])
    spool.close()

    again = Spool(tmp_path, max_bytes=1 << 20)
    assert again.corrupt_records_total == 0, "recovery is done once, not on every start"
    assert read_all(again) == expected + [b"after"]
    again.close()


@pytest.mark.parametrize("where", ["payload", "length", "magic"])
def test_damaged_record_in_the_middle_is_skipped_by_resync(tmp_path: Path, where: str) -> None:
    segment, starts = _write_ten(tmp_path)
    offset = {"payload": starts[4] + HEADER_SIZE + 2, "length": starts[4] + 5, "magic": starts[4]}[where]
    _flip(segment, offset)
    spool = Spool(tmp_path, max_bytes=1 << 20)
    expected = payloads(4) + payloads(5, start=5)
    assert spool.corrupt_records_total == 1
    assert spool.events_pending == 9
    batch = spool.read_batch(100, 1 << 20)
    assert [p for _, p in batch] == expected
    spool.ack(batch[-1][0])
    assert spool.events_pending == 0
    spool.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.lists(st.binary(min_size=0, max_size=60), min_size=1, max_size=12),
       cut=st.integers(min_value=0), flip=st.one_of(st.none(), st.integers(min_value=0)))
def test_any_truncation_or_flipped_byte_keeps_every_intact_record(
        data: list[bytes], cut: int, flip: int | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        spool = Spool(directory, max_bytes=1 << 20)
        spool.append(data)
        spool.close()
        [segment] = directory.glob("*.seg")
        size = segment.stat().st_size
        cut %= size + 1
        os.truncate(segment, cut)
        bounds, offset = [], 0
        for p in data:
            bounds.append((offset, offset + HEADER_SIZE + len(p)))
            offset += HEADER_SIZE + len(p)
        if flip is not None and cut:
            flip %= cut
            _flip(segment, flip)
        intact = [p for p, (lo, hi) in zip(data, bounds, strict=False)
                  if hi <= cut and (flip is None or not cut or not lo <= flip < hi)]
        reopened = Spool(directory, max_bytes=1 << 20)
        assert read_all(reopened) == intact
        assert reopened.events_pending == len(intact)
        reopened.close()


def test_parse_frames_waits_for_more_data_unless_final() -> None:
    frames = [encode_frame(b"one"), encode_frame(b"two")]
    data = frames[0] + frames[1][:-1]
    partial = parse_frames(data, 1, 0, final=False)
    assert [f.payload for f in partial] == [b"one"]
    final = parse_frames(data, 1, 0, final=True)
    assert [f.payload for f in final] == [b"one", None]
    assert final[-1].end == len(data)


# -- kill -9 -----------------------------------------------------------------------------

_WRITER = r"""
import sys
from pathlib import Path
from amid.sinks.spool import Spool

spool = Spool(Path(sys.argv[1]), max_bytes=1 << 30, segment_bytes=4096)
n = acked = 0
while True:
    spool.append([b'{"n":%d,"pad":"%s"}' % (n + k, b"x" * ((n + k) % 50)) for k in range(7)],
                 sync=True)
    n += 7
    if n % 3 == 0:
        batch = spool.read_batch(5, 1 << 20)
        spool.ack(batch[-1][0])
        acked += len(batch)
    print(n, acked, flush=True)
"""


async def test_kill_9_while_appending_loses_no_fsynced_record(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _WRITER, str(tmp_path), stdout=asyncio.subprocess.PIPE, env=env)
    assert proc.stdout is not None
    appended = acked = 0
    try:
        async with asyncio.timeout(20):
            while appended < 3000:
                line = await proc.stdout.readline()
                assert line, "writer exited early"
                appended, acked = map(int, line.split())
    finally:
        proc.send_signal(signal.SIGKILL)
        async with asyncio.timeout(10):
            await proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert len(list(tmp_path.glob("*.seg"))) > 1

    spool = Spool(tmp_path, max_bytes=1 << 30, segment_bytes=4096)
    numbers = [int(p.split(b'"n":')[1].split(b",")[0]) for p in read_all(spool)]
    spool.close()
    assert numbers, "records survived"
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), "in order, no gaps, no garbage"
    assert numbers[0] <= acked + 5, "the cursor never runs ahead of what was acked"
    assert numbers[0] >= acked, "acked records stay acked"
    assert numbers[-1] >= appended - 1, "every record fsynced before the kill is there"


def test_position_is_ordered() -> None:
    assert SpoolPosition(1, 500) < SpoolPosition(2, 0)


# -- I/O failures while running (disk full for a moment, no file descriptors left) -----------------

class FailingOpener:
    """``os.open`` whose next ``failures`` opens of a path ending with ``suffix`` fail with
    ``errno_`` (injected as the spool's ``opener``)."""

    def __init__(self, suffix: str, errno_: int) -> None:
        self.suffix, self.errno, self.failures = suffix, errno_, 0

    def __call__(self, path, flags, mode=0o777, **kw):
        if self.failures and str(path).endswith(self.suffix):
            self.failures -= 1
            raise OSError(self.errno, os.strerror(self.errno))
        return os.open(path, flags, mode, **kw)


def test_an_ack_whose_cursor_write_fails_is_done_whole_by_its_retry(tmp_path):
    import errno

    class FailingWrite:
        failures = 0

        def __call__(self, fd: int, data: bytes, offset: int) -> int:
            if self.failures:
                self.failures -= 1
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            return os.pwrite(fd, data, offset)

    disk_full_once = FailingWrite()
    spool = Spool(tmp_path / "sp", max_bytes=10_000, pwrite=disk_full_once)
    spool.append([b"x" * 100] * 5)
    spool.sync()
    items = spool.read_batch(10, 1 << 30)
    disk_full_once.failures = 1
    with pytest.raises(OSError):
        spool.ack(items[-1][0])
    spool.ack(items[-1][0])  # the runner retries the same call
    assert (spool.events_pending, spool.bytes_used, spool.free_bytes) == (0, 0, 10_000)
    spool.close()


def test_a_segment_that_cannot_be_opened_leaves_the_spool_usable(tmp_path):
    import errno
    no_descriptors = FailingOpener(".seg", errno.EMFILE)
    spool = Spool(tmp_path / "sp", max_bytes=1_000_000, segment_bytes=1000, opener=no_descriptors)
    spool.append([b"a" * 400] * 2)
    spool.sync()
    no_descriptors.failures = 1_000
    spool.append([b"b" * 400])  # needs the next segment
    with pytest.raises(OSError):
        spool.sync()
    no_descriptors.failures = 0
    spool.sync()  # the cause is gone: it works again
    assert [p for _, p in spool.read_batch(10, 1 << 30)] == [b"a" * 400] * 2 + [b"b" * 400]
    spool.close()
    reopened = Spool(tmp_path / "sp", max_bytes=1_000_000, segment_bytes=1000)
    assert reopened.events_pending == 3
    reopened.close()
