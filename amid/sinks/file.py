"""JSON Lines file sink: one record per line, appended with O_APPEND.

The sink cooperates with log rotation instead of fighting it:

* ``reopen()`` (the daemon calls it on SIGHUP, logrotate's ``postrotate``) reopens the path at the
  next write.
* Without a signal, the sink still notices within ``check_interval`` seconds that the path now
  names another file (logrotate ``create``: renamed, or removed) and reopens it; records written
  in between went to the renamed file, so none is lost.
* A truncated file (logrotate ``copytruncate``) needs nothing: O_APPEND makes the next write land
  at the new end instead of leaving a hole of NUL bytes. It is noticed and counted.
* Optional size rotation (``rotate_bytes``), done before a batch that would not fit:
  ``path`` -> ``path.1`` -> ... -> ``path.<rotate_keep>`` (the oldest is dropped).

The sink never retries and never queues (the SinkRunner in front of it does): ``send`` writes
the whole batch or raises :class:`~amid.sinks.base.SinkError` naming the path and the errno.

Whole lines only, each record once. A write that fails part-way (disk full, quota, EIO) is
cut back at once (``ftruncate``) to the last whole line it wrote, after checking that the file
still ends with exactly those bytes; the whole records it did write stay, "unconfirmed". The
runner retries the same batch: the sink then writes only the rest (again after checking the
file's end), so each record lands once and the file shrinks only by the torn part. If another
batch comes instead (the runner gave that one up: shutdown, spooled, handed over on reload) or
the sink is closed, the unconfirmed bytes are taken back. The same holds for a batch that a
cancelled send's thread finished writing, and for one whose ``fsync: batch`` failed. So a
batch is in the file once if ``send`` returned, and not at all if the runner gave it up. A torn
last line found when a file is opened (a crash mid-write) is ended with a newline if it is a
whole JSON document, and removed otherwise. Nothing is cut that the file no longer ends with
(someone else appended, or ``copytruncate`` emptied it meanwhile), and a cut that
``copytruncate`` races (it would leave a hole of NULs) empties the file instead.

Where the work runs: appending a small batch to an open file costs about a microsecond, while a
round trip through ``asyncio.to_thread`` costs ~70 us (figures at ``INLINE_WRITE_LIMIT``), so
small batches to a regular file are written inline on the loop. Everything that may block for
long runs in a thread: large batches, writes to pipes/terminals (stdout), fsync, and
open/stat/rename (rotation, reopen, the periodic path check).

logrotate ``create`` race: if the periodic check falls between logrotate's rename and its
create, the sink creates the file first; logrotate then renames that file to
``<path>-<date>.backup`` and creates its own, which the sink reopens at the next check. No
record is lost; some land in the ``.backup`` file.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import stat
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pydantic

from amid.ami.aio import cancel_and_wait
from amid.records import Record
from amid.sinks.base import SinkDisabled, SinkError
from amid.units import Duration, PositiveDuration, PositiveSize

__all__ = ["FileSink", "FileStats", "Options", "create"]

log = logging.getLogger("amid.sinks.file")

STDOUT_PATH = "-"

# Batches up to this size are written inline on the event loop. Measured on the 2-core dev VM
# (ext4, page cache): os.write of 300 B ~1 us, 16 KiB ~8 us, 64 KiB 20-110 us; one round trip
# through asyncio.to_thread 65-95 us. A typical batch (tens of ~1 KiB events) is far cheaper
# inline. Beyond 64 KiB the write itself dominates the thread hop, and writeback throttling
# could stall the loop for milliseconds, so larger batches are written in a thread.
INLINE_WRITE_LIMIT = 64 * 1024

# A regular file is opened read-write: the sink reads its own tail back before completing or
# taking back a failed write, and to find a torn last line at open. Anything else (a FIFO, a
# device) write-only, as before: holding a FIFO's read end would hide that its reader is gone.
_OPEN_FLAGS = os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
# How far back from the end a torn last line is looked for at open (records are far smaller).
TORN_LINE_SCAN_LIMIT = 16 * 1024 * 1024


class Options(pydantic.BaseModel, extra="forbid"):
    """The ``file`` sink type's own config keys."""

    path: str = pydantic.Field(min_length=1)
    """File to append to; ``-`` means standard output (``amid demo``)."""
    fsync: Literal["never", "interval", "batch"] = "interval"
    """``batch``: fsync after every batch; ``interval``: at most every ``fsync_interval`` seconds,
    and within that time after a write; ``never``: leave it to the kernel."""
    fsync_interval: PositiveDuration = 1.0
    rotate_bytes: PositiveSize | None = None
    """Rotate before a batch would make the file larger than this (None: never)."""
    rotate_keep: int = pydantic.Field(5, ge=1)
    """How many rotated files (``path.1`` .. ``path.N``) to keep."""
    mode: int = pydantic.Field(0o640, ge=0, le=0o7777)
    """Permission bits for a file the sink creates (the process umask still applies)."""
    check_interval: Duration = 1.0
    """How often (seconds) to check that the path still names the open file; 0: every batch."""

    @pydantic.field_validator("mode", mode="before")
    @classmethod
    def _octal_text(cls, value: Any) -> Any:
        # "0640" / "0o640" in YAML or the environment mean octal, as in chmod.
        if isinstance(value, str):
            try:
                return int(value, 8)
            except ValueError:
                raise ValueError(f"mode must be octal permission bits like 0640, not {value!r}") from None
        return value

    @pydantic.model_validator(mode="after")
    def _stdout_cannot_rotate(self) -> Options:
        if self.path == STDOUT_PATH and self.rotate_bytes is not None:
            raise ValueError("rotate_bytes cannot be used with path '-' (standard output)")
        return self


