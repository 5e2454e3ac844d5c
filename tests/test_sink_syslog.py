"""The syslog sink: exact RFC 5424 / RFC 3164 bytes, and delivery to real peers.

Real peers: a private rsyslogd (tests/rsyslog.py) that parses what we send over UDP and TCP, and
small asyncio receivers of our own (TCP, TLS with the test CA from conftest, a unix datagram
socket) for what rsyslog cannot show: a peer that goes away and comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import ssl
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pydantic
import pytest
from hypothesis import given
from hypothesis import strategies as st
from rsyslog import RsyslogServer, require_rsyslogd
from sink_contract import SinkContract

from amid.records import Record
from amid.sinks import syslog
from amid.sinks.base import Sink, SinkError
from amid.sinks.syslog import (
    Options,
    format_rfc3164,
    format_rfc5424,
    frame_octet_counting,
    parse_address,
    truncate_utf8,
)

WAIT = 10.0  # bound on every wait in this file, in seconds
T0 = 1_780_000_000.5  # 2026-05-28T20:26:40.500000Z


def rec(id: str = "pbx1:run:1:42", *, name: str = "Newchannel", server: str = "pbx1",
        seq: int = 42, received_at: float = T0, fields: dict[str, Any] | None = None) -> Record:
    return Record.synthetic(id=id, server=server, name=name, seq=seq, received_at=received_at,
                            fields=fields or {"Channel": "PJSIP/100-00000001"})


def opts(**overrides: Any) -> Options:
    return Options(**{"address": "udp://127.0.0.1:514", **overrides})


def json_part(message: bytes) -> dict:
    """The record JSON inside one of our messages (it is the MSG part, after the header)."""
    return json.loads(message[message.index(b"{"):])


# -- formatting: exact bytes ----------------------------------------------------------------------

def test_a_sink_formatter_remembers_per_name_and_server_but_stays_bounded_and_exact():
    from amid.sinks.syslog import Formatter
    for fmt in ("rfc5424", "rfc3164"):
        o = opts(format=fmt, severity_map={"Hangup": "notice"}, msgid="{server}-{event}")
        formatter = Formatter(o, hostname="host1", procid=7)
        one_off = format_rfc5424 if fmt == "rfc5424" else format_rfc3164
        records = [rec(name=f"User{n % 5000}", server=f"pbx{n % 3}", seq=n) for n in range(6000)]
        records += [rec(name="Hangup", server='p"b]x\\', seq=1, received_at=T0 + 86400 * 40)]
        for record in records:
            assert formatter.format(record) == one_off(record, o, hostname="host1", procid=7)
        assert len(formatter._parts) <= 4096  # names come from the wire



def test_rfc5424_exact_bytes():
    record = rec()
    got = format_rfc5424(record, opts(), hostname="host1", procid=123)
    assert got == (b'<134>1 2026-05-28T20:26:40.500000Z host1 amid 123 Newchannel '
                   b'[amid@32473 server="pbx1" seq="42" id="pbx1:run:1:42"] ' + record.json)


def test_rfc5424_structured_data_escapes_quote_backslash_and_bracket():
    record = rec('id"with]\\odd', server='pb"x\\1]')
    got = format_rfc5424(record, opts(), hostname="h", procid=1)
    assert (b'[amid@32473 server="pb\\"x\\\\1\\]" seq="42" id="id\\"with\\]\\\\odd"] '
            in got)


def test_rfc5424_sd_keeps_utf8_values_and_can_be_turned_off():
    record = rec(server="zentrale-zürich")
    assert 'server="zentrale-zürich"'.encode() in format_rfc5424(record, opts(), hostname="h")
    plain = format_rfc5424(record, opts(structured_data=False), hostname="h", procid=7)
    assert plain == b"<134>1 2026-05-28T20:26:40.500000Z h amid 7 Newchannel - " + record.json


def test_rfc5424_header_limits_printusascii_and_nilvalue():
    record = rec(name="E" * 40)
    got = format_rfc5424(record, opts(app_name="a" * 60), hostname="h" * 300, procid="p" * 200)
    fields = got.split(b" ", 7)
    assert fields[2] == b"h" * 255
    assert fields[3] == b"a" * 48
    assert fields[4] == b"p" * 128
    assert fields[5] == b"E" * 32

    odd = format_rfc5424(rec(name="Odd Event"), opts(app_name=""), hostname="höst name",
                         procid=None)
    assert odd.split(b" ", 6)[:6] == [b"<134>1", b"2026-05-28T20:26:40.500000Z",
                                      b"h_st_name", b"-", b"-", b"Odd_Event"]


def test_priority_from_facility_severity_and_first_matching_glob():
    o = opts(facility="local7", severity="notice",
             severity_map={"hangup": "warning", "*Failed*": "err", "*": "debug"})
    assert format_rfc5424(rec(name="Hangup"), o, hostname="h").startswith(b"<188>1 ")   # 23*8+4
    assert format_rfc5424(rec(name="InvalidPassword"), o, hostname="h").startswith(b"<191>1 ")
    assert format_rfc5424(rec(name="ChallengeResponseFailed"), o, hostname="h").startswith(
        b"<187>1 ")
    numeric = opts(facility=3, severity=2)
    assert format_rfc5424(rec(), numeric, hostname="h").startswith(b"<26>1 ")


def test_msgid_template():
    got = format_rfc5424(rec(server="pbx9"), opts(msgid="{server}.{event}"), hostname="h")
    assert got.split(b" ")[5] == b"pbx9.Newchannel"


def test_rfc3164_exact_bytes_with_space_padded_day():
    record = rec(received_at=1_780_900_000.0)  # 2026-06-08 06:26:40 UTC
    got = format_rfc3164(record, opts(format="rfc3164"), hostname="host1", procid=99)
    assert got == b"<134>Jun  8 06:26:40 host1 amid[99]: " + record.json


def test_rfc3164_tag_is_at_most_32_alphanumerics():
    got = format_rfc3164(rec(), opts(app_name="my-app_" + "x" * 40), hostname="h", procid=None)
    tag = got.split(b" ")[4]
    assert tag == b"myapp" + b"x" * 27 + b":"


def test_octet_counting_frame_counts_bytes_not_characters():
    assert frame_octet_counting("ü{}".encode()) == b"4 \xc3\xbc{}"


# -- options --------------------------------------------------------------------------------------

@pytest.mark.parametrize("address, expected", [
    ("udp://127.0.0.1:5514", syslog.Endpoint("udp", "127.0.0.1", 5514)),
    ("tcp://logs.example:601", syslog.Endpoint("tcp", "logs.example", 601)),
    ("tls://logs.example", syslog.Endpoint("tls", "logs.example", 6514)),
    ("udp://[::1]", syslog.Endpoint("udp", "::1", 514)),
    ("unix:///dev/log", syslog.Endpoint("unix", path="/dev/log")),
])
def test_parse_address(address, expected):
    assert parse_address(address) == expected


@pytest.mark.parametrize("bad", [
    {"address": "http://x:1"}, {"address": "udp://:514"}, {"address": "unix://dev/log"},
    {"address": "tcp://h:99999"}, {"facility": "local9"}, {"severity": "loud"},
    {"severity_map": {"Hangup": "nope"}}, {"msgid": "{channel}"}, {"udp_max_bytes": 100},
    {"tcp_framing": "lf"}, {"tls_ca_file": "/ca.pem"}, {"colour": "red"},
])
def test_invalid_options_are_rejected(bad):
    with pytest.raises(pydantic.ValidationError):
        opts(**bad)


def test_create_validates_a_mapping_and_names_the_sink():
    sink = syslog.create("logs", {"address": "tcp://127.0.0.1:1", "severity": "warn"})
    assert sink.name == "logs" and sink.options.severity == 4
    assert isinstance(sink, Sink)


# -- truncation -----------------------------------------------------------------------------------

def test_truncate_utf8_backs_off_to_a_character_boundary():
    assert truncate_utf8("aé".encode(), 2) == b"a"
    assert truncate_utf8("a🎉".encode(), 4) == b"a"
    assert truncate_utf8("a🎉".encode(), 5) == "a🎉".encode()


@given(st.text(), st.integers(min_value=0, max_value=64))
def test_truncate_utf8_never_splits_a_character(text, limit):
    data = text.encode()
    cut = truncate_utf8(data, limit)
    assert len(cut) <= limit
    decoded = cut.decode("utf-8")  # raises if a character was split
    assert text.startswith(decoded)
    # and it keeps as much as fits: the next character would not
    if len(decoded) < len(text):
        assert len(cut) + len(text[len(decoded)].encode()) > limit


# -- helpers: our own peers -----------------------------------------------------------------------

class StreamPeer:
    """A TCP (or TLS) syslog receiver with RFC 6587 octet-counting framing on 127.0.0.1."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self.ssl_context = ssl_context
        self.messages: list[bytes] = []
        self.connections_accepted = 0
        self._arrived = asyncio.Condition()
        self._writers: list[asyncio.StreamWriter] = []
        self._handlers: set[asyncio.Task] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self, port: int = 0) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", port,
                                                  ssl=self.ssl_context)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._handlers.add(asyncio.current_task())
        self._writers.append(writer)
        self.connections_accepted += 1
        try:
            while True:
                length = int((await reader.readuntil(b" "))[:-1])
                message = await reader.readexactly(length)
                async with self._arrived:
                    self.messages.append(message)
                    self._arrived.notify_all()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            self._writers.remove(writer)
            writer.close()
            self._handlers.discard(asyncio.current_task())

    async def wait_for(self, n: int) -> list[bytes]:
        async with self._arrived:
            await self._arrived.wait_for(lambda: len(self.messages) >= n)
            return list(self.messages)

    async def drop_connections(self, *, reset: bool) -> None:
        """End every accepted connection (FIN, or RST if ``reset``) but keep listening."""
        handlers = set(self._handlers)
        for writer in list(self._writers):
            if reset:
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
            else:
                writer.close()
        if handlers:
            await asyncio.wait(handlers)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        await self.drop_connections(reset=True)


