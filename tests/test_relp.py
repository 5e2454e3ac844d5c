"""RELP: the sans-IO client with plain bytes, the sink against our own RELP peer and real rsyslogd.

Our peer (``RelpPeer``, asyncio on 127.0.0.1) can answer 500 or say ``serverclose`` on cue, which
rsyslog cannot be made to do; rsyslogd's ``imrelp`` (tests/rsyslog.py) is the real receiver,
killed with SIGKILL and restarted mid-stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rsyslog import RsyslogServer, require_rsyslogd
from sink_contract import SinkContract
from test_sink_syslog import json_part, rec, syslog_runner, waited

from amid.sinks import syslog
from amid.sinks.base import Sink, SinkError
from amid.sinks.relp import (
    Accepted,
    Closed,
    LocalProtocolError,
    Opened,
    Refused,
    RelpClient,
    RemoteProtocolError,
    ServerClose,
    State,
)
from amid.sinks.syslog import Options

WAIT = 10.0

OPEN_ANSWER = b"1 rsp 75 200 OK\nrelp_version=0\nrelp_software=librelp,1.11.0,http://x\ncommands=syslog\n"


def opened_client(window: int = 128) -> RelpClient:
    client = RelpClient(window=window)
    assert client.open() == (b"1 open 49 relp_version=0\nrelp_software=amid\n"
                             b"commands=syslog\n")
    events = client.receive_data(OPEN_ANSWER)
    assert events == [Opened({"relp_version": "0", "relp_software": "librelp,1.11.0,http://x",
                              "commands": "syslog"})]
    assert client.state is State.OPEN
    return client


# -- the sans-IO client ---------------------------------------------------------------------------

def test_open_syslog_close_exact_bytes():
    client = opened_client()
    assert client.syslog(b"<134>1 - h a - - - {}") == (2, b"2 syslog 21 <134>1 - h a - - - {}\n")
    assert client.syslog(b"x") == (3, b"3 syslog 1 x\n")
    assert client.outstanding == {2: "syslog", 3: "syslog"}
    assert client.receive_data(b"3 rsp 6 200 OK\n2 rsp 6 200 OK\n") == [Accepted(3), Accepted(2)]
    assert client.close() == b"4 close 0\n"
    assert client.state is State.CLOSING
    assert client.receive_data(b"4 rsp 0\n") == [Closed()]
    assert client.state is State.CLOSED


def test_window_bounds_outstanding_syslog_commands():
    client = opened_client(window=2)
    client.syslog(b"a")
    client.syslog(b"b")
    assert client.window_free == 0
    with pytest.raises(LocalProtocolError, match="window"):
        client.syslog(b"c")
    client.receive_data(b"2 rsp 6 200 OK\n")
    assert client.window_free == 1
    assert client.syslog(b"c")[0] == 4


def test_500_is_refused_and_serverclose_ends_the_session():
    client = opened_client()
    client.syslog(b"a")
    client.syslog(b"b")
    events = client.receive_data(b"2 rsp 20 500 command disabled\n0 serverclose 0\n")
    assert events == [Refused(2, "syslog", 500, "command disabled"), ServerClose()]
    assert client.state is State.CLOSING
    with pytest.raises(LocalProtocolError):
        client.syslog(b"c")
    assert client.outstanding == {3: "syslog"}  # never answered: the caller sends it again


def test_open_refused_or_without_syslog_is_not_a_session():
    client = RelpClient()
    client.open()
    assert client.receive_data(b"1 rsp 44 500 required command not supported by client\n") == [
        Refused(1, "open", 500, "required command not supported by client")]
    assert client.state is State.BROKEN

    client = RelpClient()
    client.open()
    events = client.receive_data(b"1 rsp 22 200 OK\nrelp_version=0\n\n")
    assert isinstance(events[0], Refused) and "syslog" in events[0].text
    assert client.state is State.BROKEN


def test_commands_only_in_their_state():
    client = RelpClient()
    with pytest.raises(LocalProtocolError):
        client.syslog(b"x")
    with pytest.raises(LocalProtocolError):
        client.close()
    client.open()
    with pytest.raises(LocalProtocolError):
        client.open()
    with pytest.raises(LocalProtocolError):
        client.syslog(b"x")  # not before the server accepted the open


def test_txnr_wraps_after_999999999_to_1():
    client = opened_client()
    client._next_txnr = 999_999_999
    assert client.syslog(b"a") == (999_999_999, b"999999999 syslog 1 a\n")
    assert client.syslog(b"b") == (1, b"1 syslog 1 b\n")
    assert client.receive_data(b"999999999 rsp 6 200 OK\n1 rsp 6 200 OK\n") == [
        Accepted(999_999_999), Accepted(1)]


@pytest.mark.parametrize("garbage", [
    b"5 rsp 6 200 OK\n",                  # an answer to nothing we sent
    b"2 rsp 6 200 OKX",                   # no LF after DATALEN bytes
    b"2 rsp 2 20\n",                      # not a 3-digit code
    b"x rsp 6 200 OK\n",                  # txnr not a number
    b"2 r$p 6 200 OK\n",                  # command not letters
    b"2 rsp 0x\n",                        # junk after a zero DATALEN
    b"2 rsp 99999999 " + b"x" * 10,       # DATALEN beyond the bound
    b"2" * 60,                            # no header at all
    b"3 serverclose 0\n",                 # a hint must use txnr 0
    b"2 syslog 1 x\n",                    # servers do not send commands
])
def test_garbage_from_the_server_is_a_remote_protocol_error_and_final(garbage):
    client = opened_client()
    client.syslog(b"a")
    with pytest.raises(RemoteProtocolError):
        client.receive_data(garbage)
    assert client.state is State.BROKEN
    with pytest.raises(RemoteProtocolError):
        client.receive_data(b"2 rsp 6 200 OK\n")


def test_connection_end_inside_a_frame_is_an_error_but_between_frames_a_close():
    client = opened_client()
    client.syslog(b"a")
    client.receive_data(b"2 rsp 6 2")
    with pytest.raises(RemoteProtocolError, match="inside a frame"):
        client.receive_data(b"")
    client = opened_client()
    assert client.receive_data(b"") == []
    assert client.state is State.CLOSED


def test_unknown_hints_are_ignored():
    client = opened_client()
    assert client.receive_data(b"0 somehint 3 abc\n") == []
    assert client.state is State.OPEN


def server_bytes(count: int) -> tuple[RelpClient, bytes, list[Any]]:
    """A client with ``count`` syslog commands out, and the server's answers to all of them."""
    client = opened_client(window=count + 1)
    answers, expected = [], []
    for n in range(count):
        txnr, _ = client.syslog(b"m%d" % n)
        if n % 7 == 3:
            answers.append(b"%d rsp 20 500 command disabled\n" % txnr)
            expected.append(Refused(txnr, "syslog", 500, "command disabled"))
        else:
            answers.append(b"%d rsp 6 200 OK\n" % txnr)
            expected.append(Accepted(txnr))
    return client, b"".join(answers), expected


