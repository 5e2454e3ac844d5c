"""The AMI simulator against the real Asterisk 22.10.1 captures, over real sockets.

Each scenario's ``.sent`` bytes are played against the simulator by a plain asyncio client and
the answer is compared with the ``.raw`` capture after normalising only the values that
legitimately differ between runs (times, ports, session ids, Uniqueids, channel sequence
numbers, bridge ids, counters that depend on the server's history).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from amid.simulator import AMISimulator, ReplayServer, SimUser, serve_forever
from amid.simulator.actions import format_uptime

FIXTURES = Path(__file__).parent / "fixtures"
BANNER = b"Asterisk Call Manager/11.0.0\r\n"
WAIT = 5.0  # bound on every network wait


# -- a plain AMI client for the tests ------------------------------------------------------------
class Client:
    """Reads everything the server sends; splits it into messages (raw bytes, no terminator)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.data = bytearray()
        self.eof = False
        self.messages: list[bytes] = []
        self._parsed_to = 0  # offset in data after the last complete message (or the banner)

    @classmethod
    async def connect(cls, port: int, *, ssl_context: ssl.SSLContext | None = None) -> Client:
        async with asyncio.timeout(WAIT):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=ssl_context,
                server_hostname="localhost" if ssl_context else None)
        return cls(reader, writer)

    @property
    def tail(self) -> bytes:
        """Bytes after the last complete message."""
        return bytes(self.data[self._parsed_to:])

    def _split(self) -> None:
        if self._parsed_to == 0 and self.data.startswith(BANNER):
            self._parsed_to = len(BANNER)
        while (end := self.data.find(b"\r\n\r\n", self._parsed_to)) != -1:
            self.messages.append(bytes(self.data[self._parsed_to:end]))
            self._parsed_to = end + 4

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        async with asyncio.timeout(WAIT):
            await self.writer.drain()

    async def _read(self) -> None:
        chunk = await self.reader.read(1 << 16)
        if not chunk:
            self.eof = True
        self.data += chunk
        self._split()

    async def wait_for(self, predicate, timeout: float = WAIT) -> None:
        async with asyncio.timeout(timeout):
            while not predicate(self):
                if self.eof:
                    raise AssertionError(f"EOF while waiting; got {self.data[-300:]!r}")
                await self._read()

    async def wait_messages(self, n: int) -> list[bytes]:
        await self.wait_for(lambda c: len(c.messages) >= n)
        return self.messages

    async def wait_eof(self, timeout: float = WAIT) -> None:
        async with asyncio.timeout(timeout):
            while not self.eof:
                await self._read()

    async def action(self, text: str) -> bytes:
        """Send one action (lines joined by CRLF) and return the next new response."""
        before = len(self.messages)
        await self.send(text.replace("\n", "\r\n").encode() + b"\r\n\r\n")

        def responses(c: Client) -> list[bytes]:
            return [m for m in c.messages[before:] if m.startswith(b"Response: ")]

        await self.wait_for(lambda c: responses(c))
        return responses(self)[0]

    async def close(self) -> None:
        self.writer.close()
        try:
            async with asyncio.timeout(WAIT):
                await self.writer.wait_closed()
        except (ConnectionError, TimeoutError, ssl.SSLError):
            pass


async def login(port: int, user: str = "amid", secret: str = "amidsecret",
                events: str | None = None) -> Client:
    client = await Client.connect(port)
    extra = f"\nEvents: {events}" if events else ""
    reply = await client.action(f"Action: Login\nUsername: {user}\nSecret: {secret}{extra}\n"
                                "ActionID: login")
    assert b"Authentication accepted" in reply
    return client


# -- capture handling --------------------------------------------------------------------------------
def split_sent(data: bytes) -> list[bytes]:
    """The client's actions, each with its own terminator (CRLF or bare LF)."""
    return [p for p in re.split(rb"(?<=\r\n\r\n)|(?<=[^\r]\n\n)", data) if p]


def capture(name: str) -> tuple[list[bytes], list[bytes]]:
    """(actions sent, messages received) of a scenario."""
    raw = (FIXTURES / f"{name}.raw").read_bytes()
    assert raw.startswith(BANNER)
    return split_sent((FIXTURES / f"{name}.sent").read_bytes()), raw[len(BANNER):].split(b"\r\n\r\n")[:-1]


def is_terminal(msg: bytes) -> bool:
    """The message that completes an action's answer (a response or a list-complete event)."""
    if msg.startswith(b"Response: "):
        return b"\r\nEventList: start" not in msg
    return b"\r\nEventList: Complete" in msg