class DatagramPeer(asyncio.DatagramProtocol):
    """A unix datagram receiver bound to a path, like /dev/log."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.messages: list[bytes] = []
        self._arrived = asyncio.Event()
        self._closed = asyncio.Event()
        self._transport: asyncio.DatagramTransport | None = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed.set()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.messages.append(data)
        self._arrived.set()

    async def start(self) -> None:
        self.path.unlink(missing_ok=True)
        loop = asyncio.get_running_loop()
        self._transport, _ = await loop.create_datagram_endpoint(
            lambda: self, local_addr=str(self.path), family=socket.AF_UNIX)

    async def wait_for(self, n: int) -> list[bytes]:
        while len(self.messages) < n:
            self._arrived.clear()
            await self._arrived.wait()
        return list(self.messages)

    async def stop(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
            await self._closed.wait()  # the socket is closed only once connection_lost ran
        self.path.unlink(missing_ok=True)


async def send(sink: Sink, batch: Sequence[Record]) -> None:
    async with asyncio.timeout(WAIT):
        await sink.send(batch)


async def waited(awaitable):
    async with asyncio.timeout(WAIT):
        return await awaitable


# -- contract: every sink proves the same guarantees ----------------------------------------------

class TestTcpContract(SinkContract):
    # A write can reach the kernel before the peer's reset does; the next send must then fail.
    sends_to_notice_break = 2

    @pytest.fixture(autouse=True)
    async def peer(self):
        self.peer = StreamPeer()
        await self.peer.start()
        yield
        await self.peer.stop()

    async def make_sink(self) -> Sink:
        return syslog.create("contract", Options(address=f"tcp://127.0.0.1:{self.peer.port}",
                                                 connect_timeout=2, send_timeout=2))

    async def received(self, n: int) -> list[dict]:
        return [json_part(m) for m in await self.peer.wait_for(n)]

    async def break_peer(self) -> None:
        await self.peer.stop()


class TestTlsContract(TestTcpContract):
    @pytest.fixture(autouse=True)
    async def peer(self, certs):  # certs: a test CA and a localhost certificate (conftest)
        self.certs = certs
        self.peer = StreamPeer(certs.server_context())
        await self.peer.start()
        yield
        await self.peer.stop()

    async def make_sink(self) -> Sink:
        return syslog.create("contract", Options(
            address=f"tls://localhost:{self.peer.port}", tls_ca_file=str(self.certs.ca_file),
            connect_timeout=2, send_timeout=2))


class TestUnixDatagramContract(SinkContract):
    @pytest.fixture(autouse=True)
    async def peer(self, tmp_path):
        self.peer = DatagramPeer(tmp_path / "log.sock")
        await self.peer.start()
        yield
        await self.peer.stop()

    async def make_sink(self) -> Sink:
        return syslog.create("contract", Options(address=f"unix://{self.peer.path}",
                                                 udp_max_bytes=65000))

    async def received(self, n: int) -> list[dict]:
        return [json_part(m) for m in await self.peer.wait_for(n)]

    async def break_peer(self) -> None:
        await self.peer.stop()


# -- stream: reconnect after the peer goes away ---------------------------------------------------

@pytest.mark.parametrize("reset", [False, True], ids=["peer-closes", "peer-resets"])
async def test_tcp_reconnects_after_the_peer_ends_the_connection(reset):
    peer = StreamPeer()
    await peer.start()
    sink = syslog.create("s", Options(address=f"tcp://127.0.0.1:{peer.port}"))
    try:
        await send(sink, [rec("a")])
        await waited(peer.wait_for(1))

        await peer.drop_connections(reset=reset)
        # The sink either notices the dead connection before writing (and opens a new one), or
        # its write fails and it raises SinkError; it never reports success for a lost batch.
        delivered = ["a"]
        for attempt, record_id in enumerate(["b", "c"]):
            try:
                await send(sink, [rec(record_id)])
                delivered.append(record_id)
            except SinkError:
                assert attempt == 0, "only the first send after the break may fail"
        got = await waited(peer.wait_for(len(delivered)))
        assert [json_part(m)["id"] for m in got] == delivered
        assert peer.connections_accepted == 2
        assert sink.stats.reconnects_total == 1
    finally:
        await waited(sink.close())
        await peer.stop()


@pytest.mark.parametrize("reset", [False, True], ids=["peer-closed", "peer-reset"])
async def test_tcp_notices_a_closed_connection_before_the_event_loop_does(reset):
    """The peer's FIN/RST is in the kernel, but the loop has not run since: nothing may be lost.

    The peer is a plain socket closed synchronously, so asyncio cannot have seen the close when
    send() starts; only asking the kernel tells the sink that writing there would lose the batch.
    """
    loop = asyncio.get_running_loop()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        port = listener.getsockname()[1]
        sink = syslog.create("s", Options(address=f"tcp://127.0.0.1:{port}"))
        try:
            await waited(sink.start())
            first, _ = await waited(loop.sock_accept(listener))
            if reset:
                first.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            first.close()

            await send(sink, [rec("b")])  # no await between the close and this send

            second, _ = await waited(loop.sock_accept(listener))
            with second:
                expected = frame_octet_counting(format_rfc5424(
                    rec("b"), sink.options, hostname=socket.gethostname(), procid=os.getpid()))
                got = b""
                while len(got) < len(expected):
                    chunk = await waited(loop.sock_recv(second, 65536))
                    assert chunk, "connection closed before the whole frame arrived"
                    got += chunk
            assert got == expected
            assert sink.stats.reconnects_total == 1
        finally:
            await waited(sink.close())


async def test_tcp_send_fails_while_peer_is_down_and_recovers_when_it_returns():
    peer = StreamPeer()
    await peer.start()
    port = peer.port
    sink = syslog.create("s", Options(address=f"tcp://127.0.0.1:{port}", connect_timeout=2))
    try:
        await send(sink, [rec("a")])
        await waited(peer.wait_for(1))  # the peer has the connection in hand before it stops
        await peer.stop()
        with pytest.raises(SinkError, match=r"tcp://127\.0\.0\.1"):
            for record_id in ("lost-1", "lost-2"):  # one write may still reach the kernel
                await send(sink, [rec(record_id)])

        back = StreamPeer()
        await back.start(port)
        try:
            await send(sink, [rec("b"), rec("c")])
            got = await waited(back.wait_for(2))
            assert [json_part(m)["id"] for m in got] == ["b", "c"]
            assert sink.stats.connect_failures_total >= 1
        finally:
            await back.stop()
    finally:
        await waited(sink.close())


@pytest.fixture
def silent_port():
    """A TCP port that accepts connections (through the kernel backlog) but never reads."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


