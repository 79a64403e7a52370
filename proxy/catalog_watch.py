"""Tells whether the upstream's definitions changed since pgveil read its catalog: a log that an
event trigger adds to on every DDL when pgveil could install one, else a fingerprint of catalog rows."""

from __future__ import annotations

import asyncio
from typing import Any

# Installed by proxy.upstream_setup.install_catalog_watch (needs a superuser: event triggers).
DDL_LOG = "pgveil.ddl_log"
EVENT_TRIGGERS = ("pgveil_catalog_ddl", "pgveil_catalog_drop")

# A committed DDL adds a row; the trigger's trimming removes hundreds at once: count, max and sum
# of the ids visible together cannot come back to an earlier value.
_LOG_SQL = f"""
SELECT pg_catalog.count(*) || ':' || COALESCE(pg_catalog.max(l.id), 0) || ':'
       || COALESCE(pg_catalog.sum(l.id), 0),
       (SELECT pg_catalog.count(*) FROM pg_catalog.pg_event_trigger t
        WHERE t.evtname IN ('{EVENT_TRIGGERS[0]}', '{EVENT_TRIGGERS[1]}') AND t.evtenabled <> 'D')
FROM {DDL_LOG} l
"""
_LOG_READABLE_SQL = (f"SELECT COALESCE(pg_catalog.has_table_privilege("
                     f"pg_catalog.to_regclass('{DDL_LOG}'), 'SELECT'), false)")
# Without the trigger: every row version of the catalogs definitions live in (a replaced function or
# view is a new row version with a new xmin; a dropped one lowers the count). ALTER ROLE/DATABASE SET
# (pg_db_role_setting) fires no event trigger, so it is part of both markers.
# Temporary objects (apps create them all the time) are invisible to other sessions: left out.
_CATALOGS = (("pg_proc", "pronamespace"), ("pg_rewrite", ""), ("pg_class", "relnamespace"),
             ("pg_type", "typnamespace"), ("pg_operator", ""), ("pg_cast", ""),
             ("pg_constraint", "connamespace"), ("pg_namespace", "oid"))
_TEMPORARY = "SELECT oid FROM pg_catalog.pg_namespace WHERE nspname ~ '^pg_(toast_)?temp_'"
_ROLE_SETTINGS_SQL = (
    "SELECT pg_catalog.count(*) || ':' || COALESCE(pg_catalog.sum(xmin::text::bigint), 0) "
    "FROM pg_catalog.pg_db_role_setting"
)
_FINGERPRINT_SQL = "SELECT " + " || '/' || ".join(
    f"(SELECT pg_catalog.count(*) || ':' || COALESCE(pg_catalog.sum(xmin::text::bigint), 0) "
    f"FROM pg_catalog.{catalog}{f' WHERE {namespace} NOT IN ({_TEMPORARY})' if namespace else ''})"
    for catalog, namespace in _CATALOGS)


async def change_marker(connection: Any) -> str:
    """A string that changes whenever a definition in the connection's database changes (asyncpg
    connection; inside a transaction it reads that transaction's snapshot)."""
    settings = await connection.fetchval(_ROLE_SETTINGS_SQL)
    if await connection.fetchval(_LOG_READABLE_SQL):
        row = await connection.fetchrow(_LOG_SQL)
        if row is not None and row[1] == len(EVENT_TRIGGERS):
            return f"ddl:{row[0]}:{settings}"
    return f"rows:{await connection.fetchval(_FINGERPRINT_SQL)}:{settings}"


class CatalogWatch:
    """One connection that reads the change marker for every connection of a serving process.

    Callers that arrive while a probe is running wait for the next one (a probe that started before
    they arrived may have missed a change they must see); all callers waiting together share it."""

    def __init__(self, dsn: str, database: str | None = None, timeout: float = 10.0) -> None:
        self.dsn = dsn
        self.database = database
        self.timeout = timeout
        self._connection: Any = None
        self._started = 0
        self._probe: asyncio.Task[str] | None = None
        self._probe_number = 0

    async def marker(self) -> str:
        """The change marker as of a moment after this call began; raises on upstream errors."""
        arrival = self._started
        while True:
            probe = self._probe
            if probe is not None and not probe.done():
                number = self._probe_number
                result = await asyncio.shield(probe)
                if number > arrival:
                    return result
                continue
            if probe is not None and self._probe_number > arrival:
                return probe.result()
            self._started += 1
            self._probe_number = self._started
            self._probe = asyncio.ensure_future(self._read())

    async def _read(self) -> str:
        import asyncpg

        if self._connection is None or self._connection.is_closed():
            self._connection = await asyncpg.connect(self.dsn, database=self.database, timeout=self.timeout)
        try:
            return await asyncio.wait_for(change_marker(self._connection), self.timeout)
        except BaseException:
            connection, self._connection = self._connection, None
            connection.terminate()
            raise

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None and not connection.is_closed():
            await connection.close()
