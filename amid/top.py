"""``amid top``: a live terminal view of a running daemon, read from its ``/metrics``.

Like ``vector top``: one row per AMI server (state, events/s, age of the last event, ping
round-trip, reconnects) and one per sink (state, events/s in and out, queue, spool, drops, p99
delivery latency), refreshed every second; ``q`` quits. Rates and the latency quantile are
computed over the last few seconds of scrapes, so they follow what the daemon does now. When the
daemon does not answer, the view says so in one line and keeps trying.

The view only reads the Prometheus text (parsed by prometheus_client), so it works against any
amid it can reach over HTTP; ``--once`` prints one plain snapshot (two scrapes an interval apart,
for the rates) and exits, for scripts.
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
import termios
import time
import tty
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TextIO

from prometheus_client.parser import text_string_to_metric_families
from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

__all__ = ["DEFAULT_URL", "Snapshot", "Top", "metrics_url", "parse_snapshot", "run_top"]

DEFAULT_URL = "http://127.0.0.1:9180"
WINDOW_SECONDS = 5.0  # rates and the p99 cover about this much of the recent past

Buckets = tuple[tuple[float, float], ...]  # (upper bound, cumulative count), ending with +Inf


@dataclass
class ServerSample:
    up: bool = False
    events_total: float = 0.0
    last_event: float = 0.0     # unix seconds, 0 if none yet
    connects_total: float = 0.0
    ping_sum: float = 0.0
    ping_count: float = 0.0


@dataclass
class SinkSample:
    type: str = ""
    state: str = "?"
    received_total: float = 0.0
    sent_total: float = 0.0
    dropped_total: float = 0.0
    queue_events: float = 0.0
    queue_max_events: float = 0.0
    spool_events: float = 0.0
    spool_bytes: float = 0.0
    spool_max_bytes: float = 0.0
    latency: dict[float, float] = field(default_factory=dict)  # le -> cumulative count


@dataclass
class Snapshot:
    """What one scrape said, keyed by server and sink name; ``at`` is monotonic seconds."""

    at: float
    wall: float
    version: str = "?"
    servers: dict[str, ServerSample] = field(default_factory=dict)
    sinks: dict[str, SinkSample] = field(default_factory=dict)


def metrics_url(url: str) -> str:
    """``http://host:port`` or a full ``…/metrics`` URL: the URL to scrape."""
    url = url.rstrip("/")
    return url if url.endswith("/metrics") else f"{url}/metrics"


def parse_snapshot(text: str, *, at: float, wall: float) -> Snapshot:
    """Read the families ``amid top`` shows out of a Prometheus text exposition."""
    snap = Snapshot(at=at, wall=wall)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, sample.value
            if name == "amid_build_info":
                snap.version = labels.get("version", "?")
            elif name.startswith("amid_ami_") and "server" in labels:
                _server_sample(snap.servers.setdefault(labels["server"], ServerSample()), name, value)
            elif name.startswith("amid_sink_") and "sink" in labels:
                sink = snap.sinks.setdefault(labels["sink"], SinkSample())
                sink.type = labels.get("type", sink.type)
                _sink_sample(sink, name, labels, value)
    return snap


def _server_sample(server: ServerSample, name: str, value: float) -> None:
    if name == "amid_ami_up":
        server.up = value == 1
    elif name == "amid_ami_received_events_total":
        server.events_total = value
    elif name == "amid_ami_last_event_timestamp_seconds":
        server.last_event = value
    elif name == "amid_ami_connects_total":
        server.connects_total = value
    elif name == "amid_ami_ping_rtt_seconds_sum":
        server.ping_sum = value
    elif name == "amid_ami_ping_rtt_seconds_count":
        server.ping_count = value


_SINK_VALUES = {
    "amid_sink_received_events_total": "received_total",
    "amid_sink_sent_events_total": "sent_total",
    "amid_sink_queue_events": "queue_events",
    "amid_sink_queue_max_events": "queue_max_events",
    "amid_sink_spool_events": "spool_events",
    "amid_sink_spool_bytes": "spool_bytes",
    "amid_sink_spool_max_bytes": "spool_max_bytes",
}