_FIXED = [
    (rb"(Timestamp: )\d+\.\d{6}", rb"\1T"),
    (rb"(Uptime|LastReload|Seconds|CoreProcessedCalls): \d+", rb"\1: N"),
    (rb"(Duration: )\d\d:\d\d:\d\d", rb"\1D"),
    (rb"(Core(?:Startup|Reload)(?:Date|Time)): [^\r]*", rb"\1: X"),
    (rb"(SessionID: )0x[0-9a-f]+", rb"\1X"),
    (rb"((?:Local|Remote)Address: IPV4/(?:TCP|TLS)/127.0.0.1/)\d+", rb"\1P"),
    (rb"(EventTV|SessionTV): 20\d\d-[^\r]*", rb"\1: TV"),
    (rb"(Challenge|ExpectedResponse): [0-9a-f]+", rb"\1: C"),
    (rb"((?:Start|Answer|End)Time: )\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", rb"\1X"),
    (rb"(Value: )1[0-9]{9}(?=\r|$)", rb"\1EPOCH"),
    # Call timing variables (ms since dial/answer) differ from run to run.
    (rb"(Variable: (?:ANSWERED|DIALED|RING|PROGRESS)TIME(?:_MS)?\r\nValue: )\d+", rb"\1N"),
    (rb"(Output: )\d+ calls? processed", rb"\1N calls processed"),
    (rb"(Output: (?:System uptime|Last reload): )[^\r]*", rb"\1U"),
    (rb"(!3!)\d+(!)", rb"\1N\2"),  # `core show channels concise` duration
]


def normalise(messages: list[bytes]) -> list[bytes]:
    """Replace the legitimately varying values; Uniqueids, channel sequence numbers and bridge
    ids are renumbered by first appearance so that equal structure compares equal."""
    maps: dict[str, dict[bytes, bytes]] = {"uid": {}, "seq": {}, "bridge": {}}

    def renumber(kind: str, fmt: bytes):
        def sub(m: re.Match) -> bytes:
            table = maps[kind]
            key = m.group(2)
            if key not in table:
                table[key] = fmt % len(table)
            return m.group(1) + table[key]
        return sub

    out = []
    for msg in messages:
        for pattern, repl in _FIXED:
            msg = re.sub(pattern, repl, msg)
        msg = re.sub(rb"(\b)(\d{10}\.\d+)\b", renumber("uid", b"UID%d"), msg)
        msg = re.sub(rb"(-)([0-9a-f]{8})(?=;[12])", renumber("seq", b"SEQ%d"), msg)
        msg = re.sub(rb"()([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})",
                     renumber("bridge", b"BRIDGE%d"), msg)
        out.append(msg)
    return out


def segments(messages: list[bytes]) -> list[tuple[list[bytes], list[bytes]]]:
    """Split at each action's answer: (answer messages in order, async events) per segment."""
    out: list[tuple[list[bytes], list[bytes]]] = [([], [])]
    in_list = False
    for msg in messages:
        answer, events = out[-1]
        if msg.startswith(b"Response: "):
            in_list = b"\r\nEventList: start" in msg
            answer.append(msg)
        elif in_list or b"\r\nEventList: Complete" in msg:
            answer.append(msg)
        else:
            events.append(msg)
        if is_terminal(msg):
            in_list = False
            out.append(([], []))
    return out


def assert_same(got: list[bytes], expected: list[bytes], *, event_order: bool = True) -> None:
    got_n, exp_n = normalise(got), normalise(expected)
    if event_order:
        assert got_n == exp_n
        return
    # Asterisk's own event order varies between runs (threads): answers in order, events as
    # multisets per segment.
    got_s, exp_s = segments(got_n), segments(exp_n)
    assert [a for a, _ in got_s] == [a for a, _ in exp_s]
    assert [sorted(e) for _, e in got_s] == [sorted(e) for _, e in exp_s]


def event_names(messages: list[bytes]) -> Counter:
    return Counter(m.split(b"\r\n", 1)[0][7:].decode() for m in messages if m.startswith(b"Event: "))


async def play(port: int, name: str, *, expect_eof: bool = True) -> Client:
    """Play a scenario's actions one by one, each once the capture's answer to the previous one
    (and the events that followed it) has arrived."""
    actions, expected = capture(name)
    terminals = [i for i, m in enumerate(expected) if is_terminal(m)]
    assert len(terminals) == len(actions)
    client = await Client.connect(port)
    await client.wait_for(lambda c: c.data.startswith(BANNER))
    for k, action in enumerate(actions):
        if k:
            settled = terminals[k - 1] + 1
            while settled < len(expected) and expected[settled].startswith(b"Event: ") \
                    and not is_terminal(expected[settled]) and b"\r\nActionID: " not in expected[settled][:60]:
                settled += 1
            await client.wait_messages(settled)
        await client.send(action)
    await client.wait_messages(len(expected))
    if expect_eof:
        await client.wait_eof()
    return client


