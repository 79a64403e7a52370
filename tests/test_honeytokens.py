"""Honeytokens (docs/dlp.md): `pgveil honeytokens plant` on real PostgreSQL, and detection in the relay
for any role, in text and binary results, COPY output, error and notice texts, in rows larger than
many TCP reads; `terminate` ends the session before any byte of the row reaches the client and
locks the login out until `pgveil honeytokens clear`."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import psycopg
import pytest
import yaml

from proxy.discovery.detectors import is_email, luhn_valid
from proxy.policy.loader import PolicyError, parse_policy
from tests.conftest import Upstream
from tests.proxy_harness import RunningProxy, running_proxy
from tests.test_redteam5_diagnostics import Tap

DATABASE = "honey_test"
PASSWORD = "honey-pw-12"
ANALYST, ADMIN, THIEF = "ht_analyst", "ht_admin", "ht_thief"

SCHEMA = """
CREATE SCHEMA ht;
CREATE TABLE ht.accounts (id integer PRIMARY KEY, plan text NOT NULL);
INSERT INTO ht.accounts SELECT g, 'plan ' || g FROM generate_series(1, 5) g;
CREATE TABLE ht.customers (
    id integer PRIMARY KEY, full_name text NOT NULL, email text, card_number varchar(19),
    note text, signup date, account_id integer REFERENCES ht.accounts (id),
    rating smallint NOT NULL CHECK (rating BETWEEN 1 AND 5)
);
INSERT INTO ht.customers
SELECT g, 'Name ' || g, 'user' || g || '@example.com', '4111111111111111', 'note ' || g,
       date '2020-01-01' + g, 1 + g % 5, 1 + g % 5
FROM generate_series(1, 50) g;
CREATE TABLE ht.wide (id integer PRIMARY KEY, body text);
"""

POLICY = f"""
version: 1
settings:
  honeytoken_lockout: 1h
roles:
  analyst:
    members: [{ANALYST}]
    statements: [select, copy_out]
    tables: ["ht.*"]
  thief:
    members: [{THIEF}]
    statements: [select, copy_out]
    tables: ["ht.*"]
  admin:
    members: [{ADMIN}]
    statements: [all]
    tables: ["*"]
    reveal: [public, internal, confidential, restricted]
datasets:
  ht.customers:
    columns:
      full_name: {{sensitivity: confidential, protection: {{partial: {{keep_first: 1}}}}}}
      email: {{sensitivity: confidential, protection: email}}
      card_number: {{sensitivity: restricted, protection: redact}}
      note: {{sensitivity: internal}}
  ht.wide:
    columns:
      body: {{sensitivity: internal}}
"""


class _Database:
    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.superuser = upstream.superuser
        self.superpassword = upstream.superpassword

    def dsn(self, user: str | None = None, password: str | None = None, dbname: str = DATABASE) -> str:
        return self.upstream.dsn(user, password, dbname)


@dataclass
class World:
    upstream: Upstream
    proxy: RunningProxy
    audit_log: Path
    policy: Path
    markers: list[str]  # alert honeytokens planted in ht.customers.note
    wide_marker: str  # the terminate honeytoken in ht.wide.body (a 3 MB row)

    def dsn(self, login: str, port: int | None = None) -> str:
        if port is None:
            return self.proxy.dsn(login, PASSWORD, DATABASE)
        return f"postgresql://{login}:{PASSWORD}@127.0.0.1:{port}/{DATABASE}"

    def hits(self) -> list[dict[str, object]]:
        lines = self.audit_log.read_text().splitlines() if self.audit_log.exists() else []
        return [record for record in map(json.loads, lines) if record.get("type") == "honeytoken"]

    def metric(self) -> str:
        return str(self.proxy.hooks.observer.exposition().decode())


def _plant(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", "honeytokens", "plant", "--upstream", dsn, *args],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def world(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    upstream.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
    for login in (ANALYST, ADMIN, THIEF):
        upstream.execute(f"DROP ROLE IF EXISTS {login}")
        upstream.execute(f"CREATE ROLE {login} LOGIN PASSWORD '{PASSWORD}'")
    upstream.execute(f"CREATE DATABASE {DATABASE}")
    upstream.execute(SCHEMA, dbname=DATABASE)
    wide_marker = "WIDE-" + secrets.token_hex(10)
    upstream.execute(f"INSERT INTO ht.wide VALUES (1, 'ordinary row'), "
                     f"(2, repeat('a', 1500000) || '{wide_marker}' || repeat('b', 1500000))", dbname=DATABASE)
    upstream.execute(f"GRANT USAGE ON SCHEMA ht TO {ANALYST}, {ADMIN}, {THIEF}; "
                     f"GRANT SELECT ON ALL TABLES IN SCHEMA ht TO {ANALYST}, {ADMIN}, {THIEF}", dbname=DATABASE)
    planted = _plant(upstream.dsn(dbname=DATABASE), "--dataset", "ht.customers", "--count", "3",
                     "--column", "note", "--name", "cust")
    assert planted.returncode == 0, planted.stderr
    snippet = yaml.safe_load(planted.stdout)["honeytokens"]
    markers = [entry["value"] for entry in snippet]
    snippet.append({"name": "wide", "table": "ht.wide", "column": "body", "value": wide_marker,
                    "action": "terminate"})
    directory = tmp_path_factory.mktemp("honeytokens")
    policy = directory / "policy.yaml"
    policy.write_text(POLICY + yaml.safe_dump({"honeytokens": snippet}))
    audit_log = directory / "audit.jsonl"
    with running_proxy(_Database(upstream), policy_path=str(policy), audit_log=str(audit_log),
                       metrics="127.0.0.1:0") as proxy:
        yield World(upstream, proxy, audit_log, policy, markers, wide_marker)


# ---- planting -----------------------------------------------------------------------------------

def test_plant_inserts_plausible_rows_with_unguessable_markers(world: World) -> None:
    assert len(set(world.markers)) == 3 and all(len(marker) >= 20 for marker in world.markers)
    with psycopg.connect(world.upstream.dsn(dbname=DATABASE)) as conn:
        rows = conn.execute("SELECT id, full_name, email, card_number, signup, account_id, rating "
                            "FROM ht.customers WHERE note = ANY(%s)", (world.markers,)).fetchall()
    assert len(rows) == 3
    for id_, full_name, email, card, signup, account, rating in rows:
        assert id_ > 50 and " " in full_name and is_email(email) and not full_name.startswith("Name ")
        assert card.isdigit() and luhn_valid(card) and signup is not None and 1 <= account <= 5
        assert 1 <= rating <= 5  # from an existing row: the CHECK constraint holds


def test_plant_refuses_what_it_cannot_do(world: World) -> None:
    missing = _plant(world.upstream.dsn(dbname=DATABASE), "--dataset", "ht.nowhere")
    assert missing.returncode == 2 and "ht.nowhere" in missing.stderr
    not_text = _plant(world.upstream.dsn(dbname=DATABASE), "--dataset", "ht.customers", "--column", "signup")
    assert not_text.returncode == 2 and "text column" in not_text.stderr


def test_policy_refuses_a_honeytoken_in_a_masked_column() -> None:
    text = POLICY + "honeytokens:\n  - {name: h, table: ht.customers, column: email, value: abcdefghijkl}\n"
    with pytest.raises(PolicyError) as caught:
        parse_policy(text)
    assert "honeytokens[0].column" in str(caught.value) and "masked for role analyst" in str(caught.value)
    short = POLICY + "honeytokens:\n  - {name: h, table: ht.customers, column: note, value: abc}\n"
    with pytest.raises(PolicyError, match="too short"):
        parse_policy(short)


# ---- detection (alert) --------------------------------------------------------------------------

def _hits_of(world: World, login: str, message_type: str) -> list[dict[str, object]]:
    return [hit for hit in world.hits() if hit.get("login") == login and hit.get("message_type") == message_type]


def test_text_results_alert_and_pass(world: World) -> None:
    before = len(_hits_of(world, ANALYST, "D"))
    with psycopg.connect(world.dsn(ANALYST)) as conn:
        rows = conn.execute("SELECT id, note FROM ht.customers ORDER BY id").fetchall()
        assert {note for _, note in rows} >= set(world.markers)  # alert: the rows pass
        assert conn.execute("SELECT count(*) FROM ht.customers").fetchone() == (53,)
    hits = _hits_of(world, ANALYST, "D")
    assert len(hits) == before + 3  # one record per honeytoken and statement
    hit = hits[-1]
    assert hit["token"] in ("cust-1", "cust-2", "cust-3") and hit["table"] == "ht.customers"
    assert hit["action"] == "alert" and hit["role"] == "analyst" and hit["fingerprint"]
    assert hit["client_address"] and hit["connection_id"]
    assert world.markers[0] not in json.dumps(world.hits())  # the value is never recorded
    assert 'pgveil_honeytoken_hits_total{action="alert",token="cust-1"}' in world.metric()


def test_binary_results_of_asyncpg(world: World) -> None:
    before = len(_hits_of(world, ADMIN, "D"))

    async def run() -> list[str]:
        conn = await asyncpg.connect(world.dsn(ADMIN))
        try:
            return [row["note"] for row in await conn.fetch("SELECT note FROM ht.customers WHERE id > $1", 50)]
        finally:
            await conn.close()

    assert sorted(asyncio.run(run())) == sorted(world.markers)
    assert len(_hits_of(world, ADMIN, "D")) == before + 3


def test_error_and_notice_texts(world: World) -> None:
    with psycopg.connect(world.dsn(ANALYST)) as conn:
        with pytest.raises(psycopg.errors.InvalidTextRepresentation):
            conn.execute("SELECT note::integer FROM ht.customers WHERE id > 50").fetchall()
    assert _hits_of(world, ANALYST, "E")
    with psycopg.connect(world.dsn(ADMIN), autocommit=True) as conn:
        notices: list[str] = []
        conn.add_notice_handler(lambda diagnostic: notices.append(diagnostic.message_primary or ""))
        conn.execute("DO $$ BEGIN RAISE NOTICE 'found %', (SELECT note FROM ht.customers WHERE id = 51); END $$")
    assert any(marker in notice for notice in notices for marker in world.markers)
    assert _hits_of(world, ADMIN, "N")


def test_copy_output(world: World) -> None:
    before = len(_hits_of(world, ANALYST, "d"))
    with psycopg.connect(world.dsn(ANALYST)) as conn:
        with conn.cursor().copy("COPY ht.customers TO STDOUT") as copy:
            lines = [bytes(line) for line in copy]
    assert any(world.markers[0].encode() in line for line in lines)
    assert len(_hits_of(world, ANALYST, "d")) == before + 3


def test_a_role_that_never_reads_the_row_raises_nothing(world: World) -> None:
    before = len(world.hits())
    with psycopg.connect(world.dsn(ANALYST)) as conn:
        assert len(conn.execute("SELECT * FROM ht.customers WHERE id <= 50").fetchall()) == 50
    assert len(world.hits()) == before


# ---- terminate ----------------------------------------------------------------------------------

def test_terminate_before_any_byte_of_a_large_row(world: World) -> None:
    """The 3 MB row reaches pgveil in many reads; it is held whole, found, and never forwarded:
    the client gets the rows before it, then FATAL, and the login is locked out."""
    tap = Tap(world.proxy.port)
    try:
        with psycopg.connect(world.dsn(THIEF, tap.port)) as conn:
            assert conn.execute("SELECT body FROM ht.wide WHERE id = 1").fetchone() == ("ordinary row",)
            with pytest.raises(psycopg.Error) as caught:
                conn.execute("SELECT id, body FROM ht.wide ORDER BY id").fetchall()
            assert conn.closed or conn.broken
        assert "pgveil: honeytoken:" in str(caught.value)
        received = tap.received()
    finally:
        tap.close()
    assert world.wide_marker.encode() not in received
    assert b"a" * 64 not in received and b"b" * 64 not in received  # not one chunk of the row
    assert b"pgveil: honeytoken:" in received and b"FATAL" in received
    hit = [h for h in world.hits() if h.get("login") == THIEF][-1]
    assert hit["token"] == "wide" and hit["action"] == "terminate" and hit["table"] == "ht.wide"
    # locked out: refused at startup, for every role's login of that name ...
    with pytest.raises(psycopg.OperationalError, match="locked out"):
        psycopg.connect(world.dsn(THIEF)).close()
    with psycopg.connect(world.dsn(ANALYST)) as conn:  # ... and only that login
        conn.execute("SELECT 1").fetchall()
    listed = subprocess.run([sys.executable, "-m", "proxy", "honeytokens", "lockouts", "--policy",
                             str(world.policy)], capture_output=True, text=True, timeout=60)
    assert THIEF in listed.stdout and "wide" in listed.stdout
    cleared = subprocess.run([sys.executable, "-m", "proxy", "honeytokens", "clear", THIEF, "--policy",
                              str(world.policy)], capture_output=True, text=True, timeout=60)
    assert cleared.returncode == 0, cleared.stderr
    with psycopg.connect(world.dsn(THIEF)) as conn:
        assert conn.execute("SELECT count(*) FROM ht.wide").fetchone() == (2,)


def test_terminate_in_binary_format_and_copy(world: World) -> None:
    async def run() -> str:
        conn = await asyncpg.connect(world.dsn(THIEF))
        try:
            await conn.fetch("SELECT body FROM ht.wide WHERE id = $1", 2)
        except (asyncpg.PostgresError, asyncpg.exceptions.ConnectionDoesNotExistError, OSError) as exc:
            return str(exc)
        finally:
            await conn.close()
        return "not ended"

    assert "honeytoken" in asyncio.run(run())
    subprocess.run([sys.executable, "-m", "proxy", "honeytokens", "clear", THIEF, "--policy", str(world.policy)],
                   check=True, capture_output=True, timeout=60)
    with psycopg.connect(world.dsn(THIEF)) as conn, pytest.raises(psycopg.Error, match="honeytoken"):
        with conn.cursor().copy("COPY (SELECT body FROM ht.wide WHERE id = 2) TO STDOUT") as copy:
            for _line in copy:
                pass
    subprocess.run([sys.executable, "-m", "proxy", "honeytokens", "clear", THIEF, "--policy", str(world.policy)],
                   check=True, capture_output=True, timeout=60)


def test_check_against_the_live_schema_names_a_missing_honeytoken_column(world: World, tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY + "honeytokens:\n  - {name: h, table: ht.customers, column: notes, "
                      "value: abcdefghijkl}\n  - {name: g, table: ht.nowhere, column: x, value: abcdefghijkm}\n")
    done = subprocess.run([sys.executable, "-m", "proxy", "check", "--policy", str(policy), "--upstream",
                           world.upstream.dsn(dbname=DATABASE)], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "honeytokens[0].column: no column 'notes' in ht.customers" in done.stdout + done.stderr
    assert "honeytokens[1].table: no table or view ht.nowhere" in done.stdout + done.stderr
    policy.write_text(POLICY + "honeytokens:\n  - {name: h, table: ht.customers, column: note, value: abcdefghijkl}\n")
    done = subprocess.run([sys.executable, "-m", "proxy", "check", "--policy", str(policy), "--upstream",
                           world.upstream.dsn(dbname=DATABASE)], capture_output=True, text=True, timeout=120)
    assert "honeytokens" not in done.stdout + done.stderr, done.stdout + done.stderr


# ---- lockouts across replicas (state store) ---------------------------------------------------------

def test_lockout_reaches_every_replica_through_the_state_store(world: World, tmp_path: Path) -> None:
    """A terminate hit on replica A locks the login out on replica B too (within the store's
    poll), and `pgveil honeytokens clear --state-dsn` ends it on both."""
    from tests.proxy_harness import ServeProcess, spawn_serve, wait_until

    state = "honey_state"
    world.upstream.execute(f"DROP DATABASE IF EXISTS {state} WITH (FORCE)")
    world.upstream.execute(f"CREATE DATABASE {state}")
    state_dsn = world.upstream.dsn(dbname=state)
    replicas: list[ServeProcess] = []
    try:
        for index in range(2):
            # a lockout directory of its own each: only the store can carry a lockout across
            env = {**os.environ, "PGVEIL_HONEYTOKEN_LOCKOUTS": str(tmp_path / f"lockouts-{index}")}
            replicas.append(spawn_serve(
                "--upstream", world.upstream.dsn(dbname=DATABASE), "--policy", str(world.policy),
                "--listen", "127.0.0.1:0", "--audit-log", str(tmp_path / f"audit-{index}.jsonl"),
                "--state-dsn", state_dsn, env=env))
        a, b = (replica.dsn(THIEF, PASSWORD, DATABASE) for replica in replicas)

        def refused(dsn: str) -> bool:
            try:
                psycopg.connect(dsn).close()
            except psycopg.OperationalError as exc:
                assert "locked out" in str(exc), exc
                return True
            return False

        assert not refused(b)
        with psycopg.connect(a) as conn, pytest.raises(psycopg.Error, match="honeytoken"):
            conn.execute("SELECT body FROM ht.wide WHERE id = 2").fetchall()
        assert refused(a)
        wait_until(lambda: refused(b), "replica B to refuse the locked-out login")
        listed = subprocess.run([sys.executable, "-m", "proxy", "honeytokens", "lockouts", "--state-dsn",
                                 state_dsn], capture_output=True, text=True, timeout=60)
        assert THIEF in listed.stdout and "wide" in listed.stdout, listed.stdout + listed.stderr
        cleared = subprocess.run([sys.executable, "-m", "proxy", "honeytokens", "clear", THIEF, "--state-dsn",
                                  state_dsn], capture_output=True, text=True, timeout=60)
        assert cleared.returncode == 0, cleared.stderr
        wait_until(lambda: not refused(a) and not refused(b), "both replicas to accept the login again")
    finally:
        for replica in replicas:
            replica.terminate()
        for replica in replicas:
            try:
                replica.wait(30)
            finally:
                replica.__exit__(None, None, None)


# ---- the demo ------------------------------------------------------------------------------------

def test_demo_plants_honeytokens_and_caps_the_executive() -> None:
    """`pgveil demo` plants two honeytoken reviews that a `SELECT *` trips (audited, alert) and
    gives the executive a 100-row statement budget (the README's tour and docs/demo.md)."""
    import re

    from proxy.embedded import free_port
    from tests.proxy_harness import wait_until
    from tests.test_demo import DemoProcess, printed_dsns

    demo = DemoProcess(free_port())
    try:
        output = demo.read_until("Press Ctrl-C")
        assert "Planted 2 honeytoken reviews" in output
        dsns = printed_dsns(output)
        audit_log = Path(re.search(r"audit log: (\S+)", output).group(1))  # type: ignore[union-attr]
        with psycopg.connect(dsns["data_scientist"]) as conn:
            assert len(conn.execute("SELECT * FROM reviews").fetchall()) == 3002

        def hits() -> list[dict[str, object]]:
            return [r for r in map(json.loads, audit_log.read_text().splitlines())
                    if r.get("type") == "honeytoken"]

        wait_until(lambda: len(hits()) == 2, "the two honeytoken records")
        assert {hit["token"] for hit in hits()} == {"review-1", "review-2"}
        assert all(hit["login"] == "dana_scientist" and hit["action"] == "alert" for hit in hits())
        with psycopg.connect(dsns["executive"]) as conn:
            with pytest.raises(psycopg.Error, match="row-budget: role executive may receive at most 100"):
                conn.execute("SELECT * FROM analytics.restaurant_scorecard").fetchall()
            conn.rollback()
            assert conn.execute("SELECT count(*) FROM analytics.restaurant_scorecard").fetchone() == (120,)
    finally:
        demo.stop()


@pytest.mark.skipif(__import__("shutil").which("psql") is None, reason="psql is not installed")
def test_psql_backslash_copy_trips_a_terminate_honeytoken(world: World, tmp_path: Path) -> None:
    out = tmp_path / "wide.txt"
    try:
        done = subprocess.run(["psql", world.dsn(THIEF), "-X", "-c", f"\\copy ht.wide to '{out}'"],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode != 0 and "pgveil: honeytoken:" in done.stderr, done.stderr
        assert world.wide_marker not in (out.read_text() if out.exists() else "")
        hit = [h for h in world.hits() if h.get("login") == THIEF][-1]
        assert hit["token"] == "wide" and hit["message_type"] == "d"
    finally:
        subprocess.run([sys.executable, "-m", "proxy", "honeytokens", "clear", THIEF, "--policy",
                        str(world.policy)], capture_output=True, timeout=60)