@pytest.mark.parametrize("gives_up", ["sink", "caller"])
async def test_tcp_send_stuck_on_a_peer_that_stops_reading_drops_the_connection(silent_port,
                                                                                gives_up):
    # Given up by the sink's own send_timeout, or cancelled by the runner (attempt_timeout):
    # either way the batch will be sent again, so the half-written connection must go.
    send_timeout, caller_bound = (0.3, WAIT) if gives_up == "sink" else (5, 0.3)
    sink = syslog.create("s", Options(address=f"tcp://127.0.0.1:{silent_port}",
                                      send_timeout=send_timeout))
    big = [rec(f"big-{n}", fields={"Blob": "x" * 1_000_000}) for n in range(4)]
    try:
        with (pytest.raises(SinkError, match="timed out") if gives_up == "sink"
              else pytest.raises(TimeoutError)):
            for _ in range(25):  # until the kernel buffers on both ends are full
                async with asyncio.timeout(caller_bound):
                    await sink.send(big)
        await send(sink, [rec("small")])  # on a new connection, not behind the stuck one
        assert sink.stats.reconnects_total == 1
    finally:
        await waited(sink.close())


def octet_counted_ids(data: bytes) -> list[str]:
    """The record ids of the whole octet-counted frames in ``data`` (a torn last one is left)."""
    ids, position = [], 0
    while (space := data.find(b" ", position)) > 0:
        end = space + 1 + int(data[position:space])
        if end > len(data):
            break
        ids.append(json_part(data[space + 1:end])["id"])
        position = end
    return ids


