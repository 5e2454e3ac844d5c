"""The AMI source of the receive and end-to-end benchmarks, run as its own process.

    python -m benchmarks.ami_server sim --events N --dump FILE
        amid's AMISimulator with ``stream_on_login=N``: every session gets its login answer,
        FullyBooted, SuccessfulAuth, then N pre-built call events as fast as the socket takes
        them. FILE receives the exact bytes of those N events (for the intact check).

    python -m benchmarks.ami_server replay --repeat K
        answers the login like Asterisk (plain ``Secret``, any ActionID), then streams the events
        of the real capture s09a (16,003 events) K times as fast as the socket takes them.

    python -m benchmarks.ami_server paced [--chunked]
        answers the login, then waits for commands on stdin, one per line:
        ``stream RATE COUNT`` sends COUNT pre-built call events to every logged-in session at RATE
        events/s (RATE 0: as fast as possible), then prints ``done SENT SECONDS``. Paced events
        are written the way Asterisk writes them: each event with its own ``send()`` on a
        TCP_NODELAY socket, at its own moment; ``--chunked`` sends what is due every millisecond
        in one write instead (the old, kinder source: a read then carries tens of events).

It prints ``port N`` once listening, and runs until stdin closes (or it is terminated).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from amid.ami.protocol import Parser, RemoteProtocolError

BANNER = b"Asterisk Call Manager/11.0.0\r\n"
SLICE = 256 * 1024
TICK = 0.001  # paced mode: send what is due every millisecond


def _prebuilt_events() -> list[bytes]:
    from amid.simulator.calls import prebuilt_call_events
    return prebuilt_call_events(50)


class StreamSession(asyncio.Protocol):
    """One client: banner, login answered, then whatever the server streams."""

    def __init__(self, server: StreamServer) -> None:
        self.server = server
        self.parser = Parser(expect_banner=False)
        self.transport: asyncio.Transport | None = None
        self.writable = asyncio.Event()
        self.writable.set()
        self.logged_in = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.set_write_buffer_limits(high=SLICE)
        self.transport.write(BANNER)

    def data_received(self, data: bytes) -> None:
        try:
            actions = self.parser.feed(data)
        except RemoteProtocolError:
            self.transport.close()
            return
        for action in actions:
            name = action.name.lower()
            aid = action.get("ActionID")
            head = b"Response: Success\r\n" + (f"ActionID: {aid}\r\n".encode() if aid else b"")
            if name == "login":
                self.transport.write(head + b"Message: Authentication accepted\r\n\r\n")
                self.logged_in = True
                self.server.on_login(self)
            elif name == "logoff":
                self.transport.write(b"Response: Goodbye\r\n" + head[19:]
                                     + b"Message: Thanks for all the fish.\r\n\r\n")
                self.transport.close()
            elif name == "ping":
                self.transport.write(head + f"Ping: Pong\r\nTimestamp: {time.time():.6f}\r\n\r\n"
                                     .encode())
            else:
                self.transport.write(head + b"Message: ok\r\n\r\n")

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.writable.set()
        self.server.sessions.discard(self)


class StreamServer:
    """Streams a pre-rendered blob of events (or paced slices of it) to logged-in sessions."""

    def __init__(self, events: list[bytes], *, stream_on_login: int = 0,
                 per_event: bool = False) -> None:
        self.events = events
        self.per_event = per_event
        self.blob = b"".join(events)
        self.ends = []
        total = 0
        for raw in events:
            total += len(raw)
            self.ends.append(total)
        self.stream_on_login = stream_on_login
        self.sessions: set[StreamSession] = set()
        self.tasks: set[asyncio.Task] = set()

    def on_login(self, session: StreamSession) -> None:
        self.sessions.add(session)
        if self.stream_on_login:
            self._spawn(self.stream(session, self.stream_on_login, rate=0))

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def _span(self, start: int, count: int) -> list[memoryview]:
        """The bytes of events start..start+count of the endless cycle of the blob."""
        pool = len(self.ends)
        view = memoryview(self.blob)
        out = []
        while count > 0:
            idx = start % pool
            n = min(count, pool - idx)
            lo = self.ends[idx - 1] if idx else 0
            out.append(view[lo:self.ends[idx + n - 1]])
            start += n
            count -= n
        return out

    async def stream(self, session: StreamSession, count: int, rate: float) -> int:
        """Send ``count`` events; ``rate`` events/s (0: as fast as the socket takes them)."""
        if rate > 0 and self.per_event:
            return await self._stream_per_event(session, count, rate)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        sent = 0
        while sent < count and not session.closed:
            if rate > 0:
                due = min(count, int((loop.time() - t0) * rate) + 1)
                if due <= sent:
                    await asyncio.sleep(TICK)
                    continue
                batch = due - sent
            else:
                batch = min(count - sent, 700)  # about 256 KiB of call events
            await session.writable.wait()
            if session.closed:
                break
            for piece in self._span(sent, batch):
                session.transport.write(piece)
            sent += batch
            if rate <= 0:
                await asyncio.sleep(0)
        return sent


    async def _stream_per_event(self, session: StreamSession, count: int, rate: float) -> int:
        """Each event its own write (one ``send()``: asyncio writes at once while the socket
        keeps up, and sets TCP_NODELAY), each at its own due time. The loop's timers are only
        good to a millisecond, so gaps shorter than that are waited out by yielding (this
        process spins, as a busy Asterisk would be busy)."""
        loop = asyncio.get_running_loop()
        events, pool = self.events, len(self.events)
        t0 = loop.time()
        interval = 1.0 / rate
        sent = 0
        while sent < count and not session.closed:
            due = t0 + sent * interval
            gap = due - loop.time()
            if gap > 0.002:
                await asyncio.sleep(gap - 0.001)
                continue
            if gap > 0:
                await asyncio.sleep(0)
                continue
            if not session.writable.is_set():
                await session.writable.wait()
                if session.closed:
                    break
            raw = events[sent % pool]
            cut = raw.index(b"\r\n") + 2  # after the Event: line
            session.transport.write(b"%sBenchSent: %.6f\r\n%s" % (raw[:cut], time.time(), raw[cut:]))
            sent += 1
        return sent


    async def stream_to_all(self, sessions: list[StreamSession], count: int, rate: float) -> list[int]:
        """Per-event writes to many sessions on one timeline: at each event's due time, every
        session gets it with its own write (as Asterisk sends an event to every manager
        session at once). One loop, not one spinning coroutine a session."""
        loop = asyncio.get_running_loop()
        events, pool = self.events, len(self.events)
        t0 = loop.time()
        interval = 1.0 / rate
        sent = [0] * len(sessions)
        for k in range(count):
            gap = t0 + k * interval - loop.time()
            if gap > 0.002:
                await asyncio.sleep(gap - 0.001)
            while t0 + k * interval > loop.time():
                await asyncio.sleep(0)
            raw = events[k % pool]
            cut = raw.index(b"\r\n") + 2
            for i, session in enumerate(sessions):
                if session.closed:
                    continue
                if not session.writable.is_set():
                    await session.writable.wait()
                session.transport.write(b"%sBenchSent: %.6f\r\n%s" % (raw[:cut], time.time(), raw[cut:]))
                sent[i] += 1
        return sent


async def _serve_stream(server: StreamServer, commands: bool) -> None:
    loop = asyncio.get_running_loop()
    listener = await loop.create_server(lambda: StreamSession(server), "127.0.0.1", 0)
    print(f"port {listener.sockets[0].getsockname()[1]}", flush=True)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = (await reader.readline()).decode().split()
        if not line:
            if reader.at_eof():
                break
            continue
        if commands and line[0] == "stream":
            rate, count = float(line[1]), int(line[2])
            started = time.perf_counter()
            sessions = list(server.sessions)
            if rate > 0 and server.per_event and len(sessions) > 1:
                sent = await server.stream_to_all(sessions, count, rate)
            else:
                sent = await asyncio.gather(*(server.stream(s, count, rate) for s in sessions))
            print(f"done {sum(sent)} {time.perf_counter() - started:.6f}", flush=True)
        elif line[0] == "sessions":
            print(f"sessions {len(server.sessions)}", flush=True)
    listener.close()
    for session in list(server.sessions):
        session.transport.abort()


async def _serve_simulator(events: int, dump: Path | None) -> None:
    from amid.simulator.server import AMISimulator
    sim = AMISimulator(stream_on_login=events, auth_failure_delay=0.1)
    # Render the pre-built stream now, not inside the first client's measurement.
    blob, ends = sim.prebuilt_stream()
    if dump is not None:
        probe = StreamServer([])
        probe.blob, probe.ends = blob, ends
        with dump.open("wb") as out:
            for piece in probe._span(0, events):
                out.write(piece)
    await sim.start()
    print(f"port {sim.port}", flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while await reader.readline():
        pass
    await sim.close(shutdown_event=False, timeout=1.0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=("sim", "replay", "paced"))
    p.add_argument("--events", type=int, default=40_000)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--dump", type=Path, default=None)
    p.add_argument("--uvloop", action="store_true")
    p.add_argument("--chunked", action="store_true",
                   help="paced mode: what is due every millisecond in one write")
    args = p.parse_args(argv)
    if args.mode == "sim":
        coro = _serve_simulator(args.events, args.dump)
    elif args.mode == "replay":
        from benchmarks.common import s09a_events
        events = s09a_events()
        if args.dump is not None:
            args.dump.write_bytes(b"".join(events) * args.repeat)
        coro = _serve_stream(StreamServer(events, stream_on_login=len(events) * args.repeat), False)
    else:
        coro = _serve_stream(StreamServer(_prebuilt_events(), per_event=not args.chunked), True)
    if args.uvloop:
        import uvloop
        uvloop.run(coro)
    else:
        asyncio.run(coro)


if __name__ == "__main__":
    main()