def align_ids(sim: AMISimulator, name: str) -> None:
    """Start the channel sequence where the capture did, so names in the .sent file exist."""
    m = re.search(rb"-([0-9a-f]{8});[12]", (FIXTURES / f"{name}.raw").read_bytes())
    if m:
        sim.ids.next_seq = int(m.group(1), 16)


@pytest.fixture
async def sim():
    async with AMISimulator(auth_failure_delay=0.05, call_spread=0) as simulator:
        yield simulator


# -- scenario replays ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [
    "s01_login_logoff",
    "s01c_login_events_off_no_actionid",
    "s02a_challenge_md5_login",
    "s02e_action_before_login",
    "s02f_limited_login",
    "s03_ping",
    "s04_originate_events",
    "s05a_events_off_coreshowchannels_status",
    "s06_command",
    "s07d_errors_and_odd_input",
])
async def test_scenario_matches_capture(sim: AMISimulator, name: str) -> None:
    align_ids(sim, name)
    if name.startswith("s02a"):
        # The capture's Key was computed from the capture's challenge: answer with that one.
        sim.new_challenge = lambda: "201353975"  # type: ignore[method-assign]
    client = await play(sim.port, name)
    _, expected = capture(name)
    assert client.data.startswith(BANNER)
    assert client.tail == b""
    assert_same(client.messages, expected)


async def test_s02a_md5_key_is_checked_against_the_challenge(sim: AMISimulator) -> None:
    client = await Client.connect(sim.port)
    reply = await client.action("Action: Challenge\nAuthType: MD5\nActionID: c")
    challenge = re.search(rb"Challenge: (\d{9})$", reply).group(1).decode()
    key = hashlib.md5((challenge + "amidsecret").encode()).hexdigest()
    reply = await client.action(f"Action: Login\nAuthType: MD5\nUsername: amid\nKey: {key}\nActionID: l")
    assert reply == b"Response: Success\r\nActionID: l\r\nMessage: Authentication accepted"
    await client.close()


@pytest.mark.parametrize("name", ["s02b_login_wrong_secret", "s02c_login_unknown_user",
                                  "s02d_md5_bad_key"])
async def test_auth_failure_is_delayed_then_closed(sim: AMISimulator, name: str) -> None:
    started = time.monotonic()
    client = await play(sim.port, name)
    elapsed = time.monotonic() - started
    _, expected = capture(name)
    assert_same(client.messages, expected)
    assert client.eof and client.tail == b""
    assert elapsed >= sim.auth_failure_delay  # answered only after the configured delay
    assert sim.stats.failed_logins == 1


async def test_s04_event_counts_exactly_as_captured(sim: AMISimulator) -> None:
    client = await play(sim.port, "s04_originate_events")
    counts = event_names(client.messages)
    assert counts["VarSet"] == 25 and counts["Newexten"] == 11 and counts["DeviceStateChange"] == 8
    assert counts == event_names(capture("s04_originate_events")[1])
    orig = [m for m in client.messages if m.startswith(b"Event: OriginateResponse")]
    assert len(orig) == 1 and b"\r\nActionID: orig-1\r\nResponse: Success\r\n" in orig[0]


@pytest.mark.parametrize("name", ["s07a_events_off_on", "s07b_filter_newchannel",
                                  "s07c_filter_exclude_matchcriteria"])
async def test_event_mask_and_filters_match_capture(sim: AMISimulator, name: str) -> None:
    client = await play(sim.port, name)
    _, expected = capture(name)
    assert event_names(client.messages) == event_names(expected)
    assert_same(client.messages, expected, event_order=False)


async def test_s07e_limited_user_sees_call_class_only(sim: AMISimulator) -> None:
    actions, expected = capture("s07e_limited_user")
    limited = await Client.connect(sim.port)
    await limited.send(actions[0])
    await limited.wait_messages(1)
    driver = await play(sim.port, "s07e_driver_amid")
    assert_same(driver.messages, capture("s07e_driver_amid")[1])
    n_call_events = sum(1 for m in expected if m.startswith(b"Event: "))
    await limited.wait_messages(1 + n_call_events)
    for action in actions[1:]:
        before = len(limited.messages)
        await limited.send(action)
        await limited.wait_messages(before + 1)
    await limited.wait_eof()
    assert event_names(limited.messages) == event_names(expected)
    assert_same(limited.messages, expected, event_order=False)
    orig = [m for m in limited.messages if m.startswith(b"Event: OriginateResponse")]
    assert b"ActionID: o7e" in orig[0]


