"""Policy calls run eagerly: an answer that is ready costs no task; one that waits becomes a task."""

from __future__ import annotations

import asyncio

import pytest

from proxy.session.eager import Answered, start_eagerly


async def ready(value: int) -> int:
    return value


async def waits(event: asyncio.Event, value: int) -> int:
    await event.wait()
    await asyncio.sleep(0)
    return value


async def fails_later(event: asyncio.Event) -> int:
    await event.wait()
    raise ValueError("decided badly")


async def test_a_coroutine_that_does_not_suspend_answers_at_once():
    answer = start_eagerly(ready(7))
    assert isinstance(answer, Answered) and answer.value == 7


async def test_a_coroutine_that_suspends_finishes_as_a_task():
    event = asyncio.Event()
    pending = start_eagerly(waits(event, 8))
    assert not isinstance(pending, Answered) and not pending.done()
    event.set()
    assert await pending == 8


async def test_an_error_before_suspending_is_raised_to_the_caller():
    async def broken() -> int:
        raise RuntimeError("at once")

    with pytest.raises(RuntimeError, match="at once"):
        start_eagerly(broken())


async def test_an_error_after_suspending_is_the_tasks_exception():
    event = asyncio.Event()
    pending = start_eagerly(fails_later(event))
    event.set()
    with pytest.raises(ValueError, match="decided badly"):
        await pending


async def test_cancelling_the_task_cancels_the_coroutine():
    event = asyncio.Event()
    cleaned_up = []

    async def guarded() -> int:
        try:
            await event.wait()
        finally:
            cleaned_up.append(True)
        return 1

    pending = start_eagerly(guarded())
    await asyncio.sleep(0)
    pending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await pending
    assert cleaned_up == [True]


async def catches_a_failed_future(future: asyncio.Future[int]) -> str:
    try:
        await future
    except ValueError as exc:
        return f"caught {exc}"
    return "not raised"


async def test_a_failed_future_is_raised_inside_the_coroutine_that_awaits_it():
    # the coroutine's own try/except must see the failure (before, it escaped the resume task when
    # the future was not exactly asyncio.Future: the event loop then throws its exception in)
    class OwnFuture(asyncio.Future):  # type: ignore[type-arg]
        pass

    future: asyncio.Future[int] = OwnFuture()
    pending = start_eagerly(catches_a_failed_future(future))
    assert not isinstance(pending, Answered)
    future.set_exception(ValueError("store unreachable"))
    assert await pending == "caught store unreachable"