async def read_to_the_end(sock: socket.socket | ssl.SSLSocket) -> bytes:
    """Everything the peer sends until it closes (a TLS socket is read in a thread)."""
    if isinstance(sock, ssl.SSLSocket):
        def read_blocking() -> bytes:
            sock.settimeout(WAIT)
            data = bytearray()
            # An abandoned TLS connection ends without close_notify, maybe inside a record.
            with contextlib.suppress(ConnectionResetError, ssl.SSLError):
                while chunk := sock.recv(1 << 20):
                    data += chunk
            return bytes(data)
        return await asyncio.to_thread(read_blocking)
    loop = asyncio.get_running_loop()
    data = bytearray()
    with contextlib.suppress(ConnectionResetError):
        while chunk := await loop.sock_recv(sock, 1 << 20):
            data += chunk
    return bytes(data)


@pytest.mark.parametrize("transport", ["tcp", "tls"])
async def test_stream_send_returns_only_once_the_peer_acknowledged_and_a_retry_skips_what_it_did(
        transport, certs):
    # A receiver that takes the connection but does not read: its TCP acknowledges what fits in
    # its receive buffer and no more. send() must not report the batch delivered (the kernel
    # took it, the peer did not acknowledge it), and the retry sends exactly what the peer had
    # not acknowledged. With TLS the acknowledged count is of ciphertext: one record per message
    # makes it map onto whole messages all the same.
    loop = asyncio.get_running_loop()
    batch = [rec(f"r{n}", fields={"Blob": "x" * 4000}) for n in range(300)]  # ~1.2 MB
    server_context = certs.server_context() if transport == "tls" else None

    async def accept(listener: socket.socket) -> socket.socket:
        conn, _ = await waited(loop.sock_accept(listener))
        if server_context is None:
            return conn
        conn.setblocking(True)
        conn.settimeout(WAIT)
        return await waited(asyncio.to_thread(server_context.wrap_socket, conn, server_side=True))

    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)  # accepted ones inherit
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        port = listener.getsockname()[1]
        sink = syslog.create("s", Options(address=f"{transport}://localhost:{port}",
                                          send_timeout=0.5, **({"tls_ca_file": str(certs.ca_file)}
                                                               if server_context else {})))
        try:
            accepting = asyncio.create_task(accept(listener))
            await waited(sink.start())
            first = await waited(accepting)
            with first:
                with pytest.raises(SinkError, match="timed out"):
                    await send(sink, batch)
                acknowledged = sink.stats.messages_total
                assert 0 < acknowledged < len(batch)

                retry = asyncio.create_task(sink.send(batch))
                second = await accept(listener)
                with second:
                    reading = asyncio.create_task(read_to_the_end(second))
                    await waited(retry)
                    await waited(sink.close())
                    got_second = octet_counted_ids(await waited(reading))
                # The abandoned connection was closed, not reset: what it still held goes out.
                got_first = octet_counted_ids(await waited(read_to_the_end(first)))
        finally:
            await waited(sink.close())
    ids = [r.id for r in batch]
    assert got_second == ids[acknowledged:]
    assert got_first == ids[:len(got_first)] and len(got_first) >= acknowledged
    assert sink.stats.messages_total == len(batch)
    assert sink.stats.confirmed_not_resent_total == acknowledged
    assert sink.stats.resent_total == len(batch) - acknowledged


