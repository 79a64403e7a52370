"""Injection probes in every context, through a real pgveil with real clients, for an application
login whose role is not marked `application: true` (issue 13 §3) and for one that is: each probe
runs straight on PostgreSQL and is refused through pgveil with SQLSTATE 42501 naming its rule."""

from __future__ import annotations

import asyncio
import json
import re
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import asyncpg
import psycopg
import pytest

from tests.conftest import Upstream
from tests.firewall_shop_app import running_shop
from tests.proxy_harness import RunningProxy, running_proxy
from tests.test_firewall_e2e import FOUND, NOT_FOUND, page, sqlmap

PASSWORD = "fw-probe-pw"
UNMARKED, MARKED = "fw_probe_unmarked", "fw_probe_app"
PAYLOADS = json.loads((Path(__file__).parent / "corpus" / "injection_payloads.json").read_text())
PROBES = [entry["sql"] for entry in PAYLOADS if entry["valid"] and entry["family"] == "context_probe"]

POLICY = f"""
version: 1
roles:
  shop_unmarked:            # an application's login, not marked `application: true`
    members: [{UNMARKED}]
    statements: [select]
    tables: ["public.*", "shop.*"]
    reveal: [public, internal, confidential, restricted]
    injection: enforce
  shop_app:
    members: [{MARKED}]
    statements: [select]
    tables: ["public.*"]
    reveal: [public, internal, confidential, restricted]
    application: true
    injection: enforce
datasets: {{}}
"""

SCHEMA = f"""
CREATE TABLE shop_products (id int PRIMARY KEY, name text, price numeric, active bool);
INSERT INTO shop_products VALUES (1, 'widget', 9.50, true), (2, 'gadget', 20, true), (42, 'gizmo', 3, true);
CREATE TABLE docs (id int PRIMARY KEY, title text, owner text);
INSERT INTO docs VALUES (1, 'mine', '{UNMARKED}'), (2, 'theirs', 'someone');
GRANT SELECT ON shop_products, docs TO {UNMARKED}, {MARKED};
CREATE SCHEMA shop;
CREATE TABLE shop.products AS SELECT * FROM shop_products;
GRANT USAGE ON SCHEMA shop TO {UNMARKED}, {MARKED};
GRANT SELECT ON shop.products TO {UNMARKED}, {MARKED};
"""

REFUSAL = re.compile(r"^pgveil: ([a-z-]+): ")
SLEEP_IN_SORT_KEY = "SELECT id, name FROM shop_products WHERE active ORDER BY (SELECT 1 FROM pg_sleep(5))"
VERSION_IN_STRING = "SELECT id, name FROM shop_products WHERE name = 'x' || (SELECT version()) || ''"
SERVER_VALUES_BRANCH = ("SELECT id, name, price FROM shop_products WHERE id = 7 "
                        "UNION SELECT 1, current_user, 3")


class ProbeDatabase:
    """The test PostgreSQL with the probe database as the default (pgveil guards that database)."""

    def __init__(self, upstream: Upstream, name: str) -> None:
        self.upstream, self.name = upstream, name
        self.superuser, self.superpassword = upstream.superuser, upstream.superpassword

    def dsn(self, user: str | None = None, password: str | None = None, dbname: str | None = None) -> str:
        return self.upstream.dsn(user, password, dbname or self.name)


World = tuple[ProbeDatabase, RunningProxy]


@contextmanager
def probe_world(upstream: Upstream, name: str, directory: Path) -> Iterator[World]:
    upstream.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    upstream.execute(f"CREATE DATABASE {name}")
    for login in (UNMARKED, MARKED):
        upstream.execute(f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{login}') THEN "
                         f"CREATE ROLE {login} LOGIN PASSWORD '{PASSWORD}'; END IF; END $$")
    upstream.execute(SCHEMA, dbname=name)
    policy = directory / "probes.yaml"
    policy.write_text(textwrap.dedent(POLICY))
    database = ProbeDatabase(upstream, name)
    with running_proxy(database, policy_path=str(policy)) as proxy:
        yield database, proxy


