"""The nats sink against real NATS JetStream servers: the machine's shared one (127.0.0.1:4222)
for the contract and the daemon end to end, and private nats-servers (own port and store) for
the tests that kill or restart the server, so the shared one is never stopped."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

import pytest
from brokers import (
    NatsStream,
    PrivateNatsServer,
    check_kill_run,
    daemon_config,
    require_nats,
    run_fleet_example,
    run_restart_mid_stream,
    seqs_by_run,
    sim_pair,
    start_daemon,
    stop_daemon,
    unique,
    wait_until,
)
from promparse import scrape, total
from sink_contract import SinkContract, make_records

from amid.config import ConfigError, load
from amid.sinks import nats as nats_sink
from amid.sinks.base import SinkError, SinkRejected

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def nats_url() -> str:
    return require_nats()


@pytest.fixture
async def private_nats(tmp_path):
    server = PrivateNatsServer(tmp_path / "nats")
    await server.start()
    yield server
    await server.kill()


class TestNatsContract(SinkContract):
    @pytest.fixture(autouse=True)
    async def peer(self, nats_url):
        async with NatsStream(nats_url) as stream:
            self.stream = stream
            yield

    async def make_sink(self):
        return nats_sink.create("contract", {"servers": self.stream.url,
                                             "subject": self.stream.prefix + ".{server}.{event}",
                                             "stream": self.stream.name, "timeout": "3s"})

    async def received(self, n):
        await self.stream.wait_for(n)
        return [record for _, _, record in await self.stream.messages()]

    async def break_peer(self):
        await self.stream.js.delete_stream(self.stream.name)  # nothing stores the subject now


async def test_each_message_has_its_subject_and_msg_id_and_copies_are_dropped(nats_url):
    async with NatsStream(nats_url) as stream:
        sink = nats_sink.create("ids", {"servers": [nats_url],
                                        "subject": stream.prefix + ".{server}.{event}"})
        await sink.start()
        try:
            records = make_records(3)
            await sink.send(records)
            await sink.send(records)          # a replay: the stream keeps one copy each
            messages = await stream.messages()
        finally:
            await sink.close()
    assert [h["Nats-Msg-Id"] for _, h, _ in messages] == [r.id for r in records]
    assert {subject for subject, _, _ in messages} == {f"{stream.prefix}.pbx1.Newchannel"}
    assert sink.outcomes["duplicate"] == 3


async def test_a_missing_stream_fails_start_unless_create_stream(nats_url):
    name = unique("AMIDMISSING").replace("-", "_")
    sink = nats_sink.create("missing", {"servers": nats_url, "stream": name})
    with pytest.raises(SinkError, match=f"stream '{name}' does not exist"):
        await sink.start()
    await sink.close()

    async with NatsStream(nats_url, create=False) as stream:
        sink = nats_sink.create("create", {
            "servers": nats_url, "stream": stream.name,
            "subject": stream.prefix + ".{server}.{event}",
            "create_stream": {"subjects": [stream.prefix + ".>"], "max_age": "1h",
                              "duplicate_window": "5m", "storage": "memory"}})
        await sink.start()
        try:
            await sink.send(make_records(2))
            info = await stream.js.stream_info(stream.name)
        finally:
            await sink.close()
        assert info.state.messages == 2 and info.config.max_age == 3600.0
        assert info.config.duplicate_window == 300.0


async def test_an_existing_stream_is_never_edited(nats_url, caplog):
    async with NatsStream(nats_url) as stream:
        sink = nats_sink.create("keep", {"servers": nats_url, "stream": stream.name,
                                         "create_stream": {"subjects": ["other.>"]}})
        with caplog.at_level(logging.WARNING, logger="amid.sinks.nats"):
            await sink.start()
        await sink.close()
        info = await stream.js.stream_info(stream.name)
    assert info.config.subjects == stream.subjects
    assert "it is left as it is" in caplog.text


async def test_a_subject_no_stream_captures_fails_and_is_counted(nats_url):
    sink = nats_sink.create("nostream", {"servers": nats_url, "timeout": "3s",
                                         "subject": unique("nowhere") + ".{event}"})
    await sink.start()
    try:
        with pytest.raises(SinkError, match="no stream captures subject"):
            await sink.send(make_records(2))
    finally:
        await sink.close()
    assert sink.outcomes["no_stream"] == 2


async def test_refused_records_are_retried_alone_then_dead_lettered(nats_url):
    async with NatsStream(nats_url, max_msgs=3, discard="new") as stream:
        sink = nats_sink.create("full", {"servers": nats_url, "stream": stream.name,
                                         "subject": stream.prefix + ".{event}",
                                         "refused_attempts": 2})
        await sink.start()
        try:
            batch = make_records(5)
            with pytest.raises(SinkError, match="refused 2 records") as first:
                await sink.send(batch)
            assert not isinstance(first.value, SinkRejected)
            with pytest.raises(SinkRejected, match="2 attempts in a row"):
                await sink.send(batch)
        finally:
            await sink.close()
        assert await stream.count() == 3
    assert sink.outcomes["refused"] == 4


def test_check_config_names_bad_keys_with_their_line(tmp_path):
    path = tmp_path / "amid.yaml"
    path.write_text(
        "servers:\n"
        "  - {name: pbx1, host: 127.0.0.1, username: u, secret: s}\n"
        "sinks:\n"
        "  - name: bus\n"
        "    type: nats\n"
        "    servers: [http://127.0.0.1:4222]\n"
        "    subject: ami.*.{event}\n"
        "    create_stream: {subjects: [x.>], retention: forever}\n"
        "    stream_name: AMI\n")
    with pytest.raises(ConfigError) as caught:
        load(path, {})
    text = str(caught.value)
    assert "amid.yaml:6:" in text and "nats://" in text
    assert "amid.yaml:7:" in text and "wildcards" in text
    assert "amid.yaml:8:" in text and "retention" in text
    assert "amid.yaml:9:" in text and "stream_name" in text


def test_create_stream_needs_a_stream_name_and_one_way_to_authenticate(tmp_path):
    path = tmp_path / "amid.yaml"
    path.write_text(
        "servers:\n"
        "  - {name: pbx1, host: 127.0.0.1, username: u, secret: s}\n"
        "sinks:\n"
        "  - name: bus\n"
        "    type: nats\n"
        "    create_stream: {}\n"
        "  - name: bus2\n"
        "    type: nats\n"
        "    user: amid\n"
        "    password: hunter2-secret\n"
        "    token: tok-secret\n")
    with pytest.raises(ConfigError) as caught:
        load(path, {})
    text = str(caught.value)
    assert "amid.yaml:6:" in text and "create_stream needs stream" in text
    assert "amid.yaml:11:" in text and "choose one way" in text
    assert "hunter2-secret" not in text and "tok-secret" not in text


async def test_credentials_never_show_in_errors_or_logs(caplog, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("t0ken-s3cret\n")
    sink = nats_sink.create("secret", {"servers": "nats://127.0.0.1:1", "token_file":
                                       str(token_file), "connect_timeout": "1s"})
    with caplog.at_level(logging.DEBUG), pytest.raises(SinkError) as caught:
        await sink.start()
    await sink.close()
    sink2 = nats_sink.create("secret2", {"servers": "nats://amid:pw-s3cret@127.0.0.1:1",
                                         "connect_timeout": "1s"})
    with caplog.at_level(logging.DEBUG), pytest.raises(SinkError) as caught2:
        await sink2.start()
    await sink2.close()
    for text in (str(caught.value), str(caught2.value), caplog.text, repr(sink2),
                 repr(sink2._options)):
        assert "t0ken-s3cret" not in text and "pw-s3cret" not in text


async def test_a_token_from_a_file_authenticates(tmp_path):
    server = PrivateNatsServer(tmp_path / "nats")
    server.extra_args = ["--auth", "t0ken-s3cret"]
    await server.start()
    try:
        token_file = tmp_path / "token"
        token_file.write_text("t0ken-s3cret\n")
        wrong = nats_sink.create("wrong", {"servers": server.url, "connect_timeout": "2s"})
        with pytest.raises(SinkError):
            await wrong.start()
        await wrong.close()
        sink = nats_sink.create("token", {"servers": server.url, "token_file": str(token_file)})
        await sink.start()
        await sink.close()
    finally:
        await server.kill()


# -- the daemon on the simulator --------------------------------------------------------------


async def test_events_arrive_in_order_per_server_with_their_subjects(tmp_path, nats_url):
    async with sim_pair() as sims, NatsStream(nats_url) as stream:
        path = daemon_config(tmp_path, sims, [
            {"name": "bus", "type": "nats", "servers": nats_url, "stream": stream.name,
             "subject": stream.prefix + ".{server}.{event}"}])
        daemon, task = await start_daemon(path)
        try:
            for sim in sims:
                sim.originate("Local/200@test", exten="100")
            await asyncio.gather(*(sim.stream_events(300) for sim in sims))
            read = lambda: sum(s.events_total for s in daemon.server_stats.values())
            stats = daemon.sinks["bus"].runner.stats
            await wait_until(lambda: read() >= 600 and stats.sent_total >= read(), timeout=30)
            expected = read()
            samples = await scrape(daemon.http.port)
        finally:
            await stop_daemon(daemon, task)
        messages = await stream.messages()
    assert len(messages) == expected
    by_server: dict[str, list[int]] = {}
    for subject, headers, record in messages:
        assert subject == f"{stream.prefix}.{record['server']}.{record['event']}"
        assert headers["Nats-Msg-Id"] == record["id"]
        by_server.setdefault(record["server"], []).append(record["seq"])
    assert set(by_server) == {"pbx1", "pbx2"}
    for seqs in by_server.values():
        assert seqs == sorted(seqs) and len(seqs) == len(set(seqs))
    assert total(samples, "amid_sink_operations_total", sink="bus", operation="duplicate") == 0


async def test_refused_and_stream_less_records_are_visible_in_metrics(tmp_path, nats_url):
    async with sim_pair(count=1) as sims, NatsStream(nats_url, max_msgs=2, discard="new") as full:
        path = daemon_config(tmp_path, sims, [
            {"name": "nowhere", "type": "nats", "servers": nats_url, "timeout": "2s",
             "subject": unique("nowhere") + ".{event}"},
            {"name": "full", "type": "nats", "servers": nats_url, "stream": full.name,
             "subject": full.prefix + ".{event}", "refused_attempts": 2,
             "dead_letter": str(tmp_path / "dead.jsonl"),
             "retry": {"min_delay": "10ms", "max_delay": "20ms"}}], shutdown_timeout="1s")
        daemon, task = await start_daemon(path)
        try:
            await sims[0].stream_events(20)
            full_stats = daemon.sinks["full"].runner.stats
            nowhere = daemon.sinks["nowhere"].sink
            await wait_until(lambda: full_stats.dead_lettered_total > 0
                             and nowhere.outcomes["no_stream"] > 0, timeout=20)
            samples = await scrape(daemon.http.port)
        finally:
            await stop_daemon(daemon, task)
    assert total(samples, "amid_sink_operations_total", sink="nowhere",
                 operation="no_stream") > 0
    assert total(samples, "amid_sink_operations_total", sink="full", operation="refused") > 0
    assert total(samples, "amid_sink_dead_lettered_events_total", sink="full") > 0


async def test_a_server_never_reached_keeps_the_daemon_unready(tmp_path):
    async with sim_pair(count=1) as sims:
        path = daemon_config(tmp_path, sims, [
            {"name": "bus", "type": "nats", "servers": "nats://127.0.0.1:1",
             "connect_timeout": "1s"}], start_timeout="1s", shutdown_timeout="1s")
        daemon, task = await start_daemon(path, wait_ready=False)
        try:
            runner = daemon.sinks["bus"].runner
            await wait_until(lambda: runner._attempts.start_failures > 0, timeout=10)
            ready, checks = daemon.readiness()
        finally:
            await stop_daemon(daemon, task)
    assert not ready and "not opened yet" in checks["sink:bus"]


@pytest.mark.slow
async def test_a_server_restarted_mid_stream_loses_nothing_with_spool(tmp_path, private_nats):
    async with NatsStream(private_nats.url) as stream:
        async def restart(_sink_name: str) -> int:
            await private_nats.kill()
            await private_nats.start()   # same port, same store
            return 1

        sink = {"type": "nats", "servers": private_nats.url, "stream": stream.name,
                "subject": stream.prefix + ".{server}.{event}", "connect_timeout": "2s",
                "timeout": "3s"}
        expected, _ = await run_restart_mid_stream(tmp_path, sink, restart)
        messages = await stream.messages()
    ids = Counter(record["id"] for _, _, record in messages)
    # Exactly once: JetStream dropped every copy a retry sent (same Nats-Msg-Id).
    assert len(messages) == len(ids) == expected
    for seqs in seqs_by_run(ids).values():
        assert seqs == list(range(seqs[0], seqs[-1] + 1))


@pytest.mark.slow
async def test_kill_9_mid_stream_then_restart_stores_every_record_exactly_once(
        tmp_path, nats_url):
    async with NatsStream(nats_url) as stream:
        sink = {"type": "nats", "servers": nats_url, "stream": stream.name,
                "subject": stream.prefix + ".{server}.{event}"}
        async with check_kill_run(tmp_path, sink) as run:
            await run.go()
        messages = await stream.messages()
    ids = Counter(record["id"] for _, _, record in messages)
    assert len(messages) == len(ids), "a record was stored twice"
    run.verify(set(ids))


@pytest.mark.slow
async def test_the_fleet_example_runs(nats_url):
    prefix = unique("fleet").replace("-", "")
    stream = prefix.upper()
    output = await run_fleet_example("--broker", "nats", "--hangups", "2", "--prefix", prefix,
                                     "--stream", stream, "--nats-url", nats_url)
    for pbx in ("pbx1", "pbx2", "pbx3"):
        assert f"{pbx} hangup " in output
    assert "hangups per PBX" in output
    async with NatsStream(nats_url, create=False) as probe:   # the example removed its stream
        from nats.js.errors import NotFoundError
        with pytest.raises(NotFoundError):
            await probe.js.stream_info(stream)


async def test_tls_with_a_private_ca_and_user_password(tmp_path, certs):
    server = PrivateNatsServer(tmp_path / "nats")
    server.extra_args = ["--tls", "--tlscert", str(certs.cert_file), "--tlskey",
                         str(certs.key_file), "--user", "amid", "--pass", "pw-s3cret"]
    await server.start()
    try:
        options = {"servers": f"tls://127.0.0.1:{server.port}", "user": "amid",
                   "connect_timeout": "3s"}
        wrong = nats_sink.create("wrong", {**options, "password": "nope",
                                           "tls_ca_file": str(certs.ca_file)})
        with pytest.raises(SinkError, match="cannot connect"):
            await wrong.start()
        await wrong.close()
        untrusted = nats_sink.create("untrusted", {**options, "password": "pw-s3cret"})
        with pytest.raises(SinkError, match="cannot connect"):
            await untrusted.start()
        await untrusted.close()
        async with NatsStream(server.url.replace("nats://", "tls://"), create=True,
                              connect_options={"tls": certs.client_context(), "user": "amid",
                                               "password": "pw-s3cret"}) as stream:
            sink = nats_sink.create("tls", {**options, "password": "pw-s3cret",
                                            "tls_ca_file": str(certs.ca_file),
                                            "subject": stream.prefix + ".{event}"})
            await sink.start()
            try:
                await sink.send(make_records(2))
            finally:
                await sink.close()
            assert await stream.count() == 2
    finally:
        await server.kill()


async def test_a_record_larger_than_max_payload_is_refused_not_sent(tmp_path):
    server = PrivateNatsServer(tmp_path / "nats")
    config = tmp_path / "nats.conf"
    config.write_text("max_payload: 4096\n")
    server.extra_args = ["-c", str(config)]
    await server.start()
    try:
        async with NatsStream(server.url) as stream:
            sink = nats_sink.create("big", {"servers": server.url, "stream": stream.name,
                                            "subject": stream.prefix + ".{event}",
                                            "refused_attempts": 1})
            await sink.start()
            try:
                batch = [*make_records(1), *make_records(1, start=1, fields={"Big": "x" * 8000})]
                with pytest.raises(SinkRejected, match="max_payload"):
                    await sink.send(batch)
                await sink.send(make_records(1, start=2))   # the connection is still good
            finally:
                await sink.close()
            assert [r["id"] for _, _, r in await stream.messages()] == ["rec-0", "rec-2"]
    finally:
        await server.kill()


async def test_shutdown_drains_what_was_read(tmp_path, nats_url):
    async with sim_pair(count=1) as sims, NatsStream(nats_url) as stream:
        path = daemon_config(tmp_path, sims, [
            {"name": "bus", "type": "nats", "servers": nats_url, "stream": stream.name,
             "subject": stream.prefix + ".{server}.{event}", "batch": {"max_events": 50}}])
        daemon, task = await start_daemon(path)
        server = daemon.server_stats["pbx1"]
        stats = daemon.sinks["bus"].runner.stats
        try:
            await sims[0].stream_events(3000)
            await wait_until(lambda: server.events_total >= 3000)
            backlog = stats.queue_events + stats.in_flight_events
        finally:
            await stop_daemon(daemon, task)
        assert backlog > 0   # the stop came while records were still waiting
        assert await stream.count() == server.events_total


async def test_a_creds_file_is_read_at_start_and_never_shown(tmp_path, nats_url):
    import importlib.util

    import pydantic
    creds = tmp_path / "amid.creds"
    creds.write_text("-----BEGIN NATS USER JWT-----\nnot-a-jwt-but-a-secret-looking-line\n"
                     "------END NATS USER JWT------\n\n-----BEGIN USER NKEY SEED-----\n"
                     "SUAGARBAGEGARBAGEGARBAGESEEDSEED\n------END USER NKEY SEED------\n")
    options = {"servers": nats_url, "creds_file": str(creds), "connect_timeout": "3s"}
    if importlib.util.find_spec("nkeys") is None:
        with pytest.raises(pydantic.ValidationError, match=r"'asterisk-amid\[nats\]'"):
            nats_sink.create("no-nkeys", options)
        return
    missing = nats_sink.create("missing", {**options, "creds_file": str(tmp_path / "nope")})
    with pytest.raises(SinkError, match="cannot read its credential"):
        await missing.start()
    await missing.close()
    # A server without authentication never asks for the signature, so the garbage seed may
    # not even be used: whatever happens, the seed and the JWT never show.
    sink = nats_sink.create("garbage", options)
    shown = repr(sink)
    try:
        await sink.start()
    except SinkError as exc:
        shown += str(exc)
    finally:
        await sink.close()
    assert "SUAGARBAGE" not in shown and "secret-looking" not in shown
