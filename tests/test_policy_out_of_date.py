"""A column the policy protects but PostgreSQL no longer has (renamed or dropped outside pgveil) is
refused to the roles it was masked for, instead of showing the renamed column unprotected."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from tests.conftest import Upstream
from tests.proxy_harness import RunningProxy, running_proxy, wait_until

DATABASE = "pood_db"
PASSWORD = "pood-pw-3"
SECRET = "canary.pood@example.org"

POLICY = """\
version: 1
settings: {default_role: deny}
roles:
  analyst:
    members: [pood_analyst]
    statements: [select]
    tables: ["pood.*"]
    reveal: [public, internal]
  auditor:
    members: [pood_auditor]
    statements: [select]
    tables: ["pood.*"]
    reveal: [public, internal, confidential, restricted]
datasets:
  pood.people:
    columns:
      email: {sensitivity: restricted, protection: redact}
      region: {sensitivity: public}
"""


class _Database:
    """The test upstream with pood_db as the proxy's default database."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.superuser, self.superpassword = upstream.superuser, upstream.superpassword

    def dsn(self, user: str | None = None, password: str | None = None, dbname: str = DATABASE) -> str:
        return self.upstream.dsn(user, password, dbname)


@pytest.fixture
def world(upstream: Upstream) -> Iterator[tuple[RunningProxy, str, _Database]]:
    upstream.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
    upstream.execute(f"CREATE DATABASE {DATABASE}")
    for login in ("pood_analyst", "pood_auditor"):
        upstream.execute(f"DROP ROLE IF EXISTS {login}")
        upstream.execute(f"CREATE ROLE {login} LOGIN PASSWORD '{PASSWORD}'")
    upstream.execute(
        "CREATE SCHEMA pood; CREATE TABLE pood.people (id int, email text, region text);"
        f"INSERT INTO pood.people VALUES (1, '{SECRET}', 'north');"
        "CREATE VIEW pood.people_view AS SELECT id, email, region FROM pood.people;"
        "GRANT USAGE ON SCHEMA pood TO PUBLIC; GRANT SELECT ON ALL TABLES IN SCHEMA pood TO PUBLIC;",
        dbname=DATABASE)
    database = _Database(upstream)
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "policy.yaml")
        with open(path, "w") as handle:
            handle.write(POLICY)
        try:
            with running_proxy(database, path) as proxy:
                yield proxy, path, database
        finally:
            upstream.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")


def _answer(conn: psycopg.Connection[Any], sql: str) -> str:
    """Every byte of the answer as text: the error, or every value."""
    result = conn.pgconn.exec_(sql.encode())
    seen = [(result.error_message or b"").decode(errors="replace")]
    seen += [(result.get_value(row, column) or b"").decode()
             for row in range(result.ntuples) for column in range(result.nfields)]
    return "\n".join(seen)


def _rename_outside_pgveil(database: _Database) -> None:
    database.upstream.execute("ALTER TABLE pood.people RENAME COLUMN email TO contact", dbname=DATABASE)


@pytest.mark.parametrize("sql", [
    "select * from pood.people",
    "select contact from pood.people",
    "select p from pood.people p",
    "select * from pood.people_view",
    "with t as (select * from pood.people) select * from t",
    "select (select max(contact) from pood.people)",
])
def test_a_protected_column_renamed_outside_pgveil_is_refused_not_shown(
    world: tuple[RunningProxy, str, _Database], sql: str,
) -> None:
    proxy, _, database = world
    with psycopg.connect(proxy.dsn("pood_analyst", PASSWORD, DATABASE), autocommit=True) as conn:
        assert SECRET not in _answer(conn, "select * from pood.people")  # masked while the policy fits
        _rename_outside_pgveil(database)
        wait_until(lambda: "policy-out-of-date" in _answer(conn, "select id from pood.people"),
                   "pgveil to see the renamed column")
        answer = _answer(conn, sql)
        assert SECRET not in answer
        assert "pgveil: policy-out-of-date" in answer and "column email of pood.people" in answer
        assert "pood.people" in answer


def test_a_role_that_sees_the_column_unmasked_is_not_affected(
    world: tuple[RunningProxy, str, _Database],
) -> None:
    proxy, _, database = world
    _rename_outside_pgveil(database)
    with psycopg.connect(proxy.dsn("pood_analyst", PASSWORD, DATABASE), autocommit=True) as analyst:
        wait_until(lambda: "policy-out-of-date" in _answer(analyst, "select id from pood.people"),
                   "pgveil to see the renamed column")
    with psycopg.connect(proxy.dsn("pood_auditor", PASSWORD, DATABASE), autocommit=True) as auditor:
        assert auditor.execute("select contact from pood.people").fetchall() == [(SECRET,)]


def test_updating_the_policy_to_the_new_name_masks_the_column_again(
    world: tuple[RunningProxy, str, _Database],
) -> None:
    proxy, path, database = world
    _rename_outside_pgveil(database)
    with psycopg.connect(proxy.dsn("pood_analyst", PASSWORD, DATABASE), autocommit=True) as conn:
        wait_until(lambda: "policy-out-of-date" in _answer(conn, "select id from pood.people"),
                   "pgveil to see the renamed column")
        with open(path, "w") as handle:
            handle.write(POLICY.replace("      email:", "      contact:"))
        proxy.run(proxy.server.reload())
        rows = conn.execute("select id, contact, region from pood.people").fetchall()
        assert rows[0][0] == 1 and rows[0][2] == "north"
        assert SECRET not in repr(rows)


def test_a_dropped_protected_column_is_refused_until_the_policy_follows(
    world: tuple[RunningProxy, str, _Database],
) -> None:
    proxy, path, database = world
    database.upstream.execute("DROP VIEW pood.people_view; ALTER TABLE pood.people DROP COLUMN email",
                              dbname=DATABASE)
    with psycopg.connect(proxy.dsn("pood_analyst", PASSWORD, DATABASE), autocommit=True) as conn:
        wait_until(lambda: "policy-out-of-date" in _answer(conn, "select id from pood.people"),
                   "pgveil to see the dropped column")
        with open(path, "w") as handle:
            handle.write(POLICY.replace("      email: {sensitivity: restricted, protection: redact}\n", ""))
        proxy.run(proxy.server.reload())
        assert conn.execute("select id, region from pood.people").fetchall() == [(1, "north")]
