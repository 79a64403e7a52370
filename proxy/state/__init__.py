"""pgveil's shared state store: one versioned PostgreSQL schema that every replica reads and writes.

Replicas behind one Service need one truth for what changes at run time (elevation requests and
grants now; row budgets, lockouts and fingerprint allow-lists too). It lives in a schema
(default `pgveil_state`) in the upstream database, or in any database given its own DSN
(`pgveil serve --state-dsn DSN`, `state_dsn:` in --config, or PGVEIL_STATE_DSN; the password may
come from PGVEIL_STATE_PASSWORD, a Secret).

API for features (import from `proxy.state`):

    register_migration(version, name, sql) -> Migration
        At import time of your module. `sql` names the schema as `{schema}` and must be
        idempotent (CREATE TABLE IF NOT EXISTS ...). Version ranges: 1-99 the store, 100-199
        elevation, 200-299 DLP (row budgets, lockouts), 300-399 fingerprints.

    store = StateStore(dsn, schema="pgveil_state", poll_interval=0.5)
    await store.open()            # pool + migrations (under an advisory lock) + change watcher
    await store.close()
    store.sql(text)               # `{schema}` -> the quoted schema name
    await store.fetch(sql, *args) / fetchrow(...) / execute(...)   # `{schema}` expanded
    async with store.transaction() as connection: ...              # asyncpg connection
        await store.changed(connection, "topic")   # in a write's transaction: bump the topic's
                                                   # counter and NOTIFY (delivered at commit)
    store.subscribe("topic", listener)   # async listener() re-reads its data on every change
                                         # (LISTEN/NOTIFY; the counters are also polled every
                                         # poll_interval, so a missed notification costs <= 0.5 s)
    store.available, store.last_read     # whether the last counter read worked, and when
                                         # (time.monotonic())
    await in_task(coroutine)             # REQUIRED around store calls made while a statement is
                                         # decided (the relay steps those coroutines outside any
                                         # task; asyncpg's timeouts need one)

Every call that needs the store raises StateUnavailable when it cannot be reached: fail closed for
anything that needs fresh state, keep serving from what the listeners last read otherwise.
"""

from proxy.state.store import (
    DEFAULT_POLL_INTERVAL,
    DEFAULT_SCHEMA,
    STATE_PASSWORD_ENV,
    Migration,
    StateError,
    StateStore,
    StateUnavailable,
    in_task,
    migrations,
    register_migration,
    unreachable,
)

__all__ = [
    "DEFAULT_POLL_INTERVAL", "DEFAULT_SCHEMA", "STATE_PASSWORD_ENV", "Migration", "StateError", "StateStore",
    "StateUnavailable", "in_task", "migrations", "register_migration", "unreachable",
]
