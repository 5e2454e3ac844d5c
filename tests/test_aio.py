"""amid.ami.aio: first_of and cancel_and_wait, including a cancellation aimed at the caller."""

from __future__ import annotations

import asyncio

import pytest

from amid.ami.aio import cancel_and_wait, first_of


async def test_first_of_returns_the_index_of_the_first_done_and_cleans_up_its_own_tasks():
    first, second = asyncio.Event(), asyncio.Event()
    before = asyncio.all_tasks()
    waiter = asyncio.create_task(first_of(first.wait(), second.wait()))
    await asyncio.sleep(0)
    second.set()
    async with asyncio.timeout(5):
        assert await waiter == 1
    assert asyncio.all_tasks() == before  # the first.wait() task is gone, not left pending


async def test_first_of_never_cancels_a_future_it_was_given():
    lost: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    closing = asyncio.Event()
    closing.set()
    async with asyncio.timeout(5):
        assert await first_of(lost, closing.wait()) == 1
    assert not lost.done()  # the caller's future outlives one wait for it
    lost.set_result("eof")
    async with asyncio.timeout(5):
        assert await first_of(lost, asyncio.Event().wait()) == 0


async def test_first_of_cancelled_cancels_its_tasks_and_propagates():
    never = asyncio.Event()
    before = asyncio.all_tasks()
    waiter = asyncio.create_task(first_of(never.wait(), never.wait()))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert asyncio.all_tasks() == before


async def test_first_of_needs_something_to_wait_for():
    with pytest.raises(ValueError):
        await first_of()


async def test_cancel_and_wait_stops_the_task_and_waits_for_its_cleanup():
    cleaned = asyncio.Event()

    async def worker() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0)  # cleanup that itself awaits
            cleaned.set()

    task = asyncio.create_task(worker())
    await asyncio.sleep(0)
    assert await cancel_and_wait(task) is None
    assert task.cancelled() and cleaned.is_set()
    assert await cancel_and_wait(task) is None  # again: already done
    assert await cancel_and_wait(None) is None


async def test_cancel_and_wait_returns_what_the_task_failed_with():
    async def broken() -> None:
        raise RuntimeError("boom")

    task = asyncio.create_task(broken())
    await asyncio.sleep(0)
    error = await cancel_and_wait(task)
    assert isinstance(error, RuntimeError) and str(error) == "boom"


async def test_cancel_and_wait_re_raises_a_cancellation_aimed_at_the_caller():
    """The bug it replaces: ``task.cancel(); try: await task; except CancelledError: pass``
    swallows the caller's own cancellation, so under asyncio.timeout() the close "returns
    normally" while its task is still cleaning up. Here the caller is cancelled by a timeout
    while the task takes its time to stop: the timeout must fire."""
    release = asyncio.Event()
    stopped = asyncio.Event()

    async def slow_to_stop() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await release.wait()  # a long cleanup
            stopped.set()
            raise

    task = asyncio.create_task(slow_to_stop())
    await asyncio.sleep(0)
    returned_normally = False
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await cancel_and_wait(task)
            returned_normally = True
    assert not returned_normally and not stopped.is_set()
    release.set()
    async with asyncio.timeout(5):
        assert await cancel_and_wait(task) is None
    assert stopped.is_set()


async def test_the_hand_rolled_block_it_replaces_does_swallow_the_caller_s_cancellation():
    """The same scenario with the old idiom, to show the test above can fail."""
    release = asyncio.Event()

    async def slow_to_stop() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await release.wait()
            raise

    async def old_close(task: asyncio.Task[None]) -> str:
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        return "returned normally"

    task = asyncio.create_task(slow_to_stop())
    await asyncio.sleep(0)
    closer = asyncio.create_task(old_close(task))
    await asyncio.sleep(0)
    closer.cancel()  # the caller is cancelled while the task cleans up...
    await asyncio.sleep(0)
    release.set()
    async with asyncio.timeout(5):
        assert await closer == "returned normally"  # ...and never hears of it