@dataclass
class FileStats:
    """The sink's own counters, exported by :meth:`FileSink.sink_counters` as
    ``amid_sink_operations_total{operation}`` (bytes written are the runner's ``amid_sink_sent_bytes``)."""

    reopens_total: int = 0          # the path was reopened (SIGHUP, rename/removal noticed)
    rotations_total: int = 0        # size rotations done by the sink itself
    truncations_total: int = 0      # the file was found truncated under us (copytruncate)
    fsyncs_total: int = 0
    write_errors_total: int = 0
    completed_writes_total: int = 0  # a failed batch's rest written on retry (no record twice)
    taken_back_total: int = 0       # unconfirmed batches truncated away (the runner gave them up)
    torn_lines_repaired_total: int = 0  # torn last lines ended or removed when a file was opened


@dataclass
class _Unconfirmed:
    """A batch whose leading ``written`` bytes are in the file although ``send`` did not return."""

    identity: tuple[int, int] | None   # the file they went to
    data: bytes
    written: int

    @property
    def at_line_end(self) -> bool:
        return self.data[self.written - 1:self.written] == b"\n"


def create(name: str, options: Options | Mapping[str, Any]) -> FileSink:
    """Sink factory for type ``file`` (accepts validated Options or the raw config mapping)."""
    if not isinstance(options, Options):
        options = Options.model_validate(dict(options))
    return FileSink(name, options)


def _sink_error(name: str, action: str, path: str, exc: OSError) -> SinkError:
    code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    text = exc.strerror or str(exc)
    return SinkError(f"file sink {name!r}: cannot {action} {path}: {text} ({code})")


