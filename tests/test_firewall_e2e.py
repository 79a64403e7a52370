"""The firewall end to end: a vulnerable web shop attacked by sqlmap, directly and through pgveil;
refusals as ordinary errors on a usable connection; fingerprints learned and enforced."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from proxy.cli import main
from tests.conftest import Upstream
from tests.firewall_shop_app import running_shop
from tests.proxy_harness import RunningProxy, running_proxy

DATABASE = "fw_shop"
APP_LOGIN, APP_PASSWORD = "fw_shop_app", "fw-shop-pw"
REPORTING_LOGIN = "fw_shop_reporting"
SQLMAP = Path(sys.executable).with_name("sqlmap")
REFRESH = "PGVEIL_FINGERPRINTS_REFRESH_SECONDS"

POLICY = """
version: 1
roles:
  shop_app:
    members: [fw_shop_app]
    statements: [select]
    tables: ["shop.*"]
    reveal: [public, internal, confidential, restricted]
    application: true
    injection: enforce
  shop_reporting:
    members: [fw_shop_reporting]
    statements: [select]
    tables: ["shop.*"]
    reveal: [public, internal, confidential, restricted]
    application: true
    fingerprints: {mode}
datasets:
  shop.customers:
    columns:
      ssn: {{sensitivity: restricted, protection: redact, joinable: false}}
"""


class ShopUpstream:
    """The test PostgreSQL with the shop database as the default (pgveil guards that database)."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.superuser = upstream.superuser
        self.superpassword = upstream.superpassword

    def dsn(self, user: str | None = None, password: str | None = None, dbname: str = DATABASE) -> str:
        return self.upstream.dsn(user, password, dbname)


@pytest.fixture(scope="module")
def shop_database(upstream: Upstream) -> ShopUpstream:
    upstream.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
    upstream.execute(f"CREATE DATABASE {DATABASE}")
    upstream.execute(
        f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{APP_LOGIN}') THEN "
        f"CREATE ROLE {APP_LOGIN} LOGIN PASSWORD '{APP_PASSWORD}'; END IF; "
        f"IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{REPORTING_LOGIN}') THEN "
        f"CREATE ROLE {REPORTING_LOGIN} LOGIN PASSWORD '{APP_PASSWORD}'; END IF; END $$")
    upstream.execute(
        "CREATE SCHEMA shop;"
        "CREATE TABLE shop.products (id int PRIMARY KEY, name text, price numeric, active bool);"
        "INSERT INTO shop.products VALUES (1, 'widget', 9.50, true), (2, 'gadget', 20, true), "
        "(3, 'gizmo', 3, false);"
        "CREATE TABLE shop.customers (id int PRIMARY KEY, email text, ssn text, password_hash text);"
        "INSERT INTO shop.customers VALUES (1, 'ann@example.com', '914-27-6380', 'PWHASH');"
        "CREATE TABLE shop.blocklist (ssn text);"
        f"GRANT USAGE ON SCHEMA shop TO {APP_LOGIN}, {REPORTING_LOGIN};"
        f"GRANT SELECT ON ALL TABLES IN SCHEMA shop TO {APP_LOGIN}, {REPORTING_LOGIN};",
        dbname=DATABASE)
    return ShopUpstream(upstream)


@pytest.fixture(scope="module")
def policy_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fw_policy") / "shop.yaml"
    path.write_text(textwrap.dedent(POLICY.format(mode="learn")))
    return path


@pytest.fixture(scope="module")
def proxy(shop_database: ShopUpstream, policy_file: Path) -> Iterator[RunningProxy]:
    previous = os.environ.get(REFRESH)
    os.environ[REFRESH] = "0"  # re-read the fingerprint store on every check: approvals apply at once
    try:
        with running_proxy(shop_database, policy_path=str(policy_file)) as running:
            yield running
    finally:
        if previous is None:
            del os.environ[REFRESH]
        else:
            os.environ[REFRESH] = previous


def page(url: str) -> bytes:
    """The shop's answer, error pages included."""
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            body: bytes = response.read()
    except urllib.error.HTTPError as error:
        body = error.read()
    return body


FOUND = "identified the following injection point"
NOT_FOUND = "do not appear to be injectable"


def sqlmap(url: str, output: Path) -> str:
    """sqlmap, bounded: level 1, risk 1, every technique, 1-second time probes, no prompts; told the
    database is PostgreSQL so that its random probes never make it guess another one and skip tests."""
    result = subprocess.run(
        [str(SQLMAP), "-u", url, "--batch", "--dbms=PostgreSQL", "--technique=BEUST", "--level", "1",
         "--risk", "1", "--time-sec", "1", "--flush-session", "--output-dir", str(output),
         "--disable-coloring"],
        capture_output=True, text=True, timeout=240, check=False,
    )
    return result.stdout


