"""amid.metrics: the collector reads the stats objects at scrape time, scraped over real HTTP."""

from __future__ import annotations

import asyncio
import os
import platform
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from amid_procs import daemon, poll, simulator
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from promparse import Samples, key, parse, scrape, scrape_text, total

from amid.ami._accel import SPEEDUPS
from amid.ami.stats import PING_BUCKETS, Histogram, SessionStats
from amid.http import HealthServer
from amid.metrics import (
    DISCONNECT_REASONS,
    DROP_REASONS,
    PROTOCOL_ERROR_KINDS,
    SINK_STATES,
    AmidCollector,
    ReloadStats,
    build_registry,
)
from amid.sinks.delivery import DELIVERY_LATENCY_BUCKETS, SinkStats
from amid.sinks.queue import SizedQueue

README = Path(__file__).resolve().parent.parent / "README.md"


class World:
    """The servers and sinks the collector sees; tests mutate them between scrapes."""

    def __init__(self) -> None:
        self.servers: dict[str, SessionStats] = {"pbx1": SessionStats()}
        self.sinks: dict[str, tuple[str, SinkStats]] = {"hook": ("webhook", SinkStats())}
        self.sink_objects: dict[str, object] = {}  # the sink itself, when a test gives one
        self.config = ReloadStats(last_success_time=1_700_000_000.0)

    def collector(self, max_event_names: int = 300) -> AmidCollector:
        return AmidCollector(
            servers=lambda: list(self.servers.items()),
            sinks=lambda: [(name, kind, stats, self.sink_objects.get(name))
                           for name, (kind, stats) in self.sinks.items()],
            config=self.config,
            version="1.2.3",
            max_event_names=max_event_names,
        )


@pytest.fixture
def world() -> World:
    return World()


async def serve(collector: AmidCollector) -> HealthServer:
    server = HealthServer(
        "127.0.0.1:0", build_registry(collector), live=lambda: (True, {}), ready=lambda: (True, {})
    )
    await server.start()
    return server


@pytest.fixture
async def http(world: World) -> AsyncIterator[HealthServer]:
    server = await serve(world.collector())
    yield server
    await server.close()


async def test_build_info(http: HealthServer) -> None:
    samples = await scrape(http.port)
    assert samples[key("amid_build_info", version="1.2.3", python=platform.python_version(),
                       speedups=SPEEDUPS)] == 1


async def test_fresh_stats_expose_zeros_for_known_reasons(http: HealthServer) -> None:
    samples = await scrape(http.port)
    for reason in DISCONNECT_REASONS:
        assert samples[key("amid_ami_disconnects_total", server="pbx1", reason=reason)] == 0
    for reason in DROP_REASONS:
        assert samples[key("amid_sink_dropped_events_total", sink="hook", type="webhook", reason=reason)] == 0
    for kind in ("bad_banner", "message_too_large", "too_many_fields", "malformed_message"):
        assert samples[key("amid_ami_protocol_errors_total", server="pbx1", kind=kind)] == 0
    for name in ("connects", "login_failures", "received_events", "received_bytes", "sent_actions",
                 "sent_bytes", "handler_errors", "handler_dropped_events"):
        assert samples[key(f"amid_ami_{name}_total", server="pbx1")] == 0
    assert samples[key("amid_ami_received_events_by_name_total", server="pbx1", event="other")] == 0
    assert samples[key("amid_ami_up", server="pbx1")] == 0
    assert samples[key("amid_ami_last_event_timestamp_seconds", server="pbx1")] == 0
    sink = {"sink": "hook", "type": "webhook"}
    for name in ("received_events", "received_bytes", "sent_events", "sent_bytes", "discarded_events",
                 "failed_attempts", "retried_attempts", "dead_lettered_events", "truncated_events",
                 "spool_corrupt_records"):
        assert samples[key(f"amid_sink_{name}_total", **sink)] == 0
    assert samples[key("amid_sink_last_success_timestamp_seconds", **sink)] == 0
    assert samples[key("amid_sink_delivery_latency_seconds_count", **sink)] == 0
    assert samples[key("amid_ami_ping_rtt_seconds_bucket", server="pbx1", le="+Inf")] == 0
    assert samples[key("amid_config_last_reload_successful")] == 1
    assert samples[key("amid_config_last_reload_success_timestamp_seconds")] == 1_700_000_000.0
    for result in ("success", "failure"):
        assert samples[key("amid_config_reloads_total", result=result)] == 0


