"""The AuditSink protocol, records as text ready to seal, and group commit for sinks that wait."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from json.encoder import encode_basestring as json_string
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

from proxy.audit.chain import serialise

AuditRecord = Mapping[str, Any]
"""One audit record: JSON-able values only (str, int, float, bool, None, lists of those)."""

__all__ = ["AuditError", "AuditRecord", "AuditSink", "GroupCommit", "MappingWrites", "Unsealed",
           "json_string", "unsealed"]


class AuditError(Exception):
    """The sink could not write a record (or make it durable); the statement it describes must not run."""


class Unsealed(NamedTuple):
    """A record as text, before its sink seals it into the chain.

    `body` is the record's JSON members without the braces and without the chain's fields
    (`"type":"access","time":"…",…`); the sink puts `seq` before it and `prev`, `chain`, `hash`
    after it. `type` and `time` repeat two of its members for sinks that store them apart."""

    type: str
    time: str
    body: str


_CHAIN_FIELDS = frozenset({"seq", "prev", "chain", "hash"})


def unsealed(record: AuditRecord) -> Unsealed:
    """The record as text, its keys in the order given (chain fields are the sink's: dropped)."""
    if _CHAIN_FIELDS.intersection(record):
        record = {key: value for key, value in record.items() if key not in _CHAIN_FIELDS}
    return Unsealed(str(record.get("type", "")), str(record.get("time") or ""), serialise(record)[1:-1])


class AuditSink(Protocol):
    """Where audit records go, in the order they are appended.

    `append` writes a record at once: it raises AuditError when the record cannot be written, and
    returns None when the record is already as durable as the sink is configured to make it
    before a statement runs, else an awaitable that finishes when it is (raising AuditError when
    it cannot be). `append_behind` queues a record behind the earlier ones without anyone waiting
    (written with the next record, or within milliseconds; a failure is logged)."""

    def append(self, record: Unsealed) -> Awaitable[None] | None: ...

    def append_behind(self, record: Unsealed) -> None: ...

    async def flush(self) -> None: ...

    async def close(self) -> None: ...


class MappingWrites:
    """`write` and `write_behind` of records given as mappings, for sinks that `append` text."""

    def append(self, record: Unsealed) -> Awaitable[None] | None:
        raise NotImplementedError

    def append_behind(self, record: Unsealed) -> None:
        raise NotImplementedError

    async def write(self, record: AuditRecord) -> None:
        """Append the record and wait until it is as durable as configured."""
        waiter = self.append(unsealed(record))
        if waiter is not None:
            await waiter

    def write_behind(self, record: AuditRecord) -> None:
        self.append_behind(unsealed(record))


log = logging.getLogger("pgveil.audit")

Item = TypeVar("Item")

WRITE_BEHIND_DELAY = 0.05
"""Seconds a record queued without a waiter may wait for a writer's batch before it is committed alone."""


class GroupCommit(Generic[Item]):
    """Collects items from concurrent writers and commits them in batches, one commit at a time.

    Everything submitted while the loop runs other callbacks forms one batch: the commit starts in
    a task, at the next turn of the event loop. A writer's future finishes when the batch holding
    its item is committed, or raises what the commit raised. While one commit runs, newly
    submitted items wait and form the next batch. Items `enqueue`d without a waiter ride along
    with the next submitted item's batch, or are committed on their own after
    `write_behind_delay` seconds if no writer comes first.
    """

    def __init__(self, commit: Callable[[list[Item]], Awaitable[None]], max_batch: int = 1024,
                 write_behind_delay: float = WRITE_BEHIND_DELAY) -> None:
        self._commit = commit
        self._max_batch = max_batch
        self._write_behind_delay = write_behind_delay
        self._pending: list[tuple[Item, asyncio.Future[None] | None]] = []
        self._worker: asyncio.Task[None] | None = None
        self._later: asyncio.TimerHandle | None = None

    def submit(self, item: Item) -> asyncio.Future[None]:
        """Add an item to the next batch; the future finishes when that batch is committed."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        self._wake()
        return future

    @property
    def idle(self) -> bool:
        """Nothing is queued or being committed: an item written now by other means stays in order."""
        return not self._pending and (self._worker is None or self._worker.done())

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
