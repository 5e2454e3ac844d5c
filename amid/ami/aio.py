"""Two asyncio idioms amid needs in many places, written once and tested.

* :func:`first_of` waits for the first of several awaitables and cleans up the rest.
* :func:`cancel_and_wait` stops a task and waits until it has, without swallowing a
  cancellation aimed at the caller (the bug of the usual ``task.cancel(); try: await task;
  except CancelledError: pass``: under ``asyncio.timeout()`` or a cancelled parent, that
  block returns normally and the caller carries on as if nothing had happened).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable
from typing import Any

__all__ = ["cancel_and_wait", "first_of"]


async def first_of(*awaitables: Awaitable[Any]) -> int:
    """Wait until one of ``awaitables`` is done; return its index (the lowest if several are).

    Coroutines (e.g. ``event.wait()``) are run as tasks that belong to this call: they are
    cancelled, and awaited, before it returns or when it is cancelled. Futures and tasks
    passed in belong to the caller and are never cancelled here (a connection's "lost"
    future must outlive one wait for it). Outcomes are not retrieved: ask the one returned.
    """
    if not awaitables:
        raise ValueError("first_of() needs at least one awaitable")
    futures: list[asyncio.Future[Any]] = []
    owned: list[asyncio.Future[Any]] = []
    try:
        for item in awaitables:
            future = asyncio.ensure_future(item)
            futures.append(future)
            if inspect.iscoroutine(item):
                owned.append(future)
        await asyncio.wait(futures, return_when=asyncio.FIRST_COMPLETED)
        return next(index for index, future in enumerate(futures) if future.done())
    finally:
        for task in owned:
            task.cancel()
        if owned:
            # Cancelled coroutines finish at the next loop step; wait for that so none is
            # left pending, but never let this cleanup swallow a cancellation of the caller.
            await asyncio.wait(owned)
            for task in owned:
                if not task.cancelled():
                    task.exception()  # retrieved: a coroutine that failed is the caller's concern


async def cancel_and_wait(task: asyncio.Future[Any] | None) -> BaseException | None:
    """Cancel ``task`` and wait until it has finished; return the exception it ended with
    (None when it was cancelled or returned). Safe on None and on a task already done.

    If the *caller* is cancelled while waiting, that cancellation propagates
    (``CancelledError`` is raised) instead of being mistaken for the task's own; the task
    has been asked to stop either way, and a later call waits for the same stop without
    cancelling the task's cleanup again.
    """
    if task is None:
        return None
    if not task.done():
        if not (isinstance(task, asyncio.Task) and task.cancelling()):
            task.cancel()  # asked once: a second call does not interrupt the task's cleanup
        # asyncio.wait never raises the task's outcome: a CancelledError out of it is ours.
        await asyncio.wait((task,))
    if task.cancelled():
        return None
    return task.exception()
