"""Masked SELECTs repeated in the simple protocol run as EXECUTE of a statement pgveil prepared on the
upstream connection: the client gets exactly what the inline rewrite gives (rows, types, errors and
their positions), and the statement is only relied on once PostgreSQL confirmed it."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from proxy.connection_policy import ClientInfo
from proxy.enforcement import Enforcement
from proxy.guard.cache import VerdictCache
from proxy.guard.pipeline import analyse
from proxy.guard.upstream_prepare import NAME_PREFIX, prepared_form
from proxy.guard.verdict import Refuse, Rewrite, UpstreamTicket
from tests.conftest import Upstream
from tests.guard_setup import DATABASE, PASSWORD, POLICY, GuardWorld, build_world, leaked_canaries, world  # noqa: F401
from tests.guard_setup import GuardDatabase as _GuardDatabase
from tests.proxy_harness import RunningProxy, running_proxy
from tests.test_bypass_guard import ATTEMPTS

LOGIN = "gv_public"  # masked columns, no row filter


@pytest.fixture(scope="module")
def gv_world(request: pytest.FixtureRequest) -> GuardWorld:
    return request.getfixturevalue("world")  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def proxy(gv_world: GuardWorld) -> Iterator[RunningProxy]:
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "policy.yaml")
        with open(path, "w") as handle:
            handle.write(POLICY)
        with running_proxy(_GuardDatabase(gv_world), path) as running:
            yield running


def _connect(proxy: RunningProxy, login: str = LOGIN) -> psycopg.Connection[Any]:
    return psycopg.connect(proxy.dsn(login, PASSWORD, "guard_test"), autocommit=True)


Answer = tuple[list[tuple[Any, ...]], list[tuple[str, int]], str]


def _simple(conn: psycopg.Connection[Any], sql: str) -> Answer:
    with psycopg.ClientCursor(conn) as cur:
        cur.execute(sql.encode())  # type: ignore[arg-type]
        description = [(column.name, column.type_code) for column in cur.description or ()]
        return (cur.fetchall() if cur.description else []), description, cur.statusmessage or ""


def _ours(conn: psycopg.Connection[Any]) -> list[str]:
    rows = _simple(conn, "SELECT name FROM pg_catalog.pg_prepared_statements ORDER BY name")[0]
    names = [name.decode() if isinstance(name, bytes) else name for (name,) in rows]  # (SQL_ASCII)
    return [name for name in names if name.startswith(NAME_PREFIX)]


def _inline(gv_world: GuardWorld, sql: str) -> Answer:
    verdict = gv_world.verdict(sql, LOGIN)
    assert isinstance(verdict, Rewrite)
    return _simple(gv_world.connection(LOGIN), verdict.sql)


def test_a_repeated_masked_select_runs_prepared_and_answers_as_the_inline_rewrite(
        proxy: RunningProxy, gv_world: GuardWorld) -> None:
    with _connect(proxy) as conn:
        for person in (1, 2, 3, 1, 2, 99):  # (4 is the row filter canary of another role)
            sql = f"SELECT * FROM gv.people WHERE id = {person}"
            through = _simple(conn, sql)
            assert through == _inline(gv_world, sql)
            assert not leaked_canaries(repr(through))
        assert len(_ours(conn)) == 1  # one statement for the shape, prepared once


def test_in_lists_limit_and_offset_are_parameters_too(proxy: RunningProxy, gv_world: GuardWorld) -> None:
    shape = "SELECT id, email FROM gv.people WHERE id IN ({}, {}) ORDER BY id LIMIT {} OFFSET {}"
    with _connect(proxy) as conn:
        for values in ((1, 2, 5, 0), (2, 3, 1, 0), (1, 3, 5, 1), (3, 1, 0, 0)):
            sql = shape.format(*values)
            assert _simple(conn, sql) == _inline(gv_world, sql)
        assert len(_ours(conn)) == 1


def test_the_prepared_statement_holds_the_masked_rewrite(proxy: RunningProxy) -> None:
    with _connect(proxy) as conn:
        _simple(conn, "SELECT ssn, email FROM gv.people WHERE id = 1")
        _simple(conn, "SELECT ssn, email FROM gv.people WHERE id = 2")
        statement = _simple(conn, "SELECT statement FROM pg_catalog.pg_prepared_statements "
                                  f"WHERE name LIKE '{NAME_PREFIX}%'")[0][0][0]
        assert "pgveil.mask_hash" in statement and "$1" in statement
        assert not leaked_canaries(statement)


def test_an_error_in_the_first_execution_has_the_clients_position(proxy: RunningProxy) -> None:
    sql = "SELECT id FROM gv.people WHERE id = 1 AND nosuch = 2"
    with _connect(proxy) as conn:
        for _ in range(3):  # inline, then PREPARE and EXECUTE, then again (a failed PREPARE is not relied on)
            with pytest.raises(psycopg.errors.UndefinedColumn) as caught:
                _simple(conn, sql)
            assert caught.value.diag.statement_position == str(sql.index("nosuch") + 1)
        assert _ours(conn) == []
        assert _simple(conn, "SELECT id FROM gv.people WHERE id = 2")[0] == [(2,)]


def test_a_failed_prepare_in_an_aborted_transaction_is_prepared_again_later(proxy: RunningProxy) -> None:
    sql = "SELECT id, full_name FROM gv.people WHERE id = 3"
    with _connect(proxy) as conn:
        conn.autocommit = False
        with pytest.raises(psycopg.errors.DivisionByZero):
            _simple(conn, "SELECT 1/0")
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            _simple(conn, sql)
        conn.rollback()
        conn.autocommit = True
        assert _simple(conn, sql)[0] == [(3, "B********")]
        assert _simple(conn, sql.replace("3", "2"))[0] == [(2, "A********")]


def test_deallocate_all_by_the_client_makes_pgveil_prepare_again(proxy: RunningProxy) -> None:
    with _connect(proxy) as conn:
        for _ in range(2):
            rows = _simple(conn, "SELECT id, card FROM gv.people WHERE id = 1")[0]
            assert rows == [(1, "***************1098")]
        first = _ours(conn)
        _simple(conn, "DEALLOCATE ALL")
        assert _simple(conn, "SELECT id, card FROM gv.people WHERE id = 2")[0] == [(2, "***************0004")]
        second = _ours(conn)
        assert len(first) == len(second) == 1 and first != second


def test_a_client_closing_pgveils_statement_by_name_makes_it_prepare_again(proxy: RunningProxy) -> None:
    with _connect(proxy) as conn:
        _simple(conn, "SELECT id, email FROM gv.people WHERE id = 1")
        _simple(conn, "SELECT id, email FROM gv.people WHERE id = 3")
        (name,) = _ours(conn)
        _simple(conn, f"DEALLOCATE {name}")
        assert _simple(conn, "SELECT id, email FROM gv.people WHERE id = 2")[0] == [(2, "a***@example.com")]


@pytest.mark.parametrize("sql", [
    "SELECT id, full_name FROM gv.people WHERE full_name = 'Ann Other'",  # string literal
    "SELECT id, full_name FROM gv.people WHERE id = 1 ORDER BY 1",  # positional reference
    "SELECT id, salary::numeric(10, 2) FROM gv.people WHERE id = 1",  # type modifiers
    "SELECT id, full_name FROM gv.people WHERE id = 1.0",  # not an integer
    "SELECT id, full_name FROM gv.people WHERE id = 1 AND email IS NOT NULL",  # NULL
    "SELECT id + 1 FROM gv.people WHERE id = 1",  # a literal that is not compared with a column
    "SELECT id FROM gv.people WHERE id = -1",  # negative: the constant is not the token
])
def test_statements_whose_literals_must_stay_literal_are_sent_inline(
        proxy: RunningProxy, gv_world: GuardWorld, sql: str) -> None:
    with _connect(proxy) as conn:
        for _ in range(2):
            assert _simple(conn, sql) == _inline(gv_world, sql)
        assert _ours(conn) == []


def test_a_parameter_in_a_simple_query_stays_postgresqls_error(proxy: RunningProxy) -> None:
    """`$1` in a Query is an error; pgveil's own `$1` must not give it a value."""
    sql = "SELECT id FROM gv.people WHERE id = 1 AND id = $1"
    with _connect(proxy) as conn:
        for _ in range(3):
            with pytest.raises(psycopg.Error) as caught:
                _simple(conn, sql)
            assert caught.value.diag.sqlstate in ("42P02", "42501")  # PostgreSQL's, or pgveil refuses
        assert _ours(conn) == []


