"""The amqp sink against the machine's real RabbitMQ (127.0.0.1:5672): the sink contract, what
each message carries, confirms/returns/nacks, the daemon end to end on the AMI simulator, a
broker that drops the connection mid-stream, and kill -9 of a real ``amid run``."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

import pytest
from brokers import (
    RabbitExchange,
    RabbitQueue,
    TlsProxy,
    check_kill_run,
    close_rabbit_connections,
    daemon_config,
    require_rabbitmq,
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
from amid.sinks import amqp
from amid.sinks.amqp import PublishEncoder
from amid.sinks.base import SinkError, SinkRejected
from amid.sinks.broker import TopicNames

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def rabbit_url() -> str:
    return require_rabbitmq()


class TestAmqpContract(SinkContract):
    sends_to_notice_break = 2

    @pytest.fixture(autouse=True)
    async def peer(self, rabbit_url):
        async with RabbitExchange() as exchange, \
                RabbitQueue(exchange=exchange.name, binding="#") as queue:
            self.exchange, self.queue = exchange, queue
            yield

    async def make_sink(self):
        return amqp.create("contract", {"url": "amqp://127.0.0.1:5672/", "username": "guest",
                                        "password": "guest", "exchange": self.exchange.name})

    async def received(self, n):
        return [d.record for d in await self.queue.wait_for(n)]

    async def break_peer(self):
        # The exchange disappears: publishing to it is a channel error, and declaring it
        # passively on the reconnect fails too.
        await self.exchange.delete()


async def test_each_message_carries_id_headers_and_routing_key(rabbit_url):
    async with RabbitExchange() as exchange, RabbitQueue(exchange=exchange.name) as queue:
        sink = amqp.create("props", {"url": rabbit_url, "exchange": exchange.name,
                                     "routing_key": "pbx.{server}.x.{event}"})
        await sink.start()
        try:
            records = make_records(3)
            await sink.send(records)
            got = await queue.wait_for(3)
        finally:
            await sink.close()
    assert [d.message_id for d in got] == [r.id for r in records]
    assert {d.routing_key for d in got} == {"pbx.pbx1.x.Newchannel"}
    assert all(d.headers == {"server": "pbx1", "event": "Newchannel"} for d in got)
    assert all(d.content_type == "application/json" and d.delivery_mode == 2 for d in got)


def test_routing_key_values_are_made_single_topic_words():
    names = TopicNames("ami.{server}.{event}", max_bytes=255)
    record = make_records(1)[0]
    record.server = "pbx.eu west#1*"
    assert names.of(record) == "ami.pbx_eu_west_1_.Newchannel"


@pytest.mark.parametrize("size", [0, 1, 99, 100, 101, 250])
def test_publish_frames_are_what_pamqp_encodes(size):
    """The hand-encoded frames of the fast path, byte for byte the library's own."""
    import pamqp.frame
    from pamqp import commands as spec
    from pamqp.body import ContentBody
    from pamqp.header import ContentHeader
    record = make_records(1, fields={"Pad": "é" * size})[0]
    record.server = "pbx-ü"
    encoder = PublishEncoder(7, exchange="x", names=TopicNames("a.{server}.{event}", max_bytes=255),
                             mandatory=True, persistent=True, max_content_size=100)
    properties = spec.Basic.Properties(content_type="application/json", delivery_mode=2,
                                       message_id=record.id,
                                       headers={"server": record.server, "event": record.name})
    body = record.json
    expected = (pamqp.frame.marshal(spec.Basic.Publish(exchange="x", routing_key="a.pbx-_.Newchannel",
                                                       mandatory=True), 7)
                + pamqp.frame.marshal(ContentHeader(properties=properties, body_size=len(body)), 7)
                + b"".join(pamqp.frame.marshal(ContentBody(body[i:i + 100]), 7)
                           for i in range(0, len(body), 100)))
    assert encoder.frames(record) == expected


async def test_a_missing_exchange_is_never_created_by_default(rabbit_url):
    name = unique("amid-test-missing")
    sink = amqp.create("passive", {"url": rabbit_url, "exchange": name})
    with pytest.raises(SinkError, match=f"exchange '{name}' does not exist"):
        await sink.start()
    await sink.close()


async def test_exchange_type_declares_a_missing_exchange(rabbit_url):
    import aio_pika
    name = unique("amid-test-declared")
    sink = amqp.create("declare", {"url": rabbit_url, "exchange": name, "exchange_type": "topic"})
    await sink.start()
    await sink.close()
    connection = await aio_pika.connect(rabbit_url)
    try:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(name, passive=True)
        await exchange.delete()
    finally:
        await connection.close()


