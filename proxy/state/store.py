"""StateStore: pgveil's shared state in one versioned PostgreSQL schema, with change propagation."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg

log = logging.getLogger("pgveil.state")

DEFAULT_SCHEMA = "pgveil_state"
STATE_PASSWORD_ENV = "PGVEIL_STATE_PASSWORD"
"""Environment variable with the state login's password (a Kubernetes Secret), when the DSN has none."""
DEFAULT_POLL_INTERVAL = 0.5
"""Seconds between two reads of the change counters (the fallback when a notification is missed)."""

_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class StateError(RuntimeError):
    """A state store that cannot be used (bad settings, a migration that fails); one line."""


class StateUnavailable(StateError):
    """The store cannot be reached now; what needs fresh state is refused (fail closed)."""


@dataclass(frozen=True, slots=True)
class Migration:
    """One step of the schema. `sql` may name the schema as `{schema}` and must be idempotent
    (CREATE ... IF NOT EXISTS, ADD COLUMN IF NOT EXISTS): it runs once per store, under the
    migration lock, in one transaction with the others that are due."""

    version: int
    name: str
    sql: str


_MIGRATIONS: dict[int, Migration] = {}


def register_migration(version: int, name: str, sql: str) -> Migration:
    """Add a migration every StateStore applies (in version order) when it opens.

    Versions are global: 1-99 the store itself, 100-199 elevation, 200-299 DLP (row budgets,
    lockouts), 300-399 fingerprints; pick the next free number of your range. Registering the
    same version again with the same content is a no-op (modules may be imported twice); with
    other content it is a programming error (ValueError)."""
    migration = Migration(version, name, sql)
    known = _MIGRATIONS.get(version)
    if known is not None and known != migration:
        raise ValueError(f"state migration {version} is already {known.name!r}")
    _MIGRATIONS[version] = migration
    return migration


def migrations() -> list[Migration]:
    """Every registered migration, in the order they are applied."""
    return [_MIGRATIONS[version] for version in sorted(_MIGRATIONS)]


register_migration(1, "change counters", """
CREATE TABLE IF NOT EXISTS {schema}.changes (
    topic text PRIMARY KEY,
    counter bigint NOT NULL DEFAULT 0,
    changed_at timestamptz NOT NULL DEFAULT now()
);
REVOKE ALL ON SCHEMA {schema} FROM PUBLIC;
""")


Listener = Callable[[], Awaitable[None]]
T = TypeVar("T")


async def in_task(work: Coroutine[Any, Any, T]) -> T:
    """Await `work` in a task of its own when there is no current task.

    pgveil's relay steps policy coroutines by hand before it makes a task of them
    (proxy/session/eager.py), and asyncpg's timeouts (pool.acquire, command timeouts) need a
    current task: every store call reachable from a statement's decision goes through this. The
    task never fails (its outcome is handed back and raised here), because the hand-stepped
    coroutine cannot be resumed with a failed future's exception."""
    if asyncio.current_task() is not None:
        return await work
    value, failure = await asyncio.get_running_loop().create_task(_settled(work))
    if failure is not None:
        raise failure
    return value  # type: ignore[return-value]


async def _settled(work: Coroutine[Any, Any, T]) -> tuple[T | None, Exception | None]:
    try:
        return await work, None
    except Exception as exc:
        return None, exc

_UNREACHABLE_CLASSES = ("08", "57", "53", "28", "3D")
"""SQLSTATE classes that say the store cannot be used now (connection, shutdown, resources,
authentication, database gone), as opposed to an error in what was asked."""


def unreachable(exc: BaseException) -> bool:
    """Whether `exc` means the store cannot be reached (rather than a bad query)."""
    if isinstance(exc, StateUnavailable):
        return True
    if isinstance(exc, asyncpg.PostgresError):
        state = str(getattr(exc, "sqlstate", "") or "")
        return state[:2] in _UNREACHABLE_CLASSES or (state == "42501" and "CONNECT" in str(exc).upper())
    return isinstance(exc, (OSError, TimeoutError, asyncpg.InterfaceError, ConnectionError))