def test_the_prepared_form_keeps_the_literal_out_of_the_template(gv_world: GuardWorld) -> None:
    first = "SELECT * FROM gv.people p WHERE p.id = 5 AND p.id <> 6"
    sql = "SELECT * FROM gv.people p WHERE p.id = 2147483648 AND p.id <> 7"
    cache = VerdictCache()
    cache.store(first, "k", analyse(first, gv_world.context(LOGIN)))
    assert prepared_form(first, analyse(first, gv_world.context(LOGIN)).verdict, row_filtered=False) is None
    hit = cache.lookup(sql, "k")
    assert hit is not None and isinstance(hit.verdict, Rewrite)
    form = prepared_form(sql, hit.verdict, row_filtered=False)
    assert form is not None
    assert form.types == ("bigint", "integer") and form.arguments == ("2147483648", "7")
    assert "2147483648" not in form.template and " $1 " in form.template and "<> $2" in form.template
    assert prepared_form(sql, hit.verdict, row_filtered=True) is None


async def test_a_change_of_role_in_the_session_makes_pgveil_forget_its_statements(
        gv_world: GuardWorld, tmp_path: Path) -> None:
    """While elevated (unmasked) a login could deallocate pgveil's statement and prepare its own
    under the same name by means pgveil does not read (DO, dynamic SQL): it must not be EXECUTEd."""
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    elevated: set[str] = set()
    role_of: dict[str, str] = {}
    enforcement = await Enforcement.create(
        str(path), gv_world.dsn(),
        active_role=lambda user: "admin" if user in elevated else role_of.get("login"))
    try:
        connection = enforcement.connection_policy()
        client = ClientInfo(1, "test", LOGIN, DATABASE, "", False)
        assert await connection.on_startup({"user": LOGIN, "database": DATABASE}, client) is None
        sql = "SELECT id, ssn FROM gv.people WHERE id = {}"
        await connection.on_query(sql.format(1))
        prepared = await connection.on_query(sql.format(2))
        assert isinstance(prepared, Rewrite) and prepared.prepares is not None
        assert prepared.sql.startswith(f"PREPARE {prepared.prepares.name}(integer) AS ")
        prepared.prepares.state = UpstreamTicket.READY  # as the relay does on PREPARE's CommandComplete
        executed = await connection.on_query(sql.format(3))
        assert executed.sql == f"EXECUTE {prepared.prepares.name}(3)"
        elevated.add(LOGIN)
        assert not isinstance(await connection.on_query("SELECT 1"), Refuse)
        elevated.clear()
        again = await connection.on_query(sql.format(4))
        assert isinstance(again, Rewrite) and again.prepares is not None
        assert again.prepares.name != prepared.prepares.name and again.sql.startswith("PREPARE ")
        again.prepares.state = UpstreamTicket.READY
        # another masked role (an elevation to one that sees more) forgets them too
        role_of["login"] = "writer"
        await connection.on_query(sql.format(5))
        role_of.clear()
        third = await connection.on_query(sql.format(6))
        assert isinstance(third, Rewrite) and third.prepares is not None
        assert third.prepares.name not in (again.prepares.name, prepared.prepares.name)
        assert third.sql.startswith("PREPARE ")
    finally:
        await enforcement.close()


