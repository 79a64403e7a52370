"""After DDL pgveil's catalog follows PostgreSQL: re-read only for what changed (nothing for
temporary objects), never relied on before it caught up with DDL run through pgveil."""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from proxy.catalog import CatalogReader, CatalogSnapshot, load_catalog
from proxy.enforcement import Enforcement
from tests.conftest import Upstream
from tests.proxy_harness import RunningProxy, running_proxy

DATABASE = "ddl_follow_db"
PASSWORD = "ddl-follow-pw-4"
SECRET = "111-22-3333"
NEW_SECRET = "999-88-7777"

POLICY = """\
version: 1
settings: {default_role: deny}
roles:
  admin:
    members: [ddlf_admin]
    statements: [all]
    tables: ["*"]
    reveal: [public, internal, confidential, restricted]
  analyst:
    members: [ddlf_analyst]
    statements: [select]
    tables: ["ddlf.*"]
    reveal: [public, internal]
datasets:
  ddlf.people:
    columns:
      ssn: {sensitivity: restricted, protection: redact}
  ddlf.accounts:
    columns:
      ssn: {sensitivity: restricted, protection: redact}
"""


class _Database:
    """The test upstream with ddl_follow_db as the proxy's default database."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.superuser, self.superpassword = upstream.superuser, upstream.superpassword

    def dsn(self, user: str | None = None, password: str | None = None, dbname: str = DATABASE) -> str:
        return self.upstream.dsn(user, password, dbname)


class World:
    def __init__(self, proxy: RunningProxy, enforcement: Enforcement) -> None:
        self.proxy = proxy
        self.enforcement = enforcement

    def connect(self, login: str) -> psycopg.Connection[Any]:
        return psycopg.connect(self.proxy.dsn(login, PASSWORD, DATABASE), autocommit=True)

    def caught_up(self) -> CatalogSnapshot:
        """The catalog once pgveil has followed the DDL it was told of."""
        self.proxy.run(self.enforcement.ddl_followed())
        return self.enforcement.state.catalog


@pytest.fixture
def world(upstream: Upstream) -> Iterator[World]:
    upstream.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
    upstream.execute(f"CREATE DATABASE {DATABASE}")
    for login in ("ddlf_admin", "ddlf_analyst"):
        upstream.execute(f"DROP ROLE IF EXISTS {login}")
        upstream.execute(f"CREATE ROLE {login} LOGIN PASSWORD '{PASSWORD}'")
    upstream.execute(
        "CREATE SCHEMA ddlf AUTHORIZATION ddlf_admin; SET ROLE ddlf_admin;"
        "CREATE TABLE ddlf.people (id int, name text, ssn text);"
        f"INSERT INTO ddlf.people VALUES (1, 'Ann', '{SECRET}');"
        "CREATE TABLE ddlf.accounts (id int, owner text);"
        "INSERT INTO ddlf.accounts VALUES (1, 'Ann');"
        "CREATE TABLE ddlf.other (id int, name text);"
        "INSERT INTO ddlf.other VALUES (1, 'public name');"
        "CREATE VIEW ddlf.labels AS SELECT id, name AS label FROM ddlf.other;"
        "GRANT USAGE ON SCHEMA ddlf TO ddlf_analyst;"
        "ALTER DEFAULT PRIVILEGES IN SCHEMA ddlf GRANT SELECT ON TABLES TO ddlf_analyst;"
        "GRANT SELECT ON ALL TABLES IN SCHEMA ddlf TO ddlf_analyst; RESET ROLE;",
        dbname=DATABASE)
    database = _Database(upstream)
    held: list[Enforcement] = []
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "policy.yaml")
        with open(path, "w") as handle:
            handle.write(POLICY)
        try:
            with running_proxy(database, policy_factory=lambda client: held[0].connection_policy()) as proxy:
                held.append(proxy.run(Enforcement.create(path, database.dsn())))
                try:
                    yield World(proxy, held[0])
                finally:
                    proxy.run(held[0].close())
        finally:
            upstream.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")


def _answer(conn: psycopg.Connection[Any], sql: str) -> str:
    """Every byte of the answer as text: the error, or every value."""
    result = conn.pgconn.exec_(sql.encode())
    seen = [(result.error_message or b"").decode(errors="replace")]
    seen += [(result.get_value(row, column) or b"").decode()
             for row in range(result.ntuples) for column in range(result.nfields)]
    return "\n".join(seen)


# ---- fail closed: the next statement is judged on the new facts, without waiting a second -------

def test_a_column_renamed_through_pgveil_is_caught_by_the_very_next_statement(world: World) -> None:
    with world.connect("ddlf_analyst") as analyst, world.connect("ddlf_admin") as admin:
        assert analyst.execute("select id, ssn from ddlf.people where id = 1").fetchall() == [(1, None)]
        admin.execute("ALTER TABLE ddlf.people RENAME COLUMN ssn TO tax_id")
        answer = _answer(analyst, "select * from ddlf.people where id = 1")  # no waiting: at once
        assert SECRET not in answer
        assert "pgveil: policy-out-of-date" in answer and "column ssn of ddlf.people" in answer


def test_a_column_the_policy_masks_by_name_is_masked_as_soon_as_it_is_added(world: World) -> None:
    with world.connect("ddlf_analyst") as analyst, world.connect("ddlf_admin") as admin:
        assert "pgveil: policy-out-of-date" in _answer(analyst, "select * from ddlf.accounts where id = 1")
        admin.execute(f"ALTER TABLE ddlf.accounts ADD COLUMN ssn text DEFAULT '{NEW_SECRET}'")
        rows = analyst.execute("select id, owner, ssn from ddlf.accounts where id = 1").fetchall()
        assert rows == [(1, "Ann", None)]  # judged on the new column at once, and masked


def test_a_view_recreated_over_a_masked_table_is_refused_right_after(world: World) -> None:
    with world.connect("ddlf_analyst") as analyst, world.connect("ddlf_admin") as admin:
        assert analyst.execute("select label from ddlf.labels where id = 1").fetchall() == [("public name",)]
        admin.execute("CREATE OR REPLACE VIEW ddlf.labels AS SELECT id, ssn AS label FROM ddlf.people")
        answer = _answer(analyst, "select label from ddlf.labels where id = 1")
        assert SECRET not in answer
        assert "pgveil:" in answer


def test_a_table_replaced_by_a_view_over_masked_data_is_refused_right_after(world: World) -> None:
    with world.connect("ddlf_analyst") as analyst, world.connect("ddlf_admin") as admin:
        assert analyst.execute("select name from ddlf.other where id = 1").fetchall() == [("public name",)]
        admin.execute("DROP TABLE ddlf.other CASCADE")
        admin.execute("CREATE VIEW ddlf.other AS SELECT id, ssn AS name FROM ddlf.people")
        answer = _answer(analyst, "select name from ddlf.other where id = 1")
        assert SECRET not in answer
        assert "pgveil:" in answer


# ---- what is read again ---------------------------------------------------------------------------

def test_temporary_tables_do_not_make_pgveil_read_its_catalog_again(world: World) -> None:
    state = world.enforcement.state
    with world.connect("ddlf_admin") as admin:
        for _ in range(3):
            admin.execute("CREATE TEMP TABLE scratch AS SELECT * FROM ddlf.people")
            admin.execute("ALTER TABLE scratch ADD COLUMN note text")
            assert admin.execute("SELECT count(*) FROM scratch").fetchone() == (1,)
            admin.execute("DROP TABLE scratch")
    world.caught_up()
    assert world.enforcement.state is state  # nothing was read again: the verdict cache keeps its entries


def test_adding_a_column_reads_that_table_again_and_keeps_the_rest(world: World) -> None:
    before = world.enforcement.state.catalog
    with world.connect("ddlf_admin") as admin:
        admin.execute("ALTER TABLE ddlf.other ADD COLUMN note text")
        after = world.caught_up()
    assert after is not before and after.generation != before.generation
    assert [c.name for c in after.relations["ddlf.other"].columns] == ["id", "name", "note"]
    assert world.enforcement.catalog_reader.relations_read == 1
    assert after.relations["pg_catalog.pg_class"] is before.relations["pg_catalog.pg_class"]
    assert after.relations["ddlf.people"] is before.relations["ddlf.people"]
    # the view over the changed table is kept: its own columns and what it reads did not change
    assert after.relations["ddlf.labels"] is before.relations["ddlf.labels"]


# ---- the incremental read is the full read -------------------------------------------------------

CHANGES = [
    "CREATE SCHEMA inc; CREATE TABLE inc.t (id int, ssn text)",
    "ALTER TABLE inc.t ADD COLUMN email text",
    "ALTER TABLE inc.t RENAME COLUMN email TO mail",
    "CREATE VIEW inc.v AS SELECT id, ssn FROM inc.t",
    "CREATE OR REPLACE VIEW inc.v AS SELECT id, ssn, mail FROM inc.t",
    "CREATE TABLE inc.child () INHERITS (inc.t)",
    "ALTER TABLE inc.t ADD COLUMN extra int",  # recurses to the child, which the DDL does not name
    "CREATE TABLE inc.p (id int, k int) PARTITION BY RANGE (id);"
    " CREATE TABLE inc.p1 PARTITION OF inc.p FOR VALUES FROM (0) TO (10)",
    "CREATE TABLE inc.p2 (id int, k int);"
    " ALTER TABLE inc.p ATTACH PARTITION inc.p2 FOR VALUES FROM (10) TO (20)",
    "ALTER TABLE inc.p DETACH PARTITION inc.p2",
    "CREATE TYPE inc.mood AS ENUM ('a'); ALTER TABLE inc.t ADD COLUMN m inc.mood",
    "ALTER TYPE inc.mood RENAME TO feeling",  # columns of the type print its new name
    "CREATE DOMAIN inc.d AS inc.feeling; ALTER TABLE inc.p ADD COLUMN dd inc.d",  # and to its partition
    "CREATE TABLE inc.holder (x inc.t)",
    "ALTER TABLE inc.t RENAME TO tt",  # holder.x's type, the view's reads and the child's parent
    "CREATE FUNCTION inc.f() RETURNS bigint LANGUAGE plpgsql"
    " AS 'BEGIN RETURN (SELECT count(*) FROM inc.later); END'",
    "CREATE TABLE inc.later (id int)",  # the function's body names it: it reads it now
    "ALTER SCHEMA inc RENAME TO inc2",
    "CREATE TEMP TABLE tmp (x int); CREATE INDEX ON inc2.tt (id)",
    "ALTER TABLE inc2.tt DROP COLUMN mail CASCADE",
    "ALTER TABLE inc2.tt ALTER COLUMN id SET NOT NULL",
    "DROP TABLE inc2.child",
    "DROP SCHEMA inc2 CASCADE",
]


def _content(snapshot: CatalogSnapshot) -> tuple[object, ...]:
    return (snapshot.relations, snapshot.functions, snapshot.role_settings, snapshot.server_search_path,
            snapshot.operators, snapshot.casts, snapshot.domains, snapshot.write_code,
            snapshot.builtin_functions, snapshot.builtin_operators, list(snapshot.relations))


def test_reading_only_what_changed_gives_the_catalog_a_full_read_gives(upstream_any: Upstream) -> None:
    database = "ddl_follow_incremental"
    upstream_any.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
    upstream_any.execute(f"CREATE DATABASE {database}")
    dsn = upstream_any.dsn(dbname=database)

    async def follow() -> list[int]:
        reader = CatalogReader(dsn)
        read_again: list[int] = []
        try:
            previous = await reader.read()
            for change in CHANGES:
                with psycopg.connect(dsn, autocommit=True) as conn:
                    conn.execute(change.encode())
                followed = await reader.read()
                assert _content(followed) == _content(await load_catalog(dsn)), change
                if _content(followed) != _content(previous):
                    assert followed.generation != previous.generation, change
                read_again.append(reader.relations_read)
                previous = followed
            return read_again
        finally:
            await reader.close()

    try:
        read_again = asyncio.run(follow())
    finally:
        upstream_any.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
    assert read_again[CHANGES.index("ALTER TABLE inc.t ADD COLUMN email text")] == 1
    assert read_again[CHANGES.index("ALTER TABLE inc.t ADD COLUMN extra int")] == 2  # and the child
    assert read_again[CHANGES.index("CREATE TEMP TABLE tmp (x int); CREATE INDEX ON inc2.tt (id)")] == 0


def test_ddl_the_driver_prepares_runs_again_and_again(world: World) -> None:
    """psycopg prepares statements it runs often; the catalog changes under them between runs."""
    with psycopg.connect(world.proxy.dsn("ddlf_admin", PASSWORD, DATABASE), autocommit=True,
                         prepare_threshold=0) as admin:
        for _ in range(10):
            admin.execute("CREATE TABLE ddlf.scratch (x integer)")
            admin.execute("INSERT INTO ddlf.scratch VALUES (1)")
            admin.execute("DROP TABLE ddlf.scratch")