@given(count=st.integers(1, 30), cuts=st.lists(st.integers(0, 2000), max_size=30))
@settings(deadline=None)
def test_chunking_does_not_change_the_events(count, cuts):
    client, data, expected = server_bytes(count)
    events = []
    previous = 0
    for cut in sorted({c % (len(data) + 1) for c in cuts}) + [len(data)]:
        events += client.receive_data(data[previous:cut]) if cut > previous else []
        previous = cut
    assert events == expected
    assert client.outstanding == {}


def test_one_byte_at_a_time_and_whole_give_the_same_events():
    whole_client, data, expected = server_bytes(12)
    assert whole_client.receive_data(data) == expected
    bytewise_client, data, expected = server_bytes(12)
    events = []
    for i in range(len(data)):
        events += bytewise_client.receive_data(data[i:i + 1])
    assert events == expected


@given(st.binary(max_size=300))
@settings(deadline=None)
def test_arbitrary_server_bytes_give_events_or_remote_protocol_error(data):
    client = opened_client()
    client.syslog(b"a")
    try:
        events = client.receive_data(data)
    except RemoteProtocolError:
        assert client.state is State.BROKEN
    else:
        assert all(isinstance(e, (Accepted, Refused, ServerClose, Closed, Opened))
                   for e in events)


# -- our own RELP peer ----------------------------------------------------------------------------

class RelpPeer:
    """A RELP receiver on 127.0.0.1: answers open and close as librelp does, 200 to each syslog.

    ``answer(n, message)`` (n counts syslog commands over all sessions) may return bytes to
    answer instead (e.g. a 500), ``b""`` for no answer, or ``None`` for the usual 200 OK;
    ``serverclose_after`` ends a session with the hint after that many messages in it.
    """

    def __init__(self, *, answer: Callable[[int, bytes], bytes | None] | None = None,
                 serverclose_after: int | None = None) -> None:
        self.messages: list[bytes] = []
        self.sessions = 0
        self.closes = 0  # sessions the client ended with "close"
        self.port = 0
        self._answer = answer or (lambda n, message: None)
        self._serverclose_after = serverclose_after
        self._count = 0
        self._arrived = asyncio.Condition()
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self, port: int = 0) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._writers.append(writer)
        self.sessions += 1
        in_session = 0
        try:
            while True:
                txnr = (await reader.readuntil(b" "))[:-1]
                command = (await reader.readuntil(b" "))[:-1]
                data = await _read_data(reader)
                if command == b"open":
                    writer.write(txnr + b" rsp 53 200 OK\nrelp_version=0\nrelp_software=t\n"
                                 b"commands=syslog\n")
                elif command == b"close":
                    self.closes += 1
                    writer.write(txnr + b" rsp 0\n")
                    await writer.drain()
                    break
                elif command == b"syslog":
                    self._count += 1
                    in_session += 1
                    answer = self._answer(self._count, data)
                    if answer is None:
                        async with self._arrived:
                            self.messages.append(data)
                            self._arrived.notify_all()
                        writer.write(txnr + b" rsp 6 200 OK\n")
                    else:
                        writer.write(answer.replace(b"TXNR", txnr))
                    if in_session == self._serverclose_after:
                        writer.write(b"0 serverclose 0\n")
                        await writer.drain()
                        break
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._writers.remove(writer)
            writer.close()
            self._handlers.discard(task)

    async def wait_for(self, n: int) -> list[bytes]:
        async with self._arrived:
            await self._arrived.wait_for(lambda: len(self.messages) >= n)
            return list(self.messages)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for writer in list(self._writers):
            writer.transport.abort()
        if self._handlers:
            await asyncio.wait(set(self._handlers))


async def _read_data(reader: asyncio.StreamReader) -> bytes:
    """After ``TXNR SP COMMAND SP``: DATALEN, then (if not 0) SP DATA, and the LF."""
    digits = b""
    while True:
        byte = await reader.readexactly(1)
        if not byte.isdigit():
            break
        digits += byte
    length = int(digits)
    if length == 0:
        assert byte == b"\n"
        return b""
    assert byte == b" "
    data = await reader.readexactly(length)
    assert await reader.readexactly(1) == b"\n"
    return data


def relp_sink(port: int, **extra: Any) -> Sink:
    return syslog.create("relp", Options(address=f"relp://127.0.0.1:{port}", connect_timeout=2,
                                         send_timeout=2, **extra))


class TestRelpContract(SinkContract):
    @pytest.fixture(autouse=True)
    async def peer(self):
        self.peer = RelpPeer()
        await self.peer.start()
        yield
        await self.peer.stop()

    async def make_sink(self) -> Sink:
        return relp_sink(self.peer.port)

    async def received(self, n: int) -> list[dict]:
        return [json_part(m) for m in await self.peer.wait_for(n)]

    async def break_peer(self) -> None:
        await self.peer.stop()


