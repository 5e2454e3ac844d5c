"""The daemon end to end, in process: simulator -> sessions -> router -> file, syslog (a real
rsyslogd) and webhook (a real aiohttp receiver) sinks, with metrics scraped over HTTP."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from http_receiver import HttpReceiver
from promparse import scrape, total
from rsyslog import RsyslogServer, require_rsyslogd

from amid.config import load
from amid.service import Daemon
from amid.simulator import AMISimulator
from amid.sinks.registry import SinkType, SinkTypes

CALL_EVENTS = 80  # one Local/200 -> 100 call, as captured from Asterisk 22 (s04)


@pytest.fixture(scope="module")
def rsyslogd(tmp_path_factory):
    server = RsyslogServer(tmp_path_factory.mktemp("rsyslog-daemon"), require_rsyslogd())
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def sim():
    async with AMISimulator(call_spread=0.0, auth_failure_delay=0.05) as simulator:
        yield simulator


def write_config(tmp_path: Path, sim: AMISimulator, sinks: list[dict], **extra) -> Path:
    config = {
        "servers": [{"name": "pbx1", "host": "127.0.0.1", "port": sim.port, "username": "amid",
                     "secret": "amidsecret", "ping_interval": "1s", "ping_timeout": "1s",
                     "reconnect": {"min_delay": "50ms", "max_delay": "200ms"}}],
        "sinks": sinks,
        "http": {"listen": "127.0.0.1:0"},
        "state_dir": str(tmp_path / "state"),
        "shutdown_timeout": "5s",
        **extra,
    }
    path = tmp_path / "amid.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


async def start_daemon(path: Path, *, types: SinkTypes | None = None,
                       reload_drain_timeout: float = 2.0,
                       spool_factory: Any = None) -> tuple[Daemon, asyncio.Task]:
    types = types or SinkTypes.discover()
    config = load(path, {}, sink_option_models=types.option_models)
    extra = {} if spool_factory is None else {"spool_factory": spool_factory}
    daemon = Daemon(config, config_path=str(path), environ={}, types=types, install_signals=False,
                    reload_drain_timeout=reload_drain_timeout, **extra)
    task = asyncio.create_task(daemon.run())
    async with asyncio.timeout(10):
        await daemon.ready.wait()
    return daemon, task


async def stop_daemon(daemon: Daemon, task: asyncio.Task) -> None:
    daemon.request_stop()
    async with asyncio.timeout(15):
        assert await task == 0


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


async def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02):
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(interval)


async def test_every_event_reaches_file_syslog_and_webhook(tmp_path, sim, rsyslogd):
    events_file = tmp_path / "events.jsonl"
    async with HttpReceiver() as receiver:
        path = write_config(tmp_path, sim, [
            {"name": "file", "type": "file", "path": str(events_file), "overflow": "spool",
             "batch": {"max_wait": "10ms"}},
            {"name": "syslog", "type": "syslog", "address": f"tcp://127.0.0.1:{rsyslogd.tcp_port}",
             "app_name": "amid-e2e", "batch": {"max_wait": "10ms"}},
            {"name": "webhook", "type": "webhook", "url": receiver.url, "secret": "whsec_dGVzdHNlY3JldA==",
             "batch": {"max_wait": "10ms"}},
        ])
        daemon, task = await start_daemon(path)
        try:
            for _ in range(3):
                sim.originate("Local/200@test", exten="100")
            stats = daemon.server_stats["pbx1"]
            await wait_until(lambda: stats.events_by_name["OriginateResponse"] == 3)
            expected = stats.events_total
            assert expected >= 3 * CALL_EVENTS
            await wait_until(lambda: len(read_jsonl(events_file)) >= expected)
            hooks = await receiver.wait_for_records(expected)
            logged = await rsyslogd.wait_for(lambda line: line["app_name"] == "amid-e2e", expected)

            file_records = read_jsonl(events_file)
            ids = [r["id"] for r in file_records]
            assert len(ids) == len(set(ids)) == expected
            assert [r["id"] for r in hooks] == ids                 # same events, same order
            assert [json.loads(line["msg"])["id"] for line in logged] == ids
            # the documented record shape, fields verbatim
            newchannel = next(r for r in file_records if r["event"] == "Newchannel")
            assert newchannel["server"] == "pbx1" and newchannel["fields"]["Event"] == "Newchannel"
            assert newchannel["fields"]["AccountCode"] == ""
            assert set(newchannel) >= {"id", "server", "epoch", "seq", "received_at", "event", "fields"}

            samples = await scrape(daemon.http.port)
            assert samples[("amid_ami_up", (("server", "pbx1"),))] == 1
            for sink in ("file", "syslog", "webhook"):
                received = total(samples, "amid_sink_received_events_total", sink=sink)
                accounted = (total(samples, "amid_sink_sent_events_total", sink=sink)
                             + total(samples, "amid_sink_dropped_events_total", sink=sink)
                             + total(samples, "amid_sink_dead_lettered_events_total", sink=sink)
                             + total(samples, "amid_sink_queue_events", sink=sink)
                             + total(samples, "amid_sink_in_flight_events", sink=sink)
                             + total(samples, "amid_sink_spool_events", sink=sink))
                assert received == accounted == expected
            ok, checks = daemon.readiness()
            assert ok, checks
        finally:
            await stop_daemon(daemon, task)


async def test_a_sink_that_never_opened_keeps_the_daemon_unready_until_it_opens(tmp_path, sim, caplog):
    blocker = tmp_path / "logs"
    blocker.write_text("")  # a file where the sink's directory should be: open fails
    events_file = blocker / "events.jsonl"
    path = write_config(tmp_path, sim, [{"name": "file", "type": "file", "path": str(events_file),
                                         "batch": {"max_wait": "10ms"},
                                         "retry": {"min_delay": "10ms", "max_delay": "100ms"}}],
                        start_timeout="300ms")
    daemon, task = await start_daemon(path)  # ready (systemd READY=1) once start_timeout passed
    try:
        assert "sinks not opened within start_timeout (0.3s): file" in caplog.text
        ok, checks = daemon.readiness()
        assert not ok and checks["sink:file"].startswith("not opened yet (retrying: start: ")
        assert checks["server:pbx1"] == "logged in"
        sim.originate("Local/200@test", exten="100")
        stats = daemon.server_stats["pbx1"]
        await wait_until(lambda: stats.events_by_name["OriginateResponse"] == 1)
        blocker.unlink()
        blocker.mkdir()  # the operator fixes it: the retrying sink opens and delivers the backlog
        await wait_until(lambda: daemon.readiness()[0], timeout=10)
        await wait_until(lambda: len(read_jsonl(events_file)) == stats.events_total)
    finally:
        await stop_daemon(daemon, task)


async def test_a_daemon_stopped_before_it_was_ready_never_reports_ready(tmp_path, sim, caplog):
    blocker = tmp_path / "logs"
    blocker.write_text("")  # the file sink cannot open: READY waits up to start_timeout
    path = write_config(tmp_path, sim, [{"name": "file", "type": "file", "overflow": "spool",
                                         "path": str(blocker / "events.jsonl")}],
                        start_timeout="60s")
    types = SinkTypes.discover()
    config = load(path, {}, sink_option_models=types.option_models)
    daemon = Daemon(config, config_path=str(path), environ={}, types=types, install_signals=False)
    task = asyncio.create_task(daemon.run())
    await wait_until(lambda: "file" in daemon.sinks
                     and daemon.sinks["file"].runner.stats.state == "retrying")
    daemon.request_stop()
    async with asyncio.timeout(15):
        assert await task == 0
    assert not daemon.ready.is_set()
    assert "reporting ready anyway" not in caplog.text


async def test_reconnect_emits_a_gap_event(tmp_path, sim):
    events_file = tmp_path / "events.jsonl"
    path = write_config(tmp_path, sim, [{"name": "file", "type": "file", "path": str(events_file),
                                         "batch": {"max_wait": "10ms"}}])
    daemon, task = await start_daemon(path)
    try:
        sim.set_faults(close_mid_message_after=0)
        await sim.broadcast(b"Event: Poke\r\nPrivilege: system,all\r\nA: b\r\n\r\n")
        sim.set_faults(close_mid_message_after=None)
        await wait_until(lambda: any(r["event"] == "AmidGap" for r in read_jsonl(events_file)))
        gap = next(r for r in read_jsonl(events_file) if r["event"] == "AmidGap")
        assert gap["server"] == "pbx1" and gap["epoch"] == 2
        assert gap["fields"]["Start"] <= gap["fields"]["End"]
        assert float(gap["fields"]["Seconds"]) >= 0
    finally:
        await stop_daemon(daemon, task)


async def test_webhook_down_for_a_while_loses_nothing_with_spool(tmp_path, sim):
    async with HttpReceiver() as receiver:
        path = write_config(tmp_path, sim, [
            {"name": "webhook", "type": "webhook", "url": receiver.url, "overflow": "spool",
             "queue": {"max_events": 50}, "batch": {"max_events": 40, "max_wait": "10ms"},
             "retry": {"min_delay": "20ms", "max_delay": "100ms"}},
        ])
        daemon, task = await start_daemon(path)
        try:
            await receiver.go_away()
            for _ in range(5):
                sim.originate("Local/200@test", exten="100")
            stats = daemon.server_stats["pbx1"]
            await wait_until(lambda: stats.events_by_name["OriginateResponse"] == 5)
            runner = daemon.sinks["webhook"].runner
            await wait_until(lambda: runner.stats.failed_attempts_total >= 3)
            assert runner.stats.spool_events > 0  # the queue overflowed into the spool
            await receiver.come_back()
            expected = stats.events_total
            await receiver.wait_for_records(expected, timeout=20)
            await wait_until(lambda: runner.stats.sent_total >= expected, timeout=20)
            ids = [r["id"] for r in receiver.delivered_records]
            assert set(ids) == {r for r in ids} and len(set(ids)) == expected
            assert sum(runner.stats.dropped_total.values()) == 0
        finally:
            await stop_daemon(daemon, task)


async def test_a_stalled_sink_never_delays_the_others_or_the_session(tmp_path, sim):
    events_file = tmp_path / "events.jsonl"
    async with HttpReceiver() as receiver:
        receiver.stall()
        path = write_config(tmp_path, sim, [
            {"name": "file", "type": "file", "path": str(events_file), "batch": {"max_wait": "10ms"}},
            {"name": "webhook", "type": "webhook", "url": receiver.url, "timeout": 30,
             "batch": {"max_wait": "10ms"}},
        ])
        daemon, task = await start_daemon(path)
        try:
            for _ in range(2):
                sim.originate("Local/200@test", exten="100")
            stats = daemon.server_stats["pbx1"]
            await wait_until(lambda: stats.events_by_name["OriginateResponse"] == 2)
            await wait_until(lambda: len(read_jsonl(events_file)) >= stats.events_total)
            client = daemon.clients["pbx1"]
            assert (await client.ping()).is_success
            receiver.release()
        finally:
            await stop_daemon(daemon, task)


async def test_reload_hands_queued_events_to_a_changed_sink_and_keeps_servers(tmp_path, sim, caplog):
    async with HttpReceiver() as receiver:
        receiver.stall()
        sinks = [{"name": "webhook", "type": "webhook", "url": receiver.url, "timeout": 30,
                  "batch": {"max_events": 10, "max_wait": "10ms"}}]
        path = write_config(tmp_path, sim, sinks)
        daemon, task = await start_daemon(path, reload_drain_timeout=0.2)
        try:
            client = daemon.clients["pbx1"]
            for _ in range(3):
                sim.originate("Local/200@test", exten="100")
            stats = daemon.server_stats["pbx1"]
            await wait_until(lambda: stats.events_by_name["OriginateResponse"] == 3)
            old_runner = daemon.sinks["webhook"].runner
            assert old_runner.stats.queue_events > 0  # stuck behind the stalled receiver
            # a changed sink (batch size) and an unchanged server
            config = yaml.safe_load(path.read_text())
            config["sinks"][0]["batch"]["max_events"] = 500
            path.write_text(yaml.safe_dump(config))
            assert await daemon.reload()      # while the receiver still stalls
            new_runner = daemon.sinks["webhook"].runner
            assert new_runner is not old_runner
            assert old_runner.stats.handed_over_total > 0
            receiver.release()
            assert daemon.clients["pbx1"] is client and client.epoch == 1  # no reconnect
            expected = stats.events_total
            await wait_until(lambda: len({r["id"] for r in receiver.delivered_records}) >= expected,
                             timeout=20)
            assert sum(old_runner.stats.dropped_total.values()) == 0
            # a bad config is refused and the running one kept
            path.write_text("servers: [{host: x}]\nbogus: 1\n")
            assert not await daemon.reload()
            assert daemon.sinks["webhook"].runner is new_runner
            # a changed server reconnects
            config["servers"][0]["ping_interval"] = "2s"
            path.write_text(yaml.safe_dump(config))
            with caplog.at_level("INFO", logger="amid.service"):
                assert await daemon.reload()
            assert daemon.clients["pbx1"] is not client
            assert "server pbx1: settings changed: reconnecting" in caplog.text
            assert client.stats.disconnects_total["closed"] == 1
            assert await daemon.clients["pbx1"].wait_connected(10)
        finally:
            await stop_daemon(daemon, task)


async def test_a_reconfigured_sink_keeps_counting_where_its_predecessor_stopped(tmp_path, sim):
    events_file = tmp_path / "events.jsonl"
    path = write_config(tmp_path, sim, [{"name": "file", "type": "file", "path": str(events_file),
                                         "overflow": "spool", "batch": {"max_wait": "10ms"}}])
    daemon, task = await start_daemon(path)
    try:
        stats = daemon.server_stats["pbx1"]
        sim.originate("Local/200@test", exten="100")
        await wait_until(lambda: len(read_jsonl(events_file)) >= CALL_EVENTS)
        await wait_until(lambda: daemon.sinks["file"].runner.stats.sent_total >= CALL_EVENTS)
        before = await scrape(daemon.http.port)
        config = yaml.safe_load(path.read_text())
        config["sinks"][0]["batch"]["max_events"] = 7   # a changed sink: a new runner
        path.write_text(yaml.safe_dump(config))
        assert await daemon.reload()
        sim.originate("Local/200@test", exten="100")
        await wait_until(lambda: stats.events_by_name["OriginateResponse"] == 2)
        await wait_until(lambda: len(read_jsonl(events_file)) == stats.events_total)
        # With the spool, a record counts as sent once its ack follows the file write.
        await wait_until(lambda: daemon.sinks["file"].runner.stats.sent_total == stats.events_total)
        after = await scrape(daemon.http.port)
        for name in ("amid_sink_received_events_total", "amid_sink_sent_events_total",
                     "amid_sink_delivery_latency_seconds_count"):
            assert total(after, name, sink="file") >= total(before, name, sink="file") > 0, name
        assert total(after, "amid_sink_received_events_total", sink="file") == stats.events_total
        assert total(after, "amid_sink_sent_events_total", sink="file") == stats.events_total
    finally:
        await stop_daemon(daemon, task)


async def test_a_reload_applies_a_new_log_level(tmp_path, sim, caplog):
    import logging
    root = logging.getLogger()
    saved = root.level
    path = write_config(tmp_path, sim, [], log={"level": "info"})
    daemon, task = await start_daemon(path)
    try:
        config = yaml.safe_load(path.read_text())
        config["log"] = {"level": "error", "format": "json"}
        path.write_text(yaml.safe_dump(config))
        assert await daemon.reload()
        assert root.level == logging.ERROR
        assert "log level is now error" in caplog.text
        assert "the new format takes effect at the next restart" in caplog.text
    finally:
        root.setLevel(saved)
        await stop_daemon(daemon, task)


async def test_a_reload_keeps_the_log_settings_given_on_the_command_line(tmp_path, sim, caplog):
    import logging
    root = logging.getLogger()
    saved = root.level
    path = write_config(tmp_path, sim, [], log={"level": "info"})
    types = SinkTypes.discover()
    config = load(path, {}, sink_option_models=types.option_models)
    daemon = Daemon(config, config_path=str(path), environ={}, types=types, install_signals=False,
                    log_pinned=frozenset({"level", "format"}))   # amid run --log-level/--log-format
    task = asyncio.create_task(daemon.run())
    try:
        async with asyncio.timeout(10):
            await daemon.ready.wait()
        root.setLevel(logging.DEBUG)
        config = yaml.safe_load(path.read_text())
        config["log"] = {"level": "error", "format": "json"}
        path.write_text(yaml.safe_dump(config))
        assert await daemon.reload()
        assert root.level == logging.DEBUG
        assert "log level is now" not in caplog.text and "new format" not in caplog.text
    finally:
        root.setLevel(saved)
        await stop_daemon(daemon, task)


async def test_a_scrape_during_a_reload_handover_sees_no_counter_drop(tmp_path, sim):
    async with HttpReceiver() as receiver:
        sinks = [{"name": "webhook", "type": "webhook", "url": receiver.url, "timeout": 30,
                  "batch": {"max_wait": "10ms"}}]
        path = write_config(tmp_path, sim, sinks)
        daemon, task = await start_daemon(path, reload_drain_timeout=5.0)  # a wide handover window
        try:
            stats = daemon.server_stats["pbx1"]
            sim.originate("Local/200@test", exten="100")
            await wait_until(lambda: stats.events_by_name["OriginateResponse"] == 1)
            await receiver.wait_for_records(stats.events_total)
            receiver.stall()
            sim.originate("Local/200@test", exten="100")
            await wait_until(lambda: stats.events_by_name["OriginateResponse"] == 2)
            old_runner = daemon.sinks["webhook"].runner
            await wait_until(lambda: old_runner.stats.in_flight_events > 0)
            before = await scrape(daemon.http.port)
            config = yaml.safe_load(path.read_text())
            config["sinks"][0]["batch"]["max_events"] = 7
            path.write_text(yaml.safe_dump(config))
            reload = asyncio.create_task(daemon.reload())
            await wait_until(lambda: daemon.sinks["webhook"].runner is not old_runner)
            during = await scrape(daemon.http.port)  # the old runner is still draining
            receiver.release()
            assert await reload
            after = await scrape(daemon.http.port)
            for name in ("amid_sink_received_events_total", "amid_sink_sent_events_total"):
                assert (total(before, name, sink="webhook") <= total(during, name, sink="webhook")
                        <= total(after, name, sink="webhook")), name
        finally:
            receiver.release()
            await stop_daemon(daemon, task)


async def test_unusable_spool_directory_is_a_clear_startup_error(tmp_path, sim, caplog):
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "spool").write_text("not a directory")
    path = write_config(tmp_path, sim, [{"name": "file", "type": "file", "overflow": "spool",
                                         "path": str(tmp_path / "events.jsonl")}])
    types = SinkTypes.discover()
    daemon = Daemon(load(path, {}, sink_option_models=types.option_models), config_path=str(path),
                    environ={}, types=types, install_signals=False)
    async with asyncio.timeout(10):
        assert await daemon.run() == 1
    assert "cannot start" in caplog.text


def test_watchdog_is_withheld_when_a_connected_reader_stops_answering_pings(tmp_path):
    import time as _time

    from amid.ami.session import ConnectionState
    types = SinkTypes.discover()
    path = tmp_path / "c.yaml"
    path.write_text("servers: [{host: 127.0.0.1, username: amid, secret: x, ping_interval: 1s}]\n")
    daemon = Daemon(load(path, {}, sink_option_models=types.option_models), config_path=str(path),
                    environ={}, types=types, install_signals=False)
    client = daemon._start_client(daemon.config.servers[0])
    assert daemon.reader_progressing()            # not connected: reconnecting is progress
    client.state = ConnectionState.CONNECTED
    client.stats.last_pong_time = _time.time()
    assert daemon.reader_progressing()
    client.stats.last_pong_time = _time.time() - 3600
    assert not daemon.reader_progressing()
    assert not daemon.liveness()[0]


async def test_reload_of_a_changed_server_keeps_record_ids_unique_and_reports_the_gap(tmp_path, sim):
    events_file = tmp_path / "events.jsonl"
    path = write_config(tmp_path, sim, [{"name": "file", "type": "file", "path": str(events_file)}])
    daemon, task = await start_daemon(path)
    try:
        sim.originate("Local/200@test", exten="100")
        stats = daemon.server_stats["pbx1"]
        await wait_until(lambda: stats.events_by_name["OriginateResponse"] == 1)
        config = yaml.safe_load(path.read_text())
        config["servers"][0]["ping_interval"] = "3s"
        path.write_text(yaml.safe_dump(config))
        assert await daemon.reload()
        assert await daemon.clients["pbx1"].wait_connected(10)
        sim.originate("Local/200@test", exten="100")
        await wait_until(lambda: stats.events_by_name["OriginateResponse"] == 2)
        await wait_until(lambda: len(read_jsonl(events_file)) >= stats.events_total + 1)
        records = read_jsonl(events_file)
        ids = [r["id"] for r in records]
        assert len(ids) == len(set(ids))                       # receivers may dedupe by id
        gap = [r for r in records if r["event"] == "AmidGap"]
        assert len(gap) == 1 and gap[0]["epoch"] == 2
    finally:
        await stop_daemon(daemon, task)


async def test_events_keep_flowing_to_unchanged_and_changed_sinks_during_a_reload(tmp_path, sim):
    """The router switches to the new runners before the old ones are detached, so events
    arriving while a slow sink drains are neither dropped nor sent to a closed runner."""
    from amid.ami.protocol import Event

    def sinks(wait: str) -> list[dict]:
        return [{"name": "a", "type": "file", "path": str(tmp_path / "a.jsonl"), "batch": {"max_wait": wait}},
                {"name": "b", "type": "webhook", "url": "http://127.0.0.1:9/unreachable",
                 "batch": {"max_wait": wait}}]
    path = write_config(tmp_path, sim, sinks("0s"))
    daemon, task = await start_daemon(path, reload_drain_timeout=0.5)
    seq = 0

    async def feed():
        nonlocal seq
        while True:
            seq += 1
            event = Event(f"Event: Newchannel\r\nChannel: X-{seq}".encode())
            event.server, event.epoch, event.seq, event.received_at = "feed", 1, seq, 1.0
            daemon.router.on_event(event)
            await asyncio.sleep(0.002)

    feeder = asyncio.create_task(feed())
    try:
        await wait_until(lambda: seq > 50)
        old_a = daemon.sinks["a"].runner
        config = yaml.safe_load(path.read_text())
        config["sinks"] = sinks("5ms")
        path.write_text(yaml.safe_dump(config))
        assert await daemon.reload()
        await wait_until(lambda: seq > 400)
        feeder.cancel()
        new_a = daemon.sinks["a"].runner
        assert sum(old_a.stats.dropped_total.values()) == 0
        await asyncio.sleep(0)  # the feeder stops at its sleep: every counted event was routed

        def fed_ids() -> set[str]:
            return {r["id"] for r in read_jsonl(tmp_path / "a.jsonl") if r["server"] == "feed"}
        await wait_until(lambda: len(fed_ids()) == seq)
        assert new_a.stats.received_total > 0
    finally:
        feeder.cancel()
        await stop_daemon(daemon, task)


class FileSinksThatMayFail:
    """Sink types whose ``file`` factory refuses to build the sinks named in ``refused`` (the
    way a plugin's factory may raise); injected into the daemon through its SinkTypes."""

    def __init__(self) -> None:
        self.refused: set[str] = set()
        real = SinkTypes.builtin().get("file")

        def create(name, options):
            if name in self.refused:
                raise ValueError("plugin exploded")
            return real.factory(name, options)
        self.types = SinkTypes(plugins={"file": SinkType("file", create, real.options)})


async def test_a_reload_that_partly_fails_applies_the_rest_and_retries_the_failed_sink(
        tmp_path, sim, caplog):
    a_file, b_file = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    path = write_config(tmp_path, sim, [{"name": "a", "type": "file", "path": str(a_file)},
                                        {"name": "c", "type": "file", "path": str(tmp_path / "c.jsonl")}])
    sink_types = FileSinksThatMayFail()
    daemon, task = await start_daemon(path, types=sink_types.types)
    try:
        client = daemon.clients["pbx1"]
        slot_c = daemon.sinks["c"]
        # Sink b's spool cannot be opened (a file stands where its directory goes), sink c's
        # new settings cannot be built, and the server changed: all in one reload.
        (tmp_path / "state" / "spool").mkdir(parents=True, exist_ok=True)
        blocker = tmp_path / "state" / "spool" / "b"
        blocker.write_text("not a directory")
        config = yaml.safe_load(path.read_text())
        config["sinks"].append({"name": "b", "type": "file", "path": str(b_file), "overflow": "spool"})
        config["sinks"][1]["batch"] = {"max_events": 7}
        config["servers"][0]["ping_interval"] = "2s"
        path.write_text(yaml.safe_dump(config))
        sink_types.refused.add("c")
        assert not await daemon.reload()
        assert "sink b: cannot start" in caplog.text and "sink c: plugin exploded" in caplog.text
        assert daemon.sinks["c"] is slot_c                       # kept its previous settings
        assert daemon.clients["pbx1"] is not client             # the server change still applied
        assert await daemon.clients["pbx1"].wait_connected(10)
        ok, checks = daemon.readiness()
        assert not ok and checks["sink:b"].startswith("not accepting")
        # b is routed to: events queue for it while its spool is unusable...
        sim.originate("Local/200@test", exten="100")
        stats = daemon.server_stats["pbx1"]
        await wait_until(lambda: stats.events_by_name["OriginateResponse"] == 1)
        assert daemon.sinks["b"].runner.stats.queue_events > 0
        # ...and delivered once the background retry can open the spool.
        blocker.unlink()
        await wait_until(lambda: daemon.sinks["b"].runner.accepting, timeout=10)
        await wait_until(lambda: sum(r["event"] == "OriginateResponse" for r in read_jsonl(b_file)) == 1)
        assert {r["id"] for r in read_jsonl(b_file)} <= {r["id"] for r in read_jsonl(a_file)}
        # What failed is compared with what runs, not with the file: a later reload retries c.
        sink_types.refused.clear()
        assert await daemon.reload()
        assert daemon.sinks["c"] is not slot_c and daemon.sinks["c"].config.batch.max_events == 7
        await wait_until(lambda: daemon.readiness()[0])  # once the new c opened its file
    finally:
        await stop_daemon(daemon, task)


async def test_a_server_whose_new_session_cannot_be_built_keeps_its_epochs_for_the_retry(tmp_path, sim):
    path = write_config(tmp_path, sim, [{"name": "a", "type": "file", "path": str(tmp_path / "a.jsonl")}])
    daemon, task = await start_daemon(path)
    try:
        first = daemon.clients["pbx1"]
        assert await first.wait_connected(10)
        epoch_before = first.epoch
        good = yaml.safe_load(path.read_text())
        bad = yaml.safe_load(path.read_text())
        bad["servers"][0]["tls"] = {"ca_file": str(tmp_path / "missing-ca.pem")}
        path.write_text(yaml.safe_dump(bad))
        assert not await daemon.reload()  # the new session cannot be built: no CA file
        assert "pbx1" not in daemon.clients
        path.write_text(yaml.safe_dump(good))
        assert await daemon.reload()
        second = daemon.clients["pbx1"]
        assert await second.wait_connected(10)
        # Record ids are server:run:epoch:seq: the epochs must continue, never restart.
        assert second.epoch > epoch_before
    finally:
        await stop_daemon(daemon, task)


async def test_a_reload_waits_for_a_background_sink_start_and_its_successor_gets_the_spool(
        tmp_path, sim):
    import threading

    from amid.sinks.lifecycle import RunnerState
    from amid.sinks.spool import Spool
    path = write_config(tmp_path, sim, [{"name": "a", "type": "file", "path": str(tmp_path / "a.jsonl")}])
    gate = {"on": False}
    entered = threading.Event()
    release = threading.Event()

    def spool_factory(*args: Any, **kw: Any) -> Spool:  # injected: a start can hold the spool, then wait
        spool = Spool(*args, **kw)
        if gate["on"]:
            entered.set()
            release.wait(10)
        return spool
    daemon, task = await start_daemon(path, spool_factory=spool_factory)
    try:
        (tmp_path / "state" / "spool").mkdir(parents=True, exist_ok=True)
        blocker = tmp_path / "state" / "spool" / "b"
        blocker.write_text("not a directory")
        config = yaml.safe_load(path.read_text())
        config["sinks"].append({"name": "b", "type": "file", "path": str(tmp_path / "b.jsonl"),
                                "overflow": "spool"})
        path.write_text(yaml.safe_dump(config))
        assert not await daemon.reload()  # b's spool cannot open: started in the background
        first_b = daemon.sinks["b"]
        gate["on"] = True  # the background start holds the spool, then waits
        blocker.unlink()
        await wait_until(entered.is_set)
        gate["on"] = False
        config["sinks"][1]["batch"] = {"max_events": 7}
        path.write_text(yaml.safe_dump(config))
        reload = asyncio.create_task(daemon.reload())  # would detach b mid-start
        for _ in range(20):
            await asyncio.sleep(0)
        assert daemon.sinks["b"] is first_b  # the reload waits for the start to finish
        release.set()
        assert await reload
        assert daemon.sinks["b"] is not first_b
        assert first_b.runner.state is RunnerState.CLOSED and first_b.runner._spool._spool._closed
        await wait_until(lambda: daemon.sinks["b"].runner.accepting)
    finally:
        release.set()
        await stop_daemon(daemon, task)


async def test_a_sink_whose_reopen_raises_anything_does_not_stop_the_reload(tmp_path, sim):
    path = write_config(tmp_path, sim, [{"name": "a", "type": "file", "path": str(tmp_path / "a.jsonl")}])
    daemon, task = await start_daemon(path)
    try:
        client = daemon.clients["pbx1"]

        def reopen():
            raise ValueError("plugin reopen bug")
        daemon.sinks["a"].sink.reopen = reopen  # e.g. a plugin sink's reopen()
        config = yaml.safe_load(path.read_text())
        config["servers"][0]["ping_interval"] = "2s"
        path.write_text(yaml.safe_dump(config))
        assert not await daemon.reload()
        assert daemon.clients["pbx1"] is not client  # the server change still applied
    finally:
        await stop_daemon(daemon, task)


async def test_a_changed_sink_that_cannot_be_rebuilt_is_still_reopened(tmp_path, sim):
    path = write_config(tmp_path, sim, [{"name": "a", "type": "file", "path": str(tmp_path / "a.jsonl")}])
    sink_types = FileSinksThatMayFail()
    daemon, task = await start_daemon(path, types=sink_types.types)
    try:
        reopened = []
        daemon.sinks["a"].sink.reopen = lambda: reopened.append(True)
        sink_types.refused.add("a")
        config = yaml.safe_load(path.read_text())
        config["sinks"][0]["batch"] = {"max_events": 7}
        path.write_text(yaml.safe_dump(config))
        assert not await daemon.reload()
        assert reopened  # SIGHUP after logrotate reopens the kept file sink as always
    finally:
        await stop_daemon(daemon, task)


# ---------------------------------------------------------------------------------------
# Hooks for embedding the daemon (amid demo)


async def test_stop_after_routes_exactly_n_events_then_stops(tmp_path, sim):
    out = tmp_path / "events.jsonl"
    path = write_config(tmp_path, sim, [{"name": "file", "type": "file", "path": str(out)}])
    types = SinkTypes.builtin()
    daemon = Daemon(load(path, {}, sink_option_models=types.option_models), config_path=str(path),
                    environ={}, types=types, install_signals=False)
    daemon.stop_after(5)
    task = asyncio.create_task(daemon.run())
    async with asyncio.timeout(10):
        await daemon.ready.wait()  # logged in: 2 events so far
    sim.originate("Local/200@test", exten="100")  # 80 more; the stop comes after the 5th
    async with asyncio.timeout(15):
        assert await task == 0
    assert len(read_jsonl(out)) == 5
    with pytest.raises(RuntimeError):
        daemon.stop_after(1)  # only before run()


async def test_sink_disabled_is_a_signal_not_a_log_line(tmp_path, sim):
    """A sink whose peer says stop for good (SinkDisabled) sets the daemon's hook at once."""
    from amid.sinks.base import SinkDisabled

    class Refusing:
        def __init__(self, name, options):
            self.name = name

        async def start(self):
            pass

        async def send(self, batch):
            raise SinkDisabled("the reader is gone")

        async def close(self):
            pass

    types = SinkTypes(plugins={"refusing": SinkType("refusing", Refusing, None)})
    path = write_config(tmp_path, sim, [{"name": "gone", "type": "refusing"}])
    daemon = Daemon(load(path, {}, sink_option_models=types.option_models), config_path=str(path),
                    environ={}, types=types, install_signals=False)
    task = asyncio.create_task(daemon.run())
    try:
        assert not daemon.sink_is_disabled("gone")
        async with asyncio.timeout(10):
            await daemon.sink_disabled("gone")  # the login's events reach the sink, which refuses
        assert daemon.sink_is_disabled("gone")
    finally:
        daemon.request_stop()
        async with asyncio.timeout(15):
            assert await task == 0