async def test_s02_observer_sees_security_events(sim: AMISimulator) -> None:
    observer = await login(sim.port)
    await observer.wait_messages(3)  # login response, FullyBooted, own SuccessfulAuth
    for name in ("s02b_login_wrong_secret", "s02c_login_unknown_user", "s02d_md5_bad_key",
                 "s02e_action_before_login"):
        await play(sim.port, name)
    _, expected = capture("s02_observer_security_events")
    names = ["InvalidPassword", "InvalidAccountID", "ChallengeResponseFailed", "RequestNotAllowed",
             "RequestNotAllowed", "SuccessfulAuth"]
    await observer.wait_messages(3 + len(names))
    got = normalise(observer.messages[3:3 + len(names)])
    want = {name: m for m in normalise(expected) for name in names
            if m.startswith(b"Event: " + name.encode() + b"\r\n")}
    for msg, name in zip(got, names, strict=False):
        assert [line.split(b":")[0] for line in msg.split(b"\r\n")] == \
            [line.split(b":")[0] for line in want[name].split(b"\r\n")]
    assert b"RequestType: Action: Ping" in got[3]
    await observer.close()


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A throwaway self-signed certificate for localhost (openssl CLI)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not installed")
    tmp = tmp_path_factory.mktemp("tls")
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


async def test_s01b_tls_login_logoff(tls_files: tuple[Path, Path]) -> None:
    cert, key = tls_files
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))
    async with AMISimulator(ssl=server_ctx) as sim:
        client = await Client.connect(sim.port, ssl_context=client_ctx)
        for action in split_sent((FIXTURES / "s01b_tls_login_logoff.sent").read_bytes()):
            before = len(client.messages)
            await client.send(action)
            await client.wait_messages(before + 1)
        await client.wait_eof()
        _, expected = capture("s01b_tls_login_logoff")
        await client.wait_messages(len(expected))
        assert_same(client.messages, expected)


@pytest.mark.parametrize("variant", ["amid_events_on", "limited", "amid_events_off"])
async def test_s08_shutdown_event_only_for_system_readers(variant: str) -> None:
    sim = AMISimulator()
    await sim.start()
    clients = {}
    try:
        for v in ("amid_events_on", "limited", "amid_events_off"):
            actions, _ = capture(f"s08_stopnow_{v}")
            clients[v] = await Client.connect(sim.port)
            await clients[v].send(actions[0])
            await clients[v].wait_messages(1)
        await sim.wait_for_sessions(3)
    finally:
        await sim.close()
    client = clients[variant]
    await client.wait_eof()
    _, expected = capture(f"s08_stopnow_{variant}")
    assert client.tail == b""
    assert_same(client.messages, expected, event_order=False)
    if variant == "amid_events_on":
        assert client.messages[-1] == (b"Event: Shutdown\r\nPrivilege: system,all\r\n"
                                       b"Shutdown: Cleanly\r\nRestart: False")


# -- behaviour beyond the captures ----------------------------------------------------------------------
async def test_logged_in_limited_user_cannot_write(sim: AMISimulator) -> None:
    client = await login(sim.port, "limited", "limitedsecret")
    reply = await client.action("Action: Originate\nChannel: Local/200@test\nExten: 100\nActionID: o")
    assert reply == b"Response: Error\r\nActionID: o\r\nMessage: Permission denied"
    reply = await client.action("Action: ListCommands\nActionID: lc")
    assert b"Ping: Keepalive command." in reply and b"Originate:" not in reply
    await client.close()


async def test_call_spread_paces_events_and_hangup_ends_the_call() -> None:
    async with AMISimulator(call_spread=0.2, long_call_hold=60) as sim:
        client = await login(sim.port, events="call")
        await client.wait_messages(1)
        call = sim.originate("Local/310@test", exten="300")
        assert call.live and len(sim.channels.channels) < 4  # paced: not all out at once
        await client.wait_for(lambda c: sum(m.startswith(b"Event: BridgeEnter") for m in c.messages) == 2)
        assert len(sim.channels.channels) == 4 and call.live
        reply = await client.action("Action: Hangup\nChannel: /^Local/310@test-/\nActionID: h")
        assert reply.startswith(b"Response: Success\r\nActionID: h\r\nEventList: start")
        async with asyncio.timeout(WAIT):
            await call.finished.wait()
        assert sim.channels.channels == {}
        await client.close()


async def test_call_rate_generates_calls_by_itself() -> None:
    async with AMISimulator(call_rate=50, call_spread=0) as sim:
        client = await login(sim.port, events="call")
        await client.wait_for(lambda c: sum(m.startswith(b"Event: Hangup\r\n") for m in c.messages) >= 8)
        names = event_names(client.messages)
        assert names["Newchannel"] >= 8 and "VarSet" not in names
        await client.close()