@pytest.fixture(scope="module")
def world(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with probe_world(upstream, "fw_probes", tmp_path_factory.mktemp("fw_probes")) as running:
        yield running


def quick(sql: str) -> str:
    """The same probe without the wait, to run it straight on PostgreSQL."""
    sql = re.sub(r"(?i)pg_sleep\(\d+\)", "pg_sleep(0)", sql)
    return re.sub(r"(?i)generate_series\(1, ?\d+\)", "generate_series(1, 5)", sql)


def refused_rule(connection: psycopg.Connection[tuple[object, ...]], sql: str) -> str | None:
    try:
        connection.execute(sql.encode())  # type: ignore[call-overload]
    except psycopg.errors.InsufficientPrivilege as refused:
        found = REFUSAL.match(str(refused))
        assert refused.diag.sqlstate == "42501"
        return found.group(1) if found else f"not pgveil's refusal: {refused}"
    return None


def test_the_probes_are_postgresql_that_runs_straight_on_the_server(world: World) -> None:
    database, _ = world
    outcomes: dict[str, int] = {}
    with psycopg.connect(database.dsn(UNMARKED, PASSWORD), autocommit=True) as connection:
        for sql in PROBES:
            try:
                connection.execute(quick(sql).encode())  # type: ignore[call-overload]
                state = "ok"
            except psycopg.Error as error:
                state = error.sqlstate or "?"
            outcomes[state] = outcomes.get(state, 0) + 1
    # Only the server's own answers to what the probes ask: a login that may not read pg_shadow or
    # pg_authid (42501), a deliberate division by zero (22012), a value printed by a failed cast (22P02).
    assert set(outcomes) <= {"ok", "42501", "22012", "22P02"}, outcomes
    assert outcomes["ok"] > len(PROBES) // 2


@pytest.mark.parametrize("login", [UNMARKED, MARKED])
def test_every_probe_is_refused_through_pgveil_naming_its_rule(world: World, login: str) -> None:
    _, proxy = world
    let_through, rules = [], set()
    with psycopg.connect(proxy.dsn(login, PASSWORD, "fw_probes"), autocommit=True) as connection:
        for sql in PROBES:
            rule = refused_rule(connection, sql)
            if rule is None:
                let_through.append(sql)
            else:
                rules.add(rule)
        assert connection.execute("SELECT name FROM shop_products WHERE id = 42").fetchone() == ("gizmo",)
    assert let_through == []
    assert not any(rule.startswith("not pgveil") for rule in rules), rules
    assert {"time-based-probe", "catalog-probe", "union-extraction"} <= rules


def test_the_issue_examples_are_refused_with_their_rule_through_pgveil(world: World) -> None:
    _, proxy = world
    examples = {
        SLEEP_IN_SORT_KEY: "time-based-probe",
        "SELECT id, name FROM shop_products ORDER BY id, (SELECT usename FROM pg_user LIMIT 1)":
            "catalog-probe",
        "SELECT id, name FROM shop_products ORDER BY id, (SELECT rolname FROM pg_roles LIMIT 1)":
            "catalog-probe",
        VERSION_IN_STRING: "catalog-probe",
        SERVER_VALUES_BRANCH: "union-extraction",
        "SELECT id, name FROM shop_products WHERE active ORDER BY id LIMIT (SELECT length(version()))":
            "catalog-probe",
        "SELECT id, name FROM shop_products WHERE active ORDER BY id OFFSET (SELECT 0 FROM pg_sleep(5))":
            "time-based-probe",
        "SELECT id, name FROM shop_products ORDER BY CASE WHEN starts_with((SELECT title FROM docs "
        "WHERE id = 2), 't') THEN name ELSE id::text END": "sort-key-probe",
        "SELECT id FROM shop_products WHERE id = 42 AND 1 = CAST(current_user AS int)":
            "error-based-extraction",
        "SELECT id FROM shop_products WHERE id = 42; SELECT pg_sleep(5)": "time-based-probe",
    }
    with psycopg.connect(proxy.dsn(UNMARKED, PASSWORD, "fw_probes"), autocommit=True) as connection:
        seen = {sql: refused_rule(connection, sql) for sql in examples}
    assert seen == examples


def test_asyncpg_prepared_probes_are_refused_too(world: World) -> None:
    _, proxy = world

    async def probe() -> list[str]:
        connection = await asyncpg.connect(proxy.dsn(UNMARKED, PASSWORD, "fw_probes"))
        refused = []
        try:
            for sql in ("SELECT id FROM shop_products WHERE name = $1 || (SELECT current_user) || ''",
                        "SELECT id FROM shop_products ORDER BY id LIMIT $1 + (SELECT count(*) FROM pg_user)",
                        "SELECT id FROM shop_products ORDER BY id, (SELECT 1 FROM pg_sleep($1))"):
                try:
                    await connection.prepare(sql)
                except asyncpg.InsufficientPrivilegeError as error:
                    refused.append(str(error).split(":")[1].strip())
            assert await connection.fetchval("SELECT count(*) FROM shop_products WHERE active") == 3
        finally:
            await connection.close()
        return refused

    assert asyncio.run(probe()) == ["catalog-probe", "catalog-probe", "time-based-probe"]


def test_ordinary_queries_of_the_same_login_still_run(world: World) -> None:
    _, proxy = world
    with psycopg.connect(proxy.dsn(UNMARKED, PASSWORD, "fw_probes"), autocommit=True) as connection:
        for sql in ("SELECT title FROM docs WHERE owner = current_user",
                    "SELECT title FROM docs WHERE owner = (SELECT current_user)"):
            assert connection.execute(sql).fetchall() == [("mine",)]
        rows = connection.execute("SELECT id FROM shop_products ORDER BY CASE WHEN price > 5 THEN 0 ELSE 1 "
                                  "END, lower(name) LIMIT (SELECT count(*) - 1 FROM shop_products)")
        assert rows.fetchall() == [(2,), (1,)]
        assert str(connection.execute("SELECT version()").fetchone()).startswith("('PostgreSQL")


def test_probes_are_refused_on_postgresql_15_and_18(upstream_any: Upstream, tmp_path: Path) -> None:
    with probe_world(upstream_any, "fw_probes_any", tmp_path) as (_, proxy):
        connection = psycopg.connect(proxy.dsn(UNMARKED, PASSWORD, "fw_probes_any"), autocommit=True)
        with connection:
            assert refused_rule(connection, SLEEP_IN_SORT_KEY) == "time-based-probe"
            assert refused_rule(connection, VERSION_IN_STRING) == "catalog-probe"
            assert refused_rule(connection, SERVER_VALUES_BRANCH) == "union-extraction"
            assert connection.execute("SELECT count(*) FROM shop_products").fetchone() == (3,)


def test_sqlmap_finds_the_sort_key_injectable_straight_on_postgresql(world: World, tmp_path: Path) -> None:
    database, _ = world
    with running_shop(database.dsn(UNMARKED, PASSWORD)) as shop:
        assert b"widget" in page(f"{shop}/sorted?sort=price")
        report = sqlmap(f"{shop}/sorted?sort=price", tmp_path)
        assert FOUND in report, report[-4000:]


@pytest.mark.parametrize("route", ["/sorted?sort=price", "/page?limit=20"])
def test_sqlmap_finds_nothing_injectable_through_pgveil_for_a_login_not_marked_application(
        world: World, tmp_path: Path, route: str) -> None:
    _, proxy = world
    with running_shop(proxy.dsn(UNMARKED, PASSWORD, "fw_probes")) as shop:
        assert b"widget" in page(f"{shop}/sorted?sort=price")
        report = sqlmap(f"{shop}{route}", tmp_path)
        assert NOT_FOUND in report and FOUND not in report, report[-4000:]
