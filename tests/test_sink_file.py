"""The JSON Lines file sink: contract, rotation (ours and logrotate's), fsync policy, errors."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
from pathlib import Path

import pydantic
import pytest
from sink_contract import SinkContract, make_records

from amid.sinks import file as file_sink
from amid.sinks.base import SinkError

LOGROTATE = shutil.which("logrotate") or (
    "/usr/sbin/logrotate" if os.path.exists("/usr/sbin/logrotate") else None)


class FakeClock:
    """A monotonic clock the test moves by hand, so a path check becomes due without sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def read_jsonl(path: Path) -> list[dict]:
    """Every line of ``path`` as JSON; fails on a torn line, NUL bytes or a missing final LF."""
    raw = path.read_bytes()
    assert b"\0" not in raw, f"{path} contains NUL bytes (a write landed past a truncation)"
    assert raw == b"" or raw.endswith(b"\n"), f"{path} ends in the middle of a line"
    return [json.loads(line) for line in raw.splitlines()]


def ids_in(*paths: Path) -> list[str]:
    return [record["id"] for path in paths if path.exists() for record in read_jsonl(path)]


def make_sink(path: Path | str, clock: FakeClock | None = None, **options) -> file_sink.FileSink:
    opts = file_sink.Options(path=str(path), **options)
    if clock is None:
        return file_sink.FileSink("events-file", opts)
    return file_sink.FileSink("events-file", opts, clock=clock)


@pytest.fixture
async def sinks():
    """Sinks made by a test; all closed afterwards even when the test fails."""
    made: list[file_sink.FileSink] = []
    yield made
    for sink in made:
        async with asyncio.timeout(5):
            await sink.close()


async def started(sinks: list, path: Path | str, clock: FakeClock | None = None,
                  **options) -> file_sink.FileSink:
    sink = make_sink(path, clock, **options)
    sinks.append(sink)
    async with asyncio.timeout(5):
        await sink.start()
    return sink


async def send(sink: file_sink.FileSink, records) -> None:
    async with asyncio.timeout(5):
        await sink.send(records)


# -- the contract every sink passes --------------------------------------------------------------

class TestFileSinkContract(SinkContract):
    async def make_sink(self):
        self.directory = self.tmp_path / "logs"
        self.directory.mkdir(exist_ok=True)
        self.path = self.directory / "events.jsonl"
        # check_interval=0: the path is checked before every batch, so a broken target is
        # seen by the very next send.
        return file_sink.create("contract-file", file_sink.Options(
            path=str(self.path), check_interval=0))

    async def received(self, n: int) -> list[dict]:
        # send() returned only after os.write: the records are already in the file.
        return read_jsonl(self.path)

    async def break_peer(self) -> None:
        # Tests run as root, so permission bits stop nothing: put a regular file where the
        # directory was. Reopening the path now fails with ENOTDIR.
        self.directory.rename(self.tmp_path / "logs.gone")
        self.directory.write_text("not a directory")


# -- options --------------------------------------------------------------------------------------

def test_options_reject_unknown_keys_and_bad_values():
    with pytest.raises(pydantic.ValidationError):
        file_sink.Options(path="/x", fsynk="batch")
    with pytest.raises(pydantic.ValidationError):
        file_sink.Options(path="/x", fsync="always")
    with pytest.raises(pydantic.ValidationError):
        file_sink.Options(path="-", rotate_bytes=1000)
    with pytest.raises(pydantic.ValidationError):
        file_sink.Options(path="/x", mode="rw-r-----")
    assert file_sink.Options(path="/x", mode="0600").mode == 0o600


def test_create_accepts_the_raw_config_mapping():
    sink = file_sink.create("f", {"path": "/tmp/x.jsonl", "fsync": "batch"})
    assert sink.name == "f" and sink.options.fsync == "batch"


# -- reopen: SIGHUP, rename, removal, truncation ---------------------------------------------------

async def test_reopen_after_logrotate_style_rename(tmp_path, sinks):
    path, clock = tmp_path / "events.jsonl", FakeClock()
    sink = await started(sinks, path, clock)
    await send(sink, make_records(2, start=0))
    path.rename(tmp_path / "events.jsonl.1")

    sink.reopen()                                   # what the daemon does on SIGHUP
    await send(sink, make_records(3, start=2))

    assert ids_in(tmp_path / "events.jsonl.1") == ["rec-0", "rec-1"]
    assert ids_in(path) == ["rec-2", "rec-3", "rec-4"]
    assert sink.stats.reopens_total == 1


