"""Prometheus view of amid's plain stats objects, built at scrape time.

Hot paths (the AMI reader, the sink runners) only bump ints and ``Counter`` entries on their
stats objects; :class:`AmidCollector` turns those into metric families when Prometheus scrapes.
Nothing here registers at import time and nothing touches prometheus_client's global
``REGISTRY``: :func:`build_registry` returns a fresh registry the caller passes on.

``collect()`` reads live ``Counter`` objects that the event loop mutates, so it must run on the
event loop thread (``amid.http`` calls it from a request handler, which does).
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from amid._accel import SPEEDUPS
from amid.ami.protocol import PROTOCOL_ERROR_KINDS
from amid.ami.stats import Histogram, SessionStats

__all__ = [
    "DISCONNECT_REASONS",
    "DROP_REASONS",
    "OTHER_EVENT",
    "SINK_STATES",
    "AmidCollector",
    "build_registry",
]

# Label values exposed at 0 before anything happens, so `rate()` and `increase()` see the
# first increment and alerts on e.g. ping timeouts have a series to evaluate. Reasons the
# stats objects report beyond these are exposed too.
DISCONNECT_REASONS = ("eof", "ping_timeout", "protocol_error", "connect_error", "login_failed",
                      "server_shutdown", "error", "closed")
DROP_REASONS = ("queue_full", "spool_full", "spool_corrupt", "spool_io", "disabled", "shutdown")
SINK_STATES = ("starting", "ok", "retrying", "disabled", "closed")

# Event names beyond the per-server budget are summed under this label value.
OTHER_EVENT = "other"

ServerSource = Callable[[], Iterable[tuple[str, SessionStats]]]
SinkSource = Callable[[], Iterable[tuple[str, str, Any]]]
BrokerOutcomeSource = Callable[[], Iterable[tuple[str, str, Mapping[str, int]]]]

_SERVER = ["server"]
_SINK = ["sink", "type"]


class AmidCollector(Collector):
    """A prometheus_client collector reading amid's stats objects at each scrape.

    ``servers()`` yields ``(server name, SessionStats)`` and ``sinks()`` yields
    ``(sink name, sink type, SinkStats)``; both are called on every scrape, so servers and sinks
    added or removed by a reload appear and disappear without re-registering anything.

    The ``event`` label of ``amid_ami_events_received_by_name_total`` is bounded: per server,
    the first ``max_event_names`` distinct names seen at scrape time keep their own series for
    the collector's lifetime; every later name is summed under ``event="other"``. Keeping the
    admitted set fixed (rather than "top N now") keeps each series monotonic.
    """

    def __init__(
        self,
        *,
        servers: ServerSource,
        sinks: SinkSource,
        version: str,
        max_event_names: int = 300,
        broker_outcomes: BrokerOutcomeSource | None = None,
    ) -> None:
        if max_event_names < 0:
            raise ValueError("max_event_names must be >= 0")
        self._servers = servers
        self._sinks = sinks
        self._broker_outcomes = broker_outcomes
        self._version = version
        self._max_event_names = max_event_names
        # server -> event names that own a series (insertion-ordered, bounded by max_event_names)
        self._admitted_events: dict[str, dict[str, None]] = {}

    def collect(self) -> Iterator[Metric]:
        """Yield every amid metric family (called by the registry on each scrape)."""
        yield InfoMetricFamily(
            "amid_build",
            "amid build information (value is always 1).",
            value={"version": self._version, "python": platform.python_version(),
                   "speedups": SPEEDUPS},
        )
        yield from self._server_families(list(self._servers()))
        yield from self._sink_families(list(self._sinks()))
        if self._broker_outcomes is not None:
            yield self._broker_outcome_family(list(self._broker_outcomes()))

    # -- AMI servers ---------------------------------------------------------------------

    def _server_families(self, servers: list[tuple[str, SessionStats]]) -> Iterator[Metric]:
        up = GaugeMetricFamily("amid_ami_up", "1 while logged in to the AMI server, else 0.", labels=_SERVER)
        connects = CounterMetricFamily(
            "amid_ami_connects", "Successful AMI logins (connection established).", labels=_SERVER
        )
        disconnects = CounterMetricFamily(
            "amid_ami_disconnects", "AMI connections lost or closed, by reason.", labels=["server", "reason"]
        )
        login_failures = CounterMetricFamily(
            "amid_ami_login_failures", "AMI login attempts refused by the server.", labels=_SERVER
        )
        protocol_errors = CounterMetricFamily(
            "amid_ami_protocol_errors",
            "Malformed or unexpected AMI input, by kind.",
            labels=["server", "kind"],
        )
        events = CounterMetricFamily("amid_ami_events_received", "AMI events received.", labels=_SERVER)
        events_by_name = CounterMetricFamily(
            "amid_ami_events_received_by_name",
            "AMI events received by event name (a bounded set of names per server;"
            f" the rest are counted under event=\"{OTHER_EVENT}\").",
            labels=["server", "event"],
        )
        handler_errors = CounterMetricFamily(
            "amid_ami_handler_errors", "Exceptions raised by event handlers.", labels=_SERVER
        )
        handler_dropped = CounterMetricFamily(
            "amid_ami_handler_dropped",
            "Events dropped because an event handler's queue was full.",
            labels=_SERVER,
        )
        last_event = GaugeMetricFamily(
            "amid_ami_last_event_timestamp_seconds",
            "Unix time of the last AMI event received (0 if none yet).",
            labels=_SERVER,
        )
        last_pong = GaugeMetricFamily(
            "amid_ami_last_pong_timestamp_seconds",
            "Unix time of the last answered keepalive Ping (0 if none yet).",
            labels=_SERVER,
        )
        ping_rtt = HistogramMetricFamily(
            "amid_ami_ping_rtt_seconds", "Round-trip time of AMI keepalive Pings.", labels=_SERVER
        )

        for server, stats in servers:
            labels = [server]
            up.add_metric(labels, 1.0 if stats.up else 0.0)
            connects.add_metric(labels, stats.connects_total)
            for reason, count in _with_zeros(stats.disconnects_total, DISCONNECT_REASONS):
                disconnects.add_metric([server, reason], count)
            login_failures.add_metric(labels, stats.login_failures_total)
            for kind, count in _with_zeros(stats.protocol_errors_total, PROTOCOL_ERROR_KINDS):
                protocol_errors.add_metric([server, kind], count)
            events.add_metric(labels, stats.events_total)
            for event, count in self._bounded_event_counts(server, stats.events_by_name):
                events_by_name.add_metric([server, event], count)
            handler_errors.add_metric(labels, stats.handler_errors_total)
            handler_dropped.add_metric(labels, stats.handler_dropped_total)
            last_event.add_metric(labels, _timestamp(stats.last_event_time))
            last_pong.add_metric(labels, _timestamp(stats.last_pong_time))
            _add_histogram(ping_rtt, labels, stats.ping_rtt)

        # Forget servers a reload removed, so the admitted-name memory stays bounded too.
        current = {server for server, _ in servers}
        for gone in self._admitted_events.keys() - current:
            del self._admitted_events[gone]

        yield from (
            up, connects, disconnects, login_failures, protocol_errors, events, events_by_name,
            handler_errors, handler_dropped, last_event, last_pong, ping_rtt,
        )

    def _bounded_event_counts(self, server: str, by_name: Mapping[str, int]) -> list[tuple[str, int]]:
        """Per-name counts with at most ``max_event_names`` names, the rest summed as "other"."""
        admitted = self._admitted_events.setdefault(server, {})
        named: list[tuple[str, int]] = []
        other = 0
        for event, count in list(by_name.items()):
            # A real event called "other" would collide with the overflow series: fold it in.
            if event != OTHER_EVENT and (event in admitted or len(admitted) < self._max_event_names):
                admitted[event] = None
                named.append((event, count))
            else:
                other += count
        named.append((OTHER_EVENT, other))
        return named

    # -- sinks -----------------------------------------------------------------------------

    def _sink_families(self, sinks: list[tuple[str, str, Any]]) -> Iterator[Metric]:
        def counter(name: str, doc: str) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, labels=_SINK)

        def gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=_SINK)

        state = GaugeMetricFamily(
            "amid_sink_state",
            "Current sink state: 1 for the state the sink is in, 0 for the others.",
            labels=["sink", "type", "state"],
        )
        received = counter(
            "amid_sink_received", "Events routed to the sink (accepted or dropped at its queue)."
        )
        sent = counter("amid_sink_sent", "Events delivered by the sink.")
        failed = counter("amid_sink_failed_attempts", "Delivery attempts that failed (each retry that fails counts again).")
        retried = counter("amid_sink_retried", "Delivery attempts that were retries of an earlier failed attempt.")
        dropped = CounterMetricFamily(
            "amid_sink_dropped", "Events the sink dropped, by reason.", labels=["sink", "type", "reason"]
        )
        dead_lettered = counter(
            "amid_sink_dead_lettered", "Events the peer rejected for good, written to the dead-letter file."
        )
        truncated = counter(
            "amid_sink_truncated", "Events delivered shortened to the transport's size limit (syslog udp/unix)."
        )
        spool_corrupt = counter(
            "amid_sink_spool_corrupt_records",
            "Damaged spool records skipped when the spool was opened (torn or corrupted writes).",
        )
        queue_events = gauge("amid_sink_queue_events", "Events waiting in the sink's in-memory queue.")
        queue_bytes = gauge("amid_sink_queue_bytes", "Bytes of events waiting in the sink's in-memory queue.")
        in_flight = gauge("amid_sink_in_flight_events", "Events in the batch being delivered right now.")
        spool_events = gauge("amid_sink_spool_events", "Events waiting in the sink's on-disk spool.")
        spool_bytes = gauge("amid_sink_spool_bytes", "Bytes used by the sink's on-disk spool.")
        last_success = gauge(
            "amid_sink_last_success_timestamp_seconds",
            "Unix time of the sink's last successful delivery (0 if none yet).",
        )
        latency = HistogramMetricFamily(
            "amid_sink_delivery_latency_seconds",
            "Time from receiving an event to its successful delivery.",
            labels=_SINK,
        )

        for sink, sink_type, stats in sinks:
            labels = [sink, sink_type]
            for name in _with_extra(SINK_STATES, stats.state):
                state.add_metric([sink, sink_type, name], 1.0 if name == stats.state else 0.0)
            received.add_metric(labels, stats.received_total)
            sent.add_metric(labels, stats.sent_total)
            failed.add_metric(labels, stats.failed_attempts_total)
            retried.add_metric(labels, stats.retried_total)
            for reason, count in _with_zeros(stats.dropped_total, DROP_REASONS):
                dropped.add_metric([sink, sink_type, reason], count)
            dead_lettered.add_metric(labels, stats.dead_lettered_total)
            truncated.add_metric(labels, stats.truncated_total)
            spool_corrupt.add_metric(labels, stats.spool_corrupt_records_total)
            queue_events.add_metric(labels, stats.queue_events)
            queue_bytes.add_metric(labels, stats.queue_bytes)
            in_flight.add_metric(labels, stats.in_flight_events)
            spool_events.add_metric(labels, stats.spool_events)
            spool_bytes.add_metric(labels, stats.spool_bytes)
            last_success.add_metric(labels, _timestamp(stats.last_success_time))
            _add_histogram(latency, labels, stats.delivery_latency)

        yield from (
            state, received, sent, failed, retried, dropped, dead_lettered, truncated, spool_corrupt,
            queue_events, queue_bytes,
            in_flight, spool_events, spool_bytes, last_success, latency,
        )

    @staticmethod
    def _broker_outcome_family(sinks: list[tuple[str, str, Mapping[str, int]]]) -> Metric:
        family = CounterMetricFamily(
            "amid_sink_broker_outcomes",
            "Records a broker sink published that the broker answered other than with a plain "
            "confirm, by outcome (unroutable, nacked, refused, no_stream, duplicate).",
            labels=["sink", "type", "outcome"])
        for sink, sink_type, outcomes in sinks:
            for outcome, count in outcomes.items():
                family.add_metric([sink, sink_type, outcome], count)
        return family


def build_registry(collector: AmidCollector) -> CollectorRegistry:
    """A fresh registry holding ``collector`` plus the standard process, platform and GC collectors."""
    registry = CollectorRegistry()
    registry.register(collector)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def _with_zeros(counts: Mapping[str, int], known: Iterable[str]) -> list[tuple[str, int]]:
    """``known`` labels first (0 if absent), then any other label the stats object reported."""
    merged = dict.fromkeys(known, 0)
    merged.update(counts)
    return list(merged.items())


def _with_extra(known: tuple[str, ...], value: str) -> tuple[str, ...]:
    return known if value in known else (*known, value)


def _timestamp(unix_seconds: float | None) -> float:
    return 0.0 if unix_seconds is None else float(unix_seconds)


def _add_histogram(family: HistogramMetricFamily, labels: list[str], histogram: Histogram) -> None:
    buckets = [(floatToGoString(bound), count) for bound, count in histogram.cumulative()]
    family.add_metric(labels, buckets, histogram.sum)
