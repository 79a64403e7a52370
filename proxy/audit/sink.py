"""The AuditSink protocol, its error, and group commit: many concurrent writers, one durable write."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Generic, Protocol, TypeVar

AuditRecord = Mapping[str, Any]
"""One audit record: JSON-able values only (str, int, float, bool, None, lists of those)."""


class AuditError(Exception):
    """The sink could not make a record durable; the statement it describes must not run."""


class AuditSink(Protocol):
    """Where audit records go. `write` returns only once the record is as durable as configured;
    `write_behind` queues a record behind earlier ones without waiting (it is durable once any
    later `write` returns; if its batch fails, the writers waiting on that batch learn of it)."""

    async def write(self, record: AuditRecord) -> None: ...

    def write_behind(self, record: AuditRecord) -> None: ...

    async def flush(self) -> None: ...

    async def close(self) -> None: ...


log = logging.getLogger("pgveil.audit")

Item = TypeVar("Item")

WRITE_BEHIND_DELAY = 0.05
"""Seconds a record queued without a waiter may wait for a writer's batch before it is committed alone."""


class GroupCommit(Generic[Item]):
    """Collects items from concurrent writers and commits them in batches, one commit at a time.

    A writer's `submit` returns when the batch holding its item is committed, or raises what the
    commit raised. While one commit runs, newly submitted items wait and form the next batch.
    Items `enqueue`d without a waiter ride along with the next submitted item's batch, or are
    committed on their own after `write_behind_delay` seconds if no writer comes first: a
    completion record then costs no commit (no fsync) of its own on a busy connection.
    """

    def __init__(self, commit: Callable[[list[Item]], Awaitable[None]], max_batch: int = 1024,
                 write_behind_delay: float = WRITE_BEHIND_DELAY) -> None:
        self._commit = commit
        self._max_batch = max_batch
        self._write_behind_delay = write_behind_delay
        self._pending: list[tuple[Item, asyncio.Future[None] | None]] = []
        self._worker: asyncio.Task[None] | None = None
        self._later: asyncio.TimerHandle | None = None

    async def submit(self, item: Item) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        self._wake()
        await future

    def enqueue(self, item: Item) -> None:
        """Add an item to the next batch without waiting for it (committed within
        `write_behind_delay` seconds, sooner when a writer submits)."""
        self._pending.append((item, None))
        if self._later is None and (self._worker is None or self._worker.done()):
            self._later = asyncio.get_running_loop().call_later(self._write_behind_delay, self._wake)

    def _wake(self) -> None:
        if self._later is not None:
            self._later.cancel()
            self._later = None
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._drain())

    async def wait_idle(self) -> None:
        """Return once everything submitted or enqueued so far has been committed (or failed)."""
        if self._pending:
            self._wake()
        while self._worker is not None and not self._worker.done():
            await asyncio.shield(self._worker)

    async def _drain(self) -> None:
        while self._pending:
            batch = self._pending[: self._max_batch]
            del self._pending[: self._max_batch]
            try:
                await self._commit([item for item, _ in batch])
            except Exception as exc:  # every writer of the batch learns of the failure
                if any(future is None for _, future in batch):
                    log.error("audit records queued without waiting were lost: %s", exc)
                for _, future in batch:
                    if future is not None and not future.done():
                        future.set_exception(exc)
            else:
                for _, future in batch:
                    if future is not None and not future.done():
                        future.set_result(None)
