"""Prometheus view of amid's plain stats objects, built at scrape time.

Names follow one pattern (Vector's ``component_received_events_total`` is the model):
``amid_<ami|sink|config>_<what>_<unit>[_total]``, e.g. ``amid_ami_received_events_total``,
``amid_sink_sent_bytes_total``, ``amid_sink_dropped_events_total{reason}``. "received" is what
came into a server or sink, "sent" what it passed on (a sink: confirmed by its peer; a server:
actions written to Asterisk); a sink's filter "discards" (on purpose), its queue or spool
"drops" (an overflow or failure).

Hot paths (the AMI reader, the sink runners) only bump ints and ``Counter`` entries on their
stats objects; :class:`AmidCollector` turns those into metric families when Prometheus scrapes.
Nothing here registers at import time and nothing touches prometheus_client's global
``REGISTRY``: :func:`build_registry` returns a fresh registry the caller passes on.

``collect()`` reads live ``Counter`` objects that the event loop mutates, so it must run on the
event loop thread (``amid.http`` calls it from a request handler, which does).
"""

from __future__ import annotations

import platform
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from amid.ami._accel import SPEEDUPS
from amid.ami.protocol import PROTOCOL_ERROR_KINDS
from amid.ami.stats import DISCONNECT_REASONS, Histogram, SessionStats
from amid.sinks.base import ReportsCounters
from amid.sinks.delivery import DROP_REASONS
from amid.sinks.lifecycle import RunnerState

__all__ = [
    "DISCONNECT_REASONS",
    "DROP_REASONS",
    "OTHER_EVENT",
    "PROTOCOL_ERROR_KINDS",
    "RELOAD_RESULTS",
    "SINK_STATES",
    "AmidCollector",
    "ReloadStats",
    "build_registry",
]

# Label values exposed at 0 before anything happens, so `rate()` and `increase()` see the
# first increment and alerts on e.g. ping timeouts have a series to evaluate. Each list is owned
# by the module that produces the values (imported above); reasons the stats objects report
# beyond these are exposed too. RunnerState.NEW is shown as "starting" (see SinkStats.state).
SINK_STATES = tuple(state.value for state in RunnerState if state is not RunnerState.NEW)
RELOAD_RESULTS = ("success", "failure")

# Event names beyond the per-server budget are summed under this label value.
OTHER_EVENT = "other"

ServerSource = Callable[[], Iterable[tuple[str, SessionStats]]]
# (sink name, sink type, SinkStats, the sink: its ReportsCounters are exported too, if it has any)
SinkSource = Callable[[], Iterable[tuple[str, str, Any, object]]]

_SERVER = ["server"]
_SINK = ["sink", "type"]


@dataclass
class ReloadStats:
    """Outcome of the daemon's configuration loads (the load at start counts as a success).

    The daemon calls :meth:`record` after each reload (SIGHUP); the collector reads it at
    scrape time as ``amid_config_last_reload_successful`` and friends, the way Prometheus and
    Alertmanager expose their own reloads.
    """

    last_successful: bool = True
    last_success_time: float = field(default_factory=time.time)
    reloads_total: Counter[str] = field(default_factory=Counter)  # "success" | "failure" -> count

    def record(self, successful: bool, now: float | None = None) -> None:
        """Note one reload attempt's outcome."""
        self.last_successful = successful
        self.reloads_total[RELOAD_RESULTS[0] if successful else RELOAD_RESULTS[1]] += 1
        if successful:
            self.last_success_time = time.time() if now is None else now


class AmidCollector(Collector):
    """A prometheus_client collector reading amid's stats objects at each scrape.

    ``servers()`` yields ``(server name, SessionStats)`` and ``sinks()`` yields
    ``(sink name, sink type, SinkStats, sink)`` (a sink that is
    :class:`~amid.sinks.base.ReportsCounters` has its own counters exported too); both are called
    on every scrape, so servers and sinks added or removed by a reload appear and disappear
    without re-registering anything.
    ``config`` is the daemon's :class:`ReloadStats`.

    The ``event`` label of ``amid_ami_received_events_by_name_total`` is bounded: per server,
    the first ``max_event_names`` distinct names seen at scrape time keep their own series for
    the collector's lifetime; every later name is summed under ``event="other"``. Keeping the
    admitted set fixed (rather than "top N now") keeps each series monotonic.
    """

    def __init__(
        self,
        *,
        servers: ServerSource,
        sinks: SinkSource,
        config: ReloadStats,
        version: str,
        max_event_names: int = 300,
    ) -> None:
        if max_event_names < 0:
            raise ValueError("max_event_names must be >= 0")
        self._servers = servers
        self._sinks = sinks
        self._config = config
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
        yield from self._config_families()
        yield from self._server_families(list(self._servers()))
        yield from self._sink_families(list(self._sinks()))

    def _config_families(self) -> Iterator[Metric]:
        config = self._config
        yield GaugeMetricFamily(
            "amid_config_last_reload_successful",
            "1 if the last configuration reload (SIGHUP) was applied in full, else 0.",
            value=1.0 if config.last_successful else 0.0,
        )
        yield GaugeMetricFamily(
            "amid_config_last_reload_success_timestamp_seconds",
            "Unix time of the last configuration load applied in full (the start counts).",
            value=config.last_success_time,
        )
        reloads = CounterMetricFamily(
            "amid_config_reloads", "Configuration reloads (SIGHUP), by result.", labels=["result"]
        )
        for result, count in _with_zeros(config.reloads_total, RELOAD_RESULTS):
            reloads.add_metric([result], count)
        yield reloads

    # -- AMI servers ---------------------------------------------------------------------

    def _server_families(self, servers: list[tuple[str, SessionStats]]) -> Iterator[Metric]:
        def counter(name: str, doc: str) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, labels=_SERVER)

        up = GaugeMetricFamily("amid_ami_up", "1 while logged in to the AMI server, else 0.", labels=_SERVER)
        connects = counter("amid_ami_connects", "Successful AMI logins (connection established).")
        disconnects = CounterMetricFamily(
            "amid_ami_disconnects", "AMI connections lost or closed, by reason.", labels=["server", "reason"]
        )
        login_failures = counter("amid_ami_login_failures", "AMI login attempts refused by the server.")
        protocol_errors = CounterMetricFamily(
            "amid_ami_protocol_errors",
            "Malformed or unexpected AMI input, by kind.",
            labels=["server", "kind"],
        )
        received_events = counter(
            "amid_ami_received_events", "AMI events received (each is handed on to the sinks' router)."
        )
        received_by_name = CounterMetricFamily(
            "amid_ami_received_events_by_name",
            "AMI events received by event name (a bounded set of names per server;"
            f" the rest are counted under event=\"{OTHER_EVENT}\").",
            labels=["server", "event"],
        )
        received_bytes = counter("amid_ami_received_bytes", "Bytes read from the AMI connection.")
        reads = counter("amid_ami_reads", "Socket reads that returned data (events per read = "
                        "received events / reads).")
        sent_actions = counter("amid_ami_sent_actions", "AMI actions written (login, keepalive pings, others).")
        sent_bytes = counter("amid_ami_sent_bytes", "Bytes of AMI actions written.")
        handler_errors = counter("amid_ami_handler_errors", "Exceptions raised by event handlers.")
        handler_dropped = counter(
            "amid_ami_handler_dropped_events", "Events dropped because an event handler's queue was full."
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
            received_events.add_metric(labels, stats.events_total)
            for event, count in self._bounded_event_counts(server, stats.events_by_name):
                received_by_name.add_metric([server, event], count)
            received_bytes.add_metric(labels, stats.received_bytes_total)
            reads.add_metric(labels, stats.reads_total)
            sent_actions.add_metric(labels, stats.sent_actions_total)
            sent_bytes.add_metric(labels, stats.sent_bytes_total)
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
            up, connects, disconnects, login_failures, protocol_errors, received_events,
            received_by_name, received_bytes, reads, sent_actions, sent_bytes, handler_errors,
            handler_dropped, last_event, last_pong, ping_rtt,
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

    def _sink_families(self, sinks: list[tuple[str, str, Any, object]]) -> Iterator[Metric]:
        def counter(name: str, doc: str) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, labels=_SINK)

        def gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=_SINK)

        state = GaugeMetricFamily(
            "amid_sink_state",
            "Current sink state: 1 for the state the sink is in, 0 for the others.",
            labels=["sink", "type", "state"],
        )
        received_events = counter(
            "amid_sink_received_events", "Events routed to the sink (accepted by its filter; queued or dropped)."
        )
        received_bytes = counter(
            "amid_sink_received_bytes",
            "Bytes of the events routed to the sink, as counted against queue.max_bytes"
            " (estimated from the AMI message before the JSON is built).",
        )
        sent_events = counter("amid_sink_sent_events", "Events delivered (confirmed by the sink's peer).")
        sent_bytes = counter(
            "amid_sink_sent_bytes", "Bytes of the JSON records delivered (without the transport's framing)."
        )
        discarded = counter("amid_sink_discarded_events", "Events the sink's filter did not accept (on purpose).")
        dropped = CounterMetricFamily(
            "amid_sink_dropped_events", "Events the sink dropped, by reason.", labels=["sink", "type", "reason"]
        )
        dead_lettered = counter(
            "amid_sink_dead_lettered_events", "Events the peer rejected for good, written to the dead-letter file."
        )
        truncated = counter(
            "amid_sink_truncated_events",
            "Events delivered shortened to the transport's size limit (syslog udp/unix).",
        )
        failed = counter("amid_sink_failed_attempts",
                         "Delivery attempts that failed (each retry that fails counts again).")
        retried = counter("amid_sink_retried_attempts",
                          "Delivery attempts that were retries of an earlier failed attempt.")
        spool_corrupt = counter(
            "amid_sink_spool_corrupt_records",
            "Damaged spool records skipped when the spool was opened (torn or corrupted writes).",
        )
        operations = CounterMetricFamily(
            "amid_sink_operations",
            "What only the sink itself sees, by operation (file: reopen, rotation, fsync, "
            "write_error...; syslog: reconnect, connect_failure). Restarts at 0 when a reload rebuilds the sink.",
            labels=["sink", "type", "operation"],
        )
        queue_events = gauge("amid_sink_queue_events", "Events waiting in the sink's in-memory queue.")
        queue_bytes = gauge("amid_sink_queue_bytes", "Bytes of events waiting in the sink's in-memory queue.")
        queue_max_events = gauge("amid_sink_queue_max_events", "The queue's bound in events (queue.max_events).")
        queue_max_bytes = gauge("amid_sink_queue_max_bytes", "The queue's bound in bytes (queue.max_bytes).")
        in_flight = gauge("amid_sink_in_flight_events", "Events in the batch being delivered right now.")
        spool_events = gauge("amid_sink_spool_events", "Events waiting in the sink's on-disk spool.")
        spool_bytes = gauge("amid_sink_spool_bytes", "Bytes used by the sink's on-disk spool.")
        spool_max_bytes = gauge(
            "amid_sink_spool_max_bytes", "The spool's cap in bytes (spool.max_bytes; 0 without a spool)."
        )
        last_success = gauge(
            "amid_sink_last_success_timestamp_seconds",
            "Unix time of the sink's last successful delivery (0 if none yet).",
        )
        latency = HistogramMetricFamily(
            "amid_sink_delivery_latency_seconds",
            "Time from receiving an event to its successful delivery.",
            labels=_SINK,
        )

        for sink, sink_type, stats, sink_object in sinks:
            labels = [sink, sink_type]
            counts = Counter(stats.carried_operations)
            if isinstance(sink_object, ReportsCounters):
                counts.update(sink_object.sink_counters())
            for operation, count in counts.items():
                operations.add_metric([sink, sink_type, operation], count)
            for name in _with_extra(SINK_STATES, stats.state):
                state.add_metric([sink, sink_type, name], 1.0 if name == stats.state else 0.0)
            received_events.add_metric(labels, stats.received_total)
            received_bytes.add_metric(labels, stats.received_bytes_total)
            sent_events.add_metric(labels, stats.sent_total)
            sent_bytes.add_metric(labels, stats.sent_bytes_total)
            discarded.add_metric(labels, stats.discarded_total)
            for reason, count in _with_zeros(stats.dropped_total, DROP_REASONS):
                dropped.add_metric([sink, sink_type, reason], count)
            dead_lettered.add_metric(labels, stats.dead_lettered_total)
            truncated.add_metric(labels, stats.truncated_total)
            failed.add_metric(labels, stats.failed_attempts_total)
            retried.add_metric(labels, stats.retried_total)
            spool_corrupt.add_metric(labels, stats.spool_corrupt_records_total)
            queue_events.add_metric(labels, stats.queue_events)
            queue_bytes.add_metric(labels, stats.queue_bytes)
            queue_max_events.add_metric(labels, stats.queue_max_events)
            queue_max_bytes.add_metric(labels, stats.queue_max_bytes)
            in_flight.add_metric(labels, stats.in_flight_events)
            spool_events.add_metric(labels, stats.spool_events)
            spool_bytes.add_metric(labels, stats.spool_bytes)
            spool_max_bytes.add_metric(labels, stats.spool_max_bytes)
            last_success.add_metric(labels, _timestamp(stats.last_success_time))
            _add_histogram(latency, labels, stats.delivery_latency)

        yield from (
            state, received_events, received_bytes, sent_events, sent_bytes, discarded, dropped,
            dead_lettered, truncated, failed, retried, spool_corrupt, operations, queue_events, queue_bytes,
            queue_max_events, queue_max_bytes, in_flight, spool_events, spool_bytes, spool_max_bytes,
            last_success, latency,
        )


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
