"""Spool: an append-only, checksummed, size-capped segment log on disk.

The spool is what lets a sink be unplugged for hours without losing events: records that
cannot be delivered now are appended here and leave only after the sink confirmed them.

Layout of the spool directory::

    0000000000000001.seg   segments, numbered monotonically, rolled at ``segment_bytes``
    0000000000000002.seg
    cursor                 where the first unconfirmed record starts (written atomically)
    lock                   flock()ed while a process has the spool open

Each record is framed as ``MAGIC (4) | length (u32 BE) | crc32 (u32 BE) | payload``; the CRC
covers the magic, the length and the payload, so a damaged length is caught too.

Recovery on open never refuses to start: a damaged span in the middle of a segment is skipped
by resynchronising on the next valid frame, a damaged tail (a write cut short by ``kill -9`` or
a power cut) is truncated, and both are counted in ``corrupt_records_total``.

Thread model. :meth:`Spool.append` buffers in memory and :meth:`Spool.write` hands the buffer
to the kernel with one ``write()`` and no fsync: both are cheap enough for the event loop (a
``write()`` to the page cache is a copy), and a record written so survives ``kill -9`` of the
process, only not a power cut. Everything else that touches the disk (:meth:`sync`'s fsync,
:meth:`read_batch`, :meth:`ack`, :meth:`close`, and opening) is blocking and meant to run in a
worker thread (``asyncio.to_thread``). Three locks keep that safe: a short one around the
in-memory buffer and counters, one around the write end (appending, rolling segments), and one
serialising the read end (reading, acknowledging, the cursor). An fsync never holds the write
end's lock, so the event loop never waits for one.
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

__all__ = ["DEFAULT_SEGMENT_BYTES", "HEADER_SIZE", "Spool", "SpoolFull", "SpoolLocked", "SpoolPosition"]

log = logging.getLogger("amid.sinks.spool")

DEFAULT_SEGMENT_BYTES = 8 * 1024 * 1024

MAGIC = b"\x89AMS"
_HEADER = struct.Struct(">4sII")  # magic, payload length, crc32(magic + length + payload)
HEADER_SIZE = _HEADER.size

_CURSOR = struct.Struct(">4sQQI")  # magic, segment, offset, crc32 of the first three
_CURSOR_MAGIC = b"AMSC"
_CURSOR_NAME = "cursor"
_LOCK_NAME = "lock"
_SEGMENT_SUFFIX = ".seg"
# Bytes read per disk access when walking a segment; a bigger record is read whole anyway.
_READ_WINDOW = 256 * 1024


class SpoolFull(Exception):
    """Appending would take the spool over its ``max_bytes`` cap."""


class SpoolLocked(OSError):
    """Another process already has this spool directory open."""


class SpoolPosition(NamedTuple):
    """A place in the log: a segment number and a byte offset inside it (ordered)."""

    segment: int
    offset: int


class _Frame(NamedTuple):
    segment: int
    start: int
    end: int
    payload: bytes | None  # None: a damaged span that is skipped


def encode_frame(payload: bytes) -> bytes:
    """Frame one payload (magic, length, crc32, payload)."""
    head = MAGIC + len(payload).to_bytes(4, "big")
    crc = zlib.crc32(payload, zlib.crc32(head))
    return head + crc.to_bytes(4, "big") + payload


def _frame_at(data: bytes, i: int) -> int:
    """Length of the valid frame starting at ``data[i]``; 0 if invalid, -1 if cut off."""
    if len(data) - i < HEADER_SIZE:
        return -1 if MAGIC.startswith(data[i:i + 4][:len(MAGIC)]) else 0
    magic, length, crc = _HEADER.unpack_from(data, i)
    if magic != MAGIC:
        return 0
    end = i + HEADER_SIZE + length
    if end > len(data):
        return -1
    if zlib.crc32(data[i + HEADER_SIZE:end], zlib.crc32(data[i:i + 8])) != crc:
        return 0
    return HEADER_SIZE + length


def parse_frames(data: bytes, segment: int, base: int, *, final: bool) -> list[_Frame]:
    """Split ``data`` (the bytes of ``segment`` starting at offset ``base``) into frames.

    Valid frames carry their payload; damaged spans come out as frames with payload None,
    ending where the next valid frame starts. With ``final`` the data runs to the end of the
    segment, so a cut-off frame at the end is a damaged tail; without it, parsing stops before
    a frame that may be completed by more data.
    """
    frames: list[_Frame] = []
    i, n = 0, len(data)
    while i < n:
        size = _frame_at(data, i)
        if size > 0:
            frames.append(_Frame(segment, base + i, base + i + size, data[i + HEADER_SIZE:i + size]))
            i += size
            continue
        if size < 0 and not final:
            break
        # Damaged: resynchronise on the next magic that starts a valid frame.
        j = data.find(MAGIC, i + 1)
        while j != -1:
            next_size = _frame_at(data, j)
            if next_size > 0:
                break
            if next_size < 0 and not final:
                return frames  # cannot decide yet: the caller reads the rest and parses again
            j = data.find(MAGIC, j + 1)
        if j == -1 and not final:
            return frames  # the next valid frame may start beyond this window
        end = n if j == -1 else j
        frames.append(_Frame(segment, base + i, base + end, None))
        i = end
    return frames


def _segment_name(number: int) -> str:
    return f"{number:016d}{_SEGMENT_SUFFIX}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """A durable FIFO of byte payloads in a directory (see the module docstring).

    Opening scans and repairs the directory, so construct it in a worker thread. Positions
    returned by :meth:`read_batch` are the positions *after* each record: ``ack(pos)`` confirms
    every record up to and including the one that ended at ``pos``.
    """

    def __init__(self, directory: Path, *, max_bytes: int,
                 segment_bytes: int = DEFAULT_SEGMENT_BYTES,
                 opener: Callable[..., int] = os.open,
                 pwrite: Callable[[int, bytes, int], int] = os.pwrite,
                 write: Callable[[int, Any], int] = os.write) -> None:
        """``opener`` (``os.open``'s signature) opens the segments and the cursor file,
        ``write`` appends to a segment and ``pwrite`` rewrites the cursor; tests pass ones that
        fail, to make a disk-full or out-of-descriptors error on demand."""
        if max_bytes <= 0 or segment_bytes <= 0:
            raise ValueError("max_bytes and segment_bytes must be positive")
        self.directory = Path(directory)
        self._open = opener
        self._pwrite = pwrite
        self._write = write
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.corrupt_records_total = 0   # damaged spans skipped or truncated (each counts once)
        self.lost_on_close = 0           # records close() could not write (its sync failed)
        self.corrupt_bytes_total = 0

        self._buf_lock = threading.Lock()   # _pending and the counters; held only briefly
        self._append_lock = threading.Lock()  # the write end: segment writes, rolls (no fsync)
        self._io_lock = threading.RLock()   # the read end: reads, acks, the cursor
        self._pending: list[bytes] = []     # appended, not yet written to a segment
        self._pending_bytes = 0             # framed size of _pending
        self._disk_unacked = 0              # bytes in segments after the cursor
        self._events = 0                    # records not yet acked (disk + pending)
        self._sizes: dict[int, int] = {}    # segment number -> size, ascending
        self._cursor = SpoolPosition(0, 0)
        self._write_fd = -1
        self._write_segment = 0
        self._unsynced = False              # the write segment holds data not yet fsynced
        self._rolled_fds: list[int] = []    # finished segments still to fsync, then close
        self._dir_unsynced = False          # a new segment's name is not yet fsynced
        self._cursor_fd = -1                # the cursor file, rewritten in place on every ack
        self._read_fds: dict[int, int] = {}  # segment -> descriptor the read end reads it with
        self._cursor_unsynced = False       # written since the last fsync
        self._closed = False
        # Ends of the records handed out by the last read_batch -> how many records from the
        # cursor they close, so ack() can count without reading the disk again.
        self._read_marks: tuple[SpoolPosition, dict[SpoolPosition, int]] | None = None

        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.directory / _LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise SpoolLocked(f"spool {self.directory} is in use by another process") from None
        try:
            self._recover()
        except BaseException:
            self._release()
            raise

    # -- state visible to the owner -------------------------------------------------------

    @property
    def bytes_used(self) -> int:
        """Bytes of records not yet acked (on disk or buffered), framing included."""
        with self._buf_lock:  # a writer thread moves bytes between the two counters
            return self._disk_unacked + self._pending_bytes

    @property
    def events_pending(self) -> int:
        """Records not yet acked."""
        return self._events

    @property
    def free_bytes(self) -> int:
        """Bytes that can still be appended, framing included (``HEADER_SIZE`` per record)."""
        return self.max_bytes - self.bytes_used

    def can_append(self, payload_size: int) -> bool:
        """Whether one payload of ``payload_size`` bytes fits under ``max_bytes`` right now."""
        return self.bytes_used + HEADER_SIZE + payload_size <= self.max_bytes

    # -- writing ---------------------------------------------------------------------------

    def append(self, payloads: Sequence[bytes], *, sync: bool = False) -> None:
        """Append ``payloads`` (all or none); raise :class:`SpoolFull` if they do not fit.

        Without ``sync`` this only buffers in memory (safe on the event loop): the owner calls
        :meth:`write` (on the loop) to hand them to the kernel, and :meth:`sync` (in a thread)
        at least every fsync interval. With ``sync`` the records are written and fsynced before
        returning (blocking).
        """
        if self._closed:
            raise RuntimeError("spool is closed")
        size = sum(HEADER_SIZE + len(p) for p in payloads)
        with self._buf_lock:
            used = self._disk_unacked + self._pending_bytes
            if used + size > self.max_bytes:
                raise SpoolFull(f"spool {self.directory} full ({used} of {self.max_bytes} bytes)")
            self._pending.extend(bytes(p) for p in payloads)
            self._pending_bytes += size
            self._events += len(payloads)
        if sync:
            self.sync()

    @property
    def needs_sync(self) -> bool:
        """Whether records were appended since the last :meth:`sync`."""
        return bool(self._pending) or self._unsynced or bool(self._rolled_fds) or self._cursor_unsynced

    @property
    def unwritten(self) -> int:
        """Records appended but not yet handed to the kernel (lost if the process dies now)."""
        return len(self._pending)

    def write(self) -> None:
        """Hand buffered records to the kernel now, without fsync (cheap; see the module
        docstring). On an I/O error (disk full) they stay buffered and the error is raised."""
        with self._append_lock:
            if self._closed or not self._pending:
                return
            self._write_pending()

    def sync(self) -> None:
        """Write buffered records and fsync everything written so far (blocking)."""
        with self._append_lock:
            if self._closed:
                return
            self._write_pending()
            rolled, self._rolled_fds = self._rolled_fds, []
            current = os.dup(self._write_fd) if self._unsynced else -1
            self._unsynced = False
            dir_unsynced, self._dir_unsynced = self._dir_unsynced, False
        with self._io_lock:  # the read end's cursor, written by acks
            cursor = os.dup(self._cursor_fd) if self._cursor_unsynced and self._cursor_fd >= 0 else -1
            self._cursor_unsynced = False
        if cursor >= 0:
            rolled = [*rolled, cursor]
        # The fsyncs run outside the write end's lock: appends go on meanwhile.
        try:
            for fd in rolled:
                os.fsync(fd)
            if current >= 0:
                os.fsync(current)
            if dir_unsynced:
                _fsync_dir(self.directory)
        except OSError:
            with self._append_lock:
                self._unsynced = True
                self._dir_unsynced = self._dir_unsynced or dir_unsynced
            if cursor >= 0:
                self._cursor_unsynced = True
            raise
        finally:
            for fd in rolled:
                os.close(fd)
            if current >= 0:
                os.close(current)

    def _write_pending(self) -> None:
        with self._buf_lock:
            payloads, self._pending = self._pending, []
            moved = self._pending_bytes
            self._pending_bytes = 0
            self._disk_unacked += moved  # counted as on disk from now on: bytes_used stays exact
        written = 0  # records of ``payloads`` that are whole in a segment
        chunk, in_chunk = bytearray(), 0
        try:
            for payload in payloads:
                frame = encode_frame(payload)
                size = self._sizes[self._write_segment] + len(chunk)
                if size and size + len(frame) > self.segment_bytes:
                    self._write_chunk(chunk)
                    written += in_chunk
                    chunk, in_chunk = bytearray(), 0
                    self._roll()
                chunk += frame
                in_chunk += 1
            self._write_chunk(chunk)
        except OSError:
            # Disk full or I/O error: keep the unwritten records buffered, so a later sync can
            # try again and nothing is silently lost.
            unwritten = payloads[written:]
            size = sum(HEADER_SIZE + len(p) for p in unwritten)
            with self._buf_lock:
                self._pending[:0] = unwritten
                self._pending_bytes += size
                self._disk_unacked -= size
            raise

    def _write_chunk(self, chunk: bytearray) -> None:
        """Append whole frames to the write segment; on failure cut back to the last whole one."""
        if not chunk:
            return
        committed = self._sizes[self._write_segment]
        view = memoryview(chunk)
        try:
            while view:
                view = view[self._write(self._write_fd, view):]
        except OSError:
            try:
                os.ftruncate(self._write_fd, committed)
            except OSError:
                pass  # recovery on the next open truncates a partial frame anyway
            raise
        self._sizes[self._write_segment] = committed + len(chunk)
        self._unsynced = True

    def _roll(self) -> None:
        """Start the next segment; the full one is fsynced and closed by the next :meth:`sync`
        (a roll may happen on the event loop, which must not wait for an fsync)."""
        # The next segment opens before the old one is let go: if it cannot (EMFILE, ENOSPC),
        # the spool keeps a usable write segment and a later write simply tries again.
        old_fd = self._write_fd
        self._open_write_segment(self._write_segment + 1)
        if self._unsynced:
            self._rolled_fds.append(old_fd)
        else:
            os.close(old_fd)
        self._unsynced = False

    def _open_write_segment(self, number: int) -> None:
        path = self.directory / _segment_name(number)
        fd = self._open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        if number not in self._sizes:
            self._sizes[number] = os.fstat(fd).st_size
            self._dir_unsynced = True  # the new file's name must survive a power cut too
        self._write_fd, self._write_segment = fd, number

    # -- reading and confirming ------------------------------------------------------------

    def read_batch(self, max_events: int, max_bytes: int) -> list[tuple[SpoolPosition, bytes]]:
        """Return up to ``max_events`` records (payload bytes up to ``max_bytes``, but at least
        one) from the unacked head, each with the position to :meth:`ack` it. Does not consume.
        """
        out: list[tuple[SpoolPosition, bytes]] = []
        marks: dict[SpoolPosition, int] = {}
        total = 0
        with self._io_lock:
            if self._closed:
                raise RuntimeError("spool is closed")
            self.write()  # so records appended a moment ago are readable already
            for frame in self._iter_frames(self._cursor):
                if frame.payload is None:
                    continue  # counted when the spool was opened
                size = len(frame.payload)
                if out and (len(out) >= max_events or total + size > max_bytes):
                    break
                position = SpoolPosition(frame.segment, frame.end)
                out.append((position, frame.payload))
                marks[position] = len(out)
                total += size
                if len(out) >= max_events:
                    break
            self._read_marks = (self._cursor, marks)
        return out

    def ack(self, position: SpoolPosition) -> None:
        """Confirm every record up to ``position``; delete segments that are fully confirmed."""
        with self._io_lock:
            if self._closed:
                raise RuntimeError("spool is closed")
            position = SpoolPosition(*position)
            if position <= self._cursor:
                return
            if position.segment not in self._sizes or position.offset > self._sizes[position.segment]:
                raise ValueError(f"ack position {position} is not in the spool")
            count = None
            if self._read_marks is not None and self._read_marks[0] == self._cursor:
                count = self._read_marks[1].get(position)
            if count is None:
                count = sum(1 for f in self._iter_frames(self._cursor, stop=position)
                            if f.payload is not None)
            released = self._distance(self._cursor, position)
            self._move_cursor(position)
            with self._buf_lock:
                self._events -= count
                self._disk_unacked -= released

    def _distance(self, start: SpoolPosition, end: SpoolPosition) -> int:
        total = 0
        for number, size in list(self._sizes.items()):  # one C call: the write end may add keys
            if start.segment <= number <= end.segment:
                lo = start.offset if number == start.segment else 0
                hi = end.offset if number == end.segment else size
                total += hi - lo
        return total

    def _move_cursor(self, position: SpoolPosition) -> None:
        """Persist the new cursor, then delete the segments it has left behind."""
        # A cursor at the very end of a finished segment means the start of the next one.
        while position.segment != self._write_segment and position.offset >= self._sizes[position.segment]:
            position = SpoolPosition(min(n for n in self._sizes if n > position.segment), 0)
        # The file first: if writing it fails (disk full), nothing has moved and the caller's
        # retry of the same ack does the whole of it.
        self._write_cursor_file(position)
        self._cursor = position
        self._read_marks = None
        for number in [n for n in list(self._sizes) if n < position.segment]:
            try:
                (self.directory / _segment_name(number)).unlink()
            except FileNotFoundError:
                pass
            except OSError:
                continue  # behind the cursor: the next move (or the next open) removes it
            self._forget_segment(number)
            del self._sizes[number]

    def _write_cursor_file(self, position: SpoolPosition) -> None:
        """Overwrite the cursor in place (one ``pwrite``, no fsync: an ack is on the hot path).

        The write survives ``kill -9`` at once; :meth:`sync` fsyncs it with the segments. A power
        cut can leave it older (those records are delivered again: at-least-once) or, should the
        24 bytes tear, damaged: its CRC then fails and delivery restarts at the oldest segment.
        """
        head = _CURSOR_MAGIC + position.segment.to_bytes(8, "big") + position.offset.to_bytes(8, "big")
        data = head + zlib.crc32(head).to_bytes(4, "big")
        if self._cursor_fd < 0:
            self._cursor_fd = self._open(self.directory / _CURSOR_NAME, os.O_RDWR | os.O_CREAT, 0o600)
            self._dir_unsynced = True  # the file may be new: its name must survive a power cut
        self._pwrite(self._cursor_fd, data, 0)
        self._cursor_unsynced = True

    def _read_cursor_file(self) -> SpoolPosition | None:
        try:
            data = (self.directory / _CURSOR_NAME).read_bytes()
        except FileNotFoundError:
            return None
        if len(data) == _CURSOR.size:
            magic, segment, offset, crc = _CURSOR.unpack(data)
            if magic == _CURSOR_MAGIC and zlib.crc32(data[:-4]) == crc:
                return SpoolPosition(segment, offset)
        # Redelivering from the oldest segment is safe (at-least-once); guessing is not.
        log.warning("spool %s: cursor file is damaged; redelivering from the oldest segment",
                    self.directory)
        return None

    def _iter_frames(self, start: SpoolPosition,
                     stop: SpoolPosition | None = None) -> Iterator[_Frame]:
        """Frames from ``start`` onwards (up to ``stop``), across segments, read in windows."""
        for number, size in list(self._sizes.items()):
            if number < start.segment or (stop is not None and number > stop.segment):
                continue
            pos = start.offset if number == start.segment else 0
            end = size if stop is None or number < stop.segment else min(size, stop.offset)
            if pos >= end:
                continue
            fd = self._read_fd(number)
            window = _READ_WINDOW
            while pos < end:
                data = os.pread(fd, min(window, end - pos), pos)
                final = pos + len(data) >= end
                frames = parse_frames(data, number, pos, final=final)
                if not frames:
                    window = end - pos  # a frame bigger than the window, or damage: read it all
                    continue
                for frame in frames:
                    yield frame
                    pos = frame.end

    def _read_fd(self, number: int) -> int:
        """A descriptor to read segment ``number`` with (kept open until the segment goes)."""
        fd = self._read_fds.get(number)
        if fd is None:
            fd = self._read_fds[number] = os.open(self.directory / _segment_name(number), os.O_RDONLY)
        return fd

    def _forget_segment(self, number: int) -> None:
        fd = self._read_fds.pop(number, None)
        if fd is not None:
            os.close(fd)

    # -- opening, closing ------------------------------------------------------------------

    def _recover(self) -> None:
        """Scan the directory: find the cursor, count records, skip or truncate damage."""
        numbers = sorted(int(p.name[:-len(_SEGMENT_SUFFIX)]) for p in self.directory.iterdir()
                         if p.name.endswith(_SEGMENT_SUFFIX) and p.name[:-len(_SEGMENT_SUFFIX)].isdigit())
        stored = cursor = self._read_cursor_file()
        if cursor is None:
            cursor = SpoolPosition(numbers[0] if numbers else 1, 0)
        for number in numbers:
            path = self.directory / _segment_name(number)
            if number < cursor.segment:
                path.unlink()  # fully acked before a crash between cursor write and delete
                continue
            self._sizes[number] = path.stat().st_size
        if not self._sizes:
            # Numbers stay monotonic across restarts: never reuse one the cursor has passed.
            first = cursor.segment + 1 if stored is not None else cursor.segment
            self._open_write_segment(first)
            cursor = SpoolPosition(first, 0)
        elif cursor.segment not in self._sizes:
            cursor = SpoolPosition(min(self._sizes), 0)
        else:
            cursor = SpoolPosition(cursor.segment, min(cursor.offset, self._sizes[cursor.segment]))
        self._cursor = cursor

        events = 0
        for number in list(self._sizes):
            start = cursor.offset if number == cursor.segment else 0
            path = self.directory / _segment_name(number)
            with open(path, "rb") as f:
                f.seek(start)
                data = f.read()
            frames = parse_frames(data, number, start, final=True)
            for frame in frames:
                if frame.payload is not None:
                    events += 1
                else:
                    self.corrupt_records_total += 1
                    self.corrupt_bytes_total += frame.end - frame.start
                    log.warning("spool %s: skipped %d damaged bytes in %s at offset %d",
                                self.directory, frame.end - frame.start, path.name, frame.start)
            if frames and frames[-1].payload is None:
                # A damaged tail is dropped for good, so appends continue from a clean end.
                with open(path, "r+b") as f:
                    f.truncate(frames[-1].start)
                    os.fsync(f.fileno())
                self._sizes[number] = frames[-1].start
        self._events = events
        self._disk_unacked = self._distance(cursor, SpoolPosition(max(self._sizes),
                                                                  self._sizes[max(self._sizes)]))
        if self._write_fd < 0:
            self._open_write_segment(max(self._sizes))
        if stored != cursor:
            self._move_cursor(cursor)

    def close(self) -> None:
        """Write and fsync what is buffered, then release the directory. Idempotent."""
        with self._io_lock:
            if self._closed:
                return
            try:
                self.sync()
            except OSError:
                # What could not be written is lost with the process: say how much, so the
                # owner counts it as dropped instead of spooled.
                with self._buf_lock:
                    self.lost_on_close = len(self._pending)
                    self._events -= self.lost_on_close
                raise
            finally:
                with self._append_lock:
                    self._closed = True
                    self._release()

    def _release(self) -> None:
        for number in list(self._read_fds):
            self._forget_segment(number)
        if self._cursor_fd >= 0:
            os.close(self._cursor_fd)
            self._cursor_fd = -1
        for fd in self._rolled_fds:
            os.close(fd)
        self._rolled_fds = []
        if self._write_fd >= 0:
            os.close(self._write_fd)
            self._write_fd = -1
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = -1
