"""Shared world for the guard, masking and bypass tests: a database with canary values in
protected columns, logins for each policy role, the policy and the catalog snapshot."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest

from proxy.catalog import CatalogSnapshot, load_catalog
from proxy.guard.pipeline import guard
from proxy.guard.statement import GuardContext
from proxy.guard.verdict import Refuse, Verdict
from proxy.policy.loader import hash_key, parse_policy
from proxy.policy.model import Policy
from proxy.upstream_setup import install_masking_functions
from tests.conftest import Upstream

DATABASE = "guard_test"
PASSWORD = "guard-pw-51"
HASH_KEY = "guard-test-hash-key-0123456789"
LOGINS = ("gv_analyst", "gv_writer", "gv_public", "gv_admin", "gv_nobody")

# Raw values that must never reach a masked client, in any byte of any message.
CANARIES = (
    "914-27-6380", "914276380",            # ssn (hash)
    "quokkamail7731",                      # email local part (email keeps only its first char)
    "Quokkafeld", "uokkafel",              # full_name (partial keep_first 1)
    "1987-06-23", "06-23",                 # birth_date (generalize year)
    "PWHASH-CANARY",                       # password_hash (redact, no policy protection)
    "NOTE-CANARY",                         # notes (confidential, no protection: redacted)
    "4111-9876-5432-1098", "9876-5432",    # card (partial keep_last 4)
    "HIDDENCITY",                          # city of a row outside the analyst's row filter
    "EVENT-SECRET",                        # secret column of a partition (inherits the parent's policy)
    "CHILD-SECRET",                        # inheritance child
    "123457.89",                           # salary (generalize bucket 1000)
)

SCHEMA = """
CREATE SCHEMA gv;
CREATE SCHEMA gv_other;
CREATE TABLE gv.people (
    id integer PRIMARY KEY, full_name text, email text, ssn text UNIQUE, birth_date date,
    salary numeric(10,2), region text, city text, card text, password_hash text, notes text
);
INSERT INTO gv.people VALUES
 (1, 'Zed Quokkafeld', 'quokkamail7731@leak.example', '914-27-6380', '1987-06-23', 123457.89,
     'north', 'Springfield', '4111-9876-5432-1098', 'PWHASH-CANARY', 'NOTE-CANARY'),
 (2, 'Ann Other', 'ann@example.com', '111-11-1111', '1990-01-15', 50000.00,
     'north', 'Shelbyville', '5500-0000-0000-0004', 'pw2', 'plain note'),
 (3, 'Bob Third', 'bob@example.com', '222-22-2222', '1975-12-01', 72000.00,
     'south', 'Ogdenville', '3400-0000-0000-009', 'pw3', 'note three'),
 (4, 'Hidden Person', 'hidden@example.com', '333-33-3333', '1999-09-09', 1.00,
     'hidden', 'HIDDENCITY', '6011-0000-0000-0004', 'pw4', 'hidden note');
CREATE TABLE gv.orders (id integer PRIMARY KEY, person_id integer, amount numeric(10,2), placed date);
INSERT INTO gv.orders VALUES (10, 1, 20.00, '2024-03-05'), (11, 1, 5.50, '2024-03-09'),
    (12, 2, 100.00, '2024-04-01'), (13, 3, 7.25, '2025-01-02'), (14, 4, 1.00, '2025-02-02');
CREATE TABLE gv.events (id integer, at date, secret text) PARTITION BY RANGE (at);
CREATE TABLE gv.events_2024 PARTITION OF gv.events FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
INSERT INTO gv.events VALUES (1, '2024-05-05', 'EVENT-SECRET');
CREATE TABLE gv.base (id integer, secret text);
CREATE TABLE gv.child (extra text) INHERITS (gv.base);
INSERT INTO gv.child VALUES (1, 'CHILD-SECRET', 'x');
CREATE VIEW gv.people_names AS SELECT id, full_name, ssn FROM gv.people;
CREATE VIEW gv.people_listed AS SELECT id, ssn, region FROM gv.people;
CREATE VIEW gv.order_totals AS SELECT person_id, sum(amount) AS total FROM gv.orders GROUP BY 1;
CREATE TABLE gv_other.people (id integer, full_name text);
INSERT INTO gv_other.people VALUES (1, 'other schema');
CREATE TABLE gv.scratch (id integer, note text, email text);
CREATE FUNCTION gv.leak_ssn(i integer) RETURNS text LANGUAGE sql STABLE
    AS 'SELECT ssn FROM gv.people WHERE id = i';
