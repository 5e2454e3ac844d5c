"""How the syslog sink's messages travel: datagrams, TCP/TLS streams, RELP sessions.

Every channel has the same small shape: ``send(frames)`` returns once every frame is delivered in
that transport's sense, or raises an OSError/EOFError; after a failure, ``confirmed`` holds the
indices of the frames of that last ``send`` that were delivered all the same (the sink does not
send those again when the runner retries the batch). What "delivered" means:

* datagram (udp, unix): the kernel took the datagram. Nothing more can be known.
* stream (tcp, tls): the peer's TCP acknowledged every byte of the frame. The socket is written
  without an asyncio transport, so the channel knows exactly how many bytes the kernel took
  (``written``); Linux's SIOCOUTQ says how many of them the peer has not acknowledged yet, so
  ``written - SIOCOUTQ`` is how far the peer's TCP acknowledged, even after a reset (the kernel
  keeps both sequence numbers). TLS is done with :class:`ssl.SSLObject` over memory BIOs, one
  TLS record per frame, so the same count maps onto ciphertext frame by frame. Where SIOCOUTQ is
  not available (not Linux), "the kernel took it" is all a stream send can promise.
* RELP: the receiver answered ``200 OK`` to the frame's ``syslog`` command.
"""

from __future__ import annotations

import array
import asyncio
import bisect
import contextlib
import fcntl
import select
import socket
import ssl
import sys
import termios
from collections.abc import Sequence

from amid.sinks import relp

__all__ = ["DatagramChannel", "ReceiverRefused", "RelpChannel", "ServerClosed",
           "StreamChannel", "Wire", "unacknowledged_bytes"]

# Errors a socket operation can end with; all of them mean "this connection is no use now".
# (TimeoutError, ssl.SSLError and socket.gaierror are OSErrors; IncompleteReadError is an EOFError.)
IO_ERRORS = (OSError, EOFError)

# How often a stream send asks the kernel whether the peer acknowledged everything: at once,
# then backing off (an answer usually takes one round trip; a receiver that fell behind longer).
_ACK_POLL_FIRST = 0.0005
_ACK_POLL_MAX = 0.05
_READ_SIZE = 65536
# Linux reports a peer's FIN as POLLRDHUP; elsewhere only a reset (POLLHUP/POLLERR) is seen here.
_HANGUP_EVENTS = select.POLLHUP | select.POLLERR | getattr(select, "POLLRDHUP", 0)
_FAILED_EVENTS = select.POLLHUP | select.POLLERR