class StateStore:
    """One serving process's (or command's) handle on the state schema.

    `open()` connects an asyncpg pool, applies the due migrations under an advisory lock (several
    replicas may start at once) and starts the watcher: a connection that LISTENs on the
    store's channel and reads the change counters every `poll_interval` seconds, so a missed
    notification is caught within that. A topic's listeners run (and must re-read their data)
    whenever its counter moves, and once at open. While the store cannot be reached the watcher
    retries; listeners keep what they last read (`available` is False meanwhile).
    """

    def __init__(self, dsn: str, schema: str = DEFAULT_SCHEMA, *,
                 poll_interval: float = DEFAULT_POLL_INTERVAL, password: str | None = None,
                 connect_timeout: float = 5.0, max_size: int = 4) -> None:
        if not _SCHEMA_NAME.match(schema):
            raise StateError(f"state schema must be a plain lower-case name, not {schema!r}")
        self.dsn = dsn
        self.schema = schema
        self.poll_interval = poll_interval
        self.password = password if password is not None else os.environ.get(STATE_PASSWORD_ENV) or None
        self.connect_timeout = connect_timeout
        self.max_size = max_size
        self.channel = f"{schema}_changes"
        self.available = False
        self.applied: list[int] = []  # the migrations this handle applied when it opened
        self.last_read: float | None = None  # time.monotonic() of the last successful counter read
        self._pool: asyncpg.Pool | None = None
        self._listeners: dict[str, list[Listener]] = {}
        self._counters: dict[str, int] = {}
        self._wake = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None
        self._opener: asyncio.Task[None] | None = None
        self._closing = False

    # -- opening and closing ---------------------------------------------------------------------
    async def open(self, watch: bool = True) -> None:
        """Connect, migrate, and (with `watch`) follow changes. Raises StateUnavailable or StateError."""
        try:
            self._pool = await asyncpg.create_pool(
                self.dsn, password=self.password, min_size=1, max_size=self.max_size,
                timeout=self.connect_timeout, command_timeout=self.connect_timeout * 2)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError, ValueError) as exc:
            raise StateUnavailable(f"state store {self.where()}: cannot connect: {exc}") from None
        try:
            self.applied = await self.migrate()
        except BaseException as exc:
            pool, self._pool = self._pool, None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pool.close(), 5)
            if isinstance(exc, Exception) and not isinstance(exc, StateError) and unreachable(exc):
                raise StateUnavailable(f"state store {self.where()}: {exc}") from None
            raise
        self.available = True
        if watch:
            with contextlib.suppress(StateUnavailable):  # the watcher reads them again at once
                await self._read_counters()
            self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def start(self) -> None:
        """`open()`, or, when the store cannot be reached now, keep trying in the background (every
        poll_interval, up to 2 s apart) so a replica starts and serves without it. StateError (a
        migration that fails) is raised at once: that is a setting to fix, not an outage."""
        try:
            await self.open()
        except StateUnavailable as exc:
            log.warning("%s; serving without it and retrying", exc)
            self._opener = asyncio.get_running_loop().create_task(self._keep_opening())

    async def _keep_opening(self) -> None:
        pause = self.poll_interval
        while not self._closing:
            await asyncio.sleep(pause)
            try:
                await self.open()
            except StateUnavailable:
                pause = min(pause * 2, 2.0)
                continue
            except StateError as exc:
                log.error("state store %s cannot be used: %s", self.where(), exc)
                return
            log.info("state store %s reached", self.where())
            return

    async def close(self) -> None:
        self._closing = True
        if self._opener is not None:
            self._opener.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._opener
            self._opener = None
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watcher
            self._watcher = None
        if self._pool is not None:
            pool, self._pool = self._pool, None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pool.close(), 5)

    def where(self) -> str:
        """The DSN without its password, for messages."""
        return re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", re.sub(r"password=\S+", "password=***", self.dsn))

    # -- schema ----------------------------------------------------------------------------------
    def sql(self, text: str) -> str:
        """`text` with `{schema}` replaced by the quoted schema name."""
        return text.replace("{schema}", f'"{self.schema}"')

    async def migrate(self) -> list[int]:
        """Apply every registered migration not yet applied; returns the versions applied now."""
        wanted = {migration.version for migration in migrations()}
        try:
            async with self.connection() as connection:  # up to date: nothing to lock or create
                if await connection.fetchval("SELECT to_regclass($1)", f'"{self.schema}".migrations'):
                    rows = await connection.fetch(self.sql("SELECT version FROM {schema}.migrations"))
                    if wanted <= {row[0] for row in rows}:
                        await self._check_owners(connection)
                        return []
            applied = await self._migrate_locked()
            async with self.connection() as connection:
                await self._check_owners(connection)
            return applied
        except asyncpg.PostgresError as exc:
            if unreachable(exc):
                raise
            raise StateError(f"state store {self.where()}: cannot use or migrate schema {self.schema}: "
                             f"{exc} (the state login must own the schema, or have CREATE on the "
                             "database to create it)") from None

    async def _check_owners(self, connection: asyncpg.Connection) -> None:
        """StateError unless the schema and everything in it belong to the state login or a
        superuser: the owner of a schema may drop and re-create its tables (a pre-created schema
        would let its owner write grants that every replica honours)."""
        rows = await connection.fetch(
            "SELECT 'schema ' || n.nspname AS what, pg_get_userbyid(n.nspowner) AS owner FROM pg_namespace n "
            "WHERE n.nspname = $1 "
            "AND n.nspowner <> (SELECT r.oid FROM pg_roles r WHERE r.rolname = current_user) "
            "AND NOT (SELECT r.rolsuper FROM pg_roles r WHERE r.oid = n.nspowner) "
            "UNION ALL SELECT 'relation ' || c.relname, pg_get_userbyid(c.relowner) FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 "
            "AND c.relowner <> (SELECT r.oid FROM pg_roles r WHERE r.rolname = current_user) "
            "AND NOT (SELECT r.rolsuper FROM pg_roles r WHERE r.oid = c.relowner) ORDER BY 1", self.schema)
        if rows:
            found = ", ".join(f"{row['what']} (owner {row['owner']})" for row in rows[:5])
            raise StateError(f"state store {self.where()}: {found} in schema {self.schema} belong to another "
                             "login, who could write grants and lockouts every replica honours; the state "
                             "login (or a superuser) must own the schema and its tables: drop the schema "
                             "or ALTER ... OWNER TO the state login")

    async def _migrate_locked(self) -> list[int]:
        applied: list[int] = []
        async with self.transaction() as connection:
            await connection.execute("SELECT pg_advisory_xact_lock(hashtext($1))",
                                     f"pgveil_state:{self.schema}")
            await connection.execute(self.sql(
                "CREATE SCHEMA IF NOT EXISTS {schema};"
                "CREATE TABLE IF NOT EXISTS {schema}.migrations (version integer PRIMARY KEY,"
                " name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"))
            rows = await connection.fetch(self.sql("SELECT version FROM {schema}.migrations"))
            done = {row[0] for row in rows}
            for migration in migrations():
                if migration.version in done:
                    continue
                try:
                    await connection.execute(self.sql(migration.sql))
                except asyncpg.PostgresError as exc:
                    raise StateError(f"state migration {migration.version} ({migration.name}) failed: "
                                     f"{exc}") from None
                await connection.execute(self.sql("INSERT INTO {schema}.migrations (version, name) "
                                                  "VALUES ($1, $2)"), migration.version, migration.name)
                applied.append(migration.version)
        if applied:
            log.info("state store %s: schema %s migrated to version %d",
                     self.where(), self.schema, applied[-1])
        return applied

    async def version(self) -> int:
        row = await self.fetchrow("SELECT max(version) FROM {schema}.migrations")
        return int(row[0]) if row is not None and row[0] is not None else 0

    # -- reading and writing ---------------------------------------------------------------------
    def _pool_now(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StateUnavailable("the state store is not open")
        return self._pool

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection; StateUnavailable when the store cannot be reached."""
        pool = self._pool_now()
        try:  # whatever keeps a connection from being had means the store cannot be reached
            connection = await pool.acquire(timeout=self.connect_timeout)
        except Exception as exc:
            self.available = False
            raise StateUnavailable(f"state store {self.where()} unreachable: "
                                   f"{str(exc) or type(exc).__name__}") from None
        try:
            yield connection
        except Exception as exc:
            if not unreachable(exc):
                raise
            self.available = False
            raise StateUnavailable(f"state store {self.where()} unreachable: "
                                   f"{str(exc) or type(exc).__name__}") from None
        finally:
            with contextlib.suppress(Exception):
                await pool.release(connection, timeout=self.connect_timeout)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection inside a transaction (committed when the block ends without error)."""
        async with self.connection() as connection, connection.transaction():
            yield connection

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        async with self.connection() as connection:
            return list(await connection.fetch(self.sql(sql), *args))

    async def fetchrow(self, sql: str, *args: Any) -> asyncpg.Record | None:
        async with self.connection() as connection:
            return await connection.fetchrow(self.sql(sql), *args)

    async def execute(self, sql: str, *args: Any) -> str:
        async with self.connection() as connection:
            return str(await connection.execute(self.sql(sql), *args))

    async def changed(self, connection: asyncpg.Connection, topic: str) -> int:
        """Within a write's transaction: move `topic`'s change counter and notify every replica
        (the notification is delivered at commit). Returns the new counter."""
        counter = await connection.fetchval(self.sql(
            "INSERT INTO {schema}.changes AS c (topic, counter) VALUES ($1, 1) ON CONFLICT (topic) DO "
            "UPDATE SET counter = c.counter + 1, changed_at = now() RETURNING counter"), topic)
        await connection.execute("SELECT pg_notify($1, $2)", self.channel, topic)
        return int(counter)

    # -- following changes -----------------------------------------------------------------------
    def subscribe(self, topic: str, listener: Listener) -> None:
        """Run `listener` whenever `topic` changes (and at the next counter read). A listener that
        raises is run again at the next read (the change counts as not yet seen)."""
        self._listeners.setdefault(topic, []).append(listener)
        self._counters.pop(topic, None)
        self._wake.set()

    async def refresh(self) -> None:
        """Read the change counters now and run the listeners of the topics that moved."""
        await self._read_counters()

    async def _read_counters(self) -> None:
        rows = await self.fetch("SELECT topic, counter FROM {schema}.changes")
        self.available = True
        self.last_read = time.monotonic()
        counters = {row[0]: int(row[1]) for row in rows}
        for topic, listeners in list(self._listeners.items()):
            counter = counters.get(topic, 0)
            if self._counters.get(topic) == counter:
                continue
            try:
                for listener in listeners:
                    await listener()
            except StateUnavailable:
                raise
            except Exception:
                log.exception("state store: listener of %s failed; retried at the next read", topic)
                continue
            self._counters[topic] = counter

    async def _watch(self) -> None:
        """LISTEN on a connection of its own; read the counters on each notification and every
        poll_interval. Reconnect after failures (pausing up to 2 s between attempts)."""
        pause = self.poll_interval
        while not self._closing:
            listening: asyncpg.Connection | None = None
            try:
                listening = await asyncpg.connect(self.dsn, password=self.password,
                                                  timeout=self.connect_timeout)
                await listening.add_listener(self.channel, self._notified)
                while not self._closing:
                    await self._read_counters()
                    pause = self.poll_interval
                    if listening.is_closed():
                        raise StateUnavailable("the listening connection closed")
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self.poll_interval)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.available:
                    log.warning("state store %s unreachable, serving from the last state read: %s",
                                self.where(), exc)
                self.available = False
                await asyncio.sleep(pause)
                pause = min(pause * 2, 2.0)
            finally:
                if listening is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(listening.close(), 2)

    def _notified(self, connection: object, pid: int, channel: str, payload: str) -> None:
        self._wake.set()
