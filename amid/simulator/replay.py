"""Replay mode: serve a raw capture (``*.raw`` or ``amid tail --raw`` output) to every client.

Two ways to play it:

* ``interactive=True`` (the default): the server answers the client's own actions (any
  Login/Challenge is accepted, Ping gets Pong, Logoff Goodbye, anything else an error) and,
  once the client has logged in, plays every *event* of the capture byte for byte. This is
  what a client such as ``amid tail`` needs: the capture's responses carry the ActionIDs of
  the session that recorded them, which a new client never sent.
* ``interactive=False``: the capture as it is, banner first, byte for byte; the client's
  actions are read and dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl as ssl_module
import time
from collections.abc import Callable
from pathlib import Path
from typing import Self

from amid.ami.protocol import Message, Parser, RemoteProtocolError, recover_bytes

__all__ = ["ReplayServer", "load_chunks", "replay"]

_SLICE = 64 * 1024


def load_chunks(raw_path: Path) -> list[tuple[float, int]] | None:
    """``(seconds since connect, size)`` of every read in the ``.chunks`` file next to the
    capture, or None if there is none."""
    chunks_path = raw_path.with_suffix(".chunks")
    if not chunks_path.exists():
        return None
    out = []
    for line in chunks_path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] == "RECV":
            out.append((float(parts[0]), int(parts[2])))
    return out


class _ReplayConnection(asyncio.Protocol):
    def __init__(self, server: ReplayServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.writable = asyncio.Event()
        self.writable.set()
        self.lost = asyncio.Event()
        self.task: asyncio.Task | None = None
        self.parser = Parser(expect_banner=False)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop transports are not asyncio.Transport subclasses)
        self.transport = transport  # type: ignore[assignment]
        self.server._connections.add(self)
        if self.server.interactive:
            transport.write(self.server.banner)  # type: ignore[attr-defined]
        else:
            self.task = asyncio.get_running_loop().create_task(self.server._play(self))

    def data_received(self, data: bytes) -> None:
        if not self.server.interactive:
            return  # a verbatim replay does not listen: the client's actions are dropped
        try:
            actions = self.parser.feed(data)
        except RemoteProtocolError:
            if self.transport is not None:
                self.transport.abort()
            return
        for action in actions:
            self._answer(action)

    def _answer(self, action: Message) -> None:
        assert self.transport is not None
        name = action.name.lower()
        action_id = action.get("ActionID")
        head = b"ActionID: " + recover_bytes(action_id) + b"\r\n" if action_id is not None else b""
        if name == "challenge":
            self.transport.write(b"Response: Success\r\n" + head + b"Challenge: 840563284\r\n\r\n")
        elif name == "login":
            self.transport.write(b"Response: Success\r\n" + head
                                 + b"Message: Authentication accepted\r\n\r\n")
            if self.task is None:
                self.task = asyncio.get_running_loop().create_task(self.server._play(self))
        elif name == "ping":
            self.transport.write(b"Response: Success\r\n" + head + b"Ping: Pong\r\nTimestamp: "
                                 + f"{time.time():.6f}".encode() + b"\r\n\r\n")
        elif name == "logoff":
            self.transport.write(b"Response: Goodbye\r\n" + head
                                 + b"Message: Thanks for all the fish.\r\n\r\n")
            self.transport.close()
        else:
            self.transport.write(b"Response: Error\r\n" + head
                                 + b"Message: Not available in replay mode\r\n\r\n")

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.writable.set()
        self.lost.set()
        self.server._connections.discard(self)
        if self.task is not None:
            self.task.cancel()


class ReplayServer:
    """Sends the capture at ``path`` to each client that connects: banner first, byte for byte.

    ``speed`` None sends as fast as the socket takes it; a number paces the bytes by the
    ``.chunks`` file next to the capture (2.0 = twice as fast). ``close_at_end`` closes the
    connection after the last byte (default: keep it open, like an idle Asterisk).
    """

    def __init__(self, path: str | Path, *, host: str = "127.0.0.1", port: int = 0,
                 speed: float | None = None, close_at_end: bool = False,
                 ssl: ssl_module.SSLContext | None = None, interactive: bool = True) -> None:
        self.path = Path(path)
        self.interactive = interactive
        captured = self.path.read_bytes()
        nl = captured.find(b"\n")
        self.banner = captured[:nl + 1] if captured.startswith(b"Asterisk Call Manager") else \
            b"Asterisk Call Manager/11.0.0\r\n"
        if interactive:
            # Only the events: the capture's responses answered somebody else's ActionIDs.
            # Each event keeps its exact bytes (forged or non-UTF-8 content included).
            self.data = b"".join(m.raw + b"\r\n\r\n" for m in Parser().feed(captured)
                                 if m.kind == "event")
            speed = None  # .chunks timings describe the whole capture, not the events alone
        else:
            self.data = captured
        self.chunks = load_chunks(self.path) if speed else None
        self.speed = speed
        self.close_at_end = close_at_end
        self.host = host
        self._requested_port = port
        self.ssl = ssl
        self._server: asyncio.Server | None = None
        self._connections: set[_ReplayConnection] = set()
        self.connections_total = 0

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            return self._requested_port
        return self._server.sockets[0].getsockname()[1]

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _ReplayConnection(self), self.host,
                                                self._requested_port, ssl=self.ssl)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        conns = list(self._connections)
        for conn in conns:
            if conn.task is not None:
                conn.task.cancel()
            if conn.transport is not None:
                conn.transport.abort()
        tasks = [c.task for c in conns if c.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5.0):
                    await self._server.wait_closed()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _schedule(self) -> list[tuple[float, int, int]]:
        """(send at seconds, start, end) slices of the capture."""
        if not self.chunks:
            return [(0.0, i, min(i + _SLICE, len(self.data))) for i in range(0, len(self.data), _SLICE)]
        plan, pos = [], 0
        speed = self.speed or 1.0  # chunks are loaded only with a speed
        for when, size in self.chunks:
            if pos >= len(self.data):
                break
            plan.append((when / speed, pos, min(pos + size, len(self.data))))
            pos += size
        if pos < len(self.data):
            plan.append((plan[-1][0] if plan else 0.0, pos, len(self.data)))
        return plan

    async def _play(self, conn: _ReplayConnection) -> None:
        self.connections_total += 1
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        view = memoryview(self.data)
        for when, start, end in self._schedule():
            delay = t0 + when - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await conn.writable.wait()
            if conn.lost.is_set() or conn.transport is None:
                return
            conn.transport.write(view[start:end])
        if self.close_at_end and conn.transport is not None:
            conn.transport.close()


async def replay(path: str | Path, *, host: str = "127.0.0.1", port: int = 0,
                 speed: float | None = None, close_at_end: bool = False,
                 ssl: ssl_module.SSLContext | None = None,
                 ready: Callable[[int], None] | None = None, interactive: bool = True) -> None:
    """Serve a capture until cancelled (see :class:`ReplayServer`); ``ready(port)`` once bound."""
    server = ReplayServer(path, host=host, port=port, speed=speed, close_at_end=close_at_end,
                          ssl=ssl, interactive=interactive)
    await server.start()
    try:
        if ready is not None:
            ready(server.port)
        await asyncio.Future()  # until cancelled
    finally:
        await server.close()