async def test_rename_noticed_within_check_interval_without_signal(tmp_path, sinks):
    path, clock = tmp_path / "events.jsonl", FakeClock()
    sink = await started(sinks, path, clock, check_interval=1.0)
    await send(sink, make_records(1, start=0))
    path.rename(tmp_path / "events.jsonl.1")

    clock.advance(0.5)                              # not yet due: still the renamed file
    await send(sink, make_records(1, start=1))
    clock.advance(0.5)                              # check_interval reached
    await send(sink, make_records(2, start=2))

    assert ids_in(tmp_path / "events.jsonl.1") == ["rec-0", "rec-1"]
    assert ids_in(path) == ["rec-2", "rec-3"]
    assert sink.stats.reopens_total == 1


async def test_removed_file_is_created_again(tmp_path, sinks):
    path, clock = tmp_path / "events.jsonl", FakeClock()
    sink = await started(sinks, path, clock, check_interval=1.0)
    await send(sink, make_records(1, start=0))
    path.unlink()

    clock.advance(1.0)
    await send(sink, make_records(1, start=1))

    assert ids_in(path) == ["rec-1"]
    assert sink.stats.reopens_total == 1


async def test_copytruncate_continues_at_the_new_end_and_is_counted(tmp_path, sinks):
    path, clock = tmp_path / "events.jsonl", FakeClock()
    sink = await started(sinks, path, clock, check_interval=1.0)
    await send(sink, make_records(5, start=0))
    shutil.copyfile(path, tmp_path / "events.jsonl.1")
    os.truncate(path, 0)

    await send(sink, make_records(1, start=5))      # before the check: O_APPEND alone suffices
    clock.advance(1.0)
    await send(sink, make_records(1, start=6))

    assert ids_in(tmp_path / "events.jsonl.1") == [f"rec-{n}" for n in range(5)]
    assert ids_in(path) == ["rec-5", "rec-6"]       # read_jsonl also rejects NUL holes
    assert sink.stats.truncations_total == 1
    assert sink.stats.reopens_total == 0


# -- size rotation ---------------------------------------------------------------------------------

async def test_size_rotation_keeps_rotate_keep_files_and_loses_no_line(tmp_path, sinks):
    path = tmp_path / "events.jsonl"
    records = make_records(20, start=10)            # ids of equal length: equal line sizes
    line_size = records[0].size + 1
    assert all(r.size + 1 == line_size for r in records)
    sink = await started(sinks, path, rotate_bytes=4 * line_size, rotate_keep=2)
    for n in range(0, 20, 2):                       # 10 batches of 2 lines; 2 batches per file
        await send(sink, records[n:n + 2])

    files = [tmp_path / "events.jsonl.2", tmp_path / "events.jsonl.1", path]
    assert not (tmp_path / "events.jsonl.3").exists()
    assert ids_in(*files) == [r.id for r in records[8:]]
    assert all(f.stat().st_size <= 4 * line_size for f in files)
    assert sink.stats.rotations_total == 4


async def test_batch_larger_than_rotate_bytes_is_written_whole(tmp_path, sinks):
    path = tmp_path / "events.jsonl"
    sink = await started(sinks, path, rotate_bytes=10)
    await send(sink, make_records(3, start=0))
    await send(sink, make_records(3, start=3))
    assert ids_in(tmp_path / "events.jsonl.1") == ["rec-0", "rec-1", "rec-2"]
    assert ids_in(path) == ["rec-3", "rec-4", "rec-5"]


# -- fsync policies --------------------------------------------------------------------------------

async def test_fsync_batch_syncs_after_every_batch(tmp_path, sinks):
    sink = await started(sinks, tmp_path / "events.jsonl", fsync="batch")
    for n in range(3):
        await send(sink, make_records(2, start=2 * n))
    assert sink.stats.fsyncs_total == 3


async def test_fsync_never_never_syncs(tmp_path):
    sink = make_sink(tmp_path / "events.jsonl", fsync="never")
    await sink.start()
    for n in range(3):
        await send(sink, make_records(2, start=2 * n))
    await sink.close()
    assert sink.stats.fsyncs_total == 0


