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
import errno
import logging
import os
import stat
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pydantic

from amid.records import Record
from amid.sinks.base import SinkError
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

_OPEN_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC


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
                raise ValueError(f"mode must be octal permission bits like 0640, not {value!r}")
        return value

    @pydantic.model_validator(mode="after")
    def _stdout_cannot_rotate(self) -> "Options":
        if self.path == STDOUT_PATH and self.rotate_bytes is not None:
            raise ValueError("rotate_bytes cannot be used with path '-' (standard output)")
        return self


@dataclass
class FileStats:
    """Plain counters read by the metrics collector."""

    reopens_total: int = 0          # the path was reopened (SIGHUP, rename/removal noticed)
    rotations_total: int = 0        # size rotations done by the sink itself
    truncations_total: int = 0      # the file was found truncated under us (copytruncate)
    bytes_written_total: int = 0
    fsyncs_total: int = 0
    write_errors_total: int = 0


def create(name: str, options: Options | Mapping[str, Any]) -> "FileSink":
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
        self._partial_line_in: tuple[int, int] | None = None   # file holding a torn line
        self._closed = False
        self._lock = asyncio.Lock()     # one batch / fsync / close at a time
        self._dirty_event = asyncio.Event()
        self._fsync_task: asyncio.Task[None] | None = None
        self._thread_work: asyncio.Future[Any] | None = None   # see _in_thread

    # -- the Sink interface --------------------------------------------------------------------

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
        data = b"\n".join(Record.jsons(batch)) + b"\n"
        async with self._lock:
            if self._closed:
                raise SinkError(f"file sink {self.name!r} is closed")
            await self._settle()
            if self._fast_path_allowed(len(data)):
                self._write(data)
            else:
                await self._in_thread(self._deliver_slow, data)
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
        if self._fsync_task is not None:
            self._fsync_task.cancel()
            try:
                await self._fsync_task
            except asyncio.CancelledError:
                pass
            self._fsync_task = None
        async with self._lock:
            await self._settle()
            if self._fd is not None:
                await self._in_thread(self._release_fd, "close")

    def reopen(self) -> None:
        """Reopen the path before the next write (the daemon calls this on SIGHUP)."""
        if not self._to_stdout:
            self._reopen_requested = True

    # -- decisions (on the loop) ---------------------------------------------------------------

    def _fast_path_allowed(self, nbytes: int) -> bool:
        """True when the batch is a plain small append to the already open file."""
        if self._fd is None or self._reopen_requested or self.options.fsync == "batch":
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
        try:
            await asyncio.shield(work)
        except Exception:
            pass    # that batch was already reported as cancelled; its errors were counted
        self._thread_work = None

    def _deliver_slow(self, data: bytes) -> None:
        """Check the path, reopen/rotate as needed, write, fsync per policy."""
        path = self.options.path
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
        if self.options.fsync == "batch" and self._fd_is_regular:
            try:
                os.fsync(self._fd)
            except OSError as exc:
                self.stats.write_errors_total += 1
                raise _sink_error(self.name, "fsync", path, exc) from exc
            self.stats.fsyncs_total += 1
            self._dirty = False

    def _open(self) -> None:
        path = self.options.path
        try:
            if self._to_stdout:
                fd = os.dup(1)   # our own descriptor: closing the sink leaves stdout open
            else:
                fd = os.open(path, _OPEN_FLAGS, self.options.mode)
        except OSError as exc:
            raise _sink_error(self.name, "open", path, exc) from exc
        try:
            st = os.fstat(fd)
        except OSError as exc:
            os.close(fd)
            raise _sink_error(self.name, "stat", path, exc) from exc
        self._fd = fd
        self._fd_identity = (st.st_dev, st.st_ino)
        self._fd_is_regular = stat.S_ISREG(st.st_mode)
        self._size = st.st_size if self._fd_is_regular else 0
        self._next_check = self._clock() + self.options.check_interval

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

    def _write(self, data: bytes) -> None:
        """Write all of ``data``; one os.write unless the kernel takes less (then loop)."""
        assert self._fd is not None
        if self._partial_line_in is not None and self._partial_line_in == self._fd_identity:
            # A failed write left half a line; end it so the next record starts on its own line.
            data = b"\n" + data
        view = memoryview(data)
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
                self._size += written
                self.stats.bytes_written_total += written
                self._dirty = True
        except OSError as exc:
            self.stats.write_errors_total += 1
            if len(view) < len(data):
                self._partial_line_in = self._fd_identity
            # A new descriptor may cure ESTALE/EIO; for the rest reopening costs little.
            self._reopen_requested = not self._to_stdout
            raise _sink_error(self.name, "write to", self.options.path, exc) from exc
        self._partial_line_in = None

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


def _fsync_and_close(fd: int) -> None:
    # The thread closes the descriptor itself: a cancelled awaiter must not close it mid-fsync.
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino
