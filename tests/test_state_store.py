"""The state store: versioned migrations under a lock, change propagation, an unreachable store."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from proxy.state import StateStore, StateUnavailable, migrations, register_migration
from tests.conftest import Upstream

register_migration(299, "test: a table of this test module", """
CREATE TABLE IF NOT EXISTS {schema}.test_budget (name text PRIMARY KEY, used bigint NOT NULL DEFAULT 0);
""")


def _schema() -> str:
    return f"pgveil_state_t{uuid.uuid4().hex[:10]}"


def test_replicas_starting_at_once_migrate_the_schema_once(upstream: Upstream) -> None:
    schema = _schema()

    async def main() -> tuple[list[list[int]], list[int]]:
        stores = [StateStore(upstream.dsn(), schema) for _ in range(4)]
        await asyncio.gather(*(store.open(watch=False) for store in stores))
        applied = [store.applied for store in stores]
        rows = await stores[0].fetch("SELECT version FROM {schema}.migrations ORDER BY 1")
        versions = [row[0] for row in rows]
        assert await stores[0].version() == max(m.version for m in migrations())
        for store in stores:
            await store.close()
        return list(applied), versions

    applied, versions = asyncio.run(main())
    everything = [m.version for m in migrations()]
    assert sorted(v for batch in applied for v in batch) == everything  # each migration ran once
    assert versions == everything
    assert 1 in versions and 299 in versions


def test_a_change_reaches_every_subscriber_by_notification_or_polling(upstream: Upstream) -> None:
    schema = _schema()

    async def main() -> None:
        writer = StateStore(upstream.dsn(), schema)
        reader = StateStore(upstream.dsn(), schema, poll_interval=0.2)
        await writer.open(watch=False)
        seen: list[int] = []

        async def reread() -> None:
            row = await reader.fetchrow("SELECT used FROM {schema}.test_budget WHERE name = 'x'")
            seen.append(-1 if row is None else int(row[0]))

        reader.subscribe("budget", reread)
        await reader.open()
        assert seen == [-1]
        async with writer.transaction() as connection:
            await connection.execute(writer.sql("INSERT INTO {schema}.test_budget VALUES ('x', 5)"))
            await writer.changed(connection, "budget")
        for _ in range(100):
            if seen[-1] == 5:
                break
            await asyncio.sleep(0.05)
        assert seen[-1] == 5
        # a change made without a notification (a missed one) is caught by the polling
        await writer.execute("UPDATE {schema}.test_budget SET used = 7; "
                             "UPDATE {schema}.changes SET counter = counter + 1 WHERE topic = 'budget'")
        for _ in range(100):
            if seen[-1] == 7:
                break
            await asyncio.sleep(0.05)
        assert seen[-1] == 7
        await writer.close()
        await reader.close()

    asyncio.run(main())


def test_an_unreachable_store_is_an_error_naming_it_without_the_password(upstream: Upstream) -> None:
    async def main() -> None:
        store = StateStore("postgresql://someone:s3cret@127.0.0.1:1/postgres", connect_timeout=1)
        with pytest.raises(StateUnavailable) as caught:
            await store.open()
        assert "s3cret" not in str(caught.value) and "127.0.0.1:1" in str(caught.value)

    asyncio.run(main())


def test_the_state_schema_is_closed_to_other_logins(upstream: Upstream) -> None:
    schema = _schema()
    upstream.execute("DROP ROLE IF EXISTS state_outsider; "
                     "CREATE ROLE state_outsider LOGIN PASSWORD 'outsider-pw'")

    async def main() -> None:
        store = StateStore(upstream.dsn(), schema)
        await store.open(watch=False)
        outsider = await asyncpg.connect(upstream.dsn("state_outsider", "outsider-pw"))
        try:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await outsider.fetch(f"SELECT * FROM {schema}.changes")
        finally:
            await outsider.close()
            await store.close()

    asyncio.run(main())


def test_a_store_unreachable_at_start_is_opened_in_the_background_once_it_answers(
        upstream: Upstream) -> None:
    database = f"state_late_{uuid.uuid4().hex[:8]}"
    upstream.execute(f"CREATE DATABASE {database} ALLOW_CONNECTIONS false")

    async def main() -> None:
        store = StateStore(upstream.dsn(dbname=database), poll_interval=0.1, connect_timeout=2)
        seen: list[str] = []

        async def listener() -> None:
            seen.append("read")

        store.subscribe("anything", listener)
        try:
            await store.start()  # returns: the replica serves without the store meanwhile
            assert not store.available
            with pytest.raises(StateUnavailable):
                await store.fetch("SELECT 1")
            upstream.execute(f"ALTER DATABASE {database} ALLOW_CONNECTIONS true")
            for _ in range(200):
                if store.available and seen:
                    break
                await asyncio.sleep(0.05)
            assert store.available and seen == ["read"]
            assert await store.version() == max(m.version for m in migrations())
        finally:
            await store.close()

    try:
        asyncio.run(main())
    finally:
        upstream.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
