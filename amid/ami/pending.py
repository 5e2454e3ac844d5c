"""Actions waiting for their answer, correlated by ActionID only (never "the next message is
the response"). A list answer (``EventList: start``) collects its events, by the same ActionID,
up to the list-complete event; both waits are bounded, so nothing waits or leaks for ever."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from amid.ami.errors import ActionTimeout
from amid.ami.protocol import Event, Response

__all__ = ["PendingActions"]

WriteBytes = Callable[[bytes], object]


class _Pending:
    """An action waiting for its response and, for list actions, for its list to complete."""

    __slots__ = ("complete", "events", "first", "listing", "response")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.response: asyncio.Future[Response] = loop.create_future()
        self.complete: asyncio.Future[Response] = loop.create_future()
        self.events: list[Event] = []
        self.listing = False  # the response said "EventList: start"; counted in ``lists``
        self.first: Response | None = None

    def fail(self, exc: Exception) -> None:
        for fut in (self.response, self.complete):
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()  # retrieved: nobody may be waiting any more


class PendingActions:
    """The ActionID table of one session. The read path asks :attr:`lists` (any list being
    collected?) before it offers an event to :meth:`collect_list_event`."""

    __slots__ = ("_pending", "lists")

    def __init__(self) -> None:
        self._pending: dict[str, _Pending] = {}
        self.lists = 0  # pending actions that collect list events

    async def wait(self, action_id: str, send: bytes, write: WriteBytes, *, what: str,
                   timeout: float, list_timeout: float) -> Response:
        """Register ``action_id``, ``write(send)``, and wait for the answer (and its list)."""
        pending = _Pending(asyncio.get_running_loop())
        self._pending[action_id] = pending
        try:
            write(send)
            try:
                async with asyncio.timeout(timeout):
                    response = await pending.response
            except TimeoutError:
                raise ActionTimeout(f"no response to {what}") from None
            if response.is_list_start:
                try:
                    async with asyncio.timeout(list_timeout):
                        await pending.complete
                except TimeoutError:
                    raise ActionTimeout(
                        f"list of {what} not complete after {list_timeout}s "
                        f"({len(pending.events)} events)") from None
            return response
        finally:
            if self._pending.pop(action_id, None) is not None and pending.listing:
                self.lists -= 1

    def on_response(self, response: Response) -> str | None:
        """Resolve the action ``response`` answers; its ActionID, or None if nobody waits for it."""
        action_id: str | None = response.get("ActionID")
        pending = self._pending.get(action_id) if action_id is not None else None
        if pending is None or pending.response.done():
            return None
        pending.first = response
        pending.response.set_result(response)
        if response.is_list_start:
            pending.listing = True
            self.lists += 1
        else:
            pending.complete.set_result(response)
        return action_id

    def collect_list_event(self, event: Event, server: str, epoch: int) -> bool:
        """Take ``event`` if it belongs to a list being collected (True), stamped with its
        server, epoch and receive time; the list-complete event completes the action."""
        action_id = event.get("ActionID")
        if action_id is None:
            return False
        pending = self._pending.get(action_id)
        if pending is None or not pending.listing or pending.complete.done():
            return False
        response = pending.first
        assert response is not None  # listing is set by the response
        event.server = server
        event.epoch = epoch
        event.received_at = time.time()
        if (event.get("EventList") or "").lower() == "complete":
            response.events = pending.events
            response.list_complete = event
            pending.complete.set_result(response)
        else:
            pending.events.append(event)
        return True

    def fail_all(self, exc: Exception) -> None:
        """Every waiter learns ``exc`` now (the connection is gone), not at its timeout."""
        for pending in self._pending.values():
            pending.fail(exc)
        self._pending.clear()
        self.lists = 0