CREATE FUNCTION gv.add_one(i integer) RETURNS integer LANGUAGE sql IMMUTABLE AS 'SELECT i + 1';
CREATE FUNCTION gv.dyn(q text) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE n bigint; BEGIN EXECUTE q INTO n; RETURN n; END $$;
SELECT lo_from_bytea(0, 'LOB-CANARY'::bytea);
ANALYZE gv.people;
"""

GRANTS = """
GRANT USAGE ON SCHEMA gv, gv_other TO {logins};
GRANT SELECT ON ALL TABLES IN SCHEMA gv, gv_other TO {logins};
GRANT INSERT, UPDATE, DELETE ON gv.scratch, gv.people, gv.orders TO gv_writer;
GRANT CREATE ON SCHEMA gv TO gv_analyst;
GRANT TEMPORARY ON DATABASE guard_test TO {logins};
"""

POLICY = """
version: 1
settings:
  default_role: deny
  hash_key_env: PGVEIL_HASH_KEY
roles:
  analyst:
    members: [gv_analyst]
    statements: [select, copy_out]
    tables: ["gv.*"]
    reveal: [public, internal]
    row_filters:
      gv.people: "region <> 'hidden'"
  writer:
    members: [gv_writer]
    statements: [select, insert, update, delete, copy_in]
    tables: ["gv.*"]
    reveal: [public, internal]
  public_only:
    members: [gv_public]
    statements: [select]
    tables: ["gv.*"]
    reveal: [public]
  admin:
    members: [gv_admin]
    statements: [all]
    tables: ["*"]
    reveal: [public, internal, confidential, restricted]
datasets:
  gv.people:
    columns:
      id:            {sensitivity: public}
      full_name:     {sensitivity: confidential, protection: {partial: {keep_first: 1}}}
      email:         {sensitivity: confidential, protection: email}
      ssn:           {sensitivity: restricted, protection: hash}
      birth_date:    {sensitivity: confidential, protection: {generalize: year}}
      salary:        {sensitivity: confidential, protection: {generalize: {bucket: 1000}}}
      region:        {sensitivity: public}
      city:          {sensitivity: public}
      card:          {sensitivity: confidential, protection: {partial: {keep_last: 4}}}
      password_hash: {sensitivity: restricted}
      notes:         {sensitivity: confidential}
  gv.orders:
    columns:
      id:        {sensitivity: public}
      person_id: {sensitivity: public}
      amount:    {sensitivity: public}
      placed:    {sensitivity: public}
  gv.events:
    columns:
      secret: {sensitivity: restricted, protection: redact}
  gv.base:
    columns:
      secret: {sensitivity: restricted, protection: redact}
  gv.people_listed:
    columns:
      id:     {sensitivity: public}
      ssn:    {sensitivity: restricted, protection: hash}
      region: {sensitivity: public}