def test_pipelined_statements_of_a_new_shape_do_not_rely_on_an_unconfirmed_prepare(
        proxy: RunningProxy, gv_world: GuardWorld) -> None:
    with _connect(proxy) as conn, conn.pipeline():
        cursors = []
        for person in (1, 2, 3):
            cur = psycopg.ClientCursor(conn)
            cur.execute(f"SELECT id, ssn FROM gv.people WHERE id = {person}".encode())  # type: ignore[arg-type]
            cursors.append(cur)
        conn.pipeline  # noqa: B018
    with _connect(proxy) as conn:
        for person in (1, 2, 3):
            sql = f"SELECT id, ssn FROM gv.people WHERE id = {person}"
            assert _simple(conn, sql)[0] == _inline(gv_world, sql)[0]


def test_columns_changed_behind_pgveils_back_are_never_served_raw(
        proxy: RunningProxy, gv_world: GuardWorld) -> None:
    sql = "SELECT * FROM gv.people WHERE id = 1"
    outcomes: list[str] = []
    with _connect(proxy) as conn, psycopg.connect(gv_world.dsn(), autocommit=True) as su:
        try:
            for change in ("ADD COLUMN prep_extra text DEFAULT 'DDL-SECRET-2'",
                           "ALTER COLUMN city TYPE varchar(40)", "RENAME COLUMN prep_extra TO prep_renamed"):
                for _ in range(3):
                    try:
                        _simple(conn, sql)
                    except psycopg.Error as exc:
                        outcomes.append(f"{exc.diag.sqlstate} {exc.diag.message_primary}")
                su.execute(f"ALTER TABLE gv.people {change}")
                for _ in range(4):
                    try:
                        rows = _simple(conn, sql)
                    except psycopg.Error as exc:
                        outcomes.append(f"{exc.diag.sqlstate} {exc.diag.message_primary}")
                        continue
                    assert not leaked_canaries(repr(rows)) and "DDL-SECRET" not in repr(rows)
                    outcomes.append("ok")
        finally:
            su.execute("ALTER TABLE gv.people DROP COLUMN IF EXISTS prep_extra")
            su.execute("ALTER TABLE gv.people DROP COLUMN IF EXISTS prep_renamed")
            su.execute("ALTER TABLE gv.people ALTER COLUMN city TYPE text")
    # like any prepared statement's, the first execution after a column's type changed fails once
    # (0A000); pgveil then prepares the statement anew
    changed = "0A000 cached plan must not change result type"
    assert outcomes.count(changed) <= 1
    assert all(outcome in ("ok", changed) for outcome in outcomes), outcomes


