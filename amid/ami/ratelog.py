"""The one rate-limited log of amid: conditions that may repeat thousands of times a second
(a handler failing on every event, a peer sending garbage, a queue dropping) log a line now and
then and count the rest, so a hostile peer or a broken handler cannot flood the log."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["RateLimitedLog"]


class RateLimitedLog:
    """Logs at most once per ``interval`` seconds per key, and says how many similar lines it held back.

    Used for conditions that may repeat thousands of times a second (dropped events, a sink refusing
    connections, garbage from a peer)::

        drops = RateLimitedLog(log, interval=10.0)
        drops.log("queue-full:webhook", logging.WARNING, "queue full, dropping events", extra={"sink": "webhook"})

    The emitted record gets an extra ``suppressed`` field (the number of calls swallowed since the last line).
    Keys are kept in a bounded LRU of ``max_keys`` entries, so unbounded keys cannot grow memory.
    """

    def __init__(
        self,
        logger: logging.Logger,
        interval: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 1024,
    ) -> None:
        self.logger = logger
        self.interval = interval
        self._clock = clock
        self._max_keys = max_keys
        # key -> [time of the last emitted line, calls suppressed since]
        self._state: OrderedDict[Any, list[float | int]] = OrderedDict()

    def log(self, key: Any, level: int, msg: str, *args: object, extra: Mapping[str, Any] | None = None,
            exc_info: BaseException | None = None) -> bool:
        """Log ``msg % args`` unless a line with this key was logged less than ``interval`` ago; True if logged."""
        if not self.logger.isEnabledFor(level):
            return False
        now = self._clock()
        state = self._state.get(key)
        if state is not None and now - state[0] < self.interval:
            state[1] += 1
            return False
        suppressed = int(state[1]) if state is not None else 0
        self._state[key] = [now, 0]
        self._state.move_to_end(key)
        while len(self._state) > self._max_keys:
            self._state.popitem(last=False)
        fields = dict(extra or {})
        if suppressed:
            fields["suppressed"] = suppressed
            msg += " (%d similar messages suppressed)"
            args = (*args, suppressed)
        self.logger.log(level, msg, *args, extra=fields, exc_info=exc_info, stacklevel=2)
        return True

    def take_suppressed(self) -> int:
        """How many calls were held back and not yet reported by a later line (summed over
        keys); they count as reported from now on. For a summary when the source stops."""
        total = 0
        for state in self._state.values():
            total += int(state[1])
            state[1] = 0
        return total