def test_sqlmap_finds_the_vulnerable_shop_injectable_straight_on_postgresql(
        shop_database: ShopUpstream, tmp_path: Path) -> None:
    with running_shop(shop_database.dsn(APP_LOGIN, APP_PASSWORD)) as shop:
        assert b"widget" in page(f"{shop}/products?name=widget")
        assert b"psycopg.errors.SyntaxError" in page(f"{shop}/products?name=widget'")
        report = sqlmap(f"{shop}/products?name=widget", tmp_path)
        assert FOUND in report, report[-4000:]


def test_sqlmap_finds_nothing_injectable_through_pgveil(proxy: RunningProxy, tmp_path: Path) -> None:
    with running_shop(proxy.dsn(APP_LOGIN, APP_PASSWORD, DATABASE)) as shop:
        assert b"widget" in page(f"{shop}/products?name=widget")
        for url in (f"{shop}/products?name=widget", f"{shop}/product?id=1"):
            report = sqlmap(url, tmp_path)
            assert NOT_FOUND in report and FOUND not in report, report[-4000:]


def test_refusal_is_an_ordinary_error_and_the_connection_stays_usable(proxy: RunningProxy) -> None:
    with psycopg.connect(proxy.dsn(APP_LOGIN, APP_PASSWORD, DATABASE), autocommit=True) as connection:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as refused:
            connection.execute("SELECT id, name FROM shop.products WHERE name = '' OR 'a'='a' AND active")
        assert refused.value.diag.sqlstate == "42501"
        assert str(refused.value).startswith(
            "pgveil: tautology: the condition `'a' = 'a'` compares constants")
        assert connection.execute("SELECT name FROM shop.products WHERE id = 2").fetchone() == ("gadget",)


def test_join_on_a_sensitive_key_is_refused_through_pgveil(proxy: RunningProxy) -> None:
    with psycopg.connect(proxy.dsn(APP_LOGIN, APP_PASSWORD, DATABASE), autocommit=True) as connection:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="pgveil: join-on-sensitive-key"):
            connection.execute("SELECT c.id FROM shop.customers c "
                               "WHERE c.ssn IN (SELECT ssn FROM shop.blocklist)")
        email = connection.execute("SELECT email FROM shop.customers WHERE id = 1").fetchone()
        assert email == ("ann@example.com",)


def test_fingerprints_are_learned_then_enforced_and_approved_with_the_cli(
        proxy: RunningProxy, policy_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dsn = proxy.dsn(REPORTING_LOGIN, APP_PASSWORD, DATABASE)
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute("SELECT name, price FROM shop.products WHERE id = 1")
    store = policy_file.with_suffix(".fingerprints.json")
    assert "SELECT name, price FROM shop.products WHERE id = $1" in store.read_text()

    policy_file.write_text(textwrap.dedent(POLICY.format(mode="enforce")))
    proxy.run(proxy.hooks.reload())
    with psycopg.connect(dsn, autocommit=True) as connection:
        learned = connection.execute("SELECT name, price FROM shop.products WHERE id = 3").fetchone()
        assert learned == ("gizmo", 3)
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="unknown-fingerprint") as refused:
            connection.execute("SELECT count(*) FROM shop.products")
        fingerprint = str(refused.value).split("statement shape ")[1].split()[0]
        assert main(["fingerprints", "approve", fingerprint, "--policy", str(policy_file)]) == 0
        capsys.readouterr()
        assert connection.execute("SELECT count(*) FROM shop.products").fetchone() == (3,)


def test_asyncpg_pool_of_an_application_role_works_through_the_firewall(proxy: RunningProxy) -> None:
    import asyncpg

    async def use_pool() -> list[str]:
        dsn = proxy.dsn(APP_LOGIN, APP_PASSWORD, DATABASE)
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
        try:
            async with pool.acquire() as connection:
                rows = await connection.fetch(
                    "SELECT name FROM shop.products WHERE price > $1 ORDER BY id", 5)
            async with pool.acquire() as connection:  # released and reset in between
                await connection.fetchval("SELECT $1::numeric", 1)
            return [row["name"] for row in rows]
        finally:
            await pool.close()

    assert asyncio.run(use_pool()) == ["widget", "gadget"]


def test_explain_names_the_firewall_rule_and_why(
        shop_database: ShopUpstream, policy_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sql = "SELECT id FROM shop.products WHERE name = 'x' UNION ALL SELECT NULL"
    assert main(["explain", "--policy", str(policy_file), "--role", "shop_app",
                 "--upstream", shop_database.dsn(), sql]) == 0
    output = capsys.readouterr().out
    assert "decision: refuse" in output and "rule: union-extraction" in output
    assert "why: the UNION branch `SELECT NULL` adds constant rows to a query over a table" in output
