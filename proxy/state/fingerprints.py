"""The fingerprint allow-lists in the state store: the FingerprintStore interface on `{schema}.fingerprints`.

The same table as PostgresFingerprintStore's (`(role, fingerprint)` the key, the same columns), as
a versioned migration of the state schema; rows of an existing `public.pgveil_fingerprints` in
the same database are copied in once (when the state login may read it). Writes move the
store's `fingerprints` change counter, so every replica re-reads the list at its next statement
of a fingerprinted role instead of after its refresh interval.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from proxy.firewall.fingerprints import FingerprintEntry, FingerprintKeeper, Status
from proxy.state.store import StateStore, in_task, register_migration

TOPIC = "fingerprints"

register_migration(300, "fingerprint allow-lists", """
CREATE TABLE IF NOT EXISTS {schema}.fingerprints (
    role text NOT NULL,
    fingerprint text NOT NULL,
    example text NOT NULL,
    status text NOT NULL CHECK (status IN ('approved', 'pending', 'revoked')),
    first_seen timestamptz NOT NULL,
    PRIMARY KEY (role, fingerprint)
);
DO $copy$
BEGIN
    IF to_regclass('public.pgveil_fingerprints') IS NOT NULL THEN
        INSERT INTO {schema}.fingerprints (role, fingerprint, example, status, first_seen)
            SELECT role, fingerprint, example, status, first_seen FROM public.pgveil_fingerprints
            ON CONFLICT (role, fingerprint) DO NOTHING;
    END IF;
EXCEPTION WHEN insufficient_privilege OR undefined_column THEN
    NULL;  -- not readable by the state login: the list starts empty (approve again, or copy it)
END
$copy$;
""")


class StateFingerprintStore:
    """FingerprintStore (proxy.firewall.fingerprints) on the state store."""

    def __init__(self, store: StateStore) -> None:
        self.store = store

    async def load(self) -> list[FingerprintEntry]:
        return await in_task(self._load())

    async def record(self, entries: Sequence[FingerprintEntry]) -> None:
        await in_task(self._record(entries))

    async def set_status(self, fingerprint: str, status: Status, role: str | None = None) -> int:
        return await in_task(self._set_status(fingerprint, status, role))

    async def _load(self) -> list[FingerprintEntry]:
        rows = await self.store.fetch(
            "SELECT role, fingerprint, example, status, first_seen FROM {schema}.fingerprints "
            "ORDER BY first_seen")
        return [FingerprintEntry(row[0], row[1], row[2], row[3], row[4].isoformat()) for row in rows]

    async def _record(self, entries: Sequence[FingerprintEntry]) -> None:
        if not entries:
            return
        rows = [(e.role, e.fingerprint, e.example, e.status, datetime.fromisoformat(e.first_seen))
                for e in entries]
        async with self.store.transaction() as connection:
            await connection.executemany(self.store.sql(
                "INSERT INTO {schema}.fingerprints (role, fingerprint, example, status, first_seen) "
                "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (role, fingerprint) DO NOTHING"), rows)
            await self.store.changed(connection, TOPIC)

    async def _set_status(self, fingerprint: str, status: Status, role: str | None) -> int:
        async with self.store.transaction() as connection:
            result = await connection.execute(self.store.sql(
                "UPDATE {schema}.fingerprints SET status = $1 WHERE fingerprint = $2 "
                "AND ($3::text IS NULL OR role = $3) AND status <> $1"), status, fingerprint, role)
            changed = int(str(result).split()[-1])
            if changed:
                await self.store.changed(connection, TOPIC)
        return changed


def keeper_on_state(store: StateStore, refresh_seconds: float = 10.0) -> FingerprintKeeper:
    """A FingerprintKeeper on the state store that re-reads the list whenever it changes (and at
    least every `refresh_seconds`, as before)."""
    keeper = FingerprintKeeper(StateFingerprintStore(store), refresh_seconds)

    async def changed() -> None:
        keeper.reload_soon()

    store.subscribe(TOPIC, changed)
    return keeper