async def test_broadcast_respects_mask_and_filters(sim: AMISimulator) -> None:
    all_events = await login(sim.port)
    filtered = await login(sim.port)
    off = await login(sim.port, events="off")
    await all_events.wait_messages(4)  # + FullyBooted, 2 x SuccessfulAuth
    reply = await filtered.action("Action: Filter\nOperation: Add\nFilter: Foo: keep\nActionID: f")
    assert reply.endswith(b"Message: Success")
    start = {c: len(c.messages) for c in (all_events, filtered, off)}
    await sim.broadcast(b"Event: Custom\r\nPrivilege: user,all\r\nFoo: drop\r\n\r\n")
    await sim.broadcast(b"Event: Custom\r\nPrivilege: user,all\r\nFoo: keep\r\n\r\n")
    await all_events.wait_messages(start[all_events] + 2)
    reply = await filtered.action("Action: Ping\nActionID: p")
    assert filtered.messages[start[filtered]:] == [b"Event: Custom\r\nPrivilege: user,all\r\nFoo: keep", reply]
    reply = await off.action("Action: Ping\nActionID: p")
    assert off.messages[start[off]:] == [reply]
    for c in (all_events, filtered, off):
        await c.close()


# -- fault injection ------------------------------------------------------------------------------------------
async def test_ignore_pings_keeps_socket_open_without_pong(sim: AMISimulator) -> None:
    client = await login(sim.port, events="off")
    sim.set_faults(ignore_pings=True)
    await client.send(b"Action: Ping\r\nActionID: p1\r\n\r\n")
    reply = await client.action("Action: CoreStatus\nActionID: cs")
    assert reply.startswith(b"Response: Success\r\nActionID: cs\r\n")
    assert not any(b"Pong" in m for m in client.messages) and not client.eof
    sim.set_faults(ignore_pings=False)
    assert b"Ping: Pong" in await client.action("Action: Ping\nActionID: p2")
    await client.close()


async def test_stall_drops_all_output(sim: AMISimulator) -> None:
    client = await login(sim.port, events="off")
    after_login = bytes(client.data)
    sim.set_faults(stall=True)
    # The session still reads and acts (Logoff closes it), but nothing reaches the client.
    await client.send(b"Action: Ping\r\nActionID: lost\r\n\r\nAction: Logoff\r\nActionID: bye\r\n\r\n")
    await client.wait_eof()
    assert client.data == after_login


async def test_close_mid_message_cuts_an_event_in_half(sim: AMISimulator) -> None:
    client = await login(sim.port)
    await client.wait_messages(3)
    sim.set_faults(close_mid_message_after=5)
    sim.originate()
    await client.wait_eof()
    assert len(client.messages) == 3 + 5
    assert client.tail.startswith(b"Event: ") and len(client.tail) > 20


async def test_garbage_is_injected_before_the_next_message(sim: AMISimulator) -> None:
    client = await login(sim.port, events="off")
    (session,) = await sim.wait_for_sessions(1)
    session.faults.garbage = b"\x00\xffNOT AMI\r\n"
    await client.send(b"Action: Ping\r\nActionID: g\r\n\r\n")
    await client.wait_for(lambda c: b"ActionID: g" in c.data)
    assert b"Authentication accepted\r\n\r\n\x00\xffNOT AMI\r\nResponse: Success\r\nActionID: g" in client.data
    await client.close()


# -- streaming, replay, serve_forever ---------------------------------------------------------------------------
async def test_stream_events_sends_prebuilt_call_events(sim: AMISimulator) -> None:
    client = await login(sim.port, events="on")
    await client.wait_messages(3)
    n = 5000
    streamed = asyncio.create_task(sim.stream_events(n))
    await client.wait_messages(3 + n)
    async with asyncio.timeout(WAIT):
        assert await streamed == 1
    events = client.messages[3:]
    assert len(events) == n and all(m.startswith(b"Event: ") for m in events)
    uids = {m.split(b"Uniqueid: ")[1][:20] for m in events if m.startswith(b"Event: Newchannel")}
    assert len(uids) == sum(m.startswith(b"Event: Newchannel") for m in events[:4000])
    assert sim.stats.events_sent >= n
    await client.close()


async def test_stream_on_login_respects_event_mask() -> None:
    async with AMISimulator(stream_on_login=800) as sim:
        client = await login(sim.port, events="call")
        await client.wait_for(lambda c: sum(m.startswith(b"Event: Hangup\r\n") for m in c.messages) == 40)
        assert "VarSet" not in event_names(client.messages)
        await client.close()


async def test_replay_serves_capture_byte_for_byte() -> None:
    path = FIXTURES / "s04_originate_events.raw"
    async with ReplayServer(path, close_at_end=True, interactive=False) as server:
        client = await Client.connect(server.port)
        await client.wait_eof()
        assert client.data == path.read_bytes()