@pytest.mark.parametrize("login", [LOGIN, "gv_writer"])
def test_every_bypass_attempt_answers_alike_inline_and_prepared(proxy: RunningProxy, login: str) -> None:
    """Each single-statement read of the bypass suite, three times through pgveil (the later ones
    prepared where pgveil prepares them) for a masked login: the same answer each time (rows, or
    SQLSTATE), and no canary in any of them."""
    prepared = 0
    single = [sql for _, sql in ATTEMPTS if ";" not in sql.strip().rstrip(";")
              and sql.lstrip().lower().startswith(("select", "with", "table", "values", "("))]
    assert len(single) > 50
    for sql in single:
        with _connect(proxy, login) as conn:  # (some attempts change the session's settings)
            answers = []
            for _ in range(3):
                try:
                    answers.append(repr(_simple(conn, sql)))
                except psycopg.Error as exc:
                    answers.append(f"{exc.diag.sqlstate} {exc.diag.message_primary}")
            assert answers[0] == answers[1] == answers[2], sql
            leaked = [canary for canary in leaked_canaries(answers[0])
                      if canary not in sql and canary != "HIDDENCITY"]  # the statement's own; a city it sees
            assert not leaked, sql
            with contextlib.suppress(psycopg.Error):  # a session some attempt left refusing everything
                prepared += bool(_ours(conn))
    assert prepared >= 5  # the mechanism was exercised


def test_postgresql_15_answers_alike_inline_and_prepared(upstream15: Upstream) -> None:
    world15 = build_world(upstream15)
    try:
        with tempfile.TemporaryDirectory() as directory:
            path = os.path.join(directory, "policy.yaml")
            with open(path, "w") as handle:
                handle.write(POLICY)
            with running_proxy(_GuardDatabase(world15), path) as running, _connect(running) as conn:
                for person in (1, 2, 3, 2):
                    for sql in (f"SELECT * FROM gv.people WHERE id = {person}",
                                f"SELECT id, ssn FROM gv.people WHERE id IN ({person}, 9) LIMIT 3"):
                        assert _simple(conn, sql) == _inline(world15, sql)
                assert len(_ours(conn)) == 2
    finally:
        for connection in world15.connections.values():
            connection.close()