async def test_fsync_interval_syncs_after_a_write_without_further_writes(tmp_path, sinks):
    sink = await started(sinks, tmp_path / "events.jsonl", fsync="interval", fsync_interval=0.01)
    for n in range(5):
        await send(sink, make_records(1, start=n))
    assert sink.stats.fsyncs_total < 5             # not one per batch
    async with asyncio.timeout(5):
        while sink.stats.fsyncs_total == 0:         # the background syncer, not a send, does it
            await asyncio.sleep(0.005)


async def test_close_syncs_pending_data_and_is_idempotent(tmp_path):
    sink = make_sink(tmp_path / "events.jsonl", fsync="interval", fsync_interval=3600)
    await sink.start()
    await send(sink, make_records(1))
    assert sink.stats.fsyncs_total == 0
    await sink.close()
    await sink.close()
    assert sink.stats.fsyncs_total == 1
    with pytest.raises(SinkError):
        await sink.send(make_records(1))


# -- targets and errors ----------------------------------------------------------------------------

async def test_stdout_mode_writes_json_lines_to_standard_output(capfd, sinks):
    sink = await started(sinks, "-")
    await send(sink, make_records(2))
    await sink.close()
    out = capfd.readouterr().out
    assert [json.loads(line)["id"] for line in out.splitlines()] == ["rec-0", "rec-1"]
    os.fstat(1)                                     # closing the sink left stdout open


async def test_no_space_left_becomes_sink_error_naming_path_and_errno(sinks):
    sink = await started(sinks, "/dev/full")
    with pytest.raises(SinkError) as caught:
        await send(sink, make_records(2))
    message = str(caught.value)
    assert "/dev/full" in message and "ENOSPC" in message and "No space left" in message
    assert sink.stats.write_errors_total == 1


async def test_unusable_path_keeps_failing_until_it_is_back(tmp_path, sinks):
    directory = tmp_path / "logs"
    directory.mkdir()
    path = directory / "events.jsonl"
    clock = FakeClock()
    sink = await started(sinks, path, clock, check_interval=1.0)
    await send(sink, make_records(1, start=0))
    directory.rename(tmp_path / "logs.gone")
    directory.write_text("a regular file where the directory was")

    clock.advance(1.0)
    for _ in range(2):                              # a retry must not write into the old file
        with pytest.raises(SinkError, match="ENOTDIR"):
            await send(sink, make_records(1, start=1))
    directory.unlink()
    directory.mkdir()
    await send(sink, make_records(1, start=1))      # the runner's retry succeeds

    assert ids_in(tmp_path / "logs.gone" / "events.jsonl") == ["rec-0"]
    assert ids_in(path) == ["rec-1"]


async def test_start_in_missing_directory_raises_sink_error(tmp_path):
    sink = make_sink(tmp_path / "missing" / "events.jsonl")
    with pytest.raises(SinkError, match="ENOENT"):
        await sink.start()
    await sink.close()


async def test_created_file_gets_the_configured_mode(tmp_path, sinks):
    path = tmp_path / "events.jsonl"
    await started(sinks, path, mode=0o600)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


async def test_large_batch_is_written_whole(tmp_path, sinks):
    path = tmp_path / "events.jsonl"
    sink = await started(sinks, path)
    big = make_records(1000, fields={"Padding": "x" * 200})
    assert sum(r.size for r in big) > file_sink.INLINE_WRITE_LIMIT   # goes through a thread
    await send(sink, big)
    assert ids_in(path) == [r.id for r in big]
    assert path.stat().st_size == sum(len(r.json) + 1 for r in big)


async def read_exactly(fd: int, size: int) -> bytes:
    """Read ``size`` bytes from a non-blocking pipe without a thread (so nothing can hang)."""
    loop, ready, data = asyncio.get_running_loop(), asyncio.Event(), bytearray()
    loop.add_reader(fd, ready.set)
    try:
        while len(data) < size:
            await ready.wait()
            ready.clear()
            try:
                chunk = os.read(fd, 1 << 16)
            except BlockingIOError:
                continue
            if not chunk:
                break
            data += chunk
    finally:
        loop.remove_reader(fd)
    return bytes(data)