async def test_server_values_follow_stats(world: World, http: HealthServer) -> None:
    stats = world.servers["pbx1"]
    stats.up = True
    stats.connects_total = 3
    stats.disconnects_total.update({"eof": 1, "ping_timeout": 1, "tls_error": 1})
    stats.login_failures_total = 2
    stats.protocol_errors_total["oversized_message"] += 4
    stats.events_total = 7
    stats.received_bytes_total = 4321
    stats.sent_actions_total, stats.sent_bytes_total = 5, 321
    stats.events_by_name.update({"Newchannel": 5, "Hangup": 2})
    stats.handler_errors_total = 1
    stats.handler_dropped_total = 6
    stats.last_event_time = 1_700_000_000.5
    stats.last_pong_time = 1_700_000_001.0
    for rtt in (0.00015, 0.0007, 0.002, 0.3):
        stats.ping_rtt.observe(rtt)

    samples = await scrape(http.port)

    pbx1 = {"server": "pbx1"}
    assert samples[key("amid_ami_up", **pbx1)] == 1
    assert samples[key("amid_ami_connects_total", **pbx1)] == 3
    assert samples[key("amid_ami_disconnects_total", reason="eof", **pbx1)] == 1
    assert samples[key("amid_ami_disconnects_total", reason="ping_timeout", **pbx1)] == 1
    assert samples[key("amid_ami_disconnects_total", reason="tls_error", **pbx1)] == 1  # unknown reasons too
    assert samples[key("amid_ami_disconnects_total", reason="closed", **pbx1)] == 0
    assert samples[key("amid_ami_login_failures_total", **pbx1)] == 2
    assert samples[key("amid_ami_protocol_errors_total", kind="oversized_message", **pbx1)] == 4
    assert samples[key("amid_ami_received_events_total", **pbx1)] == 7
    assert samples[key("amid_ami_received_bytes_total", **pbx1)] == 4321
    assert samples[key("amid_ami_sent_actions_total", **pbx1)] == 5
    assert samples[key("amid_ami_sent_bytes_total", **pbx1)] == 321
    assert samples[key("amid_ami_received_events_by_name_total", event="Newchannel", **pbx1)] == 5
    assert samples[key("amid_ami_received_events_by_name_total", event="Hangup", **pbx1)] == 2
    assert samples[key("amid_ami_handler_errors_total", **pbx1)] == 1
    assert samples[key("amid_ami_handler_dropped_events_total", **pbx1)] == 6
    assert samples[key("amid_ami_last_event_timestamp_seconds", **pbx1)] == 1_700_000_000.5
    assert samples[key("amid_ami_last_pong_timestamp_seconds", **pbx1)] == 1_700_000_001.0
    # Histogram: cumulative buckets with le labels, +Inf == count, and the sum.
    assert samples[key("amid_ami_ping_rtt_seconds_bucket", le="0.0001", **pbx1)] == 0
    assert samples[key("amid_ami_ping_rtt_seconds_bucket", le="0.0002", **pbx1)] == 1  # loopback
    assert samples[key("amid_ami_ping_rtt_seconds_bucket", le="0.001", **pbx1)] == 2
    assert samples[key("amid_ami_ping_rtt_seconds_bucket", le="0.002", **pbx1)] == 3
    assert samples[key("amid_ami_ping_rtt_seconds_bucket", le="0.2", **pbx1)] == 3
    assert samples[key("amid_ami_ping_rtt_seconds_bucket", le="0.5", **pbx1)] == 4
    assert samples[key("amid_ami_ping_rtt_seconds_bucket", le="+Inf", **pbx1)] == 4
    assert samples[key("amid_ami_ping_rtt_seconds_count", **pbx1)] == 4
    assert samples[key("amid_ami_ping_rtt_seconds_sum", **pbx1)] == pytest.approx(0.30285)


async def test_sink_values_follow_stats(world: World, http: HealthServer) -> None:
    _, stats = world.sinks["hook"]
    stats.state = "retrying"
    stats.received_total = 100
    stats.sent_total = 56
    stats.received_bytes_total, stats.sent_bytes_total = 51200, 30000
    stats.discarded_total = 9
    stats.spool_max_bytes = 1 << 30  # the queue's bounds come with its SizedQueue, below
    stats.failed_attempts_total = 3
    stats.retried_total = 2
    stats.dropped_total.update({"queue_full": 10, "spool_full": 5})
    stats.dead_lettered_total = 4
    stats.truncated_total = 6
    stats.spool_corrupt_records_total = 7
    stats.queue = SizedQueue(1000, 1 << 20)
    stats.queue.events, stats.queue.bytes = 15, 4096
    stats.spool = SimpleNamespace(waiting=8, bytes_used=2048)  # what the collector reads of it
    stats.in_flight_events = 2
    stats.last_success_time = 1_700_000_123.25
    for latency in (0.02, 45.0, 90.0):
        stats.delivery_latency.observe(latency)

    samples = await scrape(http.port)

    sink = {"sink": "hook", "type": "webhook"}
    assert samples[key("amid_sink_received_events_total", **sink)] == 100
    assert samples[key("amid_sink_sent_events_total", **sink)] == 56
    assert samples[key("amid_sink_received_bytes_total", **sink)] == 51200
    assert samples[key("amid_sink_sent_bytes_total", **sink)] == 30000
    assert samples[key("amid_sink_discarded_events_total", **sink)] == 9
    assert samples[key("amid_sink_queue_max_events", **sink)] == 1000
    assert samples[key("amid_sink_queue_max_bytes", **sink)] == 1 << 20
    assert samples[key("amid_sink_spool_max_bytes", **sink)] == 1 << 30
    assert samples[key("amid_sink_failed_attempts_total", **sink)] == 3
    assert samples[key("amid_sink_retried_attempts_total", **sink)] == 2
    assert samples[key("amid_sink_dropped_events_total", reason="queue_full", **sink)] == 10
    assert samples[key("amid_sink_dropped_events_total", reason="spool_full", **sink)] == 5
    assert samples[key("amid_sink_dropped_events_total", reason="shutdown", **sink)] == 0
    assert samples[key("amid_sink_dead_lettered_events_total", **sink)] == 4
    assert samples[key("amid_sink_truncated_events_total", **sink)] == 6
    assert samples[key("amid_sink_spool_corrupt_records_total", **sink)] == 7
    assert samples[key("amid_sink_queue_events", **sink)] == 15
    assert samples[key("amid_sink_queue_bytes", **sink)] == 4096
    assert samples[key("amid_sink_spool_events", **sink)] == 8
    assert samples[key("amid_sink_spool_bytes", **sink)] == 2048
    assert samples[key("amid_sink_in_flight_events", **sink)] == 2
    assert samples[key("amid_sink_last_success_timestamp_seconds", **sink)] == 1_700_000_123.25
    assert samples[key("amid_sink_delivery_latency_seconds_bucket", le="0.01", **sink)] == 0
    assert samples[key("amid_sink_delivery_latency_seconds_bucket", le="0.02", **sink)] == 1
    assert samples[key("amid_sink_delivery_latency_seconds_bucket", le="60.0", **sink)] == 2
    assert samples[key("amid_sink_delivery_latency_seconds_bucket", le="+Inf", **sink)] == 3
    assert samples[key("amid_sink_delivery_latency_seconds_sum", **sink)] == pytest.approx(135.02)
    # The invariant an end-to-end test checks: every received event is accounted for.
    accounted = sum(samples[key(f"amid_sink_{name}", **sink)]
                    for name in ("sent_events_total", "queue_events", "spool_events", "in_flight_events",
                                 "dead_lettered_events_total"))
    assert accounted + total(samples, "amid_sink_dropped_events_total", **sink) == 100


async def test_sink_state_is_one_hot(world: World, http: HealthServer) -> None:
    def states(samples: Samples) -> dict[str, float]:
        return {state: samples[key("amid_sink_state", sink="hook", type="webhook", state=state)]
                for state in SINK_STATES}

    assert states(await scrape(http.port)) == {s: float(s == "starting") for s in SINK_STATES}
    world.sinks["hook"][1].state = "disabled"
    assert states(await scrape(http.port)) == {s: float(s == "disabled") for s in SINK_STATES}


async def test_event_name_label_is_bounded(world: World) -> None:
    server = await serve(world.collector(max_event_names=3))
    try:
        by_name = world.servers["pbx1"].events_by_name
        by_name.update({"Newchannel": 1, "Hangup": 1, "VarSet": 1, "Cdr": 4, "DTMFBegin": 2})
        first = await scrape(server.port)
        named = {dict(labels)["event"]: value for (name, labels), value in first.items()
                 if name == "amid_ami_received_events_by_name_total"}
        assert named == {"Newchannel": 1, "Hangup": 1, "VarSet": 1, "other": 6}

        # The admitted names stay fixed even when others become more frequent: no series
        # moves in or out of "other", so every series stays monotonic.
        by_name.update({"Cdr": 100, "Newstate": 1, "other": 2})  # a real "other" event folds in
        by_name["VarSet"] += 1
        second = await scrape(server.port)
        named = {dict(labels)["event"]: value for (name, labels), value in second.items()
                 if name == "amid_ami_received_events_by_name_total"}
        assert named == {"Newchannel": 1, "Hangup": 1, "VarSet": 2, "other": 109}

        # The budget is per server.
        world.servers["pbx2"] = SessionStats()
        world.servers["pbx2"].events_by_name.update({"Cdr": 1, "Newstate": 1})
        third = await scrape(server.port)
        assert third[key("amid_ami_received_events_by_name_total", server="pbx2", event="Cdr")] == 1
        assert third[key("amid_ami_received_events_by_name_total", server="pbx2", event="other")] == 0
    finally:
        await server.close()


async def test_servers_and_sinks_are_read_at_each_scrape(world: World, http: HealthServer) -> None:
    world.servers["pbx2"] = SessionStats(up=True)
    world.sinks["log"] = ("file", SinkStats(state="ok"))
    samples = await scrape(http.port)
    assert samples[key("amid_ami_up", server="pbx2")] == 1
    assert samples[key("amid_sink_state", sink="log", type="file", state="ok")] == 1

    del world.servers["pbx2"], world.sinks["log"]
    samples = await scrape(http.port)
    assert key("amid_ami_up", server="pbx2") not in samples
    assert not any(dict(labels).get("sink") == "log" for _, labels in samples)


async def test_every_family_has_help_and_follows_naming(http: HealthServer) -> None:
    text = await scrape_text(http.port)
    families = [f for f in text_string_to_metric_families(text) if f.name.startswith("amid_")]
    assert len(families) >= 25
    for family in families:
        assert family.documentation, family.name
        if family.type == "counter":
            assert all(s.name.endswith("_total") for s in family.samples), family.name
    # Standard process collectors are on the registry too.
    assert "process_cpu_seconds_total" in text


def test_nothing_registered_globally(world: World) -> None:
    one, two = build_registry(world.collector()), build_registry(world.collector())
    assert one is not two
    assert b"amid_build_info" in generate_latest(one)
    assert b"amid_" not in generate_latest(REGISTRY)


def test_rejects_negative_event_budget(world: World) -> None:
    with pytest.raises(ValueError):
        world.collector(max_event_names=-1)


def require_promtool() -> str:
    promtool = shutil.which("promtool") or shutil.which("promtool", path="/usr/bin")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing (Debian package 'prometheus')")
        pytest.skip("promtool not installed")
    return promtool


async def test_promtool_check_metrics_is_clean(world: World, http: HealthServer) -> None:
    promtool = require_promtool()
    # A realistic scrape: two servers, two sinks, every label kind populated.
    world.servers["pbx2"] = SessionStats(up=True, connects_total=1)
    stats = world.servers["pbx1"]
    stats.disconnects_total["eof"] += 1
    stats.protocol_errors_total["bad_line"] += 1
    stats.events_by_name.update({"Newchannel": 3, "Hangup": 3, 'Odd"Name\\x': 1})
    stats.ping_rtt.observe(0.004)
    world.sinks["log"] = ("file", SinkStats(state="ok", sent_total=5, received_total=5))
    world.sinks["hook"][1].delivery_latency.observe(1.5)
    text = await scrape_text(http.port)
    assert parse(text)  # sanity: parses

    process = await asyncio.create_subprocess_exec(
        promtool, "check", "metrics",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    async with asyncio.timeout(20):
        output, _ = await process.communicate(text.encode())
    assert (process.returncode, output.decode()) == (0, "")


def histogram_quantile(q: float, cumulative: list[tuple[float, int]]) -> float:
    """Prometheus's ``histogram_quantile`` (linear interpolation inside the bucket)."""
    total_count = cumulative[-1][1]
    rank = q * total_count
    previous_bound, previous_count = 0.0, 0
    for bound, count in cumulative:
        if count >= rank:
            if bound == float("inf"):
                return previous_bound
            return previous_bound + (bound - previous_bound) * (rank - previous_count) / (count - previous_count)
        previous_bound, previous_count = bound, count
    raise AssertionError("unreachable: the +Inf bucket holds every observation")


@pytest.mark.parametrize("buckets", [DELIVERY_LATENCY_BUCKETS, PING_BUCKETS], ids=["latency", "ping"])
def test_histograms_resolve_sub_millisecond_times(buckets: tuple[float, ...]) -> None:
    # What amid does on one host: p50 about 0.15 ms, p99 0.3 ms. The old delivery buckets (from
    # 5 ms) made histogram_quantile(0.99) say 4.95 ms; the estimate must now stay within the
    # bucket around the truth.
    histogram = Histogram(buckets)
    histogram.observe(0.00015, count=980)
    histogram.observe(0.0003, count=20)
    assert buckets[0] <= 0.00005
    cumulative = histogram.cumulative()
    assert 0.0001 <= histogram_quantile(0.5, cumulative) <= 0.0002
    assert 0.0002 <= histogram_quantile(0.99, cumulative) <= 0.0005


async def test_reload_outcome_is_exposed(world: World, http: HealthServer) -> None:
    world.config.record(False, now=1_700_000_100.0)
    samples = await scrape(http.port)
    assert samples[key("amid_config_last_reload_successful")] == 0
    # A failed reload leaves the time of the last good one.
    assert samples[key("amid_config_last_reload_success_timestamp_seconds")] == 1_700_000_000.0
    assert samples[key("amid_config_reloads_total", result="failure")] == 1
    world.config.record(True, now=1_700_000_200.0)
    samples = await scrape(http.port)
    assert samples[key("amid_config_last_reload_successful")] == 1
    assert samples[key("amid_config_last_reload_success_timestamp_seconds")] == 1_700_000_200.0
    assert samples[key("amid_config_reloads_total", result="success")] == 1


def test_label_values_are_the_ones_dashboards_and_alerts_use() -> None:
    """The label sets live where their values are produced (delivery, lifecycle, ami.stats,
    ami.protocol); deploy/'s dashboard and alerts query these exact values."""
    assert DROP_REASONS == ("queue_full", "spool_full", "spool_corrupt", "spool_io", "disabled", "shutdown")
    assert SINK_STATES == ("starting", "ok", "retrying", "disabled", "closing", "closed")
    assert DISCONNECT_REASONS == ("eof", "ping_timeout", "protocol_error", "connect_error", "login_failed",
                                  "server_shutdown", "error", "closed")
    assert PROTOCOL_ERROR_KINDS == ("bad_banner", "message_too_large", "too_many_fields", "malformed_message",
                                    "event_before_login")


class CountingSink:
    """A sink with counters of its own (amid.sinks.base.ReportsCounters)."""

    def __init__(self) -> None:
        self.counters = {"reconnect": 0, "connect_failure": 0}

    def sink_counters(self) -> dict[str, int]:
        return dict(self.counters)


async def test_a_sinks_own_counters_are_exported(world: World) -> None:
    sink = CountingSink()
    world.sinks["out"] = ("syslog", SinkStats())
    world.sink_objects["out"] = sink
    server = await serve(world.collector())
    try:
        labels = {"sink": "out", "type": "syslog"}
        samples = await scrape(server.port)
        assert samples[key("amid_sink_operations_total", operation="reconnect", **labels)] == 0
        sink.counters["reconnect"] = 3
        samples = await scrape(server.port)
        assert samples[key("amid_sink_operations_total", operation="reconnect", **labels)] == 3
        # A sink without the capability (the webhook here) has no such series.
        assert not [k for k in samples if k[0] == "amid_sink_operations_total" and ("sink", "hook") in k[1]]
    finally:
        await server.close()


def readme_metric_names() -> set[str]:
    """Every metric name in the first column of the README's metrics table."""
    section = README.read_text().split("## Metrics and health", 1)[1].split("\n## ", 1)[0]
    names: set[str] = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            first_column = line.split(" | ")[0]
            names.update(re.findall(r"`(amid_[a-z_]+)`", first_column))
    return names


def exposed_metric_names(text: str) -> set[str]:
    """The names of amid's families in a scrape, as written in queries (counters with _total)."""
    suffix = {"counter": "_total", "info": "_info"}
    return {family.name + suffix.get(family.type, "")
            for family in text_string_to_metric_families(text) if family.name.startswith("amid_")}


def test_readme_table_and_a_real_daemons_scrape_agree(tmp_path: Path) -> None:
    """``amid run`` on the simulator: its scrape is promtool-clean, names exactly what the README
    table lists, keeps every sink's accounting identity, counts a filter's discards apart from
    what it received, and records reload outcomes."""
    promtool = require_promtool()
    with simulator(tmp_path, call_rate=20) as sim, daemon(tmp_path, sim.port) as amid:
        def moving() -> Samples | None:
            samples = parse(amid.metrics())
            wanted = (samples[key("amid_ami_received_events_total", server="pbx1")] > 0
                      and samples[key("amid_ami_ping_rtt_seconds_count", server="pbx1")] > 0
                      and total(samples, "amid_sink_sent_events_total", sink="hangups") > 0
                      and total(samples, "amid_sink_sent_bytes_total", sink="events") > 0)
            return samples if wanted else None
        poll(moving, 20, "events, pings and deliveries")

        amid.reload()  # the same file again: a successful reload
        poll(lambda: parse(amid.metrics())[key("amid_config_reloads_total", result="success")] == 1,
             10, "a successful reload")
        amid.config.write_text("servers: [\n")  # broken YAML: refused, the running config kept
        amid.reload()
        poll(lambda: parse(amid.metrics())[key("amid_config_reloads_total", result="failure")] == 1,
             10, "a refused reload")
        text = amid.metrics()

    samples = parse(text)
    assert samples[key("amid_config_last_reload_successful")] == 0
    assert samples[key("amid_config_last_reload_success_timestamp_seconds")] > 1_700_000_000

    readme, exposed = readme_metric_names(), exposed_metric_names(text)
    assert exposed - readme == set(), "exposed but not in the README table"
    assert readme - exposed == set(), "in the README table but not exposed"

    checked = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, check=False,
                             text=True, timeout=30)
    assert (checked.returncode, checked.stdout + checked.stderr) == (0, "")

    for sink in ("events", "hangups"):
        accounted = sum(total(samples, name, sink=sink) for name in (
            "amid_sink_sent_events_total", "amid_sink_dropped_events_total",
            "amid_sink_dead_lettered_events_total", "amid_sink_queue_events",
            "amid_sink_in_flight_events", "amid_sink_spool_events"))
        assert total(samples, "amid_sink_received_events_total", sink=sink) == accounted, sink
    # Both sinks see every event; the filtered one receives some and discards the rest.
    routed = total(samples, "amid_sink_received_events_total", sink="events")
    hangups = total(samples, "amid_sink_received_events_total", sink="hangups")
    discarded = total(samples, "amid_sink_discarded_events_total", sink="hangups")
    assert total(samples, "amid_sink_discarded_events_total", sink="events") == 0
    assert hangups > 0 and discarded > 0
    assert hangups + discarded == routed
    assert total(samples, "amid_sink_spool_max_bytes", sink="events") == 64 << 20
    assert samples[key("amid_ami_received_bytes_total", server="pbx1")] > 0
    assert samples[key("amid_ami_sent_actions_total", server="pbx1")] >= 2  # login and pings