def _sink_sample(sink: SinkSample, name: str, labels: Mapping[str, str], value: float) -> None:
    attribute = _SINK_VALUES.get(name)
    if attribute is not None:
        setattr(sink, attribute, value)
    elif name == "amid_sink_state" and value == 1:
        sink.state = labels.get("state", "?")
    elif name == "amid_sink_dropped_events_total":
        sink.dropped_total += value
    elif name == "amid_sink_delivery_latency_seconds_bucket":
        sink.latency[float(labels["le"])] = value


def _quantile(q: float, newer: Mapping[float, float], older: Mapping[float, float]) -> float | None:
    """Prometheus's ``histogram_quantile`` over the observations between two scrapes."""
    buckets = sorted((bound, count - older.get(bound, 0.0)) for bound, count in newer.items())
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return None


# -- formatting -------------------------------------------------------------------------------

def _rate(text_of: Callable[[float], str], new: float, old: float | None, seconds: float) -> str:
    if old is None or seconds <= 0:
        return "-"
    return text_of(max(new - old, 0.0) / seconds)


def _per_second(value: float) -> str:
    return f"{value:,.1f}"


def _count(value: float) -> str:
    return f"{int(value):,}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 0.001:
        return f"{seconds * 1e6:.0f}µs"
    if seconds < 1:
        return f"{seconds * 1e3:.2f}ms"
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.0f}h"


_STATE_STYLES = {"up": "green", "ok": "green", "down": "bold red", "retrying": "yellow",
                 "starting": "cyan", "disabled": "bold red", "closed": "dim"}


def _state(state: str) -> Text:
    return Text(state, style=_STATE_STYLES.get(state, ""))


