"""Run a coroutine synchronously as far as it goes, so a policy that answers at once costs no task."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Generator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Answered(Generic[T]):
    """The coroutine finished without suspending."""

    __slots__ = ("value",)

    def __init__(self, value: T) -> None:
        self.value = value


def start_eagerly(coro: Coroutine[Any, Any, T]) -> Answered[T] | asyncio.Future[T]:
    """Step `coro` now; if it suspends, the rest runs as a task (what Python 3.12's eager tasks do).

    An exception raised before the first suspension propagates to the caller."""
    try:
        yielded = coro.send(None)
    except StopIteration as stop:
        return Answered(stop.value)
    return resume_later(coro, yielded)


def resume_later(coro: Coroutine[Any, Any, T], yielded: Any) -> asyncio.Future[T]:
    """The rest of a coroutine that was stepped once by hand and yielded `yielded`, as a task."""
    return asyncio.ensure_future(_resume(coro, yielded))


async def _resume(coro: Coroutine[Any, Any, T], yielded: Any) -> T:
    while True:
        try:
            await _Wait(yielded)
        except asyncio.CancelledError:
            if yielded is not None and not yielded.done():
                yielded.cancel()
            try:
                yielded = coro.throw(asyncio.CancelledError())
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            continue
        try:
            yielded = coro.send(None)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]


class _Wait:
    """Wait until what the inner coroutine yielded (a future, or None for a bare yield) is done,
    without consuming its result: the inner coroutine reads the result itself when resumed."""

    __slots__ = ("_future",)

    def __init__(self, future: Any) -> None:
        self._future = future

    def __await__(self) -> Generator[Any, None, None]:
        future = self._future
        if future is None:
            yield None
            return
        if not future.done():
            future._asyncio_future_blocking = True
            yield future


async def after(lane: asyncio.Future[Any], method: Callable[..., Coroutine[Any, Any, T]],
                args: tuple[Any, ...]) -> T:
    """`method(*args)` once `lane` (an earlier call) is done, whatever its outcome."""
    await asyncio.wait([lane])
    return await method(*args)
