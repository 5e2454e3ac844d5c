"""One backoff for every retry in amid: capped exponential, always jittered, never below a floor.

The n-th consecutive failure (n = 1, 2, ...) waits a delay drawn uniformly from
``[max(min_delay, ceiling / 2), ceiling]`` where ``ceiling = min(max_delay, min_delay * 2**n)``
("equal jitter" with a floor): every delay is at least ``min_delay``, at most ``max_delay``,
and random within a band whose width grows with the ceiling, so many clients that failed
together do not retry together. (Only ``min_delay == max_delay`` leaves no room for jitter.)

A peer's own instruction (HTTP ``Retry-After``) is a floor on top of that: the delay is then
``retry_after`` plus a jitter of up to ``min_delay``, with ``retry_after`` capped at
``retry_after_cap`` (a peer may not park us for a day).
"""

from __future__ import annotations

import random
from collections.abc import Callable

__all__ = ["Backoff", "backoff_delay"]

_MAX_EXPONENT = 60  # 2**60 * any sane min_delay is past every max_delay: no float overflow


def backoff_delay(failures: int, min_delay: float, max_delay: float, rand: float,
                  retry_after: float | None = None, retry_after_cap: float = 3600.0) -> float:
    """The delay after ``failures`` consecutive failures (>= 1), given ``rand`` in [0, 1).

    Pure, so tests can pin it: see the module docstring for the rule.
    """
    if min_delay < 0 or max_delay < min_delay:
        raise ValueError(f"need 0 <= min_delay <= max_delay, got {min_delay}, {max_delay}")
    exponent = min(max(failures, 1), _MAX_EXPONENT)
    ceiling = min(max_delay, min_delay * 2.0 ** exponent)
    low = max(min_delay, ceiling / 2)
    delay = low + rand * (ceiling - low)
    if retry_after is not None and retry_after > 0:
        floor = min(retry_after, retry_after_cap)
        if delay < floor:
            delay = floor + rand * min_delay
    return delay


class Backoff:
    """The delays of one retry loop: :meth:`failure` gives the next delay, :meth:`reset`
    starts over after a success that held.

    ``rng`` returns floats in [0, 1) (injected by tests for exact delays).
    """

    def __init__(self, min_delay: float, max_delay: float, *,
                 rng: Callable[[], float] = random.random,
                 retry_after_cap: float = 3600.0) -> None:
        backoff_delay(1, min_delay, max_delay, 0.0)  # validates the bounds now, not at a failure
        self.min_delay = min_delay
        self.max_delay = max_delay
        self.retry_after_cap = retry_after_cap
        self._rng = rng
        self.failures = 0

    def failure(self, retry_after: float | None = None) -> float:
        """Count one more consecutive failure and return how long to wait before the next try."""
        self.failures += 1
        return backoff_delay(self.failures, self.min_delay, self.max_delay, self._rng(),
                             retry_after, self.retry_after_cap)

    def reset(self) -> None:
        """A success that held: the next failure waits about ``min_delay`` again."""
        self.failures = 0

    def __repr__(self) -> str:
        return (f"Backoff(min_delay={self.min_delay}, max_delay={self.max_delay}, "
                f"failures={self.failures})")