@dataclass
class Top:
    """The view's state: the recent snapshots, and whether the daemon answered last time."""

    url: str
    window: float = WINDOW_SECONDS
    history: deque[Snapshot] = field(default_factory=deque)
    error: str | None = None

    def record(self, snap: Snapshot) -> None:
        self.error = None
        self.history.append(snap)
        # Keep one snapshot older than the window, so rates always span about `window` seconds.
        while len(self.history) > 2 and snap.at - self.history[1].at >= self.window:
            self.history.popleft()

    def scrape(self, fetch: Callable[[str], str]) -> None:
        """One scrape; a daemon that does not answer sets ``error`` and keeps the history."""
        try:
            text = fetch(metrics_url(self.url))
        except (OSError, ValueError) as exc:
            self.error = _reason(exc)
            return
        self.record(parse_snapshot(text, at=time.monotonic(), wall=time.time()))

    def render(self, *, plain: bool = False) -> RenderableType:
        header = Text(f"amid top: {metrics_url(self.url)}", style="bold")
        if self.history:
            header.append(f"  (amid {self.history[-1].version})")
        if not plain:
            header.append("  refreshing every second; q quits", style="dim")
        if self.error is not None:
            retry = "" if plain else "; trying again every second"
            return Group(header, Text(f"amid at {metrics_url(self.url)} does not answer: {self.error}{retry}",
                                      style="bold red"))
        if not self.history:
            return Group(header, Text("waiting for the first scrape...", style="dim"))
        return Group(header, Text(""), self._servers(plain), Text(""), self._sinks(plain))

    def _pair(self) -> tuple[Snapshot, Snapshot | None, float]:
        new = self.history[-1]
        old = self.history[0] if len(self.history) > 1 else None
        return new, old, (new.at - old.at) if old is not None else 0.0

    def _table(self, title: str, columns: list[tuple[str, str]], plain: bool) -> Table:
        table = Table(title=title, title_justify="left", box=None if plain else box.SIMPLE_HEAD,
                      header_style="bold", title_style="bold", pad_edge=False)
        for name, justify in columns:
            table.add_column(name, justify="right" if justify == "r" else "left", no_wrap=True)
        return table

    def _servers(self, plain: bool) -> Table:
        new, old, seconds = self._pair()
        table = self._table("AMI servers", [("SERVER", "l"), ("STATE", "l"), ("EVENTS/S", "r"),
                                            ("LAST EVENT", "r"), ("PING RTT", "r"),
                                            ("RECONNECTS", "r")], plain)
        for name, server in sorted(new.servers.items()):
            before = old.servers.get(name) if old is not None else None
            pings = server.ping_count - (before.ping_count if before else 0.0)
            rtt = ((server.ping_sum - (before.ping_sum if before else 0.0)) / pings if pings > 0
                   else server.ping_sum / server.ping_count if server.ping_count else None)
            age = max(new.wall - server.last_event, 0.0) if server.last_event > 0 else None
            table.add_row(name, _state("up" if server.up else "down"),
                          _rate(_per_second, server.events_total, before.events_total if before else None, seconds),
                          _duration(age), _duration(rtt), _count(max(server.connects_total - 1, 0)))
        return table

    def _sinks(self, plain: bool) -> Table:
        new, old, seconds = self._pair()
        table = self._table("sinks", [("SINK", "l"), ("TYPE", "l"), ("STATE", "l"), ("IN/S", "r"),
                                      ("OUT/S", "r"), ("QUEUE", "r"), ("SPOOL", "r"), ("DROPS", "r"),
                                      ("P99 LATENCY", "r")], plain)
        for name, sink in sorted(new.sinks.items()):
            before = old.sinks.get(name) if old is not None else None
            latency = _quantile(0.99, sink.latency, before.latency if before else {})
            spool = (f"{_count(sink.spool_events)} ({sink.spool_bytes / sink.spool_max_bytes:.0%})"
                     if sink.spool_max_bytes else "-")
            drops = Text(_count(sink.dropped_total), style="bold red" if sink.dropped_total else "")
            table.add_row(name, sink.type, _state(sink.state),
                          _rate(_per_second, sink.received_total, before.received_total if before else None, seconds),
                          _rate(_per_second, sink.sent_total, before.sent_total if before else None, seconds),
                          _count(sink.queue_events), spool, drops, _duration(latency))
        return table


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        exc = exc.reason if isinstance(exc.reason, BaseException) else exc
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


def fetch_text(url: str, timeout: float = 2.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return str(response.read().decode("utf-8"))


@contextlib.contextmanager
def _keys(stream: TextIO) -> Iterator[int | None]:
    """The terminal's file descriptor in cbreak mode (keys arrive unbuffered), or None."""
    if not stream.isatty():
        yield None
        return
    fd = stream.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _quit_pressed(fd: int | None, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for a key; True if it was q."""
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        if fd is None:
            time.sleep(remaining)
            return False
        readable, _, _ = select.select([fd], [], [], remaining)
        if readable and os.read(fd, 32).lower().startswith(b"q"):
            return True
    return False


def run_top(url: str = DEFAULT_URL, *, once: bool = False, interval: float = 1.0,
            console: Console | None = None, fetch: Callable[[str], str] = fetch_text) -> int:
    """Show the view until ``q``; with ``once``, print one snapshot and return (1 if the daemon
    did not answer). Colour only when the output is a terminal (and ``NO_COLOR`` is unset)."""
    console = console or Console(highlight=False)
    top = Top(url)
    if once:
        top.scrape(fetch)
        if top.error is None:
            time.sleep(interval)  # a second scrape, for the rates
            top.scrape(fetch)
        if top.error is not None:
            Console(stderr=True, highlight=False).print(top.render(plain=True))
            return 1
        console.print(top.render(plain=True))
        return 0
    with _keys(sys.stdin) as fd, Live(console=console, screen=console.is_terminal,
                                      auto_refresh=False) as live:
        while True:
            started = time.monotonic()
            top.scrape(fetch)
            live.update(top.render(), refresh=True)
            if _quit_pressed(fd, max(interval - (time.monotonic() - started), 0.05)):
                return 0