class FileSink:
    """Appends records as JSON Lines to a file (or stdout); see the module docstring."""

    def __init__(self, name: str, options: Options, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.options = options
        self.stats = FileStats()
        self._clock = clock   # injectable so tests can make a path check due without sleeping
        self._to_stdout = options.path == STDOUT_PATH
        self._fd: int | None = None
        self._fd_identity: tuple[int, int] | None = None   # (st_dev, st_ino) of the open file
        self._fd_is_regular = False
        self._size = 0                  # our idea of the file's size, for size rotation
        self._next_check = 0.0
        self._reopen_requested = False
        self._dirty = False             # written since the last fsync
        self._unconfirmed: _Unconfirmed | None = None   # see the module docstring
        self._end_torn_line = False     # a stream (stdout) holds a torn line: start a new one
        self._fd_readable = False       # opened read-write (see _OPEN_FLAGS)
        self._closed = False
        self._lock = asyncio.Lock()     # one batch / fsync / close at a time
        self._dirty_event = asyncio.Event()
        self._fsync_task: asyncio.Task[None] | None = None
        self._thread_work: asyncio.Future[Any] | None = None   # see _in_thread

    # -- the Sink interface --------------------------------------------------------------------

    def sink_counters(self) -> dict[str, int]:
        """:class:`~amid.sinks.base.ReportsCounters`: ``amid_sink_operations_total``."""
        stats = self.stats
        return {"reopen": stats.reopens_total, "rotation": stats.rotations_total,
                "truncation_found": stats.truncations_total, "fsync": stats.fsyncs_total,
                "write_error": stats.write_errors_total, "resumed_write": stats.completed_writes_total,
                "taken_back": stats.taken_back_total, "torn_line_repaired": stats.torn_lines_repaired_total}

    async def start(self) -> None:
        """Open (creating it if needed) the file. Raises SinkError if that fails."""
        if self._closed:
            raise SinkError(f"file sink {self.name!r} is closed")
        async with self._lock:
            await self._settle()
            if self._fd is None:
                await self._in_thread(self._open)
        if self.options.fsync == "interval" and not self._to_stdout and self._fsync_task is None:
            self._fsync_task = asyncio.create_task(
                self._fsync_periodically(), name=f"amid-file-sink-fsync-{self.name}")

    async def send(self, batch: Sequence[Record]) -> None:
        """Append every record of ``batch`` (one JSON document per line) or raise SinkError."""
        if not batch:
            return
        records = batch if isinstance(batch, (list, tuple)) else list(batch)
        data = b"\n".join(Record.jsons(records)) + b"\n"
        async with self._lock:
            if self._closed:
                raise SinkError(f"file sink {self.name!r} is closed")
            await self._settle()
            if self._fast_path_allowed(len(data)):
                self._write(data)
            else:
                await self._in_thread(self._deliver_slow, data)
                # Reached only if we were not cancelled: the runner now knows the batch is in.
                self._unconfirmed = None
        if self._dirty and self.options.fsync == "interval":
            self._dirty_event.set()

    def send_nowait(self, batch: Sequence[Record]) -> bool:
        """Append ``batch`` at once when that is a small plain append to the open file (the
        runner's hot path); return False, having written nothing, when :meth:`send` is needed."""
        if not batch or self._closed or self._lock.locked() or self._thread_work is not None:
            return False
        data = b"\n".join(Record.jsons(batch)) + b"\n"
        if not self._fast_path_allowed(len(data)):
            return False
        self._write(data)
        if self._dirty and self.options.fsync == "interval":
            self._dirty_event.set()
        return True

    async def close(self) -> None:
        """Flush (fsync unless ``fsync: never``) and close. Idempotent; never raises."""
        if self._closed:
            return
        self._closed = True
        await cancel_and_wait(self._fsync_task)
        self._fsync_task = None
        async with self._lock:
            await self._settle()
            if self._fd is not None:
                await self._in_thread(self._close_file)

    def reopen(self) -> None:
        """Reopen the path before the next write (the daemon calls this on SIGHUP)."""
        if not self._to_stdout:
            self._reopen_requested = True

    # -- decisions (on the loop) ---------------------------------------------------------------

    def _fast_path_allowed(self, nbytes: int) -> bool:
        """True when the batch is a plain small append to the already open file."""
        if self._fd is None or self._reopen_requested or self.options.fsync == "batch":
            return False
        if self._unconfirmed is not None or self._end_torn_line:
            return False
        if nbytes > INLINE_WRITE_LIMIT or not self._fd_is_regular:
            return False    # a pipe or terminal (stdout) can block for as long as its reader likes
        if self._clock() >= self._next_check:
            return False
        rotate_bytes = self.options.rotate_bytes
        return rotate_bytes is None or self._size == 0 or self._size + nbytes <= rotate_bytes

    # -- blocking work (in a thread, except the inline small write) ----------------------------

    async def _in_thread(self, func: Callable[..., Any], *args: Any) -> Any:
        """Run ``func`` in a thread; the caller holds ``_lock``.

        A thread cannot be cancelled. If our caller is (e.g. the runner's send timeout), the
        thread keeps the descriptor busy, so it stays recorded and :meth:`_settle` makes the
        next operation wait for it: no two threads ever use the descriptor at once, and close
        never pulls it away mid-write.
        """
        work = self._thread_work = asyncio.ensure_future(asyncio.to_thread(func, *args))
        try:
            return await asyncio.shield(work)
        finally:
            if work.done():
                self._thread_work = None

    async def _settle(self) -> None:
        """Wait for thread work left running by a cancelled caller (its outcome is moot)."""
        work = self._thread_work
        if work is None:
            return
        # That batch was already reported as cancelled; its errors were counted.
        with contextlib.suppress(Exception):
            await asyncio.shield(work)
        self._thread_work = None

    def _deliver_slow(self, data: bytes) -> None:
        """Settle an unconfirmed batch, check the path, reopen/rotate as needed, write, fsync
        per policy. On success the batch stays recorded as unconfirmed: :meth:`send` clears
        that once it returns (a cancelled send's batch is then known to be in the file)."""
        if self._unconfirmed is not None and self._resume(data):
            self._fsync_batch(data)
            self._unconfirmed = _Unconfirmed(self._fd_identity, data, len(data))
            return
        if self._fd is None or self._reopen_requested:
            if self._fd is not None:
                self._release_fd("reopen")
                self.stats.reopens_total += 1
            self._reopen_requested = False
            self._open()
        elif not self._to_stdout and self._clock() >= self._next_check:
            self._check_path()
        rotate_bytes = self.options.rotate_bytes
        if rotate_bytes is not None and self._size > 0 and self._size + len(data) > rotate_bytes:
            self._rotate()
        self._write(data)
        self._fsync_batch(data)
        self._unconfirmed = _Unconfirmed(self._fd_identity, data, len(data))

    def _fsync_batch(self, data: bytes) -> None:
        if self.options.fsync != "batch" or not self._fd_is_regular:
            return
        assert self._fd is not None
        try:
            os.fsync(self._fd)
        except OSError as exc:
            self.stats.write_errors_total += 1
            # The batch is written but not known durable: the retry of the same batch only
            # fsyncs again; another batch takes this one back first.
            self._unconfirmed = _Unconfirmed(self._fd_identity, data, len(data))
            raise _sink_error(self.name, "fsync", self.options.path, exc) from exc
        self.stats.fsyncs_total += 1
        self._dirty = False

    # -- unconfirmed bytes: complete or take back -----------------------------------------------

    def _resume(self, data: bytes) -> bool:
        """Settle the unconfirmed batch before writing ``data``; True if ``data`` is that very
        batch and is now complete in the file (only the rest was written)."""
        unconfirmed = self._unconfirmed
        assert unconfirmed is not None
        if self._fd is None or self._fd_identity != unconfirmed.identity:
            self._unconfirmed = None   # that file is no longer ours to touch
            return False
        if data != unconfirmed.data:
            self._take_back()          # raises SinkError if it cannot: retried by the next send
            return False
        try:
            intact = not self._fd_is_regular or self._tail_size(unconfirmed) is not None
        except OSError as exc:
            self.stats.write_errors_total += 1
            raise _sink_error(self.name, "read back the end of", self.options.path, exc) from exc
        if not intact:
            # The file no longer ends with our bytes: copytruncate copied them away and emptied
            # it, or someone else appended. Whole lines of ours went where they went: write the
            # rest. A torn part (its cut failed) would make the rest a torn line: write it all.
            if not unconfirmed.at_line_end:
                self._unconfirmed = None
                return False
            log.info("file sink %r: %s changed while a batch was unfinished; writing its rest "
                     "at the new end", self.name, self.options.path)
        rest = len(data) - unconfirmed.written
        self._write(data, unconfirmed.written)   # a new failure records the new progress
        if rest:
            self.stats.completed_writes_total += 1
            log.info("file sink %r: completed the batch a failed write left unfinished in %s "
                     "(%d of %d bytes were already there)", self.name, self.options.path,
                     unconfirmed.written, len(data))
        return True

    def _tail_size(self, unconfirmed: _Unconfirmed) -> int | None:
        """The file's size if it ends with exactly the unconfirmed bytes, else None. Raises
        OSError."""
        assert self._fd is not None
        size = os.fstat(self._fd).st_size
        written = unconfirmed.written
        if size < written:
            return None
        if not self._fd_readable:   # a write-only file (no read permission): trust the size
            return size if size == self._size else None
        return size if os.pread(self._fd, written, size - written) == unconfirmed.data[:written] else None

    def _cut_tail(self, unconfirmed: _Unconfirmed, keep: int) -> bool:
        """Truncate the unconfirmed bytes at the end of the file to their first ``keep``; False
        (nothing done) if the file no longer ends with them. Raises OSError."""
        assert self._fd is not None
        size = self._tail_size(unconfirmed)
        if size is None:
            return False
        end = size - unconfirmed.written + keep
        os.ftruncate(self._fd, end)
        if end and os.pread(self._fd, 1, end - 1) == b"\0":
            # copytruncate emptied the file between our check and our ftruncate, which then
            # made a hole of NULs (JSON never holds one): it was empty.
            os.ftruncate(self._fd, 0)
            end = 0
        self._size = end
        return True

    def _take_back(self) -> None:
        """Remove the unconfirmed bytes from the end of the file (or, on a stream that cannot
        be truncated, end the torn line). Raises SinkError if the file cannot be truncated."""
        unconfirmed = self._unconfirmed
        assert unconfirmed is not None and self._fd is not None
        path = self.options.path
        if not self._fd_is_regular:
            self._unconfirmed = None
            self._end_torn_line = not unconfirmed.at_line_end
            return
        try:
            cut = self._cut_tail(unconfirmed, 0)
        except OSError as exc:
            self.stats.write_errors_total += 1
            raise _sink_error(self.name, "truncate", path, exc) from exc
        self._unconfirmed = None
        if cut:
            self.stats.taken_back_total += 1
            log.warning("file sink %r: took back %d bytes of a batch that was not confirmed "
                        "from the end of %s", self.name, unconfirmed.written, path)
        else:
            log.warning("file sink %r: %s changed since a write failed; nothing taken back",
                        self.name, path)

    def _cut_torn_line(self, unconfirmed: _Unconfirmed) -> None:
        """Right after a failed write: cut its bytes back to the last whole line, so the file
        never shows a torn line, and keep the whole records (the retry writes the rest)."""
        whole = unconfirmed.data.rfind(b"\n", 0, unconfirmed.written) + 1
        if whole == unconfirmed.written or not self._fd_readable:
            return
        try:
            if not self._cut_tail(unconfirmed, whole):
                return          # someone else wrote meanwhile: the retry decides (see _resume)
        except OSError as exc:  # still torn: the retry completes it, or close takes it back
            log.warning("file sink %r: cannot cut a torn line from %s: %s",
                        self.name, self.options.path, exc)
            return
        self._unconfirmed = _Unconfirmed(unconfirmed.identity, unconfirmed.data, whole) if whole else None

    def _close_file(self) -> None:
        """Take back unconfirmed bytes (the runner spools or drops their batch), then close."""
        if self._unconfirmed is not None:
            try:
                self._take_back()
            except SinkError as exc:
                log.error("%s: %s ends with %d bytes of a batch that was not confirmed",
                          exc, self.options.path, self._unconfirmed.written)
        self._release_fd("close")

    def _open(self) -> None:
        path = self.options.path
        try:
            if self._to_stdout:
                fd, readable = os.dup(1), False   # our own descriptor: closing leaves stdout open
            else:
                fd, readable = _open_for_append(path, self.options.mode)
        except OSError as exc:
            raise _sink_error(self.name, "open", path, exc) from exc
        try:
            st = os.fstat(fd)
        except OSError as exc:
            os.close(fd)
            raise _sink_error(self.name, "stat", path, exc) from exc
        self._fd_is_regular = stat.S_ISREG(st.st_mode)
        self._fd_readable = readable and self._fd_is_regular
        size = st.st_size if self._fd_is_regular else 0
        if size and self._fd_readable:
            try:
                size = self._repair_torn_line(fd, size)
            except OSError as exc:
                os.close(fd)
                raise _sink_error(self.name, "repair the last line of", path, exc) from exc
        self._fd = fd
        self._fd_identity = (st.st_dev, st.st_ino)
        self._size = size
        self._end_torn_line = False
        self._next_check = self._clock() + self.options.check_interval

    def _repair_torn_line(self, fd: int, size: int) -> int:
        """End a last line that has no newline (a crash mid-write): with a newline if it is a
        whole JSON document, else by cutting it off. Returns the file's new size."""
        if os.pread(fd, 1, size - 1) == b"\n":
            return size
        line_start = 0
        end = size
        while end > 0 and size - end < TORN_LINE_SCAN_LIMIT:
            chunk_start = max(0, end - 65536)
            newline = os.pread(fd, end - chunk_start, chunk_start).rfind(b"\n")
            if newline >= 0:
                line_start = chunk_start + newline + 1
                break
            end = chunk_start
        else:
            if end > 0:     # no newline within the limit: not a line we wrote; start a new one
                os.write(fd, b"\n")
                return size + 1
        tail = os.pread(fd, size - line_start, line_start)
        self.stats.torn_lines_repaired_total += 1
        try:
            json.loads(tail)
        except ValueError:
            os.ftruncate(fd, line_start)
            log.warning("file sink %r: removed a torn last line of %d bytes from %s (a write "
                        "that was cut short)", self.name, size - line_start, self.options.path)
            return line_start
        os.write(fd, b"\n")
        log.warning("file sink %r: ended the last line of %s, a whole record without its newline",
                    self.name, self.options.path)
        return size + 1

    def _check_path(self) -> None:
        """Reopen if the path names another file now; notice truncation (copytruncate)."""
        self._next_check = self._clock() + self.options.check_interval
        assert self._fd is not None
        path = self.options.path
        try:
            path_identity: tuple[int, int] | None = _identity(os.stat(path))
        except FileNotFoundError:
            path_identity = None      # removed: reopening creates it again
        except OSError as exc:
            # The path is unusable (e.g. its directory was replaced). Never fall back to writing
            # into the old, possibly orphaned file: retry the path at the next send.
            self._reopen_requested = True
            raise _sink_error(self.name, "stat", path, exc) from exc
        if path_identity != self._fd_identity:
            log.info("file sink %r: %s was renamed or removed; reopening", self.name, path)
            self._release_fd("reopen")
            self.stats.reopens_total += 1
            self._open()
            return
        if not self._fd_is_regular:
            return
        try:
            size = os.fstat(self._fd).st_size
        except OSError as exc:
            raise _sink_error(self.name, "stat", path, exc) from exc
        # Smaller than what we wrote: someone truncated it (appends since then are counted in
        # both, others' appends only make it larger).
        if size < self._size:
            # O_APPEND already puts the next write at the new end; only our size is stale.
            log.info("file sink %r: %s was truncated (copytruncate); continuing at its end",
                     self.name, path)
            self.stats.truncations_total += 1
        self._size = size

    def _rotate(self) -> None:
        """path.N-1 -> path.N, ..., path -> path.1, then open a new path."""
        path, keep = self.options.path, self.options.rotate_keep
        self._release_fd("rotate")
        try:
            for n in range(keep - 1, 0, -1):
                try:
                    os.replace(f"{path}.{n}", f"{path}.{n + 1}")
                except FileNotFoundError:
                    pass
            os.replace(path, f"{path}.1")
        except OSError as exc:
            raise _sink_error(self.name, "rotate", path, exc) from exc
        self.stats.rotations_total += 1
        self._open()

    def _write(self, data: bytes, done: int = 0) -> None:
        """Write ``data`` from offset ``done``; one os.write unless the kernel takes less (then
        loop). On failure the bytes that did go in are recorded as unconfirmed."""
        assert self._fd is not None
        view = memoryview(data)[done:]
        try:
            if self._end_torn_line:
                # A stream (stdout) got half a line of a batch that was given up: end that line.
                os.write(self._fd, b"\n")
                self._end_torn_line = False
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
                done += written
                self._size += written
                self._dirty = True
        except OSError as exc:
            self.stats.write_errors_total += 1
            if done:
                self._unconfirmed = _Unconfirmed(self._fd_identity, data, done)
                self._cut_torn_line(self._unconfirmed)
            if self._to_stdout and exc.errno == errno.EPIPE:  # `amid ... | head`: for good
                raise SinkDisabled(f"file sink {self.name!r}: the reader of standard output is gone "
                                   "(EPIPE)") from exc
            # A new descriptor may cure ESTALE/EIO; for the rest reopening costs little.
            self._reopen_requested = not self._to_stdout
            raise _sink_error(self.name, "write to", self.options.path, exc) from exc

    def _release_fd(self, why: str) -> None:
        """fsync (unless ``never``) and close the current descriptor. Never raises."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if self._dirty and self._fd_is_regular and self.options.fsync != "never":
            try:
                os.fsync(fd)
                self.stats.fsyncs_total += 1
            except OSError as exc:
                self.stats.write_errors_total += 1
                log.warning("file sink %r: fsync of %s before %s failed: %s",
                            self.name, self.options.path, why, exc)
        self._dirty = False
        try:
            os.close(fd)
        except OSError as exc:
            log.warning("file sink %r: closing %s failed: %s", self.name, self.options.path, exc)

    # -- fsync: interval -----------------------------------------------------------------------

    async def _fsync_periodically(self) -> None:
        """Sync within ``fsync_interval`` of a write, and at most once per interval."""
        interval = self.options.fsync_interval
        while True:
            await self._dirty_event.wait()
            await asyncio.sleep(interval)
            self._dirty_event.clear()
            async with self._lock:
                await self._settle()
                if self._fd is None or not self._dirty or not self._fd_is_regular:
                    continue
                # fsync a duplicate so writers need not wait for the disk, and a concurrent
                # close cannot hand our descriptor number to another file mid-fsync.
                dup_fd = os.dup(self._fd)
                self._dirty = False
            try:
                await asyncio.to_thread(_fsync_and_close, dup_fd)
                self.stats.fsyncs_total += 1
            except asyncio.CancelledError:
                self._dirty = True   # this fsync may still be running: close() syncs again
                raise
            except OSError as exc:
                self.stats.write_errors_total += 1
                self._dirty = True
                log.warning("file sink %r: fsync of %s failed: %s",
                            self.name, self.options.path, exc)


def _open_for_append(path: str, mode: int) -> tuple[int, bool]:
    """Open ``path`` for appending; return the descriptor and whether it is also readable."""
    try:
        regular = stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        regular = True     # created as one (or os.open reports why it cannot be)
    if regular:
        try:
            return os.open(path, _OPEN_FLAGS | os.O_RDWR, mode), True
        except PermissionError:
            pass           # writable but not readable for us: append without reading back
    return os.open(path, _OPEN_FLAGS | os.O_WRONLY, mode), False


def _fsync_and_close(fd: int) -> None:
    # The thread closes the descriptor itself: a cancelled awaiter must not close it mid-fsync.
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino
