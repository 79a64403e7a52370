"""The rolling-hour row ledger shared by every replica through the state store (--state-dsn).

Each replica counts its logins' rows in memory as they pass (the relay never waits for the
store), adds them to one small table in batches every FLUSH_SECONDS, and reads back each active
login's total over the last hour: a login's budget is enforced across replicas within about one
flush interval. While the store cannot be reached, counts wait (they are added when it is back)
and each replica goes on with what it last read plus its own rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from proxy.dlp.ledger import BUCKET_SECONDS, WINDOW_SECONDS, MemoryLedger, Reservations
from proxy.state.store import StateStore, StateUnavailable, register_migration

log = logging.getLogger("pgveil.dlp")

FLUSH_SECONDS = 0.2
_MINUTES = WINDOW_SECONDS // BUCKET_SECONDS
_PRUNE_SECONDS = 60.0

register_migration(200, "row budget ledger", """
CREATE TABLE IF NOT EXISTS {schema}.row_budget (
    login text NOT NULL,
    minute bigint NOT NULL,  -- Unix time // 60
    rows bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (login, minute)
);
""")


class StateLedger:
    """A RowLedger over the state store (see the module docstring)."""

    def __init__(self, store: StateStore, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self._clock = clock
        self._local = MemoryLedger(clock)  # this replica's own rows: the floor while the store is away
        self._pending: dict[tuple[str, int], int] = {}  # (login, minute) -> rows not yet in the store
        self._flying: dict[tuple[str, int], int] = {}  # the batch being added (not in the totals yet)
        self._totals: dict[str, int] = {}  # login -> the store's last-hour total as last read
        self._active: dict[str, float] = {}  # login -> when last asked about (read while recent)
        self._reservations = Reservations()  # per replica: others' rows arrive through the store
        self._task: asyncio.Task[None] | None = None
        self._pruned = 0.0
        self._warned = False

    # -- RowLedger (synchronous, on the event loop) ----------------------------------------------
    def used(self, login: str) -> int:
        self._active[login] = self._clock()
        pending = sum(rows for (who, _), rows in self._pending.items() if who == login)
        pending += sum(rows for (who, _), rows in self._flying.items() if who == login)
        total = self._totals.get(login)
        local = self._local.used(login)
        return local if total is None else max(local, total + pending)

    def reserve(self, login: str, rows: int, limit: int) -> int:
        return self._reservations.reserve_from(self.used(login), login, rows, limit)

    def release(self, login: str, rows: int) -> None:
        self._reservations.release(login, rows)

    def free(self, login: str, limit: int) -> int:
        return self._reservations.free(self.used(login), login, limit)

    def watch(self, login: str) -> None:
        """A connection of `login` with an hourly budget opened: read its total from now on."""
        self._active[login] = self._clock()

    def add(self, login: str, rows: int) -> None:
        if rows <= 0:
            return
        self._local.add(login, rows)
        key = (login, int(self._clock()) // BUCKET_SECONDS)
        self._pending[key] = self._pending.get(key, 0) + rows
        self._active[login] = self._clock()

    # -- the batches -----------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.flush(), 2)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            try:
                await self.flush()
                self._warned = False
            except StateUnavailable as exc:
                if not self._warned:
                    log.warning("row budgets: %s; hourly counts wait and each replica uses its own", exc)
                    self._warned = True
            except Exception:
                log.exception("row budgets: the shared ledger could not be updated")

    async def flush(self) -> None:
        """Add the pending counts to the store, then read the totals of the logins in use."""
        now = self._clock()
        horizon = now - WINDOW_SECONDS
        for login, seen in list(self._active.items()):
            if seen < horizon:
                del self._active[login]
                self._totals.pop(login, None)
        batch, self._pending = self._pending, {}
        self._flying = batch
        if not batch and not self._active:
            return
        minute = int(now) // BUCKET_SECONDS
        try:
            async with self.store.transaction() as connection:
                if batch:
                    await connection.execute(self.store.sql(
                        "INSERT INTO {schema}.row_budget AS b (login, minute, rows) "
                        "SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[]) "
                        "ON CONFLICT (login, minute) DO UPDATE SET rows = b.rows + excluded.rows"),
                        [login for login, _ in batch], [m for _, m in batch], list(batch.values()))
                logins = list(self._active)
                rows = await connection.fetch(self.store.sql(
                    "SELECT login, sum(rows)::bigint FROM {schema}.row_budget "
                    "WHERE login = ANY($1::text[]) AND minute > $2 GROUP BY login"),
                    logins, minute - _MINUTES)
                if now - self._pruned > _PRUNE_SECONDS:
                    self._pruned = now
                    await connection.execute(self.store.sql(
                        "DELETE FROM {schema}.row_budget WHERE minute <= $1"), minute - 2 * _MINUTES)
        except BaseException:
            for key, count in batch.items():  # not added: they wait for the next batch
                self._pending[key] = self._pending.get(key, 0) + count
            self._flying = {}
            raise
        totals = {str(row[0]): int(row[1]) for row in rows}
        self._totals = {login: totals.get(login, 0) for login in logins}
        self._flying = {}
