"""Plain counters kept on hot paths; metrics exporters read them at scrape time.

Nothing here talks to prometheus_client: increments on the AMI read path must cost a dict
update, not a lock and a label lookup.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal, get_args

__all__ = ["DISCONNECT_REASONS", "DisconnectReason", "Histogram", "SessionStats"]

# Why a session's connection ended: the keys of ``SessionStats.disconnects_total``, the one list
# (amid.metrics exports each as a ``reason`` label, at 0 until it happens). The session sets them;
# ``closed`` is a connection the client ended itself.
DisconnectReason = Literal["eof", "ping_timeout", "protocol_error", "connect_error", "login_failed",
                           "server_shutdown", "error", "closed"]
DISCONNECT_REASONS: tuple[DisconnectReason, ...] = get_args(DisconnectReason)


class Histogram:
    """Fixed-bucket histogram (Prometheus semantics: ``le`` upper bounds, cumulative on read)."""

    __slots__ = ("buckets", "_counts", "sum", "count")

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = tuple(sorted(buckets))
        self._counts = [0] * (len(self.buckets) + 1)  # last slot: +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float, count: int = 1) -> None:
        """Record ``count`` observations of ``value``."""
        self._counts[bisect_left(self.buckets, value)] += count
        self.sum += value * count
        self.count += count

    def add(self, other: Histogram) -> None:
        """Add ``other``'s observations (same buckets) to this histogram."""
        if other.buckets != self.buckets:
            raise ValueError("histograms with different buckets")
        self._counts = [a + b for a, b in zip(self._counts, other._counts, strict=False)]
        self.sum += other.sum
        self.count += other.count

    def cumulative(self) -> list[tuple[float, int]]:
        """[(upper_bound, cumulative_count), ...] ending with (inf, count)."""
        out, running = [], 0
        for bound, n in zip((*self.buckets, float("inf")), self._counts, strict=False):
            running += n
            out.append((bound, running))
        return out


# 50 µs (loopback) to 5 s (the default ping_timeout): a LAN PBX answers in well under 1 ms.
PING_BUCKETS = (0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2,
                0.5, 1.0, 2.0, 5.0)


@dataclass
class SessionStats:
    """Counters of one AMI session (one server). Read by amid.metrics at scrape time."""

    up: bool = False                       # logged in right now
    connects_total: int = 0                # successful logins
    disconnects_total: Counter[str] = field(default_factory=Counter)   # DisconnectReason -> count
    login_failures_total: int = 0
    protocol_errors_total: Counter[str] = field(default_factory=Counter)  # PROTOCOL_ERROR_KINDS -> count
    events_total: int = 0
    received_bytes_total: int = 0          # bytes read from the AMI connection
    reads_total: int = 0                   # socket reads that returned data (the per-read cost)
    sent_actions_total: int = 0            # actions written (login, pings, the caller's)
    sent_bytes_total: int = 0              # bytes of those actions
    events_by_name: Counter[str] = field(default_factory=Counter)       # event name -> count
    handler_errors_total: int = 0
    handler_dropped_total: int = 0         # events a too-slow handler queue had to drop
    last_event_time: float | None = None   # unix seconds
    last_pong_time: float | None = None    # unix seconds of the last answered Ping
    ping_rtt: Histogram = field(default_factory=lambda: Histogram(PING_BUCKETS))
