"""The asyncio session against the simulator over real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amid.ami.session import (
    ActionTimeout,
    AMIClient,
    AMIConnectionError,
    ConnectionState,
    LoginError,
    is_error,
    is_success,
    parse_host,
)
from amid.simulator import AMISimulator

SECRET = "amidsecret"


@pytest.fixture
async def sim():
    async with AMISimulator(auth_failure_delay=0.05, call_spread=0.0) as simulator:
        yield simulator


def client_for(sim: AMISimulator, **kw) -> AMIClient:
    kw.setdefault("username", "amid")
    kw.setdefault("secret", SECRET)
    kw.setdefault("ping_interval", 30)
    kw.setdefault("reconnect_min_delay", 0.05)
    kw.setdefault("reconnect_max_delay", 0.2)
    kw.setdefault("name", "pbx1")
    return AMIClient("127.0.0.1", sim.port, **kw)


async def next_change(changes, state: ConnectionState, timeout: float = 5.0):
    async with asyncio.timeout(timeout):
        async for change in changes:
            if change.state is state:
                return change


@settings(max_examples=300, deadline=None)
@given(host=st.one_of(st.from_regex(r"[a-z0-9.-]{1,20}", fullmatch=True),
                      st.ip_addresses().map(str)),
       port=st.integers(0, 65535))
def test_every_address_amid_shows_reads_back(host, port):
    """format_host and split_host_port (amid.ami.address) are one pair for every part of amid
    (servers, listen addresses, sink peers): what one writes, the other reads."""
    from amid.ami.address import format_host, split_host_port
    assert split_host_port(f"{format_host(host)}:{port}") == (host, port)
    assert split_host_port(format_host(host)) == (host, None)


def test_parse_host_forms():
    assert parse_host("pbx") == ("pbx", 5038)
    assert parse_host("pbx:5039") == ("pbx", 5039)
    assert parse_host("[::1]:6000") == ("::1", 6000)
    assert parse_host("[::1]") == ("::1", 5038)
    assert parse_host("pbx", default_port=1234) == ("pbx", 1234)
    assert AMIClient("pbx:7000", username="u", secret="s").port == 7000
    for bad in ("pbx:99999", "pbx:0"):  # the socket layer would wrap 99999 to 34463 silently
        with pytest.raises(ValueError, match="is not in 1-65535"):
            AMIClient(bad, username="u", secret="s")
    for bad, says in (("[::1]x", "invalid address"), ("pbx:port", "invalid port")):
        with pytest.raises(ValueError, match=says):
            AMIClient(bad, username="u", secret="s")


@pytest.mark.parametrize("auth", ["md5", "plain"])
async def test_login_ping_and_events_through_handlers(sim, auth):
    got: dict[str, list] = {"newchannel": [], "dial": [], "any": []}
    done = asyncio.Event()

    async with client_for(sim, auth=auth) as ami:
        assert ami.banner == "Asterisk Call Manager/11.0.0"
        ami.add_event_handler("NEWCHANNEL", got["newchannel"].append)   # case-insensitive
        ami.add_event_handler("Dial*", got["dial"].append)               # glob

        async def any_event(event):  # async handlers work too
            got["any"].append(event)
            if event.name == "OriginateResponse":
                done.set()
        ami.add_event_handler("*", any_event)

        pong = await ami.ping()
        assert is_success(pong) and pong["Ping"] == "Pong" and pong["Timestamp"]
        response = await ami.originate("Local/200@test", exten="100", context="test", priority=1)
        assert response.message == "Originate successfully queued"
        async with asyncio.timeout(5):
            await done.wait()
    assert len(got["newchannel"]) == 4
    assert {e.name for e in got["dial"]} == {"DialBegin", "DialEnd"}
    names = {e.name for e in got["any"]}
    assert "Newchannel" not in names and "DialBegin" not in names  # taken by specific handlers
    assert "VarSet" in names and "Hangup" in names
    # the envelope
    every = sorted(got["newchannel"] + got["dial"] + got["any"], key=lambda e: e.seq)
    assert all(e.server == "pbx1" and e.epoch == 1 and e.received_at > 0 for e in every)
    assert len({e.seq for e in every}) == len(every)


async def test_events_iterator_and_envelope_sequence(sim):
    async with client_for(sim) as ami:
        seen = []

        async def consume():
            async for event in ami.events():
                seen.append(event)
                if event.name == "OriginateResponse":
                    return

        consumer = asyncio.create_task(consume())
        await asyncio.sleep(0)
        await ami.originate("Local/200@test", exten="100", context="test", priority=1)
        async with asyncio.timeout(5):
            await consumer
    seqs = [e.seq for e in seen]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert ami.stats.events_by_name["Newchannel"] == 4


async def test_tls_login(certs):
    async with AMISimulator(ssl=certs.server_context()) as simulator:
        async with AMIClient("localhost", simulator.port, username="amid", secret=SECRET,
                             ssl=certs.client_context()) as ami:
            assert is_success(await ami.ping())
        # verification is on by default: an unknown CA is refused
        with pytest.raises(AMIConnectionError):
            async with AMIClient("localhost", simulator.port, username="amid", secret=SECRET, ssl=True,
                                 connect_timeout=5):
                pass


async def test_login_failure_is_a_clear_error_without_the_secret(sim, caplog):
    caplog.set_level(logging.DEBUG)
    with pytest.raises(LoginError, match="Authentication failed"):
        async with client_for(sim, secret="wrong-s3cret-value"):
            pass
    assert "wrong-s3cret-value" not in caplog.text


async def test_login_failure_is_retried_with_backoff_never_a_hot_loop(sim, caplog):
    caplog.set_level(logging.INFO, logger="amid.ami")
    client = client_for(sim, secret="wrong-s3cret-value", reconnect_min_delay=0.1,
                        reconnect_max_delay=0.4)
    delays = []
    changes = client.state_changes()
    await client.start()
    try:
        for _ in range(3):
            change = await next_change(changes, ConnectionState.DISCONNECTED)
            assert change.reason == "login_failed"
    finally:
        await client.close()
    assert client.stats.login_failures_total >= 3
    for record in caplog.records:
        if record.getMessage().startswith("reconnecting to"):
            delays.append(float(record.getMessage().split(" in ")[1].rstrip("s")))
    assert delays and all(0.1 <= d <= 0.4 for d in delays)
    assert "wrong-s3cret-value" not in caplog.text
    assert not any(r.exc_info for r in caplog.records)  # a clear line, no traceback


async def test_actions_before_connect_and_unknown_actions(sim):
    client = client_for(sim)
    with pytest.raises(AMIConnectionError):
        await client.ping()
    async with client:
        response = await client.send_action("NoSuchAction")
        assert is_error(response) and "Invalid/unknown command" in response.message


async def test_half_open_connection_detected_by_ping_timeout_then_reconnect(sim):
    client = client_for(sim, ping_interval=0.05, ping_timeout=0.2, filters=["Event: Newchannel"])
    changes = client.state_changes()
    await client.start()
    try:
        await next_change(changes, ConnectionState.CONNECTED)
        sim.set_faults(ignore_pings=True)      # socket stays open, pings go unanswered
        down = await next_change(changes, ConnectionState.DISCONNECTED)
        assert down.reason == "ping_timeout"
        sim.set_faults(ignore_pings=False)
        up = await next_change(changes, ConnectionState.CONNECTED)
        assert up.epoch == 2 and up.gap_start is not None and up.gap_seconds >= 0
        # filters re-applied on the new connection: only Newchannel arrives
        sessions = await sim.wait_for_sessions(1)
        got = []
        client.add_listener(got.append)
        await client.originate("Local/200@test", exten="100", context="test", priority=1)
        async with asyncio.timeout(5):
            while len(got) < 4:
                await asyncio.sleep(0.01)
        assert {e.name for e in got} == {"Newchannel"} and len(sessions) >= 1
        assert client.stats.disconnects_total["ping_timeout"] == 1
    finally:
        await client.close()


async def test_close_mid_message_and_garbage_recycle_the_connection(sim):
    client = client_for(sim)
    changes = client.state_changes()
    await client.start()
    try:
        await next_change(changes, ConnectionState.CONNECTED)
        sim.set_faults(garbage=b"\x00\xffnot ami at all" + b"x" * (2 << 20))
        await sim.broadcast(b"Event: Poke\r\nPrivilege: system,all\r\n\r\n")
        down = await next_change(changes, ConnectionState.DISCONNECTED)
        assert down.reason == "protocol_error"
        sim.set_faults(garbage=None)
        await next_change(changes, ConnectionState.CONNECTED)
        assert client.stats.protocol_errors_total["message_too_large"] == 1
        sim.set_faults(close_mid_message_after=0)
        await sim.broadcast(b"Event: Poke\r\nPrivilege: system,all\r\nA: b\r\n\r\n")
        down = await next_change(changes, ConnectionState.DISCONNECTED)
        assert down.reason == "eof"
        sim.set_faults(close_mid_message_after=None)
        up = await next_change(changes, ConnectionState.CONNECTED)
        assert up.epoch == 3
    finally:
        await client.close()


async def test_stalled_server_gives_action_timeout(sim):
    async with client_for(sim, action_timeout=0.2) as ami:
        sim.set_faults(stall=True)
        with pytest.raises(ActionTimeout):
            await ami.ping()
        sim.set_faults(stall=False)


async def test_list_actions_collect_their_events_by_action_id(sim):
    async with client_for(sim) as ami:
        await ami.originate("Local/310@test", exten="300", context="test", priority=1)
        async with asyncio.timeout(5):
            while True:
                channels = await ami.core_show_channels()
                if len(channels.events) == 4:
                    break
                await asyncio.sleep(0.02)
        assert channels.is_list_start
        assert all(e.name == "CoreShowChannel" for e in channels.events)
        assert channels.list_complete["ListItems"] == "4"
        status = await ami.status()
        assert len(status.events) == 4 and all(e.name == "Status" for e in status.events)
        missing = await ami.status("PJSIP/none-0001")
        assert is_error(missing) and missing.message == "No such channel"
        hung = await ami.hangup("/^Local\\/310@test-/")
        assert is_success(hung)


async def test_list_events_do_not_leak_to_handlers(sim):
    async with client_for(sim) as ami:
        names = []
        ami.add_listener(lambda e: names.append(e.name))
        await ami.core_show_channels()
        await ami.ping()
    assert "CoreShowChannelsComplete" not in names


async def test_command_output_lines(sim):
    async with client_for(sim) as ami:
        version = await ami.command("core show version")
        assert is_success(version) and version.output[0].startswith("Asterisk 22")
        bad = await ami.command("no such cli command")
        assert is_error(bad) and bad.output


async def test_failing_and_slow_handlers_never_block_the_reader(sim, caplog):
    async with client_for(sim, handler_queue_size=100_000) as ami:
        release = asyncio.Event()
        fast = []

        def broken(event):
            raise RuntimeError("handler bug")

        async def slow(event):
            await release.wait()

        ami.add_event_handler("VarSet", broken)
        ami.add_event_handler("Newexten", slow)
        ami.add_listener(fast.append)
        await ami.originate("Local/200@test", exten="100", context="test", priority=1)
        async with asyncio.timeout(5):
            while not any(e.name == "OriginateResponse" for e in fast):
                await asyncio.sleep(0.01)
        # the reader kept going while a handler was stuck; pings still work
        assert is_success(await ami.ping())
        assert ami.connected
        release.set()
        async with asyncio.timeout(5):
            while ami.stats.handler_errors_total < 25:
                await asyncio.sleep(0.01)
    # every failure counted, but the log holds one traceback (and at most one summary line)
    failures = [r for r in caplog.records if "broken" in r.getMessage()]
    assert 1 <= len(failures) <= 2 and failures[0].exc_info is not None
    # what no summary covered yet is summed up when the session closes
    assert any(r.getMessage().endswith("more handler failures") for r in caplog.records)


async def test_close_logs_off_and_is_idempotent(sim):
    client = client_for(sim)
    await client.connect()
    sessions = await sim.wait_for_sessions(1)
    await client.close()
    await client.close()
    assert client.state is ConnectionState.CLOSED
    assert client.stats.disconnects_total["closed"] == 1 and not client.stats.up
    async with asyncio.timeout(5):
        while sessions[0].logged_in:
            await asyncio.sleep(0.01)


async def test_shutdown_event_then_eof_is_reported_as_server_shutdown():
    simulator = AMISimulator()
    await simulator.start()
    client = AMIClient("127.0.0.1", simulator.port, username="amid", secret=SECRET,
                       reconnect_min_delay=5, ping_interval=30)
    changes = client.state_changes()
    await client.start()
    try:
        await next_change(changes, ConnectionState.CONNECTED)
        await simulator.close()
        down = await next_change(changes, ConnectionState.DISCONNECTED)
        assert down.reason == "server_shutdown"
    finally:
        await client.close()


@pytest.mark.parametrize("auth, action, waited", [("md5", "Challenge", "0.2s"),
                                                   ("plain", "Login", "2.2s")])
async def test_a_login_nobody_answers_names_the_action_and_the_time_waited(auth, action, waited):
    async def banner_then_silence(reader, writer):  # e.g. a verbatim replay, or a wedged PBX
        writer.write(b"Asterisk Call Manager/9.0.0\r\n")
        await reader.read()  # until the client gives up and closes
        writer.close()

    server = await asyncio.start_server(banner_then_silence, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = AMIClient("127.0.0.1", port, username="amid", secret=SECRET, auth=auth,
                       login_timeout=0.2, reconnect=False)
    try:
        with pytest.raises(LoginError, match=f"^no answer to {action} within {waited}$"):
            async with asyncio.timeout(10):
                await client.connect()
    finally:
        await client.close()
        server.close()
        await server.wait_closed()


async def test_batch_listeners_get_each_read_s_events_in_order_once(sim):
    """The daemon's router listens per read: the batches, joined, are exactly what a per-event
    listener sees, in the same order; a failing batch listener is counted and harms no one."""
    async with client_for(sim) as ami:
        single: list = []
        batches: list[list] = []
        ami.add_listener(single.append)
        ami.add_batch_listener(lambda events: batches.append(list(events)))

        def broken(events):
            raise RuntimeError("boom")
        ami.add_batch_listener(broken)
        await ami.originate("Local/200@test", exten="100", context="test", priority=1)
        async with asyncio.timeout(5):
            while not any(e.name == "OriginateResponse" for e in single):
                await asyncio.sleep(0.01)
    joined = [e for batch in batches for e in batch]
    assert joined == single and all(batches)
    assert [e.seq for e in joined] == sorted(e.seq for e in joined)
    assert ami.stats.handler_errors_total == len(batches)


# ---------------------------------------------------------------- settings, TLS model, config keys


async def test_a_frozen_settings_object_makes_the_same_client(certs):
    """AMIClient.from_settings(SessionSettings) is what the daemon uses: its TLS block builds
    the one TLS context (server_hostname checked against the certificate)."""
    from amid.ami.settings import SessionSettings
    from amid.ami.tls import TlsSettings
    async with AMISimulator(ssl=certs.server_context()) as simulator:
        settings = SessionSettings(
            host="127.0.0.1", port=simulator.port, username="amid", secret=SECRET, name="pbx-tls",
            tls=TlsSettings(ca_file=str(certs.ca_file), server_hostname="localhost"))
        assert "amidsecret" not in repr(settings)
        async with AMIClient.from_settings(settings) as ami:
            assert ami.name == "pbx-tls" and is_success(await ami.ping())
        wrong_name = SessionSettings(
            host="127.0.0.1", port=simulator.port, username="amid", secret=SECRET,
            tls=TlsSettings(ca_file=str(certs.ca_file), server_hostname="not-the-cert-name"),
            connect_timeout=5)
        with pytest.raises(AMIConnectionError):
            async with AMIClient.from_settings(wrong_name):
                pass
    with pytest.raises(ValueError, match="is not in 1-65535"):
        SessionSettings(host="pbx", port=0, username="u", secret="s")
    with pytest.raises(ValueError, match="key_file needs cert_file"):
        TlsSettings(key_file="k.pem")


def test_the_one_tls_builder_honours_verify_and_the_ca_file(certs):
    import ssl

    from amid.ami.tls import TlsSettings, client_context
    strict = client_context()
    assert strict.verify_mode is ssl.CERT_REQUIRED and strict.check_hostname
    loose = client_context(TlsSettings(verify=False))
    assert loose.verify_mode is ssl.CERT_NONE and not loose.check_hostname
    pinned = client_context(TlsSettings(ca_file=str(certs.ca_file)))
    assert [c["subject"] for c in pinned.get_ca_certs()] == [((("commonName", "amid test CA"),),)]
    with pytest.raises(FileNotFoundError):
        client_context(TlsSettings(ca_file="/nonexistent/ca.pem"))


def _config(tmp_path, text: str):
    from amid.config import load
    path = tmp_path / "amid.yaml"
    path.write_text(text)
    return path, load(path, {})


_SERVER = "servers: [{host: pbx, username: amid, secret: s}]\n"


def test_reconnect_and_malformed_keys_reach_the_config(tmp_path):
    _, config = _config(tmp_path, "servers:\n  - {host: pbx, username: amid, secret: s,\n"
                                  "     reconnect: {min_delay: 2s, max_delay: 1m, stable_after: 30s},\n"
                                  "     max_malformed: 5, malformed_window: 10s}\n")
    server = config.servers[0]
    assert (server.reconnect.min_delay, server.reconnect.max_delay, server.reconnect.stable_after,
            server.max_malformed, server.malformed_window) == (2.0, 60.0, 30.0, 5, 10.0)
    _, default = _config(tmp_path, _SERVER)
    assert default.servers[0].reconnect.stable_after == 10.0 and default.servers[0].max_malformed == 100


def test_syslog_tls_is_spelled_as_a_server_s_and_the_old_name_is_a_warning(tmp_path, capsys):
    from amid.cli import main
    from amid.config import ConfigError
    from amid.service import config_warnings
    _, config = _config(tmp_path, _SERVER + "sinks:\n  - {name: s, type: syslog, address: 'tls://logs:6514',\n"
                                            "     tls: {server_hostname: logs.example.net, verify: false}}\n")
    tls = config.sinks[0].options.tls_settings
    assert (tls.server_hostname, tls.verify) == ("logs.example.net", False)
    assert config_warnings(config) == []
    path, old = _config(tmp_path, _SERVER + "sinks:\n  - {name: s, type: syslog, address: 'tls://logs:6514',\n"
                                            "     tls_server_name: logs.example.net}\n")
    assert old.sinks[0].options.tls_settings.server_hostname == "logs.example.net"
    assert config_warnings(old) == [
        "sinks[0] (s): tls_server_name is deprecated: use tls: {server_hostname: …}"]
    assert main(["check-config", "--config", str(path)]) == 0  # a warning, not an error
    err = capsys.readouterr().err
    assert "warning: sinks[0] (s): tls_server_name is deprecated" in err
    with pytest.raises(ConfigError, match="give TLS settings once"):
        _config(tmp_path, _SERVER + "sinks:\n  - {name: s, type: syslog, address: 'tls://logs:6514',\n"
                                    "     tls: {verify: false}, tls_server_name: x}\n")
    with pytest.raises(ConfigError, match=r"only apply to a tls:// or relp\+tls:// address"):
        _config(tmp_path, _SERVER + "sinks:\n  - {name: s, type: syslog, address: 'udp://logs:514',\n"
                                    "     tls: {verify: false}}\n")


# ---------------------------------------------------------------- the handler dispatcher alone


def _event(name: str):
    from amid.ami.protocol import Event
    return Event(f"Event: {name}\r\nPrivilege: call,all".encode(), name)


async def test_handler_dispatcher_matches_names_globs_and_the_fallback(caplog):
    from amid.ami.dispatch import CallbackErrors, HandlerDispatcher
    from amid.ami.stats import SessionStats
    stats = SessionStats()
    dispatcher = HandlerDispatcher("pbx", stats, CallbackErrors("pbx", stats), queue_size=3)
    seen: list[tuple[str, str]] = []
    done = asyncio.Event()

    async def dial(event):
        seen.append(("dial", event.name))

    def other(event):
        seen.append(("other", event.name))
        if event.name == "Last":
            done.set()

    assert not dispatcher.active
    dispatcher.add("HANGUP", lambda e: seen.append(("hangup", e.name)))
    dispatcher.add("Dial*", dial)
    dispatcher.add("*", other)
    assert dispatcher.active
    for name in ("Hangup", "DialBegin", "VarSet", "Last"):
        dispatcher.push(_event(name))
    # queue_size 3: the oldest (Hangup) was dropped and counted, the reader never waited
    assert stats.handler_dropped_total == 1
    async with asyncio.timeout(5):
        await done.wait()
    assert seen == [("dial", "DialBegin"), ("other", "VarSet"), ("other", "Last")]
    dispatcher.remove("*", other)
    dispatcher.remove("Dial*", dial)
    with pytest.raises(ValueError):
        dispatcher.remove("Dial*", dial)
    assert dispatcher.handlers_for("dialend") == ()
    await dispatcher.close()
    await dispatcher.close()  # idempotent


def test_every_add_returns_its_undo():
    client = AMIClient("127.0.0.1", 5038, username="u", secret="s", name="pbx")
    got: list = []
    undo = client.add_batch_listener(got.append)
    undo_one = client.add_listener(got.append)
    undo()
    undo_one()
    undo()  # twice is harmless
    from amid.ami.protocol import Parser
    client._dispatch_messages(Parser(expect_banner=False).feed(b"Event: A\r\n\r\n"))
    assert got == [] and client.stats.events_total == 1


async def test_a_close_cancelled_by_the_caller_s_timeout_says_so(sim):
    """Issue 15: the old close swallowed a cancellation aimed at itself while it awaited its
    tasks, so under asyncio.timeout() it "returned normally" with a handler still cleaning up.
    Now the timeout fires; a second close waits for the cleanup and completes."""
    started, cleaning, release = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def slow_to_stop(event):
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cleaning.set()
            await release.wait()  # a cleanup that takes its time
            raise

    client = client_for(sim)
    client.add_event_handler("Poke", slow_to_stop)
    await client.connect()
    await sim.broadcast(b"Event: Poke\r\nPrivilege: system,all\r\n\r\n")
    async with asyncio.timeout(5):
        await started.wait()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.5):
            await client.close()
    assert cleaning.is_set() and client.state is ConnectionState.CLOSED
    release.set()
    async with asyncio.timeout(5):
        await client.close()


@pytest.mark.parametrize("coalesce", [0.0, 0.05])
async def test_read_coalesce_lets_one_read_carry_many_one_event_writes(coalesce: float) -> None:
    """Asterisk writes each event on its own: with ``read_coalesce`` the session leaves the
    socket that long after a small read, so reads come at most about once per window; without
    it, reads follow the writes (the simulator writes every millisecond)."""
    sim = AMISimulator(stream_rate=2000, write_mode="per-event")
    async with sim, client_for(sim, read_coalesce=coalesce) as ami:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(10):
            while ami.stats.events_total < 50:
                await asyncio.sleep(0.01)
        reads0, events0, t0 = ami.stats.reads_total, ami.stats.events_total, loop.time()
        async with asyncio.timeout(10):
            while loop.time() - t0 < 0.5:
                await asyncio.sleep(0.05)
        reads = ami.stats.reads_total - reads0
        events = ami.stats.events_total - events0
        seconds = loop.time() - t0
    assert events >= 500, "the stream kept flowing"
    windows = seconds / 0.05 + 2
    if coalesce:
        assert reads <= windows, (reads, events)
        assert events / reads >= 10, (reads, events)
    else:
        assert reads > windows, "without coalescing a read follows each burst of writes"