def ids_of(messages: list[bytes]) -> list[str]:
    return [json_part(m)["id"] for m in messages]


async def test_relp_send_returns_once_every_message_is_answered_with_a_small_window():
    peer = RelpPeer()
    await peer.start()
    sink = relp_sink(peer.port, relp_window=3)
    batch = [rec(f"w{n}", seq=n) for n in range(50)]
    try:
        await waited(sink.send(batch))
        # No waiting here: send() returned, so the peer has answered (and stored) every one.
        assert ids_of(peer.messages) == [r.id for r in batch]
        assert sink.stats.messages_total == 50
    finally:
        await waited(sink.close())
        await peer.stop()


async def test_relp_500_fails_the_batch_and_the_retry_sends_only_what_was_not_accepted():
    refused_once = {5}
    peer = RelpPeer(answer=lambda n, m: b"TXNR rsp 20 500 command disabled\n"
                    if n in refused_once else None)
    await peer.start()
    sink = relp_sink(peer.port, relp_window=1)  # one at a time: the 500 comes before the rest
    batch = [rec(f"e{n}", seq=n) for n in range(10)]
    try:
        with pytest.raises(SinkError, match="500 command disabled"):
            await waited(sink.send(batch))
        assert sink.stats.refused_total == 1 and sink.stats.messages_total == 4
        await waited(sink.send(batch))
        assert ids_of(peer.messages) == [r.id for r in batch]
        assert sink.stats.confirmed_not_resent_total == 4
        assert sink.stats.resent_total == 6   # e4 (refused) and the five never sent
        assert sink.stats.messages_total == 10
    finally:
        await waited(sink.close())
        await peer.stop()


async def test_relp_serverclose_mid_batch_reconnects_and_resends_the_unanswered():
    peer = RelpPeer(serverclose_after=7)
    await peer.start()
    sink = relp_sink(peer.port)
    batch = [rec(f"s{n}", seq=n) for n in range(20)]
    try:
        for _ in range(5):  # each session takes 7; a failed attempt is retried like the runner
            with contextlib.suppress(SinkError):
                await waited(sink.send(batch))
                break
        got = ids_of(peer.messages)
        assert sorted(set(got)) == sorted(r.id for r in batch)
        assert len(got) - len(set(got)) <= sink.stats.resent_total  # only unanswered ones twice
        assert sink.stats.server_closes_total >= 2
        assert sink.stats.messages_total == 20
    finally:
        await waited(sink.close())
        await peer.stop()


async def test_relp_close_ends_the_session_politely():
    peer = RelpPeer()
    await peer.start()
    sink = relp_sink(peer.port)
    try:
        await waited(sink.send([rec("c1")]))
        await waited(sink.close())
        await waited(peer.wait_for(1))
        assert peer.sessions == 1
        # The peer's handler ends because of our close command (not a reset or a timeout).
        if peer._handlers:
            await asyncio.wait(set(peer._handlers), timeout=WAIT)
        assert not peer._handlers and peer.closes == 1
    finally:
        await peer.stop()


def test_relp_address_needs_a_port_and_window_only_for_relp():
    with pytest.raises(ValueError, match="needs a port"):
        Options(address="relp://127.0.0.1")
    with pytest.raises(ValueError, match="relp_window"):
        Options(address="tcp://127.0.0.1:514", relp_window=4)
    assert Options(address="relp://[::1]:2514").endpoint == syslog.Endpoint("relp", "::1", 2514)


# -- a real rsyslogd with imrelp ------------------------------------------------------------------

@pytest.fixture
def rsyslogd_relp(tmp_path):
    server = RsyslogServer(tmp_path, require_rsyslogd(), relp=True)
    server.start()
    yield server
    server.stop()


def msg_ids(lines: list[dict], app_name: str) -> list[str]:
    return [json.loads(line["msg"])["id"] for line in lines if line["app_name"] == app_name]


@pytest.mark.rsyslog
async def test_rsyslog_imrelp_parses_what_we_send(rsyslogd_relp):
    sink = syslog.create("relp", Options(address=f"relp://127.0.0.1:{rsyslogd_relp.relp_port}",
                                         app_name="relpparse", hostname="testhost",
                                         facility="local3"))
    sent = [rec("p1", fields={"CallerIDName": "Zoë 日本語 🎉"}), rec("p2", server='pb"x]')]
    try:
        await waited(sink.send(sent))
    finally:
        await waited(sink.close())
    # Direct queue: imrelp answered only after the line was written, so it is there now.
    lines = [line for line in rsyslogd_relp.lines if line["app_name"] == "relpparse"]
    assert [json.loads(line["msg"]) for line in lines] == [r.data for r in sent]
    assert {line["input"] for line in lines} == {"imrelp"}
    assert {line["facility"] for line in lines} == {"local3"}


@pytest.mark.rsyslog
async def test_rsyslog_killed_and_restarted_mid_stream_loses_nothing(rsyslogd_relp):
    # rsyslogd is SIGKILLed three times while a runner streams records to it over RELP (fast
    # enough that messages are in flight when it dies: stats.resent_total is in the hundreds), and
    # started again on the same port. Every record must be in its output; a record can be there
    # twice only if the sink sent it again for want of an answer (stats.resent_total).
    server = rsyslogd_relp
    total = 6000
    sink = syslog.create("relp", Options(address=f"relp://127.0.0.1:{server.relp_port}",
                                         app_name="relpkill", connect_timeout=2, send_timeout=5))
    runner = syslog_runner(sink, batch_max_events=500)
    records = [rec(f"k{n}", seq=n) for n in range(total)]

    def delivered() -> int:
        return len([line for line in server.lines if line["app_name"] == "relpkill"])

    def kill_and_restart() -> None:
        # In a thread of its own, so a kill lands at any moment of the sink's work, not only
        # while the event loop is between two of its steps (when every answer may be in).
        deadline = time.monotonic() + 60
        for at in (1000, 2500, 4000):
            while delivered() < at:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"rsyslogd never got {at} messages")
                time.sleep(0.001)
            server.kill()
            server.restart()

    try:
        await waited(runner.start())
        chaos = asyncio.create_task(asyncio.to_thread(kill_and_restart))
        for start in range(0, total, 200):
            for record in records[start:start + 200]:
                runner.offer(record)
            await asyncio.sleep(0.001)  # a stream, not one burst: the kills land mid-stream
        async with asyncio.timeout(60):
            await chaos
            assert await runner.drain(30)
    finally:
        await waited(runner.close(WAIT))
    got = msg_ids(server.lines, "relpkill")
    assert set(got) == {r.id for r in records}
    assert list(dict.fromkeys(got)) == [r.id for r in records]  # in order of first arrival
    assert len(got) - total <= sink.stats.resent_total
    assert runner.stats.sent_total == total
    assert sink.stats.reconnects_total >= 3



@pytest.mark.rsyslog
async def test_rsyslog_imrelp_over_tls_verifies_the_server_and_takes_every_message(tmp_path, certs):
    server = RsyslogServer(tmp_path, require_rsyslogd(),
                           relp_tls=(certs.ca_file, certs.cert_file, certs.key_file))
    server.start()
    try:
        address = f"relp+tls://localhost:{server.relp_tls_port}"
        untrusted = syslog.create("relp", Options(address=address, connect_timeout=2))
        with pytest.raises(SinkError, match="CERTIFICATE_VERIFY_FAILED"):
            await waited(untrusted.start())
        await untrusted.close()

        sink = syslog.create("relp", Options(address=address, tls_ca_file=str(certs.ca_file),
                                             app_name="relptls", relp_window=16))
        sent = [rec(f"t{n}", seq=n) for n in range(300)]
        try:
            await waited(sink.send(sent[:1]))
            await waited(sink.send(sent[1:]))
        finally:
            await waited(sink.close())
        assert msg_ids(server.lines, "relptls") == [r.id for r in sent]
        assert sink.stats.messages_total == 300
    finally:
        server.stop()