async def test_cancelled_send_does_not_let_the_next_write_interleave(tmp_path, sinks):
    # The runner may cancel a send (timeout) while its thread is blocked in os.write. The next
    # send must wait for that thread instead of writing through the same descriptor at once.
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)   # a reader first: our open won't block
    try:
        sink = await started(sinks, fifo, fsync="never")
        first = make_records(2000, prefix="a", fields={"Padding": "a" * 400})
        second = make_records(2000, prefix="b", fields={"Padding": "b" * 400})
        expected = b"".join(r.json + b"\n" for r in first + second)   # ~2 MB, pipe holds 64 KiB

        blocked_send = asyncio.create_task(sink.send(first))
        pipe_has_data = asyncio.Event()
        asyncio.get_running_loop().add_reader(reader, pipe_has_data.set)
        async with asyncio.timeout(5):
            await pipe_has_data.wait()                  # the thread is now stuck in os.write
        asyncio.get_running_loop().remove_reader(reader)
        blocked_send.cancel()
        with pytest.raises(asyncio.CancelledError):
            await blocked_send

        next_send = asyncio.create_task(sink.send(second))
        async with asyncio.timeout(10):
            got = await read_exactly(reader, len(expected))
            await next_send
        assert got == expected
    finally:
        os.close(reader)


# -- the real logrotate ----------------------------------------------------------------------------

def require_logrotate() -> str:
    if LOGROTATE is None:
        if os.environ.get("CI"):
            pytest.fail("logrotate is required in CI (Debian package 'logrotate')")
        pytest.skip("logrotate not installed")
    return LOGROTATE