"""


@dataclass
class Outcome:
    """Everything PostgreSQL sent back for one statement, as text, for canary searches."""

    rows: list[tuple[Any, ...]] = field(default_factory=list)
    error: str | None = None
    sqlstate: str | None = None
    notices: list[str] = field(default_factory=list)

    def text(self) -> str:
        return repr(self.rows) + repr(self.error) + repr(self.notices)


@dataclass
class GuardWorld:
    upstream: Upstream
    policy: Policy
    catalog: CatalogSnapshot
    connections: dict[str, psycopg.Connection[Any]] = field(default_factory=dict)

    def dsn(self, login: str | None = None) -> str:
        if login is None:
            return self.upstream.dsn(dbname=DATABASE)
        return self.upstream.dsn(user=login, password=PASSWORD, dbname=DATABASE)

    def context(self, login: str = "gv_analyst") -> GuardContext:
        role = self.policy.role_for_user(login)
        assert role is not None
        return GuardContext(
            policy=self.policy, role=role, catalog=self.catalog, user=login,
            search_path=self.catalog.default_search_path(login, DATABASE),
        )

    def verdict(self, sql: str, login: str = "gv_analyst") -> Verdict:
        return guard(sql, self.context(login))

    def connection(self, login: str) -> psycopg.Connection[Any]:
        conn = self.connections.get(login)
        if conn is None or conn.closed:
            conn = psycopg.connect(self.dsn(login), autocommit=True)
            self.connections[login] = conn
        return conn

    def run(self, sql: str, login: str = "gv_analyst", params: tuple[Any, ...] | None = None) -> Outcome:
        """Execute SQL directly on the upstream as `login` and collect rows, error and notices."""
        conn = self.connection(login)
        outcome = Outcome()
        conn.add_notice_handler(lambda diag: outcome.notices.append(
            f"{diag.message_primary} {diag.message_detail} {diag.context}"))
        try:
            if params is None and re.match(r"\s*copy\b", sql, re.IGNORECASE):
                with conn.cursor() as cur, cur.copy(sql.encode()) as copy:  # type: ignore[arg-type]
                    outcome.rows.extend((bytes(block).decode(errors="replace"),) for block in copy)
            elif params is None:
                with conn.cursor() as cur:
                    cur.execute(sql.encode())  # type: ignore[call-overload]
                    while True:
                        if cur.description is not None:
                            outcome.rows.extend(cur.fetchall())
                        if not cur.nextset():
                            break
            else:
                result = conn.pgconn.exec_params(sql.encode(), [str(p).encode() for p in params])
                if result.error_message:
                    outcome.error = result.error_message.decode(errors="replace")
                else:
                    outcome.rows.extend(
                        tuple(result.get_value(r, c) for c in range(result.nfields)) for r in range(result.ntuples)
                    )
        except psycopg.Error as exc:
            diag = exc.diag
            outcome.error = f"{diag.message_primary} | {diag.message_detail} | {diag.message_hint} | {diag.context}"
            outcome.sqlstate = diag.sqlstate
        finally:
            conn._notice_handlers.clear()  # type: ignore[attr-defined]
        return outcome

    def guarded(self, sql: str, login: str = "gv_analyst", params: tuple[Any, ...] | None = None
                ) -> tuple[Verdict, Outcome]:
        """What a masked client would get: the verdict, and if forwarded, PostgreSQL's answer."""
        verdict = self.verdict(sql, login)
        if isinstance(verdict, Refuse):
            return verdict, Outcome(error=verdict.text, sqlstate=verdict.sqlstate)
        return verdict, self.run(verdict.sql, login, params)


def leaked_canaries(text: str) -> list[str]:
    return [canary for canary in CANARIES if canary in text]


def build_world(upstream: Upstream) -> GuardWorld:
    os.environ.setdefault("PGVEIL_HASH_KEY", HASH_KEY)
    upstream.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
    for login in LOGINS:
        upstream.execute(f"DROP ROLE IF EXISTS {login}")
        upstream.execute(f"CREATE ROLE {login} LOGIN PASSWORD '{PASSWORD}'")
    upstream.execute(f"CREATE DATABASE {DATABASE}")
    upstream.execute(SCHEMA, dbname=DATABASE)
    upstream.execute(GRANTS.format(logins=", ".join(LOGINS)), dbname=DATABASE)
    policy = parse_policy(POLICY, "guard-test.yaml")
    asyncio.run(install_masking_functions(upstream.dsn(dbname=DATABASE), hash_key(policy)))
    catalog = asyncio.run(load_catalog(upstream.dsn(dbname=DATABASE)))
    return GuardWorld(upstream, policy, catalog)


_BUILT: dict[tuple[str, int], GuardWorld] = {}


class GuardDatabase:
    """The test upstream with the guard test database as the proxy's default database
    (what `tests.proxy_harness.running_proxy` takes as its upstream)."""

    def __init__(self, world: GuardWorld) -> None:
        self.world = world
        self.superuser = world.upstream.superuser
        self.superpassword = world.upstream.superpassword

    def dsn(self, user: str | None = None, password: str | None = None, dbname: str = DATABASE) -> str:
        return self.world.upstream.dsn(user, password, dbname)


@pytest.fixture(scope="module")
def world(upstream: Upstream) -> Iterator[GuardWorld]:
    """Built once per test session (every guard test module shares the database)."""
    key = (upstream.host, upstream.port)
    if key not in _BUILT:
        _BUILT[key] = build_world(upstream)
    built = _BUILT[key]
    try:
        yield built
    finally:
        for conn in built.connections.values():
            conn.close()


def normalise_space(sql: str) -> str:
    return re.sub(r"\s+", " ", sql).strip()
