"""Analysis threads: long or costly guard work runs here, off the event loop, and a job that runs
past its deadline is interrupted (AnalysisTimedOut raised in its thread) instead of holding the
thread for minutes."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

log = logging.getLogger("pgveil.analysis")

_T = TypeVar("_T")
_INTERRUPT_AGAIN_SECONDS = 0.1


class AnalysisTimedOut(Exception):
    """The job passed its deadline and was interrupted (raised by AnalysisPool.run)."""


class _Interrupted(BaseException):
    """Raised inside an analysis thread whose job passed its deadline. A BaseException, so the
    guard's own `except Exception` (which turns a bug into a refusal) does not swallow it."""


def _raise_in_thread(ident: int, exception: type[BaseException] | None) -> None:
    """Make `exception` fire in thread `ident` at its next bytecode boundary (None: forget one that
    has not fired yet)."""
    target = ctypes.py_object(exception) if exception is not None else None
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), target)


@dataclass(eq=False)
class _Job(Generic[_T]):
    work: Callable[[], _T]
    deadline: float | None
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[_T]
    timer: asyncio.TimerHandle | None = field(default=None)


class AnalysisPool:
    """`workers` daemon threads, started on first use, taking jobs in order."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._jobs: queue.SimpleQueue[_Job[Any] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._running: dict[int, _Job[Any]] = {}  # thread ident -> its job, while it runs
        self._lock = threading.Lock()
        self._closed = False

    async def run(self, work: Callable[[], _T], deadline: float | None = None) -> _T:
        """`work()` on an analysis thread. With `deadline` (seconds from when a thread starts it),
        raises AnalysisTimedOut when it has not finished by then."""
        if self._closed:
            raise RuntimeError("the analysis pool is closed")
        if not self._threads:
            self._start()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_T] = loop.create_future()
        job = _Job(work, deadline, loop, future)
        self._jobs.put(job)
        return await job.future

    def close(self) -> None:
        """Threads end after their current job; queued jobs still run."""
        self._closed = True
        for _ in self._threads:
            self._jobs.put(None)

    def _start(self) -> None:
        for index in range(self.workers):
            thread = threading.Thread(target=self._serve, name=f"pgveil-analysis-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)

    # ---- in the analysis thread ----------------------------------------------------------------

    def _serve(self) -> None:
        ident = threading.get_ident()
        while True:
            job: _Job[Any] | None = None
            try:
                job = self._jobs.get()
                if job is None:
                    return
                self._run(ident, job)
            except _Interrupted:  # fired late, outside the job: the job was settled already
                pass
            except BaseException:  # never lose the thread
                log.exception("analysis thread: unexpected error")

    def _run(self, ident: int, job: _Job[Any]) -> None:
        result: Any = None
        error: BaseException | None = None
        try:
            try:
                with self._lock:
                    self._running[ident] = job
                if job.deadline is not None:
                    job.loop.call_soon_threadsafe(self._arm, job, ident)
                result = job.work()
            finally:
                with self._lock:
                    self._running.pop(ident, None)
                _raise_in_thread(ident, None)  # an interruption that has not fired yet never will
        except _Interrupted:
            error = AnalysisTimedOut()
        except BaseException as exc:
            error = exc if isinstance(exc, Exception) else RuntimeError(f"analysis thread: {exc!r}")
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits for the answer
            job.loop.call_soon_threadsafe(self._settle, job, result, error)

    # ---- on the event loop ---------------------------------------------------------------------

    def _arm(self, job: _Job[Any], ident: int) -> None:
        if job.future.done() or job.deadline is None:
            return
        job.timer = job.loop.call_later(job.deadline, self._interrupt, job, ident)

    def _interrupt(self, job: _Job[Any], ident: int) -> None:
        with self._lock:
            running = self._running.get(ident) is job
            if running:
                _raise_in_thread(ident, _Interrupted)
        if running:  # again until it ends: code that ignores exceptions (a gc callback) may eat one
            job.timer = job.loop.call_later(_INTERRUPT_AGAIN_SECONDS, self._interrupt, job, ident)

    @staticmethod
    def _settle(job: _Job[Any], result: Any, error: BaseException | None) -> None:
        if job.timer is not None:
            job.timer.cancel()
        if job.future.done():
            return
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)