async def test_unroutable_records_are_confirmed_counted_and_logged(rabbit_url, caplog):
    async with RabbitExchange() as exchange:
        sink = amqp.create("unroutable", {"url": rabbit_url, "exchange": exchange.name})
        await sink.start()
        try:
            with caplog.at_level(logging.WARNING, logger="amid.sinks.amqp"):
                await sink.send(make_records(4))
        finally:
            await sink.close()
    assert sink.outcomes["unroutable"] == 4
    assert "4 records returned unroutable" in caplog.text


async def test_nacked_records_fail_the_batch_are_retried_alone_then_dead_lettered(rabbit_url):
    arguments = {"x-max-length": 3, "x-overflow": "reject-publish"}
    async with RabbitExchange() as exchange, \
            RabbitQueue(exchange=exchange.name, arguments=arguments, consume=False) as queue:
        sink = amqp.create("nack", {"url": rabbit_url, "exchange": exchange.name,
                                    "refused_attempts": 2})
        await sink.start()
        try:
            batch = make_records(5)
            with pytest.raises(SinkError, match="refused \\(nack\\) 2 of 5") as first:
                await sink.send(batch)
            assert not isinstance(first.value, SinkRejected)
            # The retry publishes only the two the broker refused, and they are refused again.
            with pytest.raises(SinkRejected, match="refused \\(nack\\) 2 records 2 attempts"):
                await sink.send(batch)
        finally:
            await sink.close()
        assert await queue.message_count() == 3  # the retry added no copy of a confirmed one
    assert sink.outcomes["nacked"] == 4


async def test_a_connection_closed_by_the_broker_is_reopened_by_the_next_send(rabbit_url):
    async with RabbitExchange() as exchange, RabbitQueue(exchange=exchange.name) as queue:
        name = unique("reopen")
        sink = amqp.create(name, {"url": rabbit_url, "exchange": exchange.name})
        await sink.start()
        try:
            await sink.send(make_records(2))
            assert await close_rabbit_connections(f"amid:{name}") == 1
            sent = False
            for attempt in range(3):   # the first may still find the closing connection
                try:
                    await sink.send(make_records(2, start=2))
                    sent = True
                    break
                except SinkError:
                    await asyncio.sleep(0.2 * (attempt + 1))
            assert sent
            got = await queue.wait_for(4)
        finally:
            await sink.close()
    assert [d.record["id"] for d in got][-2:] == ["rec-2", "rec-3"]


def test_check_config_names_bad_keys_with_their_line(tmp_path):
    path = tmp_path / "amid.yaml"
    path.write_text(
        "servers:\n"
        "  - {name: pbx1, host: 127.0.0.1, username: u, secret: s}\n"
        "sinks:\n"
        "  - name: bus\n"
        "    type: amqp\n"
        "    url: http://127.0.0.1/\n"
        "    routing_key: ami.{server}.{nope}\n"
        "    exchange_typo: topic\n"
        "    password: hunter2-secret\n")
    with pytest.raises(ConfigError) as caught:
        load(path, {})
    text = str(caught.value)
    assert "amid.yaml:6:" in text and "amqp://" in text
    assert "amid.yaml:7:" in text and "{nope}" in text
    assert "amid.yaml:8:" in text and "exchange_typo" in text
    assert "hunter2-secret" not in text


def test_a_missing_client_library_is_a_config_error_naming_the_extra(tmp_path, monkeypatch):
    from amid.sinks import broker
    real = broker.importlib.util.find_spec
    monkeypatch.setattr(broker.importlib.util, "find_spec",
                        lambda name, *a: None if name == "aio_pika" else real(name, *a))
    path = tmp_path / "amid.yaml"
    path.write_text("servers:\n  - {name: pbx1, host: 127.0.0.1, username: u, secret: s}\n"
                    "sinks:\n  - name: bus\n    type: amqp\n")
    with pytest.raises(ConfigError) as caught:
        load(path, {})
    assert "amid.yaml:5:" in str(caught.value) and "'asterisk-amid[amqp]'" in str(caught.value)


