"""Numbered streams: paced, real-looking events a test can account for, written as Asterisk writes.

Every logged-in session with events on gets its own stream (``AMISimulator(stream_rate=N)``, or
``amid simulate --stream-rate N``): real captured call events (Newchannel, VarSet, Hangup…), each
with two fields appended, ``AmidTestSession: <n>`` (the simulator's login number, one per amid
epoch) and ``AmidTestSeq: <k>`` (1, 2, … within that session). The simulator keeps, per session,
how many it wrote in full (:class:`StreamStats`): with what a client delivered, a test knows what
was lost, duplicated or never read.

Real Asterisk writes every event with its own ``write()`` to every session, so a client's read
holds a few events, not hundreds. ``write_mode="per-event"`` (the default) does the same: a
steady clock says how many events are due, the streamer sleeps to the next deadline and sends
what is due, each event its own ``send()`` on a ``TCP_NODELAY`` socket (asyncio's transport calls
``send`` at once while its buffer is empty). ``"chunked"`` joins the events due at one tick
into one write, the way a benchmark source floods.

Faults apply to the stream as to any event (``FaultConfig``): ``stall`` ends it silently (a
half-open peer), ``garbage`` is written before the next event, ``close_mid_message_after`` sends
half of an event and closes. Each fault point is recorded, so a test knows which events it spoiled.
"""

from __future__ import annotations

import asyncio
import math
import socket
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from .calls import prebuilt_call_events
from .model import SessionState

if TYPE_CHECKING:
    from .server import SimSession, SimulatorStats

__all__ = ["WRITE_MODES", "NumberedStream", "StreamStats", "WriteMode", "numbered_pool"]

WriteMode = Literal["per-event", "chunked"]
WRITE_MODES: tuple[WriteMode, ...] = ("per-event", "chunked")
SEQ_FIELD = "AmidTestSeq"
SESSION_FIELD = "AmidTestSession"
# Once behind the clock (a slow reader, a busy machine), catch up this many events per loop turn.
_MAX_BURST = 2000


@dataclass
class StreamStats:
    """What one session's numbered stream did. ``sent`` counts events written in full (handed to
    the transport; with a reader that keeps up, to the kernel): ``AmidTestSeq`` 1..sent."""

    session: int
    username: str
    peer: str
    rate: float
    write_mode: str
    started_at: float = field(default_factory=time.time)
    sent: int = 0
    bytes: int = 0
    open: bool = True
    ended_at: float | None = None
    end: str | None = None               # logoff, peer_closed, close_mid_message, half_open, restart…
    half_sent: int | None = None         # the seq cut in half by close_mid_message (not in sent)
    garbage_after: list[int] = field(default_factory=list)  # `sent` when garbage went out
    stalled_after: int | None = None     # `sent` when the stream went half-open
    other_events: int = 0                # events of the session that are not numbered (FullyBooted…)
    wakeups: int = 0                     # turns of the pacing loop (a busy wait would show here)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def numbered_pool(calls: int = 50, *, seed: int = 0) -> list[bytes]:
    """The events a stream cycles through: ``calls`` × 80 captured short-call events with
    distinct Uniqueids, each without its closing blank line (the numbered fields go there)."""
    return [raw[:-2] for raw in prebuilt_call_events(calls, seed=seed)]


class NumberedStream:
    """The paced writer of one session. Owned by the simulator, which runs :meth:`run` as a task."""

    def __init__(self, session: SimSession, sim_stats: SimulatorStats, stats: StreamStats,
                 pool: list[bytes], rate: float, write_mode: WriteMode,
                 running: asyncio.Event) -> None:
        if rate <= 0:
            raise ValueError(f"stream rate must be positive, got {rate}")
        if write_mode not in WRITE_MODES:
            raise ValueError(f"write mode must be one of {WRITE_MODES}, got {write_mode!r}")
        self.session = session
        self.stats = stats
        self._sim_stats = sim_stats
        self._pool = pool
        self._rate = rate
        self._mode = write_mode
        self._running = running
        self._tail = b"%s: %d\r\n%s: " % (SESSION_FIELD.encode(), stats.session, SEQ_FIELD.encode())

    def render(self, seq: int) -> bytes:
        """Event number ``seq`` (1-based) of this stream, blank line included."""
        return b"%b%b%d\r\n\r\n" % (self._pool[(seq - 1) % len(self._pool)], self._tail, seq)

    async def run(self) -> None:
        session = self.session
        transport = session.transport
        if self._mode == "per-event" and transport is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        loop = asyncio.get_running_loop()
        start = loop.time()
        rate = self._rate
        try:
            while session.state is SessionState.AUTHENTICATED:
                self.stats.wakeups += 1
                if session.writing_paused:
                    await session._writable.wait()
                    continue
                if not self._running.is_set():  # paused: resume on the clock, without a burst
                    await self._running.wait()
                    start = loop.time() - self.stats.sent / rate
                    continue
                elapsed = (loop.time() - start) * rate   # events due by now, and a fraction
                due = min(int(elapsed) + 1 - self.stats.sent, _MAX_BURST)
                if due > 0:
                    if not self._send(due):
                        break
                    await asyncio.sleep(0)
                    continue
                # Nothing due: sleep to the next deadline (one reading of the clock for both, or
                # rounding could call it due and not due at once), in whole milliseconds: uvloop
                # truncates a timer to the millisecond below and would spin to the deadline.
                await asyncio.sleep(math.ceil((self.stats.sent - elapsed) / rate * 1000) / 1000)
        finally:
            self.stats.open = False

    def _send(self, count: int) -> bool:
        """Send the next ``count`` events; False once the stream is over (a fault ended it)."""
        session = self.session
        faults = session.faults
        stats = self.stats
        chunk: list[bytes] | None = [] if self._mode == "chunked" else None

        def out(data: bytes) -> None:
            if chunk is None:
                session._write(data)
            else:
                chunk.append(data)

        ended = False
        sent = 0
        for _ in range(count):
            if faults.stall or session.state is not SessionState.AUTHENTICATED:
                if faults.stall and stats.stalled_after is None:
                    stats.stalled_after = stats.sent
                    stats.end = "half_open"
                ended = True
                break
            seq = stats.sent + 1
            raw = self.render(seq)
            if faults.garbage:
                garbage, faults.garbage = faults.garbage, None
                out(garbage)
                stats.garbage_after.append(stats.sent)
            remaining = faults.close_mid_message_after
            if remaining is not None:
                if remaining <= 0:
                    faults.close_mid_message_after = None
                    out(raw[:len(raw) // 2])
                    stats.half_sent = seq
                    session.end_reason = "close_mid_message"
                    ended = True
                    break
                faults.close_mid_message_after = remaining - 1
            out(raw)
            stats.sent = seq
            stats.bytes += len(raw)
            sent += 1
        if chunk:
            session._write(b"".join(chunk))
        self._sim_stats.events_sent += sent
        if stats.half_sent is not None and session.state is SessionState.AUTHENTICATED:
            session.close()
        return not ended