def test_stream_acknowledgement_under_uvloop(certs):
    # `amid run` uses uvloop when installed: the socket is written and polled the same way there.
    import uvloop
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(test_stream_send_returns_only_once_the_peer_acknowledged_and_a_retry_skips_what_it_did(
            "tcp", certs))


class AbruptReceiver:
    """A TCP syslog receiver that crashes (a reset, SO_LINGER 0) and comes back on the same port.

    It runs in the test's event loop and reads synchronously in reader callbacks, so a crash
    drains every byte its kernel already took before the reset: what its TCP acknowledged, it
    also read (the one loss a sender cannot see is not staged here). ``crash_after`` lists the
    counts of received messages at which it crashes; it listens again ``downtime`` later.
    """

    def __init__(self, crash_after: Sequence[int], downtime: float,
                 receive_buffer: int | None = None) -> None:
        self.ids: list[str] = []
        self._receive_buffer = receive_buffer
        self.connections = 0
        self.crashes = 0
        self.port = 0
        self._crash_after = sorted(crash_after)
        self._downtime = downtime
        self._listener: socket.socket | None = None
        self._buffers: dict[socket.socket, bytearray] = {}
        self._restart: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self._receive_buffer:  # accepted connections inherit it
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._receive_buffer)
        listener.bind(("127.0.0.1", self.port))
        listener.listen()
        listener.setblocking(False)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._loop.add_reader(listener.fileno(), self._accept)

    def _accept(self) -> None:
        assert self._listener is not None
        with contextlib.suppress(BlockingIOError):
            conn, _ = self._listener.accept()
            conn.setblocking(False)
            self.connections += 1
            self._buffers[conn] = bytearray()
            self._loop.add_reader(conn.fileno(), self._read, conn)

    def _read(self, conn: socket.socket) -> None:
        ended = self._drain(conn)
        if self._crash_after and len(self.ids) >= self._crash_after[0]:
            self._crash_after.pop(0)
            self.crash()
        elif ended:
            self._close(conn, reset=False)

    def _drain(self, conn: socket.socket) -> bool:
        """Read all the kernel holds; parse whole frames; True if the peer ended the connection."""
        buffer = self._buffers[conn]
        ended = False
        while True:
            try:
                chunk = conn.recv(1 << 20)
            except BlockingIOError:
                break
            except ConnectionError:
                ended = True
                break
            if not chunk:
                ended = True
                break
            buffer += chunk
        while (space := buffer.find(b" ")) > 0:
            end = space + 1 + int(buffer[:space])
            if end > len(buffer):
                break
            self.ids.append(json_part(bytes(buffer[space + 1:end]))["id"])
            del buffer[:end]
        return ended

    def _close(self, conn: socket.socket, *, reset: bool) -> None:
        self._loop.remove_reader(conn.fileno())
        del self._buffers[conn]
        if reset:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()

    def crash(self) -> None:
        """Like a process killed: every connection reset, nobody listening for ``downtime``."""
        self.crashes += 1
        for conn in list(self._buffers):
            self._drain(conn)  # a torn last frame stays unparsed, like a receiver would drop it
            self._close(conn, reset=True)
        self.stop_listening()
        self._restart = self._loop.call_later(self._downtime, self.start)

    def stop_listening(self) -> None:
        if self._listener is not None:
            self._loop.remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None

    def stop(self) -> None:
        if self._restart is not None:
            self._restart.cancel()
        for conn in list(self._buffers):
            self._close(conn, reset=True)
        self.stop_listening()