async def run_logrotate_while_writing(tmp_path: Path, path: Path, sink, how: str,
                                      first_id: int) -> int:
    """Run ``logrotate -f`` once with directive ``how`` while the sink keeps appending.

    Returns the next unused record number.
    """
    config = tmp_path / f"logrotate-{how}.conf"
    config.write_text(f"{path} {{\n  {how}\n  rotate 5\n  missingok\n  nocompress\n}}\n")
    os.chmod(config, 0o644)          # logrotate ignores group/world-writable configs
    proc = await asyncio.create_subprocess_exec(
        LOGROTATE, "-f", "-s", str(tmp_path / "logrotate.state"), str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    wait_for_exit = asyncio.ensure_future(proc.communicate())
    n = first_id
    async with asyncio.timeout(20):
        while not wait_for_exit.done():
            await sink.send(make_records(3, start=n))
            n += 3
            await asyncio.sleep(0)   # small sends complete inline: let the subprocess be reaped
        output, _ = await wait_for_exit
    assert proc.returncode == 0, output.decode(errors="replace")
    return n


async def test_real_logrotate_create_mode_loses_no_line(tmp_path, sinks):
    require_logrotate()
    path, clock = tmp_path / "events.jsonl", FakeClock()
    sink = await started(sinks, path, clock, check_interval=1.0)
    await send(sink, make_records(10, start=0))

    n = await run_logrotate_while_writing(tmp_path, path, sink, "create 0640", first_id=10)
    await send(sink, make_records(2, start=n))      # still the renamed file: no check due yet
    sink.reopen()                                   # logrotate's postrotate would send SIGHUP
    await send(sink, make_records(2, start=n + 2))

    n = await run_logrotate_while_writing(tmp_path, path, sink, "create 0640", first_id=n + 4)
    clock.advance(1.0)                              # no signal this time: the path check sees it
    await send(sink, make_records(2, start=n))

    files = [tmp_path / "events.jsonl.2", tmp_path / "events.jsonl.1", path]
    assert ids_in(*files) == [f"rec-{i}" for i in range(n + 2)]
    assert ids_in(path) == [f"rec-{n}", f"rec-{n + 1}"]
    assert sink.stats.reopens_total == 2


async def test_real_logrotate_copytruncate_loses_no_line_written_outside_the_copy(
        tmp_path, sinks):
    require_logrotate()
    path, clock = tmp_path / "events.jsonl", FakeClock()
    sink = await started(sinks, path, clock, check_interval=1.0)
    await send(sink, make_records(10, start=0))

    n = await run_logrotate_while_writing(tmp_path, path, sink, "copytruncate", first_id=10)
    clock.advance(1.0)
    await send(sink, make_records(5, start=n))

    rotated = tmp_path / "events.jsonl.1"
    got = ids_in(rotated, path)                     # every line parses, no NUL hole
    numbers = [int(i.removeprefix("rec-")) for i in got]
    assert numbers == sorted(set(numbers)), "lines duplicated or out of order"
    # copytruncate itself loses what is appended between its copy and its truncate (logrotate
    # documents this); everything written before it started or after it ended must be there.
    assert numbers[:10] == list(range(10))
    assert numbers[-5:] == list(range(n, n + 5))
    assert ids_in(path)[-5:] == [f"rec-{i}" for i in range(n, n + 5)]
    assert rotated.stat().st_size > 0
    assert sink.stats.truncations_total == 1 and sink.stats.reopens_total == 0


# -- whole lines, each record once ------------------------------------------------------------------
# (A real full disk, through the runner: tests/test_disk_full.py.)

async def cancel_while_in_thread(sink: file_sink.FileSink, batch) -> None:
    """Start a send that goes through a thread and cancel it once that thread has the batch (the
    runner's attempt_timeout does this): the thread writes it all, the caller hears "cancelled"."""
    task = asyncio.create_task(sink.send(batch))
    async with asyncio.timeout(5):
        while sink._thread_work is None:
            await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_retry_of_a_batch_a_cancelled_send_wrote_does_not_write_it_twice(tmp_path, sinks):
    path = tmp_path / "events.jsonl"
    sink = await started(sinks, path)
    big = make_records(1000, fields={"Padding": "x" * 200})   # beyond INLINE_WRITE_LIMIT
    await cancel_while_in_thread(sink, big)
    await send(sink, big)                           # the runner's retry of the same batch
    await send(sink, make_records(1, start=1000))
    assert ids_in(path) == [r.id for r in big] + ["rec-1000"]
    assert sink.stats.taken_back_total == 0


async def test_a_batch_the_runner_gave_up_is_taken_back_before_the_next(tmp_path, sinks):
    path = tmp_path / "events.jsonl"
    sink = await started(sinks, path)
    await send(sink, make_records(1, prefix="before"))
    given_up = make_records(1000, prefix="lost", fields={"Padding": "x" * 200})
    await cancel_while_in_thread(sink, given_up)
    await send(sink, make_records(2, prefix="next"))   # another batch: the first was given up
    assert ids_in(path) == ["before-0", "next-0", "next-1"]
    assert sink.stats.taken_back_total == 1


async def test_close_takes_back_a_batch_that_was_never_confirmed(tmp_path):
    path = tmp_path / "events.jsonl"
    sink = make_sink(path)
    await sink.start()
    await send(sink, make_records(1, prefix="kept"))
    await cancel_while_in_thread(sink, make_records(1000, prefix="lost", fields={"Padding": "x" * 200}))
    await sink.close()                              # the runner spools or drops that batch
    assert ids_in(path) == ["kept-0"]


async def test_a_torn_last_line_left_by_a_crash_is_removed_at_open(tmp_path, sinks):
    path = tmp_path / "events.jsonl"
    whole = b"".join(r.json + b"\n" for r in make_records(2))
    path.write_bytes(whole + make_records(1, start=2)[0].json[:40])   # killed mid-write
    sink = await started(sinks, path)
    await send(sink, make_records(1, start=3))
    assert ids_in(path) == ["rec-0", "rec-1", "rec-3"]
    assert sink.stats.torn_lines_repaired_total == 1


async def test_a_whole_record_missing_only_its_newline_is_kept_at_open(tmp_path, sinks):
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"".join(r.json + b"\n" for r in make_records(2)) + make_records(1, start=2)[0].json)
    sink = await started(sinks, path)
    await send(sink, make_records(1, start=3))
    assert ids_in(path) == ["rec-0", "rec-1", "rec-2", "rec-3"]
    assert sink.stats.torn_lines_repaired_total == 1


async def test_a_file_of_one_torn_line_is_emptied_at_open(tmp_path, sinks):
    path = tmp_path / "events.jsonl"
    path.write_bytes(b'{"id":"pbx1')
    sink = await started(sinks, path)
    await send(sink, make_records(1))
    assert ids_in(path) == ["rec-0"]