async def test_the_password_never_shows_in_errors_or_logs(caplog):
    sink = amqp.create("secret", {"url": "amqp://guest:s3cr3t-pw@127.0.0.1:1/",
                                  "connect_timeout": "2s"})
    with caplog.at_level(logging.DEBUG), pytest.raises(SinkError) as caught:
        await sink.start()
    await sink.close()
    assert "s3cr3t-pw" not in str(caught.value) and "s3cr3t-pw" not in caplog.text
    assert "s3cr3t-pw" not in repr(sink) and "s3cr3t-pw" not in repr(sink._options)


# -- the daemon on the simulator --------------------------------------------------------------


async def test_events_arrive_in_order_per_server_with_their_routing_keys(tmp_path, rabbit_url):
    async with sim_pair() as sims, RabbitExchange() as exchange, \
            RabbitQueue(exchange=exchange.name, binding="ami.#") as queue:
        path = daemon_config(tmp_path, sims, [
            {"name": "bus", "type": "amqp", "url": rabbit_url, "exchange": exchange.name}])
        daemon, task = await start_daemon(path)
        try:
            for sim in sims:
                sim.originate("Local/200@test", exten="100")
            await asyncio.gather(*(sim.stream_events(300) for sim in sims))
            expected = lambda: sum(s.events_total for s in daemon.server_stats.values())
            await wait_until(lambda: daemon.sinks["bus"].runner.stats.sent_total >= expected()
                             and expected() >= 600, timeout=30)
            got = await queue.wait_for(expected(), timeout=20)
        finally:
            await stop_daemon(daemon, task)
    by_server: dict[str, list[int]] = {}
    for delivered in got:
        record = delivered.record
        assert delivered.routing_key == f"ami.{record['server']}.{record['event']}"
        assert delivered.message_id == record["id"]
        by_server.setdefault(record["server"], []).append(record["seq"])
    assert set(by_server) == {"pbx1", "pbx2"}
    for seqs in by_server.values():
        assert seqs == sorted(seqs) and len(seqs) == len(set(seqs))


async def test_unroutable_and_refused_records_are_visible_in_metrics(tmp_path, rabbit_url):
    arguments = {"x-max-length": 2, "x-overflow": "reject-publish"}
    async with sim_pair(count=1) as sims, RabbitExchange() as nowhere, RabbitExchange() as full, \
            RabbitQueue(exchange=full.name, arguments=arguments, consume=False):
        path = daemon_config(tmp_path, sims, [
            {"name": "nowhere", "type": "amqp", "url": rabbit_url, "exchange": nowhere.name},
            {"name": "full", "type": "amqp", "url": rabbit_url, "exchange": full.name,
             "refused_attempts": 2, "dead_letter": str(tmp_path / "dead.jsonl"),
             "retry": {"min_delay": "10ms", "max_delay": "20ms"}}], shutdown_timeout="1s")
        daemon, task = await start_daemon(path)
        try:
            await sims[0].stream_events(20)
            full_stats = daemon.sinks["full"].runner.stats
            await wait_until(lambda: full_stats.dead_lettered_total > 0, timeout=20)
            samples = await scrape(daemon.http.port)
        finally:
            await stop_daemon(daemon, task)
    assert total(samples, "amid_sink_operations_total", sink="nowhere",
                 operation="unroutable") > 0
    assert total(samples, "amid_sink_operations_total", sink="full", operation="nacked") > 0
    assert total(samples, "amid_sink_dead_lettered_events_total", sink="full") > 0
    assert (tmp_path / "dead.jsonl").read_text().count("\n") == full_stats.dead_lettered_total


async def test_a_sink_whose_broker_was_never_reached_keeps_the_daemon_unready(tmp_path):
    async with sim_pair(count=1) as sims:
        path = daemon_config(tmp_path, sims, [
            {"name": "bus", "type": "amqp", "url": "amqp://127.0.0.1:1/",
             "connect_timeout": "1s"}], start_timeout="1s", shutdown_timeout="1s")
        daemon, task = await start_daemon(path, wait_ready=False)
        try:
            await wait_until(lambda: daemon.sinks["bus"].runner.stats.failed_attempts_total
                             + daemon.sinks["bus"].runner._attempts.start_failures > 0, timeout=10)
            ready, checks = daemon.readiness()
        finally:
            await stop_daemon(daemon, task)
    assert not ready and "not opened yet" in checks["sink:bus"]