def syslog_runner(sink: Sink, **overrides: Any):
    """A SinkRunner in front of ``sink`` with short retry delays (the daemon's own machinery)."""
    from amid.sinks import delivery
    params: dict[str, Any] = dict(
        name="s", max_queue_events=100_000, max_queue_bytes=1 << 30, overflow="drop_newest",
        spool_dir=None, spool_max_bytes=1 << 20, spool_fallback="drop_newest",
        spool_fsync_interval=0.1, batch_max_events=50, batch_max_bytes=1 << 20,
        batch_max_wait=0.0, retry_min_delay=0.005, retry_max_delay=0.05, dead_letter_path=None)
    params.update(overrides)
    # The runner's settings are moving into one RunnerSettings object (delivery.py rewrite).
    settings = getattr(delivery, "RunnerSettings", None)
    if settings is not None:
        return delivery.SinkRunner(sink, settings(**params))
    return delivery.SinkRunner(sink, **params)


async def test_tcp_receiver_reset_several_times_mid_stream_loses_nothing():
    # Issue 13: a TCP receiver that restarts abruptly lost records silently, counted as sent.
    # The oracle: every record arrives, in order of first arrival; the only duplicates are
    # records the sink re-sent because the peer had not acknowledged them (stats.resent_total).
    total = 6000
    receiver = AbruptReceiver(crash_after=[700, 1900, 3100, 4300, 5500], downtime=0.05)
    receiver.start()
    sink = syslog.create("s", Options(address=f"tcp://127.0.0.1:{receiver.port}",
                                      connect_timeout=2, send_timeout=2))
    runner = syslog_runner(sink)
    records = [rec(f"r{n}", seq=n) for n in range(total)]
    try:
        await waited(runner.start())
        for start in range(0, total, 100):  # a stream: sending goes on between the offers
            for record in records[start:start + 100]:
                runner.offer(record)
            await asyncio.sleep(0)
        assert await waited(runner.drain(WAIT))
    finally:
        await waited(runner.close(WAIT))
        receiver.stop()
    assert receiver.crashes == 5
    first_seen = list(dict.fromkeys(receiver.ids))
    assert first_seen == [r.id for r in records]
    duplicates = len(receiver.ids) - len(first_seen)
    assert duplicates <= sink.stats.resent_total
    assert runner.stats.sent_total == total
    assert sum(runner.stats.dropped_total.values()) == 0
    assert sink.stats.reconnects_total >= 5
    assert sink.stats.messages_total == total


async def test_start_raises_sink_error_when_nobody_listens():
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]  # bound, never listening: connections are refused
        sink = syslog.create("s", Options(address=f"tcp://127.0.0.1:{port}"))
        with pytest.raises(SinkError, match="cannot connect"):
            await waited(sink.start())
    await sink.close()


async def test_send_after_close_raises_sink_error():
    peer = StreamPeer()
    await peer.start()
    sink = syslog.create("s", Options(address=f"tcp://127.0.0.1:{peer.port}"))
    await waited(sink.start())
    await waited(sink.close())
    with pytest.raises(SinkError, match="closed"):
        await send(sink, [rec()])
    await peer.stop()


# -- tls ------------------------------------------------------------------------------------------

async def test_tls_verifies_the_server_by_default(certs):
    peer = StreamPeer(certs.server_context())
    await peer.start()
    try:
        untrusted = syslog.create("s", Options(address=f"tls://localhost:{peer.port}"))
        with pytest.raises(SinkError, match="CERTIFICATE_VERIFY_FAILED"):
            await waited(untrusted.start())
        await untrusted.close()

        wrong_name = syslog.create("s", Options(address=f"tls://localhost:{peer.port}",
                                                tls_ca_file=str(certs.ca_file),
                                                tls_server_name="syslog.example"))
        with pytest.raises(SinkError, match="CERTIFICATE_VERIFY_FAILED"):
            await waited(wrong_name.start())
        await wrong_name.close()

        unverified = syslog.create("s", Options(address=f"tls://127.0.0.1:{peer.port}",
                                                tls_verify=False))
        await send(unverified, [rec("x")])
        assert json_part((await waited(peer.wait_for(1)))[0])["id"] == "x"
        await waited(unverified.close())
    finally:
        await peer.stop()


# -- unix datagram --------------------------------------------------------------------------------

async def test_unix_datagram_reconnects_when_the_receiver_is_recreated(tmp_path):
    peer = DatagramPeer(tmp_path / "dev-log")
    await peer.start()
    sink = syslog.create("s", Options(address=f"unix://{peer.path}"))
    try:
        await send(sink, [rec("a")])
        await waited(peer.wait_for(1))
        await peer.stop()   # e.g. journald or rsyslog restarting: the socket file goes away
        with pytest.raises(SinkError):
            await send(sink, [rec("lost")])

        again = DatagramPeer(peer.path)
        await again.start()
        try:
            await send(sink, [rec("b")])
            got = await waited(again.wait_for(1))
            assert [json_part(m)["id"] for m in got] == ["b"]
            assert sink.stats.reconnects_total == 1
        finally:
            await again.stop()
    finally:
        await waited(sink.close())


