"""Hostile and flaky peers: garbage is counted, logged at a bounded rate and, past
``max_malformed``, ends the connection as a protocol error; events before the login are not
routed; a peer that accepts the login and hangs up is retried with growing, jittered gaps.

The peer is a raw asyncio server on 127.0.0.1 (it answers the login by ActionID, then does
what the test asks) or the simulator with injected bytes. Gaps between connection attempts are
measured on the server side; every bound comes from the delays the test injects.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Self

import pytest

from amid.ami.protocol import Parser
from amid.ami.session import AMIClient, ConnectionState
from amid.simulator import AMISimulator

BANNER = b"Asterisk Call Manager/9.0.0\r\n"
SLACK = 1.0  # seconds a loaded machine may add to a gap: generous beside the injected delays

Peer = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "FakeAMI"], Awaitable[None]]


def _response(action_id: str, message: str) -> bytes:
    return (f"Response: Success\r\nActionID: {action_id}\r\nMessage: {message}\r\n\r\n").encode()


class FakeAMI:
    """A loopback AMI peer: banner, ``before_login`` bytes, a plain Login answered Success
    (``with_login`` bytes written in the same write as the answer), then ``after_login``."""

    def __init__(self, *, after_login: Peer | None = None, before_login: bytes = b"",
                 with_login: tuple[bytes, bytes] = (b"", b"")) -> None:
        self.after_login = after_login
        self.before_login = before_login
        self.with_login = with_login
        self.attempts: list[float] = []   # monotonic time of each accepted connection
        self.new_attempt = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    async def wait_attempts(self, n: int, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while len(self.attempts) < n:
                self.new_attempt.clear()
                await self.new_attempt.wait()

    def gaps(self) -> list[float]:
        return [b - a for a, b in itertools.pairwise(self.attempts)]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.attempts.append(time.monotonic())
        self.new_attempt.set()
        try:
            writer.write(BANNER + self.before_login)
            parser = Parser(expect_banner=False)
            logged_in = False
            while not logged_in:
                data = await reader.read(65536)
                if not data:
                    return
                for action in parser.feed(data):
                    if action.name.lower() == "login":
                        before, after = self.with_login
                        writer.write(before + _response(action["ActionID"], "Authentication accepted")
                                     + after)
                        logged_in = True
            if self.after_login is not None:
                await self.after_login(reader, writer, self)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            self._tasks.discard(task)


async def answer_until_logoff(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    parser = Parser(expect_banner=False)
    while data := await reader.read(65536):
        for action in parser.feed(data):
            if action.name.lower() == "logoff":
                writer.write(_response(action["ActionID"], "Thanks for all the fish."))
                return


async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: FakeAMI) -> None:
    """Accept the login, then close at once (the peer of issue 13's fixed 1.00 s reconnects)."""
    await writer.drain()


def client_for(port: int, **kw) -> AMIClient:
    kw.setdefault("ping_interval", 30)
    kw.setdefault("name", "hostile")
    return AMIClient("127.0.0.1", port, username="amid", secret="x", auth="plain", **kw)


async def test_a_session_that_dies_right_after_login_is_retried_with_growing_jittered_gaps():
    # The jitter draws alternate between the bottom and the top of each band, so the injected
    # delays are known: 0.1, 0.398, 0.4, 1.592, 0.8 (bands [min, 2min], [2min, 4min], ...,
    # then capped at [max/2, max]).
    draws = itertools.cycle([0.0, 0.99])
    async with FakeAMI(after_login=hang_up) as peer:
        client = client_for(peer.port, reconnect_min_delay=0.1, reconnect_max_delay=1.6,
                            reconnect_stable_after=30.0, rng=lambda: next(draws))
        await client.start()
        try:
            await peer.wait_attempts(6, timeout=20)
        finally:
            await client.close()
    gaps = peer.gaps()[:5]
    delays = [0.1, 0.398, 0.4, 1.592, 0.8]
    for gap, delay in zip(gaps, delays, strict=False):
        assert delay <= gap <= delay + SLACK, (gaps, delays)
    assert gaps[3] - gaps[4] > 0.792 - SLACK / 2  # same capped band, different draws: jitter
    assert min(gaps[2:]) >= 4 * 0.1               # grown: no longer min_delay each time
    assert client.stats.connects_total >= 5 and client.stats.disconnects_total["eof"] >= 5


async def test_a_session_that_dies_after_login_backs_off_with_real_randomness():
    async with FakeAMI(after_login=hang_up) as peer:
        client = client_for(peer.port, reconnect_min_delay=0.05, reconnect_max_delay=0.8,
                            reconnect_stable_after=30.0)
        await client.start()
        try:
            await peer.wait_attempts(6, timeout=20)
        finally:
            await client.close()
    gaps = peer.gaps()[:5]
    lows = [0.05, 0.1, 0.2, 0.4, 0.4]  # the bottom of each band: min_delay is a floor
    assert all(gap >= low for gap, low in zip(gaps, lows, strict=False)), gaps
    assert all(gap <= 0.8 + SLACK for gap in gaps), gaps


async def test_a_session_that_held_past_stable_after_starts_the_backoff_over():
    """stable_after 0: every lost session counts as having held, so the gaps stay in the first
    band (what the old code did for every session; now only for sessions that held)."""
    async with FakeAMI(after_login=hang_up) as peer:
        client = client_for(peer.port, reconnect_min_delay=0.05, reconnect_max_delay=5.0,
                            reconnect_stable_after=0.0, rng=lambda: 0.0)
        await client.start()
        try:
            await peer.wait_attempts(6, timeout=20)
        finally:
            await client.close()
    gaps = peer.gaps()[:5]
    # Without the reset the fifth delay would be at least 0.8 s (band [0.8, 1.6]).
    assert all(0.05 <= gap < 0.8 for gap in gaps), gaps


def _garbage(count: int, seed: int = 1) -> bytes:
    """``count`` messages of random bytes (no CR/LF inside), each ended by a blank line."""
    rng = random.Random(seed)
    chunks = []
    for _ in range(count):
        body = bytes(b for b in rng.randbytes(60) if b not in (10, 13)) or b"x"
        chunks.append(body + b"\r\n\r\n")
    return b"".join(chunks)


async def test_garbage_after_login_is_counted_logged_at_a_bounded_rate_and_drops_the_session(caplog):
    """Issue 13: random bytes after login gave 66,545 log lines in 25 s while the session stayed
    "logged in". Now: each connection ends as a protocol_error once more than max_malformed
    messages came within the window, the log holds a bounded number of lines, and the peer is
    retried with growing gaps."""
    caplog.set_level(logging.DEBUG, logger="amid")

    async def spew(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: FakeAMI) -> None:
        writer.write(_garbage(2000) + b"Event: AfterGarbage\r\nPrivilege: system,all\r\n\r\n")
        await writer.drain()
        await reader.read()  # until the client hangs up

    got: list[str] = []
    started = time.monotonic()
    async with FakeAMI(after_login=spew) as peer:
        client = client_for(peer.port, reconnect_min_delay=0.05, reconnect_max_delay=0.8,
                            max_malformed=20)
        client.add_listener(lambda event: got.append(event.name))
        changes = client.state_changes()
        await client.start()
        try:
            async with asyncio.timeout(10):
                async for change in changes:
                    if change.state is ConnectionState.DISCONNECTED:
                        assert change.reason == "protocol_error"
                        assert "21 malformed messages within 60s" in (change.detail or "")
                        break
            await peer.wait_attempts(5, timeout=20)
        finally:
            await client.close()
    elapsed = time.monotonic() - started
    stats = client.stats
    connections = len(peer.attempts)
    assert stats.disconnects_total["protocol_error"] >= 4
    # Counted: at least max_malformed + 1 per dropped connection, never all 2000 of each.
    assert 21 * 4 <= stats.protocol_errors_total["malformed_message"] <= 21 * connections
    assert "AfterGarbage" not in got  # nothing after the garbage was taken
    records = [r for r in caplog.records if r.name.startswith("amid")]
    malformed_lines = [r for r in records if "neither response nor event" in r.getMessage()]
    assert 1 <= len(malformed_lines) <= 1 + elapsed / 10  # one per 10 s at most
    # Per connection: logged in, dropped, reconnecting; plus the close.
    assert len(records) <= 3 * connections + len(malformed_lines) + 5, [r.getMessage() for r in records]
    gaps = peer.gaps()[:4]
    assert gaps[-1] >= 0.4 and all(gap >= 0.05 for gap in gaps), gaps


async def test_garbage_below_the_threshold_is_counted_and_the_session_kept(caplog):
    caplog.set_level(logging.DEBUG, logger="amid")

    async def a_little(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: FakeAMI) -> None:
        writer.write(_garbage(5) + b"Event: StillHere\r\n\r\n")
        await writer.drain()
        await answer_until_logoff(reader, writer)

    got: list[str] = []
    async with FakeAMI(after_login=a_little) as peer:
        client = client_for(peer.port, max_malformed=5)
        client.add_listener(lambda event: got.append(event.name))
        async with client:
            async with asyncio.timeout(5):
                while "StillHere" not in got:
                    await asyncio.sleep(0.01)
            assert client.connected
            assert client.stats.protocol_errors_total["malformed_message"] == 5
    lines = [r for r in caplog.records if "neither response nor event" in r.getMessage()]
    assert len(lines) == 1


async def test_garbage_injected_by_the_simulator_drops_and_reconnects(caplog):
    caplog.set_level(logging.DEBUG, logger="amid")
    async with AMISimulator(call_spread=0.0) as sim:
        client = AMIClient("127.0.0.1", sim.port, username="amid", secret="amidsecret",
                           ping_interval=30, reconnect_min_delay=0.05, reconnect_max_delay=0.2,
                           max_malformed=10, name="pbx1")
        changes = client.state_changes()
        await client.start()
        try:
            async with asyncio.timeout(10):
                async for change in changes:
                    if change.state is ConnectionState.CONNECTED:
                        break
            (session,) = await sim.wait_for_sessions(1)
            session.inject(_garbage(500, seed=2))
            async with asyncio.timeout(10):
                async for change in changes:
                    if change.state is ConnectionState.DISCONNECTED:
                        assert change.reason == "protocol_error"
                        break
                async for change in changes:
                    if change.state is ConnectionState.CONNECTED:
                        break
            assert client.stats.protocol_errors_total["malformed_message"] == 11
        finally:
            await client.close()
    lines = [r for r in caplog.records if "neither response nor event" in r.getMessage()]
    assert len(lines) == 1


async def test_events_before_the_login_succeeded_are_not_routed(caplog):
    """An event before the Login response (on its own, and in the same read as the response)
    reaches no listener, batch listener or handler; it is counted and logged once. The event
    Asterisk sends right after the Login response (FullyBooted) is routed as ever."""
    caplog.set_level(logging.DEBUG, logger="amid")
    sneaky = b"Event: Sneaky\r\nPrivilege: system,all\r\n\r\n"
    booted = b"Event: FullyBooted\r\nPrivilege: system,all\r\nStatus: Fully Booted\r\n\r\n"
    async def stay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: FakeAMI) -> None:
        await answer_until_logoff(reader, writer)

    async with FakeAMI(before_login=sneaky, with_login=(sneaky * 2, booted), after_login=stay) as peer:
        client = client_for(peer.port)
        single: list[str] = []
        batched: list[str] = []
        handled: list[str] = []
        client.add_listener(lambda event: single.append(event.name))
        client.add_batch_listener(lambda events: batched.extend(e.name for e in events))
        client.add_event_handler("*", lambda event: handled.append(event.name))
        async with client:
            async with asyncio.timeout(5):
                while "FullyBooted" not in handled:
                    await asyncio.sleep(0.01)
    assert single == batched == handled == ["FullyBooted"]
    assert client.stats.protocol_errors_total["event_before_login"] == 3
    lines = [r for r in caplog.records if "before the login succeeded" in r.getMessage()]
    assert len(lines) == 1


@pytest.mark.parametrize("max_malformed", [0, 3])
async def test_max_malformed_is_the_number_tolerated(max_malformed):
    async def some(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: FakeAMI) -> None:
        writer.write(_garbage(max_malformed + 1))
        await writer.drain()
        await reader.read()

    async with FakeAMI(after_login=some) as peer:
        client = client_for(peer.port, max_malformed=max_malformed, reconnect=False)
        changes = client.state_changes()
        await client.start()
        try:
            async with asyncio.timeout(10):
                async for change in changes:
                    if change.state is ConnectionState.DISCONNECTED:
                        break
        finally:
            await client.close()
    assert change.reason == "protocol_error"
    assert client.stats.protocol_errors_total["malformed_message"] == max_malformed + 1