@pytest.mark.slow
async def test_connections_closed_by_the_broker_mid_stream_lose_nothing_with_spool(
        tmp_path, rabbit_url):
    async with RabbitExchange() as exchange, \
            RabbitQueue(exchange=exchange.name, binding="ami.#") as queue:
        async def interrupt(sink_name: str) -> int:
            return await close_rabbit_connections(f"amid:{sink_name}")

        sink = {"type": "amqp", "url": rabbit_url, "exchange": exchange.name}
        expected, _ = await run_restart_mid_stream(tmp_path, sink, interrupt)
        got = await queue.wait_quiet(timeout=30)
    ids = Counter(d.record["id"] for d in got)
    assert len(ids) == expected   # every record read reached the broker
    for seqs in seqs_by_run(ids).values():
        assert seqs == list(range(seqs[0], seqs[-1] + 1))
    duplicates = sum(ids.values()) - len(ids)
    # Copies only of batches in flight when a connection was closed (two closes, one batch
    # of at most 100 each).
    assert duplicates <= 2 * 100, duplicates


@pytest.mark.slow
async def test_kill_9_mid_stream_then_restart_delivers_every_record_at_least_once(
        tmp_path, rabbit_url):
    async with RabbitExchange() as exchange, \
            RabbitQueue(exchange=exchange.name, binding="ami.#") as queue:
        sink = {"type": "amqp", "url": rabbit_url, "exchange": exchange.name}
        async with check_kill_run(tmp_path, sink) as run:
            await run.go()
        got = await queue.wait_quiet(timeout=30)
    ids = Counter(d.record["id"] for d in got)
    run.verify(set(ids))
    duplicates = sum(ids.values()) - len(ids)
    # Duplicates only from the batches in flight at the kill (at most two batches' worth).
    assert duplicates <= 2 * run.batch_max_events, duplicates


@pytest.mark.slow
async def test_the_fleet_example_runs(rabbit_url):
    prefix = unique("fleet").replace("-", "")
    output = await run_fleet_example("--broker", "amqp", "--hangups", "2", "--prefix", prefix,
                                     "--queue", f"{prefix}-hangups", "--amqp-url", rabbit_url)
    for pbx in ("pbx1", "pbx2", "pbx3"):
        assert f"{pbx} hangup " in output
    assert "hangups per PBX" in output


async def test_amqps_with_a_private_ca_and_credentials_from_the_config(rabbit_url, certs):
    async with TlsProxy(certs.server_context(), ("127.0.0.1", 5672)) as proxy, \
            RabbitExchange() as exchange, RabbitQueue(exchange=exchange.name) as queue:
        options = {"url": f"amqps://127.0.0.1:{proxy.port}/", "username": "guest",
                   "password": "guest", "exchange": exchange.name}
        untrusted = amqp.create("untrusted", {**options, "connect_timeout": "3s"})
        with pytest.raises(SinkError, match="cannot connect"):
            await untrusted.start()   # the system store does not know the test CA
        await untrusted.close()
        sink = amqp.create("tls", {**options, "tls_ca_file": str(certs.ca_file)})
        await sink.start()
        try:
            await sink.send(make_records(2))
            assert [d.record["id"] for d in await queue.wait_for(2)] == ["rec-0", "rec-1"]
        finally:
            await sink.close()


def test_the_password_can_come_from_a_file(tmp_path):
    (tmp_path / "amqp-password").write_text("from-a-file\n")
    path = tmp_path / "amid.yaml"
    path.write_text("servers:\n  - {name: pbx1, host: 127.0.0.1, username: u, secret: s}\n"
                    "sinks:\n  - {name: bus, type: amqp, username: amid, "
                    f"password_file: {tmp_path / 'amqp-password'}}}\n")
    config = load(path, {})
    options = config.sinks[0].options
    assert options.password.get_secret_value() == "from-a-file"
    assert "from-a-file" not in repr(options)


async def test_broker_outcome_counters_continue_across_a_reload(tmp_path, rabbit_url):
    async with sim_pair(count=1) as sims, RabbitExchange() as nowhere:
        sink = {"name": "bus", "type": "amqp", "url": rabbit_url, "exchange": nowhere.name}
        path = daemon_config(tmp_path, sims, [sink])
        daemon, task = await start_daemon(path)
        try:
            await sims[0].stream_events(10)
            await wait_until(lambda: daemon.sinks["bus"].sink.outcomes["unroutable"] >= 10)
            before = daemon.sinks["bus"].sink.outcomes["unroutable"]
            daemon_config(tmp_path, sims, [{**sink, "routing_key": "x.{server}.{event}"}])
            assert await daemon.reload()
            samples = await scrape(daemon.http.port)
        finally:
            await stop_daemon(daemon, task)
    assert total(samples, "amid_sink_operations_total", sink="bus",
                 operation="unroutable") >= before