async def test_unix_datagram_truncates_on_a_character_boundary_and_counts_it(tmp_path):
    peer = DatagramPeer(tmp_path / "dev-log")
    await peer.start()
    sink = syslog.create("s", Options(address=f"unix://{peer.path}", udp_max_bytes=600))
    try:
        await send(sink, [rec("small"), rec("big", fields={"Note": "é" * 1000}), rec("small2")])
        got = await waited(peer.wait_for(3))
        assert len(got[1]) <= 600 and len(got[1]) >= 599
        got[1].decode("utf-8")
        assert sink.stats.truncated_total == 1
        assert sink.sink_counters() == {"confirmed": 3, "reconnect": 0, "connect_failure": 0, "resend": 0,
                                        "confirmed_not_resent": 0, "refused": 0, "server_close": 0}
        assert [json_part(got[0])["id"], json_part(got[2])["id"]] == ["small", "small2"]
    finally:
        await waited(sink.close())
        await peer.stop()


async def test_unix_datagram_batch_counts_as_sent_only_once_the_kernel_took_every_message(tmp_path):
    await slow_receiver_gets_every_message(tmp_path)


def test_unix_datagram_under_uvloop_gets_every_message(tmp_path):
    # `amid run` uses uvloop when installed; its datagram transport differs from asyncio's.
    import uvloop
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(slow_receiver_gets_every_message(tmp_path))


async def slow_receiver_gets_every_message(tmp_path: Path) -> None:
    # A receiver that falls behind (journald under load): the kernel's queue fills, asyncio keeps
    # the rest in the process. Neither send nor close may return while any of it is still there,
    # or a sink that is closed (shutdown, reload) loses messages the runner counted as sent.
    path = tmp_path / "slow-log"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(path))
    receiver.setblocking(False)
    loop = asyncio.get_running_loop()
    got: list[bytes] = []

    def read_waiting() -> None:  # synchronous: nothing read can be lost to a cancellation
        while True:
            try:
                got.append(receiver.recv(65536))
            except BlockingIOError:
                return

    sink = syslog.create("s", Options(address=f"unix://{path}"))
    batch = [rec(f"r{n}", fields={"Note": "x" * 900}) for n in range(1000)]
    try:
        await sink.start()
        sending = asyncio.create_task(sink.send(batch))
        await asyncio.sleep(0)  # sendto runs until the kernel's queue is full, then waits
        assert not sending.done()
        loop.add_reader(receiver.fileno(), read_waiting)
        try:
            await waited(sending)
            await waited(sink.close())
        finally:
            loop.remove_reader(receiver.fileno())
    finally:
        await waited(sink.close())
    read_waiting()  # what the kernel still holds for the receiver
    receiver.close()
    assert [json_part(m)["id"] for m in got] == [f"r{n}" for n in range(1000)]


async def test_truncation_is_counted_once_per_delivered_message_and_reaches_the_metrics(tmp_path):
    from amid.sinks.delivery import RunnerSettings, SinkRunner
    peer = DatagramPeer(tmp_path / "dev-log")
    sink = syslog.create("s", Options(address=f"unix://{peer.path}", udp_max_bytes=600))
    big = rec("big", fields={"Note": "é" * 1000})
    with pytest.raises(SinkError):  # nobody listens yet: this attempt fails
        await send(sink, [big])
    assert sink.stats.truncated_total == 0
    await peer.start()
    runner = SinkRunner(
        sink, RunnerSettings(name="s", max_queue_events=100, max_queue_bytes=1 << 20, overflow="drop_newest",
        spool_dir=None, spool_max_bytes=1 << 20, spool_fallback="drop_newest",
        spool_fsync_interval=0.1, batch_max_events=10, batch_max_bytes=1 << 20,
        batch_max_wait=0.0, retry_min_delay=0.001, retry_max_delay=0.01, dead_letter_path=None))
    try:
        await waited(runner.start())
        for record in (big, rec("small"), big):
            runner.offer(record)
        assert await waited(runner.drain(WAIT))
        assert sink.stats.truncated_total == 2
        assert runner.stats.truncated_total == 2  # what amid_sink_truncated_events_total shows
    finally:
        await waited(runner.close(WAIT))
        await peer.stop()


def test_udp_max_bytes_defaults_to_the_formats_limit():
    assert Options(address="udp://127.0.0.1:514").udp_max_bytes == 2048
    assert Options(address="udp://127.0.0.1:514", format="rfc3164").udp_max_bytes == 1024
    assert Options(address="udp://127.0.0.1:514", format="rfc3164",
                   udp_max_bytes=1500).udp_max_bytes == 1500


# -- udp ------------------------------------------------------------------------------------------