class ReceiverRefused(ConnectionError):
    """The RELP receiver answered a command with an error code (e.g. ``500``)."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"receiver refused: {code} {text}".rstrip())
        self.code = code
        self.text = text


class ServerClosed(ConnectionResetError):
    """The RELP receiver said it closes the session (``serverclose``) or closed the connection."""


def unacknowledged_bytes(sock: socket.socket) -> int | None:
    """Bytes in the socket's send queue the peer's TCP has not acknowledged (Linux SIOCOUTQ).

    None where the kernel cannot tell (not Linux, or the socket is gone).
    """
    if sys.platform != "linux" or sock.fileno() == -1:
        return None
    count = array.array("i", [0])
    try:
        fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, count)  # TIOCOUTQ == SIOCOUTQ on Linux
    except OSError:
        return None
    return count[0]


def _polled(sock: socket.socket, events: int) -> bool:
    if sock.fileno() == -1:
        return True
    poller = select.poll()
    poller.register(sock.fileno(), events)
    return bool(poller.poll(0))


# -- one connected stream socket, TLS or not -------------------------------------------------------

class Wire:
    """A connected, non-blocking TCP socket, optionally TLS, read and written without a transport.

    ``written`` counts the bytes the kernel took for this connection (TLS: ciphertext, handshake
    included), so ``written - unacknowledged_bytes()`` is how far the peer's TCP acknowledged.
    """

    def __init__(self, sock: socket.socket, tls: ssl.SSLObject | None = None,
                 incoming: ssl.MemoryBIO | None = None,
                 outgoing: ssl.MemoryBIO | None = None) -> None:
        self.sock = sock
        self.written = 0
        self._tls = tls
        self._incoming = incoming
        self._outgoing = outgoing
        self._eof = False

    @classmethod
    async def connect(cls, host: str, port: int, *, ssl_context: ssl.SSLContext | None = None,
                      server_hostname: str | None = None) -> Wire:
        """Connect (trying each address in turn) and, with ``ssl_context``, do the handshake."""
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        problems: list[OSError] = []
        for family, kind, proto, _, address in infos:
            sock = socket.socket(family, kind, proto)
            try:
                sock.setblocking(False)
                # Frames go out whole at once; Nagle would hold the last small segment back
                # until the previous one is acknowledged, and the peer may delay that ACK.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                await loop.sock_connect(sock, address)
            except OSError as exc:
                sock.close()
                problems.append(exc)
                continue
            except BaseException:
                sock.close()
                raise
            break
        else:
            if problems:
                raise problems[0]
            raise OSError(f"no address for {host}")
        if ssl_context is None:
            return cls(sock)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = ssl_context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
        wire = cls(sock, tls, incoming, outgoing)
        try:
            await wire._handshake()
        except BaseException:
            sock.close()
            raise
        return wire

    async def _handshake(self) -> None:
        assert self._tls is not None and self._incoming is not None
        while True:
            try:
                self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush_tls()
                data = await asyncio.get_running_loop().sock_recv(self.sock, _READ_SIZE)
                if not data:
                    raise ConnectionResetError("connection closed during the TLS handshake") \
                        from None
                self._incoming.write(data)
        await self._flush_tls()

    # -- writing ----------------------------------------------------------------------------

    def encode(self, frames: Sequence[bytes]) -> tuple[bytes, list[int]]:
        """The bytes to write for ``frames`` and where each frame ends, as ``written`` will be.

        With TLS each frame is its own record (or records, past 16 KiB), so a frame's ciphertext
        ends at a known byte.
        """
        ends = []
        position = self.written
        if self._tls is None:
            for frame in frames:
                position += len(frame)
                ends.append(position)
            return b"".join(frames), ends
        assert self._outgoing is not None
        pending = self._outgoing.read()  # normally empty: every TLS step flushes
        position += len(pending)
        chunks = [pending]
        for frame in frames:
            self._tls.write(frame)
            chunk = self._outgoing.read()
            position += len(chunk)
            ends.append(position)
            chunks.append(chunk)
        return b"".join(chunks), ends

    async def write(self, data: bytes) -> None:
        """Send application data (encrypted with TLS), waiting for room in the kernel."""
        wire_bytes, _ = self.encode([data])
        await self.send_all(wire_bytes)

    async def send_all(self, data: bytes) -> None:
        """Hand ``data`` (bytes for the wire, as they are) to the kernel, waiting for room;
        ``written`` grows as it goes."""
        view = memoryview(data)
        while view:
            try:
                sent = self.sock.send(view)
            except BlockingIOError:
                await self._writable()
                continue
            self.written += sent
            view = view[sent:]

    async def _writable(self) -> None:
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        fd = self.sock.fileno()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_writer(fd, wake)
        try:
            await ready
        finally:
            loop.remove_writer(fd)

    async def _flush_tls(self) -> None:
        if self._outgoing is not None and self._outgoing.pending:
            await self.send_all(self._outgoing.read())

    def acknowledged(self) -> int | None:
        """How many of the ``written`` bytes the peer's TCP acknowledged; None if unknown."""
        outstanding = unacknowledged_bytes(self.sock)
        return None if outstanding is None else self.written - outstanding

    def failed(self) -> bool:
        """True once the connection was reset or is shut in both directions."""
        return _polled(self.sock, _FAILED_EVENTS)

    def hung_up(self) -> bool:
        """True if the peer's FIN or RST arrived, even if nothing read it yet.

        asyncio would learn of it only when the loop next polls the socket, which may be after
        the next write: bytes written to a connection the peer has closed are lost.
        """
        return self._eof or _polled(self.sock, _HANGUP_EVENTS)

    # -- reading ----------------------------------------------------------------------------

    def read_ready(self) -> bytes:
        """What can be read without waiting (decrypted); ``at_eof`` tells if the peer closed."""
        chunks = []
        while not self._eof:
            try:
                data = self.sock.recv(_READ_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            chunks.append(self._plain(data))
        return b"".join(chunks)

    async def read(self) -> bytes:
        """Wait for data from the peer (decrypted); ``b""`` once it closed the connection."""
        loop = asyncio.get_running_loop()
        while not self._eof:
            plain = self._plain(await loop.sock_recv(self.sock, _READ_SIZE))
            if self._tls is not None:
                await self._flush_tls()  # a post-handshake message may want an answer
            if plain:
                return plain
        return b""

    @property
    def at_eof(self) -> bool:
        return self._eof

    def _plain(self, data: bytes) -> bytes:
        if not data:
            self._eof = True
            return b""
        if self._tls is None:
            return data
        assert self._incoming is not None
        self._incoming.write(data)
        chunks = []
        while True:
            try:
                chunk = self._tls.read(_READ_SIZE)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:  # the peer's close_notify
                self._eof = True
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        """Close now; with TLS, a close_notify goes out first if the kernel takes it at once."""
        if self.sock.fileno() == -1:
            return
        # Unread data would make the kernel answer our close with a reset.
        with contextlib.suppress(OSError, ValueError):
            self.read_ready()
        if self._tls is not None and self._outgoing is not None:
            # SSLWantReadError: our close_notify is written, the peer's never comes; fine.
            with contextlib.suppress(ssl.SSLError, ValueError):
                self._tls.unwrap()
            with contextlib.suppress(OSError):
                self.sock.send(self._outgoing.read())
        self.sock.close()


# -- channels -------------------------------------------------------------------------------------

class DatagramChannel:
    """A connected udp or unix datagram socket, written without an asyncio transport.

    Each datagram goes to the kernel whole or waits for room (``sock_sendall``), so nothing of a
    batch ever sits in the process: ``send`` returning means the kernel took every message, and
    a cancelled send or a close leaves nothing behind to go out later (a transport would keep
    its buffer, and uvloop logs an error for each buffered datagram it drops on abort). Errors
    the kernel reports for earlier datagrams (ICMP port unreachable, a unix receiver gone)
    surface from the next ``send`` call as OSError.
    """

    confirmed: frozenset[int] = frozenset()  # nothing is known of a datagram once sent

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def is_stale(self) -> bool:
        return self._sock.fileno() == -1

    async def send(self, datagrams: Sequence[bytes]) -> None:
        sock = self._sock
        if sock.fileno() == -1:
            raise ConnectionResetError("datagram socket closed")
        loop = asyncio.get_running_loop()
        for datagram in datagrams:
            try:
                sock.send(datagram)  # a datagram is taken whole or not at all
            except BlockingIOError:  # the kernel's queue is full: wait for room
                await loop.sock_sendall(sock, datagram)

    async def close(self) -> None:
        self._sock.close()

    def abort(self) -> None:
        self._sock.close()


class StreamChannel:
    """A tcp or tls connection carrying framed messages; syslog servers never send us data.

    ``send`` returns once the peer's TCP acknowledged every byte written on this connection
    (Linux; elsewhere once the kernel took them). After a failed send, ``confirmed`` holds the
    frames the peer's TCP had acknowledged before the connection broke.
    """

    def __init__(self, wire: Wire) -> None:
        self.wire = wire
        self.confirmed: frozenset[int] = frozenset()
        self._ends: list[int] = []

    def is_stale(self) -> bool:
        """True if the peer closed or reset the connection, even if nothing has read it yet."""
        try:
            self.wire.read_ready()  # TLS session tickets and the like; a plain peer sends nothing
        except OSError:
            return True
        return self.wire.hung_up()

    async def send(self, frames: Sequence[bytes]) -> None:
        self.confirmed = frozenset()
        self._ends = []
        if self.is_stale():
            raise ConnectionResetError("connection closed by peer")
        data, self._ends = self.wire.encode(frames)
        try:
            await self.wire.send_all(data)
            await self._until_acknowledged(self.wire.written)
        finally:
            self.confirmed = self._acknowledged_frames()

    async def _until_acknowledged(self, target: int) -> None:
        """Wait until the peer's TCP acknowledged ``target`` bytes; raise if the connection fails.

        Nothing signals an acknowledgement, so the kernel is asked, at once and then at growing
        intervals. A peer that closed (FIN) but still acknowledges is waited for; a reset fails.
        """
        delay = _ACK_POLL_FIRST
        while True:
            acknowledged = self.wire.acknowledged()
            if acknowledged is None or acknowledged >= target:
                return
            if self.wire.failed():
                error = self.wire.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                raise ConnectionResetError(error or None, "connection reset before the peer "
                                           f"acknowledged {target - acknowledged} bytes")
            await asyncio.sleep(delay)
            delay = min(delay * 2, _ACK_POLL_MAX)

    def _acknowledged_frames(self) -> frozenset[int]:
        acknowledged = self.wire.acknowledged()
        if acknowledged is None:
            return frozenset()
        return frozenset(range(bisect.bisect_right(self._ends, acknowledged)))

    async def close(self) -> None:
        self.wire.close()

    def abort(self) -> None:
        self.wire.close()


class RelpChannel:
    """A RELP session: ``send`` returns once the receiver answered 200 to every frame.

    The protocol is :class:`amid.sinks.relp.RelpClient`; this class only moves its bytes. Up to
    ``window`` frames are outstanding at once. A ``500`` fails the send with
    :class:`ReceiverRefused`, a ``serverclose`` or a closed connection with :class:`ServerClosed`;
    either way ``confirmed`` holds the frames answered 200 before that.
    """

    def __init__(self, wire: Wire, client: relp.RelpClient) -> None:
        self.wire = wire
        self.client = client
        self.confirmed: frozenset[int] = frozenset()

    @classmethod
    async def open(cls, wire: Wire, *, window: int) -> RelpChannel:
        """Send ``open`` on a connected wire and wait for the receiver's accepting answer."""
        channel = cls(wire, relp.RelpClient(window=window))
        await wire.write(channel.client.open())
        while channel.client.state is relp.State.OPENING:
            for event in channel._events(await wire.read()):
                if isinstance(event, relp.Refused):
                    raise ReceiverRefused(event.code, event.text)
        if channel.client.state is not relp.State.OPEN:
            raise ServerClosed("the receiver closed the session while it was being opened")
        return channel

    def is_stale(self) -> bool:
        try:
            self._events(self.wire.read_ready())
        except (OSError, relp.RelpError):
            return True
        return self.client.state is not relp.State.OPEN or self.wire.hung_up()

    async def send(self, frames: Sequence[bytes]) -> None:
        self.confirmed = frozenset()
        confirmed: set[int] = set()
        waiting: dict[int, int] = {}  # txnr -> index into frames
        client = self.client
        position = 0
        try:
            while position < len(frames) or waiting:
                if position < len(frames) and client.window_free:
                    commands = []
                    while position < len(frames) and client.window_free:
                        txnr, command = client.syslog(frames[position])
                        waiting[txnr] = position
                        commands.append(command)
                        position += 1
                    await self.wire.write(b"".join(commands))
                    data = self.wire.read_ready()
                else:
                    data = await self.wire.read()
                for event in self._events(data):
                    if isinstance(event, relp.Accepted):
                        index = waiting.pop(event.txnr, None)
                        if index is not None:
                            confirmed.add(index)
                    elif isinstance(event, relp.Refused):
                        raise ReceiverRefused(event.code, event.text)
                if client.state is not relp.State.OPEN:
                    raise ServerClosed("the receiver closed the session"
                                       + (" (serverclose)" if not self.wire.at_eof else ""))
        finally:
            self.confirmed = frozenset(confirmed)

    def _events(self, data: bytes) -> list[relp.Event]:
        if not data and not self.wire.at_eof:
            return []
        try:
            return self.client.receive_data(data)
        except relp.RemoteProtocolError as exc:
            raise ConnectionResetError(f"RELP protocol error: {exc}") from exc

    async def close(self) -> None:
        """End the session politely (``close``, its answer), then the connection."""
        try:
            if self.client.state is relp.State.OPEN and not self.client.outstanding:
                await self.wire.write(self.client.close())
                while self.client.state is relp.State.CLOSING:
                    data = await self.wire.read()
                    self._events(data)
                    if not data:
                        break
        finally:
            self.wire.close()

    def abort(self) -> None:
        self.wire.close()


Channel = DatagramChannel | StreamChannel | RelpChannel


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__

