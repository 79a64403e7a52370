"""Honeytoken lockouts in the state store (--state-dsn): every replica refuses a locked-out login.

A lockout is in force on the replica that saw the hit at once, and on every other replica as soon
as it has read the change (LISTEN/NOTIFY, or the store's poll: within about a second). Replicas
keep the lockouts they last read while the store cannot be reached. `pgveil honeytokens clear
LOGIN --state-dsn DSN` ends one everywhere.
"""

from __future__ import annotations

import asyncio
import logging
import time

from proxy.dlp.honeytokens import Lockout
from proxy.state.store import StateError, StateStore, register_migration

log = logging.getLogger("pgveil.dlp")

TOPIC = "honeytoken_lockouts"

register_migration(201, "honeytoken lockouts", """
CREATE TABLE IF NOT EXISTS {schema}.lockouts (
    login text PRIMARY KEY,
    until timestamptz NOT NULL,
    token text NOT NULL,
    since timestamptz NOT NULL DEFAULT now()
);
""")

_SELECT = ("SELECT login, extract(epoch FROM until)::float8, token, extract(epoch FROM since)::float8 "
           "FROM {schema}.lockouts WHERE until > now() ORDER BY login")


async def read_lockouts(store: StateStore) -> list[Lockout]:
    return [Lockout(str(row[0]), float(row[1]), str(row[2]), float(row[3]))
            for row in await store.fetch(_SELECT)]


async def write_lockout(store: StateStore, lockout: Lockout) -> None:
    async with store.transaction() as connection:
        await connection.execute(store.sql(
            "INSERT INTO {schema}.lockouts (login, until, token, since) "
            "VALUES ($1, to_timestamp($2), $3, to_timestamp($4)) ON CONFLICT (login) DO UPDATE "
            "SET until = greatest({schema}.lockouts.until, excluded.until), token = excluded.token, "
            "since = excluded.since"), lockout.login, lockout.until, lockout.token, lockout.since)
        await store.changed(connection, TOPIC)


async def clear_lockout(store: StateStore, login: str) -> bool:
    async with store.transaction() as connection:
        done = await connection.execute(store.sql("DELETE FROM {schema}.lockouts WHERE login = $1"), login)
        await store.changed(connection, TOPIC)
    return str(done).endswith(" 1")


class StateLockouts:
    """The Lockouts of a serving process over the state store (see the module docstring)."""

    def __init__(self, store: StateStore) -> None:
        self.store = store
        self._known: dict[str, Lockout] = {}
        self._writes: set[asyncio.Task[None]] = set()
        store.subscribe(TOPIC, self._reload)

    async def _reload(self) -> None:
        self._known = {lockout.login: lockout for lockout in await read_lockouts(self.store)}

    def lock(self, login: str, seconds: int, token: str) -> Lockout:
        now = time.time()
        lockout = Lockout(login, now + seconds, token, now)
        self._known[login] = lockout  # here at once; the others when the write is read
        task = asyncio.get_running_loop().create_task(self._write(lockout))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)
        return lockout

    async def _write(self, lockout: Lockout) -> None:
        try:
            await write_lockout(self.store, lockout)
        except StateError as exc:
            log.error("the lockout of login %s could not be written to the state store (it holds on "
                      "this replica only): %s", lockout.login, exc)

    def locked(self, login: str, now: float | None = None) -> Lockout | None:
        lockout = self._known.get(login)
        if lockout is None or lockout.until <= (time.time() if now is None else now):
            return None
        return lockout
