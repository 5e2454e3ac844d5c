"""The life of a sink runner as one state with a table of legal moves.

::

    NEW ──start──► STARTING ──opened──► OK ◄──► RETRYING
     │                │                  │          │
     │                └──────────────────┴──────────┴──► DISABLED (the peer said stop)
     │                │                  │          │        │
     └────────────────┴──────close───────┴──────────┴────────┴──► CLOSING ──► CLOSED

``CLOSING`` drains (offers are still taken); ``CLOSED`` refuses offers. An illegal move raises
:class:`IllegalTransition`: a bug, never something a peer can cause.
"""

from __future__ import annotations

import enum

__all__ = ["IllegalTransition", "RunnerState"]


class RunnerState(enum.Enum):
    NEW = "new"              # built; start() not called yet
    STARTING = "starting"    # opening the sink (retried until it opens)
    OK = "ok"                # the last attempt succeeded
    RETRYING = "retrying"    # the last attempt failed; retrying with backoff
    DISABLED = "disabled"    # the peer refused for good; spooled sinks keep spooling
    CLOSING = "closing"      # draining for shutdown or reload
    CLOSED = "closed"        # done; offers are refused

    @property
    def delivering(self) -> bool:
        """Whether the worker is (trying to) deliver: the states an attempt's outcome moves."""
        return self in _DELIVERING

    def can_move_to(self, new: RunnerState) -> bool:
        return new in _MOVES[self]


_DELIVERING = frozenset({RunnerState.STARTING, RunnerState.OK, RunnerState.RETRYING})

_MOVES: dict[RunnerState, frozenset[RunnerState]] = {
    RunnerState.NEW: frozenset({RunnerState.STARTING, RunnerState.CLOSING}),
    RunnerState.STARTING: frozenset({RunnerState.OK, RunnerState.RETRYING, RunnerState.DISABLED,
                                     RunnerState.CLOSING}),
    RunnerState.OK: frozenset({RunnerState.OK, RunnerState.RETRYING, RunnerState.DISABLED,
                               RunnerState.CLOSING}),
    RunnerState.RETRYING: frozenset({RunnerState.OK, RunnerState.RETRYING, RunnerState.DISABLED,
                                     RunnerState.CLOSING}),
    RunnerState.DISABLED: frozenset({RunnerState.CLOSING}),
    RunnerState.CLOSING: frozenset({RunnerState.CLOSED}),
    RunnerState.CLOSED: frozenset(),
}


class IllegalTransition(RuntimeError):
    """A move the table does not allow (a bug in the runner)."""

    def __init__(self, old: RunnerState, new: RunnerState) -> None:
        super().__init__(f"sink runner cannot move from {old.value} to {new.value}")
        self.old, self.new = old, new


def check_move(old: RunnerState, new: RunnerState) -> RunnerState:
    """``new`` if the table allows ``old`` → ``new``; else raise :class:`IllegalTransition`."""
    if not old.can_move_to(new):
        raise IllegalTransition(old, new)
    return new