async def test_replay_paced_by_chunks_keeps_connection_open() -> None:
    path = FIXTURES / "s03_ping.raw"
    async with ReplayServer(path, speed=50.0, interactive=False) as server:
        client = await Client.connect(server.port)
        await client.wait_for(lambda c: len(c.data) == len(path.read_bytes()))
        assert client.data == path.read_bytes() and not client.eof
        await client.close()


async def test_serve_forever_sends_shutdown_on_cancel() -> None:
    bound: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve_forever("127.0.0.1:0", ready=bound.set_result,
                                             users=[SimUser("amid", "amidsecret")]))
    async with asyncio.timeout(WAIT):
        port = await bound
    client = await login(port)
    await client.wait_messages(3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await client.wait_eof()
    assert client.messages[-1].startswith(b"Event: Shutdown\r\n")


def test_uptime_format_like_asterisk() -> None:
    assert format_uptime(124) == "2 minutes, 4 seconds"
    assert format_uptime(119) == "1 minute, 59 seconds"
    assert format_uptime(0) == "0 seconds"
    assert format_uptime(3600 + 60 + 1) == "1 hour, 1 minute, 1 second"


async def test_stream_waits_for_a_slow_reader_with_bounded_buffer(sim: AMISimulator) -> None:
    client = await login(sim.port)
    await client.wait_messages(3)
    (session,) = await sim.wait_for_sessions(1)
    streaming = asyncio.create_task(sim.stream_events(50_000))  # ~18 MB, far beyond socket buffers
    # The client reads nothing yet: the streamer must pause instead of buffering everything.
    done, _ = await asyncio.wait({streaming}, timeout=0.3)
    assert not done and session.writing_paused
    assert session.transport.get_write_buffer_size() <= 2 * 256 * 1024
    await client.wait_messages(3 + 50_000)
    async with asyncio.timeout(WAIT):
        await streaming
    await client.close()


async def test_write_timeout_drops_a_client_that_stops_reading() -> None:
    async with AMISimulator(write_timeout=0.05) as sim:
        client = await login(sim.port)
        (session,) = await sim.wait_for_sessions(1)
        streaming = asyncio.create_task(sim.stream_events(50_000))
        async with asyncio.timeout(WAIT):
            await session.closed.wait()
            await streaming
        assert sim.stats.slow_readers_dropped == 1
        with pytest.raises((ConnectionError, AssertionError)):
            await client.wait_messages(3 + 50_000)  # cut short: EOF or reset
        await client.close()


async def test_graceful_shutdown_refuses_actions_until_calls_end() -> None:
    async with AMISimulator(call_spread=0, long_call_hold=0.2) as sim:
        client = await login(sim.port, events="off")
        call = sim.originate("Local/310@test", exten="300")
        stopping = asyncio.create_task(sim.shutdown_gracefully(timeout=WAIT))
        reply = await client.action("Action: Ping\nActionID: p")
        assert reply == b"Response: Error\r\nActionID: p\r\nMessage: Asterisk is shutting down"
        async with asyncio.timeout(WAIT):
            await stopping
        assert not call.live
        await client.wait_eof()


def test_parse_listen_refuses_a_port_the_bind_would_wrap():
    from amid.simulator.server import parse_listen
    assert parse_listen("[::1]:0") == ("::1", 0)
    with pytest.raises(ValueError, match="port 99999 is not in 0-65535"):
        parse_listen("127.0.0.1:99999")


async def test_a_call_started_late_still_emits_only_what_is_due_at_its_start() -> None:
    # A busy machine may take a while between rendering a call and starting it: the events
    # due later must still come from their timers, not all at once (this made the pacing
    # test above flaky under load).
    from random import Random

    from amid.simulator.calls import SHORT_CALL, Call, IdAllocator

    emitted: list[bytes] = []
    call = Call(SHORT_CALL, IdAllocator(Random(1)), lambda _call, raw: emitted.append(raw),
                spread=1.0, hold=60)
    real_loop = call._loop

    class LateLoop:  # the clock has moved on by 100 s since the call was rendered
        def time(self) -> float:
            return real_loop.time() + 100

        def call_at(self, when: float, callback):
            return real_loop.call_at(when, callback)

    call._loop = LateLoop()  # type: ignore[assignment]
    call.start()
    due_at_start = sum(1 for ev in SHORT_CALL.setup if ev.offset == 0)
    assert 0 < due_at_start < len(SHORT_CALL.setup)
    assert len(emitted) == due_at_start
    call.cancel()


# -- numbered streams (conservation tests' source), Asterisk-like writes, faults, restart --------------
_SEQ = re.compile(rb"\r\nAmidTestSession: (\d+)\r\nAmidTestSeq: (\d+)$")


def numbered(messages: list[bytes]) -> list[tuple[int, int]]:
    """(session, seq) of every numbered event, in arrival order."""
    return [(int(m.group(1)), int(m.group(2))) for m in map(_SEQ.search, messages) if m]


async def test_numbered_stream_numbers_each_session_and_logoff_ends_it_exactly() -> None:
    async with AMISimulator(stream_rate=2000) as sim:
        first, second = await login(sim.port), await login(sim.port)
        for client in (first, second):
            await client.wait_for(lambda c: len(numbered(c.messages)) >= 150)
        reply = await first.action("Action: Logoff\nActionID: bye")
        assert reply.startswith(b"Response: Goodbye")
        await first.wait_eof()
        streams = sim.stats.streams
        got = numbered(first.messages)
        session = got[0][0]
        # Every event written before the Goodbye reached the client, numbered 1..sent.
        assert got == [(session, k) for k in range(1, streams[session].sent + 1)]
        assert streams[session].end == "logoff" and not streams[session].open
        # Real call events under the numbers; the other session has its own count.
        assert {m.split(b"\r\n", 1)[0] for m in first.messages} >= {b"Event: Newchannel",
                                                                    b"Event: VarSet"}
        other = numbered(second.messages)
        assert {s for s, _ in other} == {3 - session} and streams[3 - session].open
        assert [k for _, k in other] == list(range(1, len(other) + 1))
        await second.close()


async def test_numbered_stream_is_paced_by_a_steady_clock() -> None:
    rate = 500
    async with AMISimulator(stream_rate=rate) as sim:
        client = await login(sim.port)
        started = time.monotonic()
        await client.wait_for(lambda c: len(numbered(c.messages)) >= 100)
        elapsed = time.monotonic() - started
        sent = sim.stats.streams[1].sent
        # Paced, not flat out: never ahead of the clock (the first event is due at once).
        assert sent <= rate * (time.monotonic() - started) + 1
        assert elapsed >= 99 / rate
        await client.close()


@pytest.mark.parametrize("mode", ["per-event", "chunked"])
async def test_write_mode_per_event_sends_each_event_on_its_own(mode: str) -> None:
    async with AMISimulator(stream_rate=5000, write_mode=mode) as sim:  # type: ignore[arg-type]
        client = await login(sim.port)
        (session,) = await sim.wait_for_sessions(1)
        await client.wait_for(lambda c: len(numbered(c.messages)) >= 1000)
        sock = session.transport.get_extra_info("socket")
        before = sim.stats.writes
        sent_before = sim.stats.streams[1].sent
        await client.wait_for(lambda c: len(numbered(c.messages)) >= 2000)
        writes = sim.stats.writes - before
        events = sim.stats.streams[1].sent - sent_before
        if mode == "per-event":
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            assert writes == events        # one write (one send) per event
        else:
            assert writes < events / 2     # the events due at a tick share a write
        await client.close()


async def test_stream_faults_are_recorded_where_they_hit() -> None:
    async with AMISimulator(stream_rate=2000) as sim:
        cut, spoiled, silent = [await login(sim.port) for _ in range(3)]
        for client in (cut, spoiled, silent):
            await client.wait_for(lambda c: len(numbered(c.messages)) >= 20)
        by_number = {numbered(c.messages)[0][0]: c for c in (cut, spoiled, silent)}
        sessions = {s.number: s for s in sim.sessions}
        n_cut, n_spoiled, n_silent = by_number
        sessions[n_cut].faults.close_mid_message_after = 0
        sessions[n_spoiled].faults.garbage = b"\x00\xff garbage \xfe"
        sessions[n_silent].faults.stall = sessions[n_silent].faults.ignore_pings = True

        await cut.wait_eof()
        stream = sim.stats.streams[n_cut]
        assert stream.end == "close_mid_message" and stream.half_sent == stream.sent + 1
        assert [k for _, k in numbered(cut.messages)] == list(range(1, stream.sent + 1))
        assert cut.tail.startswith(b"Event: ") and b"AmidTestSeq" not in cut.tail

        await spoiled.wait_for(lambda c: b"\x00\xff garbage \xfe" in c.data)
        (after,) = sim.stats.streams[n_spoiled].garbage_after
        assert bytes(spoiled.data).count(b"\x00\xff garbage \xfe") == 1
        assert b"AmidTestSeq: %d\r\n\r\n\x00\xff garbage \xfe" % after in spoiled.data

        async with asyncio.timeout(WAIT):
            while sim.stats.streams[n_silent].stalled_after is None:
                await asyncio.sleep(0.01)
        stream = sim.stats.streams[n_silent]
        await silent.send(b"Action: Ping\r\nActionID: p\r\n\r\n")
        await spoiled.wait_for(lambda c: len(numbered(c.messages)) >= after + 50)  # time passes
        assert stream.end == "half_open" and stream.sent == stream.stalled_after
        assert len(numbered(silent.messages)) == stream.sent and b"Pong" not in silent.data
        assert not silent.eof
        for client in (spoiled, silent):
            await client.close()


async def test_restart_closes_every_session_and_listens_again_on_the_same_port() -> None:
    async with AMISimulator(stream_rate=1000) as sim:
        port = sim.port
        client = await login(sim.port)
        await client.wait_for(lambda c: len(numbered(c.messages)) >= 10)
        await sim.restart(down_for=0.05)
        await client.wait_eof()
        shutdown = [m for m in client.messages if m.startswith(b"Event: Shutdown")]
        assert shutdown and b"Restart: True" in shutdown[0]
        assert sim.port == port and sim.stats.streams[1].end == "restart"
        again = await login(port)
        await again.wait_for(lambda c: len(numbered(c.messages)) >= 10)
        assert numbered(again.messages)[0] == (2, 1)   # session numbers carry on
        await again.close()


async def test_control_actions_read_stats_and_inject_faults() -> None:
    async with AMISimulator(stream_rate=1000) as sim:
        streamed = await login(sim.port)
        control = await login(sim.port, events="off")
        await streamed.wait_for(lambda c: len(numbered(c.messages)) >= 10)
        reply = await control.action("Action: AmidTestFault\nFault: close_mid_message\nActionID: f")
        assert b"close_mid_message on 1 sessions" in reply
        await streamed.wait_eof()
        reply = await control.action("Action: AmidTestStats\nActionID: s")
        stats = json.loads(reply.split(b"\r\nStats: ", 1)[1])
        (stream,) = stats["streams"]     # the control session (events off) has no stream
        assert stream["end"] == "close_mid_message"
        assert stream["sent"] == len(numbered(streamed.messages))
        bad = await control.action("Action: AmidTestFault\nFault: explode\nActionID: e")
        assert bad.startswith(b"Response: Error")
        await control.close()


async def test_simulate_subprocess_streams_and_writes_its_stats_file(tmp_path: Path) -> None:
    stats_file = tmp_path / "stats.json"
    amid = Path(sys.executable).with_name("amid")
    process = await asyncio.create_subprocess_exec(
        str(amid), "simulate", "--listen", "127.0.0.1:0", "--stream-rate", "1000",
        "--stats-file", str(stats_file), stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(WAIT * 2):
            line = (await process.stderr.readline()).decode()
        port = int(re.search(r":(\d+) \(", line).group(1))
        client = await login(port)
        await client.wait_for(lambda c: len(numbered(c.messages)) >= 200)
        await client.action("Action: Logoff\nActionID: bye")
        await client.wait_eof()
        received = numbered(client.messages)
    finally:
        if process.returncode is None:
            process.terminate()
        async with asyncio.timeout(WAIT):
            assert await process.wait() == 0
    stats = json.loads(stats_file.read_text())
    (stream,) = stats["streams"]
    assert stream["end"] == "logoff" and stream["write_mode"] == "per-event"
    assert received == [(1, k) for k in range(1, stream["sent"] + 1)]


async def test_paused_streams_send_nothing_and_resume_on_the_clock() -> None:
    rate = 1000
    async with AMISimulator(stream_rate=rate) as sim:
        client = await login(sim.port)
        await client.wait_for(lambda c: len(numbered(c.messages)) >= 50)
        sim.pause_streams()
        held = sim.stats.streams[1].sent
        await client.wait_for(lambda c: len(numbered(c.messages)) >= held)
        await asyncio.sleep(0.1)                  # ~100 events would have been due meanwhile
        ping = await client.action("Action: Ping\nActionID: p")   # the session still answers
        assert b"Pong" in ping and sim.stats.streams[1].sent == held
        sim.resume_streams()
        resumed = time.monotonic()
        await client.wait_for(lambda c: len(numbered(c.messages)) >= held + 50)
        # No burst for the time it was held: paced from where it stopped.
        assert sim.stats.streams[1].sent - held <= rate * (time.monotonic() - resumed) + 1
        got = [k for _, k in numbered(client.messages)]
        assert got == list(range(1, len(got) + 1))
        await client.close()


def test_pacing_sleeps_between_events_under_uvloop_too() -> None:
    # uvloop truncates timers to the millisecond below: a sub-millisecond wait must not turn
    # into a busy loop until the deadline (it did: ~30 loop turns per event at 1,000/s).
    uvloop = pytest.importorskip("uvloop")

    async def stream() -> tuple[int, int]:
        async with AMISimulator(stream_rate=1000) as sim:
            client = await login(sim.port)
            await client.wait_for(lambda c: len(numbered(c.messages)) >= 300)
            await client.close()
            return sim.stats.streams[1].sent, sim.stats.streams[1].wakeups

    sent, wakeups = uvloop.run(stream())
    assert wakeups <= 3 * sent