async def test_udp_reports_a_receiver_that_is_not_there():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]
    # Nobody listens on ``port`` now: the kernel answers each datagram with "port unreachable".
    sink = syslog.create("s", Options(address=f"udp://127.0.0.1:{port}"))
    try:
        with pytest.raises(SinkError, match="ConnectionRefused"):
            for n in range(3):  # the first datagram goes out before the answer comes back
                await send(sink, [rec(f"r{n}")])
    finally:
        await waited(sink.close())


# -- a real rsyslogd ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rsyslogd(tmp_path_factory):
    server = RsyslogServer(tmp_path_factory.mktemp("rsyslog"), require_rsyslogd())
    server.start()
    yield server
    server.stop()


def parsed_for(app_name: str):
    return lambda line: line["app_name"] == app_name


def tricky_records(prefix: str) -> list[Record]:
    return [
        rec(f"{prefix}-1", name="Newchannel", seq=1,
            fields={"CallerIDName": "Zoë 日本語 🎉", "Variable": ["A=1", "B=2"]}),
        rec(f"{prefix}-2", name="Hangup", seq=2, server='pbx"1]\\',
            fields={"Cause": "16", "Quote": 'say "hi" ] [x]'}),
        rec(f"{prefix}-3", name="ChallengeResponseFailed", seq=3, fields={"Severity": "Error"}),
    ]


def assert_parsed_like_sent(lines: list[dict], sent: list[Record], o: Options) -> None:
    assert [json.loads(line["msg"])["id"] for line in lines] == [r.id for r in sent]
    for line, record in zip(lines, sent, strict=True):
        assert json.loads(line["msg"]) == record.data
        assert line["facility"] == "local3"
        assert line["app_name"] == o.app_name
        assert line["hostname"] == "testhost"
        assert line["procid"].isdigit()
    assert [line["severity"] for line in lines] == ["info", "notice", "warning"]


async def rsyslog_round_trip(rsyslogd: RsyslogServer, transport: str, app_name: str,
                             **extra: Any) -> tuple[list[dict], list[Record], Options]:
    port = rsyslogd.udp_port if transport == "udp" else rsyslogd.tcp_port
    o = Options(address=f"{transport}://127.0.0.1:{port}", facility="local3", app_name=app_name,
                hostname="testhost", severity_map={"Hangup": "notice", "*Failed*": "warning"},
                **extra)
    sink = syslog.create("rsyslog", o)
    sent = tricky_records(app_name)
    try:
        await waited(sink.start())
        await send(sink, sent[:1])
        await send(sink, sent[1:])
    finally:
        await waited(sink.close())
    lines = await rsyslogd.wait_for(parsed_for(app_name), len(sent), timeout=WAIT)
    return lines, sent, o


@pytest.mark.rsyslog
@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_rsyslog_parses_rfc5424(rsyslogd, transport):
    lines, sent, o = await rsyslog_round_trip(rsyslogd, transport, f"t5424{transport}")
    assert_parsed_like_sent(lines, sent, o)
    assert [line["msgid"] for line in lines] == [r.name for r in sent]
    assert all(line["protocol_version"] == "1" for line in lines)
    assert lines[1]["structured_data"] == (
        '[amid@32473 server="pbx\\"1\\]\\\\" seq="2" id="t5424' + transport + '-2"]')


@pytest.mark.rsyslog
async def test_rsyslog_parses_lf_framed_tcp(rsyslogd):
    lines, sent, o = await rsyslog_round_trip(rsyslogd, "tcp", "tlf", tcp_framing="lf")
    assert_parsed_like_sent(lines, sent, o)


@pytest.mark.rsyslog
@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_rsyslog_parses_rfc3164(rsyslogd, transport):
    lines, sent, o = await rsyslog_round_trip(rsyslogd, transport, f"t3164{transport}",
                                              format="rfc3164")
    for line in lines:  # rsyslog keeps the space after "TAG:" in an RFC 3164 MSG
        line["msg"] = line["msg"].removeprefix(" ")
    assert_parsed_like_sent(lines, sent, o)
    assert all(line["protocol_version"] == "0" for line in lines)


@pytest.mark.rsyslog
async def test_rsyslog_udp_truncation_is_counted_and_stays_valid_utf8(rsyslogd):
    o = Options(address=f"udp://127.0.0.1:{rsyslogd.udp_port}", app_name="ttrunc",
                hostname="testhost", udp_max_bytes=480)
    sink = syslog.create("rsyslog", o)
    big = rec("ttrunc-big", fields={"Note": "日本語" * 200})
    try:
        await send(sink, [big, rec("ttrunc-small")])
    finally:
        await waited(sink.close())
    lines = await rsyslogd.wait_for(parsed_for("ttrunc"), 2, timeout=WAIT)
    assert sink.stats.truncated_total == 1
    cut = lines[0]["msg"]
    assert big.json.decode().startswith(cut) and len(cut) < len(big.json.decode())
    assert "\ufffd" not in cut and "#" not in cut   # rsyslog saw no broken character
    assert json.loads(lines[1]["msg"])["id"] == "ttrunc-small"
