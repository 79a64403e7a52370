"""Row budgets (docs/dlp.md): max_rows_per_statement and max_rows_per_hour, enforced in the relay on
real PostgreSQL through psycopg (simple and extended protocol, DECLARE/FETCH, server-side cursors,
COPY), asyncpg (binary, portals executed in chunks) and psql's \\copy; the session stays usable."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import psycopg
import pytest

from tests.conftest import Upstream
from tests.proxy_harness import RunningProxy, ServeProcess, running_proxy, spawn_serve, wait_until

DATABASE = "budget_test"
PASSWORD = "budget-pw-12"
CAPPED, HOURLY, FREE, CHUNKS, SHARED = "rb_capped", "rb_hourly", "rb_free", "rb_chunks", "rb_shared"
STATE_DATABASE = "budget_state"
LIMIT = 10
HOUR = 25

POLICY = f"""
version: 1
roles:
  capped:
    members: [{CAPPED}]
    statements: [select, copy_out]
    tables: ["rb.*"]
    max_rows_per_statement: {LIMIT}
  chunks:
    members: [{CHUNKS}]
    statements: [select, copy_out]
    tables: ["rb.*"]
    max_rows_per_statement: {LIMIT}
  hourly:
    members: [{HOURLY}]
    statements: [select]
    tables: ["rb.*"]
    max_rows_per_hour: {HOUR}
  shared:
    members: [{SHARED}]
    statements: [select]
    tables: ["rb.*"]
    max_rows_per_hour: {HOUR}
  free:
    members: [{FREE}]
    statements: [select, copy_out]
    tables: ["rb.*"]
datasets:
  rb.items:
    columns:
      id: {{sensitivity: public}}
      label: {{sensitivity: internal}}
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

    def dsn(self, login: str) -> str:
        return self.proxy.dsn(login, PASSWORD, DATABASE)

    def records(self, kind: str) -> list[dict[str, object]]:
        lines = self.audit_log.read_text().splitlines() if self.audit_log.exists() else []
        return [record for record in map(json.loads, lines) if record.get("type") == kind]


@pytest.fixture(scope="module")
def world(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    upstream.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
    for login in (CAPPED, HOURLY, FREE, CHUNKS, SHARED):
        upstream.execute(f"DROP ROLE IF EXISTS {login}")
        upstream.execute(f"CREATE ROLE {login} LOGIN PASSWORD '{PASSWORD}'")
    upstream.execute(f"CREATE DATABASE {DATABASE}")
    upstream.execute("CREATE SCHEMA rb; CREATE TABLE rb.items (id integer PRIMARY KEY, label text); "
                     "INSERT INTO rb.items SELECT g, 'item ' || g FROM generate_series(1, 100) g; "
                     "CREATE TABLE rb.big AS SELECT g AS id, repeat('x', 100) AS filler "
                     "FROM generate_series(1, 300000) g",
                     dbname=DATABASE)
    logins = ", ".join((CAPPED, HOURLY, FREE, CHUNKS, SHARED))
    upstream.execute(f"GRANT USAGE ON SCHEMA rb TO {logins}; GRANT SELECT ON rb.items, rb.big TO {logins}",
                     dbname=DATABASE)
    directory = tmp_path_factory.mktemp("budgets")
    policy = directory / "policy.yaml"
    policy.write_text(POLICY)
    audit_log = directory / "audit.jsonl"
    with running_proxy(_Database(upstream), policy_path=str(policy), audit_log=str(audit_log),
                       metrics="127.0.0.1:0") as proxy:
        yield World(upstream, proxy, audit_log, policy)


def _is_budget_error(exc: BaseException, limit: str = "max_rows_per_statement", role: str = "capped") -> bool:
    text = str(exc)
    return ("pgveil: row-budget:" in text and limit in text and f"role {role}" in text
            and getattr(exc, "sqlstate", None) == "54000")


def _still_usable(conn: psycopg.Connection) -> None:
    if not conn.autocommit:
        conn.rollback()
    assert conn.execute("SELECT count(*) FROM rb.items").fetchone() == (100,)
    assert len(conn.execute(f"SELECT * FROM rb.items ORDER BY id LIMIT {LIMIT}").fetchall()) == LIMIT


# ---- simple and extended protocol ---------------------------------------------------------------

def test_simple_query_over_budget_is_cut_and_session_usable(world: World) -> None:
    with psycopg.connect(world.dsn(CAPPED), autocommit=True) as conn:
        with pytest.raises(psycopg.Error) as caught:
            conn.execute("SELECT * FROM rb.items ORDER BY id", prepare=False).fetchall()
        # psycopg's execute() uses the extended protocol; pgconn.exec_ sends a simple Query
        assert _is_budget_error(caught.value), caught.value
        result = conn.pgconn.exec_(b"SELECT * FROM rb.items ORDER BY id")
        assert result.error_field(psycopg.pq.DiagnosticField.SQLSTATE) == b"54000"
        assert b"max_rows_per_statement" in (result.error_message or b"")
        assert result.ntuples <= LIMIT
        _still_usable(conn)


def test_a_long_result_is_cancelled_and_the_next_statements_run(world: World) -> None:
    """Many reads' worth of rows: PostgreSQL is still sending when the budget is passed, so the
    statement is cancelled; the statements after it are not (the cancel is taken first)."""
    with psycopg.connect(world.dsn(CAPPED), autocommit=True) as conn:
        for _ in range(3):
            result = conn.pgconn.exec_(b"SELECT * FROM rb.big")
            assert result.error_field(psycopg.pq.DiagnosticField.SQLSTATE) == b"54000"
            for _ in range(5):
                _still_usable(conn)
            with pytest.raises(psycopg.Error) as caught:
                conn.execute("SELECT * FROM rb.big WHERE id > %s", (0,)).fetchall()
            assert _is_budget_error(caught.value), caught.value
            _still_usable(conn)
        with pytest.raises(psycopg.Error) as caught:
            with conn.cursor().copy("COPY rb.big TO STDOUT") as copy:
                for _line in copy.rows():
                    pass
        assert _is_budget_error(caught.value), caught.value
        _still_usable(conn)


def test_multi_statement_query_stops_at_the_breach(world: World) -> None:
    with psycopg.connect(world.dsn(CAPPED), autocommit=True) as conn:
        result = conn.pgconn.exec_(b"SELECT 1; SELECT * FROM rb.items; SELECT 2")
        assert result.error_field(psycopg.pq.DiagnosticField.SQLSTATE) == b"54000"
        _still_usable(conn)


def test_extended_protocol_with_parameters(world: World) -> None:
    with psycopg.connect(world.dsn(CAPPED)) as conn:
        with pytest.raises(psycopg.Error) as caught:
            conn.execute("SELECT * FROM rb.items WHERE id > %s", (0,)).fetchall()
        assert _is_budget_error(caught.value), caught.value
        _still_usable(conn)
        # a prepared statement executed again is counted again
        for _ in range(3):
            assert len(conn.execute("SELECT * FROM rb.items WHERE id <= %s", (LIMIT,), prepare=True).fetchall()) \
                == LIMIT
        with pytest.raises(psycopg.Error):
            conn.execute("SELECT * FROM rb.items WHERE id <= %s", (LIMIT + 1,), prepare=True).fetchall()
        _still_usable(conn)


def test_a_role_without_budget_reads_everything(world: World) -> None:
    with psycopg.connect(world.dsn(FREE)) as conn:
        assert len(conn.execute("SELECT * FROM rb.items").fetchall()) == 100


def test_asyncpg_binary_results(world: World) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(world.dsn(CAPPED))
        try:
            with pytest.raises(asyncpg.PostgresError) as caught:
                await conn.fetch("SELECT * FROM rb.items WHERE id > $1", 0)
            assert _is_budget_error(caught.value), caught.value
            assert await conn.fetchval("SELECT count(*) FROM rb.items") == 100
            assert len(await conn.fetch("SELECT * FROM rb.items LIMIT $1", LIMIT)) == LIMIT
        finally:
            await conn.close()

    asyncio.run(run())


# ---- results in chunks: cursors and portals -------------------------------------------------------

def test_declare_fetch_counts_across_fetches(world: World) -> None:
    with psycopg.connect(world.dsn(CAPPED)) as conn:
        conn.execute("DECLARE c CURSOR FOR SELECT * FROM rb.items ORDER BY id")
        assert len(conn.execute("FETCH 6 FROM c").fetchall()) == 6
        with pytest.raises(psycopg.Error) as caught:  # 6 + 6 > 10
            conn.execute("FETCH 6 FROM c").fetchall()
        assert _is_budget_error(caught.value), caught.value
        conn.rollback()
        # simple protocol too, and a new cursor of the same name starts from zero
        conn.autocommit = True
        conn.pgconn.exec_(b"BEGIN")
        conn.pgconn.exec_(b"DECLARE c CURSOR FOR SELECT * FROM rb.items ORDER BY id")
        assert conn.pgconn.exec_(b"FETCH 5 IN c").ntuples == 5
        assert conn.pgconn.exec_(b"FETCH FORWARD 5 c").ntuples == 5
        result = conn.pgconn.exec_(b"FETCH 1 FROM c")
        assert result.error_field(psycopg.pq.DiagnosticField.SQLSTATE) == b"54000"
        conn.pgconn.exec_(b"ROLLBACK")
        _still_usable(conn)


def test_server_side_cursor_of_psycopg(world: World) -> None:
    with psycopg.connect(world.dsn(CAPPED)) as conn:
        seen = 0
        with pytest.raises(psycopg.Error) as caught, conn.cursor(name="named") as cursor:
            cursor.itersize = 4
            cursor.execute("SELECT * FROM rb.items ORDER BY id")
            for _row in cursor:
                seen += 1
        assert _is_budget_error(caught.value), caught.value
        assert seen <= LIMIT
        conn.rollback()
        _still_usable(conn)


def test_asyncpg_portal_in_chunks(world: World) -> None:
    """asyncpg's cursor executes one portal with Execute(max_rows=prefetch): the chunks add up."""
    async def run() -> int:
        conn = await asyncpg.connect(world.dsn(CHUNKS))
        seen = 0
        try:
            with pytest.raises(asyncpg.PostgresError) as caught:
                async with conn.transaction():
                    async for _row in conn.cursor("SELECT * FROM rb.items ORDER BY id", prefetch=3):
                        seen += 1
            assert _is_budget_error(caught.value, role="chunks"), caught.value
            assert await conn.fetchval("SELECT count(*) FROM rb.items") == 100
            async with conn.transaction():  # within the budget, chunks pass
                rows = [row async for row in conn.cursor("SELECT * FROM rb.items ORDER BY id LIMIT 10",
                                                         prefetch=3)]
            assert len(rows) == LIMIT
        finally:
            await conn.close()
        return seen

    assert asyncio.run(run()) <= LIMIT


# ---- COPY -------------------------------------------------------------------------------------------

def test_copy_to_stdout(world: World) -> None:
    with psycopg.connect(world.dsn(CAPPED)) as conn:
        lines = []
        with pytest.raises(psycopg.Error) as caught:
            with conn.cursor().copy("COPY rb.items TO STDOUT") as copy:
                for line in copy.rows():
                    lines.append(line)
        assert _is_budget_error(caught.value), caught.value
        assert len(lines) <= LIMIT
        conn.rollback()
        _still_usable(conn)
    with psycopg.connect(world.dsn(FREE)) as conn, conn.cursor().copy("COPY rb.items TO STDOUT") as copy:
        assert len(list(copy.rows())) == 100


@pytest.mark.skipif(shutil.which("psql") is None, reason="psql is not installed")
def test_psql_backslash_copy(world: World, tmp_path: Path) -> None:
    out = tmp_path / "items.txt"
    done = subprocess.run(["psql", world.dsn(CAPPED), "-X", "-v", "ON_ERROR_STOP=1", "-c",
                           f"\\copy rb.items to '{out}'"], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "row-budget" in done.stderr and "max_rows_per_statement" in done.stderr
    assert len(out.read_text().splitlines()) <= LIMIT if out.exists() else True
    done = subprocess.run(["psql", world.dsn(CAPPED), "-X", "-At", "-c", "SELECT count(*) FROM rb.items"],
                          capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "100"


# ---- the rolling hour, records, metrics -----------------------------------------------------------

def test_hourly_budget_per_login_across_connections(world: World) -> None:
    with psycopg.connect(world.dsn(HOURLY)) as conn:
        assert len(conn.execute("SELECT * FROM rb.items LIMIT 10").fetchall()) == 10
        assert len(conn.execute("SELECT * FROM rb.items LIMIT 10").fetchall()) == 10
        with pytest.raises(psycopg.Error) as caught:  # 20 + 10 > 25
            conn.execute("SELECT * FROM rb.items LIMIT 10").fetchall()
        assert _is_budget_error(caught.value, "max_rows_per_hour", "hourly"), caught.value
        conn.rollback()
        conn.execute("SET application_name = 'still usable'")  # no rows: the session goes on
    with psycopg.connect(world.dsn(HOURLY)) as conn:  # a new connection of the login: spent too
        with pytest.raises(psycopg.Error) as caught:
            conn.execute("SELECT 1").fetchall()
        assert _is_budget_error(caught.value, "max_rows_per_hour", "hourly"), caught.value


def test_breaches_are_audited_and_counted(world: World) -> None:
    with psycopg.connect(world.dsn(CAPPED), autocommit=True) as conn:
        conn.pgconn.exec_(b"SELECT * FROM rb.items")
    records = [r for r in world.records("budget") if r.get("login") == CAPPED]
    assert records, "no budget record"
    record = records[-1]
    assert record["limit"] == "max_rows_per_statement" and record["limit_value"] == LIMIT
    assert record["rows"] == LIMIT and record["role"] == "capped"
    assert record["fingerprint"] and record["client_address"]
    exposition = world.proxy.hooks.observer.exposition().decode()
    assert 'pgveil_row_budget_breaches_total{limit="max_rows_per_statement",role="capped"}' in exposition


# ---- two pgveil processes sharing a state store ---------------------------------------------------

def _rows_or_breach(dsn: str) -> int | None:
    """Rows a 10-row statement passed, or None when it was cut by the hourly budget."""
    with psycopg.connect(dsn) as conn:
        try:
            return len(conn.execute("SELECT * FROM rb.items LIMIT 10").fetchall())
        except psycopg.Error as exc:
            assert _is_budget_error(exc, "max_rows_per_hour", "shared"), exc
            return None


def test_hourly_budget_across_two_replicas(world: World, tmp_path: Path) -> None:
    """Replica A hands the login 20 rows; replica B, sharing the state store, cuts the login's
    next statements long before B's own 25 rows (alone, B would pass two 10-row statements)."""
    upstream = world.upstream
    upstream.execute(f"DROP DATABASE IF EXISTS {STATE_DATABASE} WITH (FORCE)")
    upstream.execute(f"CREATE DATABASE {STATE_DATABASE}")
    replicas: list[ServeProcess] = []
    try:
        for index in range(2):
            replicas.append(spawn_serve(
                "--upstream", upstream.dsn(dbname=DATABASE), "--policy", str(world.policy),
                "--listen", "127.0.0.1:0", "--audit-log", str(tmp_path / f"audit-{index}.jsonl"),
                "--state-dsn", upstream.dsn(dbname=STATE_DATABASE)))
        a, b = (replica.dsn(SHARED, PASSWORD, DATABASE) for replica in replicas)
        assert _rows_or_breach(a) == 10 and _rows_or_breach(a) == 10

        def stored() -> int:
            with psycopg.connect(upstream.dsn(dbname=STATE_DATABASE)) as conn:
                row = conn.execute("SELECT coalesce(sum(rows), 0) FROM pgveil_state.row_budget "
                                   "WHERE login = %s", (SHARED,)).fetchone()
            return int(row[0]) if row else 0

        wait_until(lambda: stored() >= 20, "replica A's rows in the state store")
        # B reads the login's total within a flush interval of its connection: its first statement
        # may still pass on B's own count; once B's rows are in the store, B knows the total too
        first = _rows_or_breach(b)
        if first is not None:
            wait_until(lambda: stored() >= 30, "replica B's rows in the state store")
            assert _rows_or_breach(b) is None, "B passed 20 rows of a login that had 20 of its 25 already"
        records = [json.loads(line) for line in (tmp_path / "audit-1.jsonl").read_text().splitlines()]
        assert any(r.get("type") == "budget" and r.get("limit") == "max_rows_per_hour" for r in records)
    finally:
        for replica in replicas:
            replica.terminate()
        for replica in replicas:
            try:
                replica.wait(30)
            finally:
                replica.__exit__(None, None, None)


# ---- what the relay does (and does not do) -------------------------------------------------------

def _relay_of(world: World, login: str) -> object:
    relays = [session.relay for session in world.proxy.server.sessions
              if getattr(session, "relay", None) is not None and f" {login}@" in session.label]
    assert len(relays) == 1, relays
    return relays[0]


def test_no_guard_without_a_budget_or_honeytokens(world: World) -> None:
    """A role without a budget, under a policy without honeytokens: the relay has no DataGuard
    and watches what it watched before row budgets existed (rows are not even framed whole)."""
    with psycopg.connect(world.dsn(FREE)) as free, psycopg.connect(world.dsn(CAPPED)) as capped:
        free.execute("SELECT 1").fetchall()
        capped.execute("SELECT 1").fetchall()
        assert getattr(_relay_of(world, FREE), "_guard") is None
        assert getattr(_relay_of(world, FREE), "_counting") is False
        assert getattr(_relay_of(world, CAPPED), "_guard") is not None
        assert getattr(_relay_of(world, CAPPED), "_counting") is True


def test_scanner_counts_rows_within_its_quota_and_reports_the_rest() -> None:
    """The scanner's counted kind, fed a stream of rows and result ends cut at random places with
    random quotas: every byte passes, rows within the quota are counted (not reported), every
    other row is reported whole, and each reported message's mark is the count so far."""
    import random

    from proxy.wire import BACKEND_TAGS, MessageScanner

    def message(tag: bytes, body: bytes) -> bytes:
        return tag + (len(body) + 4).to_bytes(4, "big") + body

    rng = random.Random(12)
    for _ in range(200):
        stream = b"".join(
            message(b"D", b"x" * rng.randint(0, 300)) if rng.random() < 0.85 else message(b"C", b"SELECT 1\x00")
            for _ in range(rng.randint(1, 60)))
        scanner = MessageScanner(b"CEZ", BACKEND_TAGS, 1 << 20, b"", b"Dd")
        scanner.quota = rng.choice((-1, 0, rng.randint(0, 40)))
        out, reported, pos = b"", 0, 0
        while pos < len(stream):
            step = rng.randint(1, 700)
            emit, spans = scanner.feed(stream[pos : pos + step])
            pos += step
            assert len(scanner.marks) == len(spans) or not spans
            for (tag, start, end), mark in zip(spans, scanner.marks, strict=False):
                assert end <= len(emit) and emit[start] == tag
                assert mark + reported <= stream.count(b"D") and mark <= scanner.counted
                if tag == ord("D"):
                    reported += 1
            out += emit
            if rng.random() < 0.2:
                scanner.quota = rng.randint(0, 5)
        assert out == stream
        rows = 0
        at = 0
        while at < len(stream):
            rows += stream[at] == ord("D")
            at += 1 + int.from_bytes(stream[at + 1 : at + 5], "big")
        assert scanner.counted + reported == rows
