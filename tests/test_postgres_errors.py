"""Errors pgveil passes as PostgreSQL's own: syntax errors, unknown relations and prepared statements,
error positions in the client's text, invalid bytes and client encodings, each compared field by field
(severity, SQLSTATE, message, position) with what PostgreSQL 18 and 15 answer straight."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from proxy.embedded import bin_dir
from proxy.wire import ErrorResponse
from proxy.wire.frontend import Bind, Execute, Sync
from tests import guard_setup
from tests.conftest import Upstream
from tests.guard_setup import DATABASE, PASSWORD, POLICY, GuardDatabase, GuardWorld, leaked_canaries
from tests.proxy_harness import RawClient, RunningProxy, running_proxy

MASKED = "gv_analyst"  # row filter and masked columns on gv.people
WRITER = "gv_writer"  # masked, may write gv.scratch
ADMIN = "gv_admin"  # sees everything


class Veil:
    """pgveil with the guard test policy in front of one PostgreSQL (18 or 15)."""

    def __init__(self, world: GuardWorld, proxy: RunningProxy) -> None:
        self.world = world
        self.proxy = proxy

    def direct(self, login: str, **kwargs: Any) -> psycopg.Connection[Any]:
        return psycopg.connect(self.world.dsn(login), autocommit=True, **kwargs)

    def veiled(self, login: str, **kwargs: Any) -> psycopg.Connection[Any]:
        return psycopg.connect(self.proxy.dsn(login, PASSWORD, DATABASE), autocommit=True, **kwargs)


@pytest.fixture(scope="module")
def veil(upstream_any: Upstream) -> Iterator[Veil]:
    key = (upstream_any.host, upstream_any.port)
    if key not in guard_setup._BUILT:
        guard_setup._BUILT[key] = guard_setup.build_world(upstream_any)
    world = guard_setup._BUILT[key]
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "policy.yaml")
        with open(path, "w") as handle:
            handle.write(POLICY)
        with running_proxy(GuardDatabase(world), path) as proxy:
            yield Veil(world, proxy)


def error_of(conn: psycopg.Connection[Any], sql: str | bytes, prepare: bool = False) -> tuple[Any, ...]:
    """(severity, severity_nonlocalized, SQLSTATE, message, position) of the error `sql` raises."""
    with pytest.raises(psycopg.Error) as raised:
        if prepare:
            conn.execute(sql, (), prepare=True)  # type: ignore[call-overload]
        else:
            conn.execute(sql)  # type: ignore[call-overload]
    diag = raised.value.diag
    return (diag.severity, diag.severity_nonlocalized, diag.sqlstate, diag.message_primary,
            diag.statement_position)


def same_error(veil: Veil, login: str, sql: str | bytes, prepare: bool = False,
               encoding: str | None = None) -> tuple[Any, ...]:
    """The error through pgveil, asserted equal to PostgreSQL's straight for the same login."""
    answers = []
    for connect in (veil.direct, veil.veiled):
        with connect(login) as conn:
            if encoding is not None:
                conn.execute(f"set client_encoding = '{encoding}'")
            answers.append(error_of(conn, sql, prepare))
            assert conn.execute("select 1").fetchone() == (1,)  # the session goes on
    assert answers[1] == answers[0]
    return answers[1]


TYPOS = [
    "SELEC 1",
    "SELECT 1 FROM",
    "select id from gv.orders wher id = 10",
    "SELECT 'abc",
    'SELECT "abc',
    "select $$ x",
    "SELECT 1e",
    "select 'é€' as x, ééé FRM gv.orders",
    "SELECT 1 LIMIT 1,2",
    "SELECT UNIQUE (SELECT 1)",
    "select 1;\n  selec 2",
    "select * from gv.people where\n  id = = 1",
    "SELECT U&'\\D800'",
]


@pytest.mark.parametrize("login", [MASKED, ADMIN])
@pytest.mark.parametrize("sql", TYPOS)
def test_a_syntax_error_is_postgresqls_own_error_with_its_position(veil: Veil, login: str, sql: str) -> None:
    severity, _, sqlstate, message, position = same_error(veil, login, sql)
    assert severity == "ERROR" and sqlstate in ("42601", "0A000") and position is not None
    assert "pgveil" not in message


def test_a_syntax_error_reads_as_postgresql_18s_grammar_words_it(veil: Veil) -> None:
    # pgveil parses with PostgreSQL 18's grammar (libpg_query): where older servers word a syntax
    # error otherwise (15: "trailing junk after numeric literal"), the client gets 18's words.
    with veil.veiled(ADMIN) as conn:
        assert error_of(conn, "SELECT 0x")[2:] == (
            "42601", 'invalid hexadecimal integer at or near "0x"', "8")


def test_a_syntax_error_in_the_extended_protocol_is_postgresqls_own(veil: Veil) -> None:
    for login in (MASKED, ADMIN):
        assert same_error(veil, login, "select id frm gv.orders", prepare=True)[2] == "42601"


def test_a_syntax_error_in_a_later_statement_runs_nothing_of_the_query(veil: Veil) -> None:
    with veil.veiled(WRITER) as conn:
        conn.execute("delete from gv.scratch where id = 7001")
        with pytest.raises(psycopg.errors.SyntaxError):
            conn.execute("insert into gv.scratch (id) values (7001); selec 1")
        assert conn.execute("select count(*) from gv.scratch where id = 7001").fetchone() == (0,)


@pytest.mark.parametrize(("login", "sql"), [
    (ADMIN, "SELECT id FROM gv.orders WHERE nme = 'x'"),  # no masking: only qualified
    (MASKED, "SELECT id FROM gv.orders WHERE nme = 'x'"),
    (MASKED, "select full_name from gv.people where nme = 'x'"),  # a masked derived table before it
    (MASKED, "select p.email, o.amount from gv.people p join gv.orders o on o.person_id = p.id "
             "where o.nme = 1"),
    (MASKED, "select 'é' as a, full_name from people where nme = 'x'"),  # search_path resolution
    (MASKED, "select 1; select full_name from gv.people where\n nme = 'x'"),
    (MASKED, "select id from gv.people where id = 'abc'::int"),
])
def test_an_error_position_points_into_the_clients_text(veil: Veil, login: str, sql: str) -> None:
    with veil.direct("postgres") as conn:  # `people` as search_path finds it for every login
        conn.execute(f"alter role {login} in database {DATABASE} set search_path = gv")
    try:
        for prepare in (False, True):
            if prepare and ";" in sql:
                continue
            position = same_error(veil, login, sql, prepare=prepare)[4]
            assert position is not None
    finally:
        with veil.direct("postgres") as conn:
            conn.execute(f"alter role {login} in database {DATABASE} reset search_path")


def test_an_error_position_on_a_verdict_cache_hit_follows_the_new_literals(veil: Veil) -> None:
    template = "select full_name from gv.people where id = {} and nme = 'x'"
    for literal in ("1", "123456", "2"):  # the second and third are cache hits of the first's shape
        assert same_error(veil, MASKED, template.format(literal))[4] == str(49 + len(literal))


@pytest.mark.parametrize("template", ["select {} as x frm gv.orders", "select {} as x, * from gv.nope"])
def test_a_refusal_with_a_position_is_not_reused_for_other_literals(veil: Veil, template: str) -> None:
    for literal in ("'a'", "'abcdef'", "1", "123456"):  # one shape: a cached refusal would keep 'a'
        same_error(veil, MASKED, template.format(literal))


def test_an_error_position_in_a_pipeline_belongs_to_the_statement_that_failed(veil: Veil) -> None:
    answers = []
    for connect in (veil.direct, veil.veiled):
        with connect(MASKED) as conn:
            with pytest.raises(psycopg.errors.UndefinedColumn) as raised, conn.pipeline():
                conn.execute("select full_name from gv.people where id = %s", (1,))
                conn.execute("select email from gv.people where id = %s and nme = 1", (1,))
            answers.append((raised.value.diag.message_primary, raised.value.diag.statement_position))
    assert answers[1] == answers[0]


@pytest.mark.parametrize("sql", [
    "select * from gv.nope",
    "select * from nope",
    'select o.id from gv.orders o, "Nope"',
    "select 1; select * from guard_test.gv.nope x",
    "insert into gv.nope values (1)",
    "copy gv.nope to stdout",
])
def test_an_unknown_relation_is_postgresqls_42p01_for_a_masked_role(veil: Veil, sql: str) -> None:
    login = WRITER if sql.startswith("insert") else MASKED
    assert same_error(veil, login, sql)[2] == "42P01"


@pytest.mark.parametrize("sql", ["execute nope", "explain execute nope", "execute nope(1)",
                                 "fetch next from nope"])
def test_an_unknown_prepared_statement_or_cursor_is_postgresqls_own_error(veil: Veil, sql: str) -> None:
    for login in (MASKED, ADMIN):
        with veil.direct(login) as conn:
            conn.execute("begin")
            direct = error_of(conn, sql)
            conn.execute("rollback")
        with veil.veiled(login) as conn:
            conn.execute("begin")
            veiled = error_of(conn, sql)
            conn.execute("rollback")
        assert veiled == direct and direct[2] in ("26000", "34000")


def test_executing_a_deallocated_statement_is_26000(veil: Veil) -> None:
    with veil.veiled(MASKED) as conn:
        conn.execute("prepare short_lived as select id from gv.orders where id = 10")
        assert conn.execute("execute short_lived").fetchall() == [(10,)]
        conn.execute("deallocate short_lived")
        with pytest.raises(psycopg.errors.InvalidSqlStatementName,
                           match='prepared statement "short_lived" does not exist'):
            conn.execute("execute short_lived")
        assert conn.execute("select 1").fetchone() == (1,)


def raw_errors(host: str, port: int, user: str, *messages: Any) -> list[tuple[tuple[str, str], ...]]:
    with RawClient.connect(host, port, user=user, database=DATABASE) as client:
        client.send(*messages)
        return [tuple(sorted((code, value) for code, value in m.fields if code in "SVCMP"))
                for m in client.until_ready() if isinstance(m, ErrorResponse)]


def test_a_bind_of_an_unknown_statement_is_26000_named_or_unnamed(veil: Veil) -> None:
    # trust logins: the harness's RawClient has no password exchange, so ask the superuser's way
    upstream = veil.world.upstream
    for name in ("nope", ""):
        messages = (Bind("", name, (), (), ()), Execute("", 0), Sync())
        direct = raw_errors(upstream.host, upstream.port, "postgres", *messages)
        assert direct and dict(direct[0])["C"] == "26000"
        with veil.veiled(MASKED) as conn:
            result = conn.pgconn.exec_prepared(name.encode(), [])
            assert result.error_field(ord("C")) == b"26000"
            assert (result.error_field(ord("M")) or b"").decode() == dict(direct[0])["M"]


def test_invalid_utf8_is_postgresqls_22021(veil: Veil) -> None:
    for login in (MASKED, ADMIN):
        for raw in (b"select '\xc3('", b"select 1 as \xff", b"select '\xe2\x82'", b"select '\xed\xa0\x80'"):
            answers = []
            for connect in (veil.direct, veil.veiled):
                with connect(login) as conn:
                    result = conn.pgconn.exec_(raw)
                    answers.append(tuple(result.error_field(ord(c)) for c in "SVCMP"))
                    result = conn.pgconn.prepare(b"", raw)  # a Parse message
                    answers.append(tuple(result.error_field(ord(c)) for c in "SVCMP"))
            assert answers[2:] == answers[:2] and answers[0][2] == answers[1][2] == b"22021"


def test_asyncpg_gets_the_same_errors_and_positions(veil: Veil) -> None:
    import asyncio

    import asyncpg

    statements = ["selec 1", "select full_name from gv.people where nme = $1", "select * from gv.nope",
                  "select p.email from gv.people p where p.id = $1 and\n o.x = 1"]

    async def errors(dsn: str) -> list[tuple[Any, ...]]:
        conn = await asyncpg.connect(dsn)
        try:
            found = []
            for sql in statements:
                with pytest.raises(asyncpg.PostgresError) as raised:
                    await conn.fetch(sql, *(1,) * sql.count("$"))
                error = raised.value
                found.append((error.severity_en, error.sqlstate, error.message, error.position))
            return found
        finally:
            await conn.close()

    direct = asyncio.run(errors(veil.world.dsn(MASKED)))
    assert asyncio.run(errors(veil.proxy.dsn(MASKED, PASSWORD, DATABASE))) == direct
    assert [error[1] for error in direct] == ["42601", "42703", "42P01", "42P01"]


def test_psql_draws_its_line_pointer_under_the_same_place(veil: Veil) -> None:
    script = "select id,\n  email from gv.people\n  where nme = 1;\nselect 1 frm gv.orders;\n"
    outputs = []
    for dsn in (veil.world.dsn(MASKED), veil.proxy.dsn(MASKED, PASSWORD, DATABASE)):
        done = subprocess.run([str(bin_dir() / "psql"), "-X", "-d", dsn, "-f", "-"], input=script,
                              capture_output=True, text=True, timeout=60)
        outputs.append(done.stderr)
    assert "LINE 3:   where nme = 1;" in outputs[0] and "^" in outputs[0]
    assert outputs[1] == outputs[0]


def test_a_login_that_sees_everything_has_its_text_forwarded_as_sent(veil: Veil) -> None:
    with veil.veiled(ADMIN) as conn:
        conn.execute("set search_path = gv")
        conn.execute("create temp table orders (note text)")
        conn.execute("insert into orders values ('the temporary one')")
        # PostgreSQL reads pg_temp.orders first; a qualified rewrite would have read gv.orders
        assert conn.execute("select * from orders").fetchall() == [("the temporary one",)]
        conn.execute("drop table orders")
        # a statement prepared while its table existed is not stale after the table is dropped
        # and created again (psycopg prepares statements it runs five times)
        with veil.direct("postgres") as owner:
            owner.execute("grant create on schema gv to gv_admin")
        try:
            for _ in range(7):
                conn.execute("drop table if exists admin_scratch")
                conn.execute("create table admin_scratch (id text primary key)", prepare=True)
            conn.execute("drop table admin_scratch")
        finally:
            with veil.direct("postgres") as owner:
                owner.execute("drop table if exists gv.admin_scratch")
                owner.execute("revoke create on schema gv from gv_admin")


# ---- client encodings ----------------------------------------------------------------------------


def test_an_unmasked_login_reads_and_writes_latin9(veil: Veil) -> None:
    with veil.veiled(ADMIN) as conn:
        conn.execute("set client_encoding = 'LATIN9'")
        assert conn.pgconn.exec_("select '€uro' as \"é\"".encode("iso8859_15")).get_value(0, 0) == \
            "€uro".encode("iso8859_15")


@pytest.mark.parametrize("encoding", ["LATIN1", "LATIN9", "WIN1252", "WIN1251", "KOI8R", "EUC_JP", "EUC_KR"])
def test_a_masked_login_may_use_an_ascii_safe_client_encoding_and_stays_masked(
    veil: Veil, encoding: str
) -> None:
    with veil.veiled(MASKED) as conn:
        conn.execute(f"set client_encoding = '{encoding}'")
        assert conn.info.parameter_status("client_encoding") == encoding
        rows = conn.execute("select full_name, email, ssn from gv.people where id = 1").fetchall()
        assert leaked_canaries(repr(rows)) == [] and rows[0][0].startswith("Z")
        # a non-ASCII literal next to a masked column: read in the session's encoding
        codec = conn.info.encoding
        text = {"WIN1251": "ж", "KOI8R": "ж", "EUC_JP": "日本", "EUC_KR": "한국"}.get(encoding, "é")
        sql = f"select full_name, '{text}' as x from gv.people where id = 1".encode(codec)
        got = conn.pgconn.exec_(sql)
        assert got.error_message == b"" and got.get_value(0, 1) == text.encode(codec)
        assert leaked_canaries(got.get_value(0, 0).decode(codec)) == []


@pytest.mark.parametrize("raw", [
    # a byte that starts a GBK character before a backslash: ASCII-safe encodings keep the backslash
    "select E'\u4e01\\' , (select ssn from gv.people where id = 1) as x -- ', 1".encode(),
    b"select E'\xe4\xb8\x81\\' , (select ssn from gv.people where id = 1) as x -- ', 1",
    b"select \"\xe9\xe8\" from gv.people",  # non-ASCII identifier
    b"select * from U&\"gv\".U&\"\\0070eople\"",
    b"select U&\"\\0073sn\" from gv.people where id = 1",
    b"select full_name from gv.people where id = 1 and '\xa4' <> '\xbd'",
])
@pytest.mark.parametrize("encoding", ["LATIN1", "WIN1252", "EUC_JP"])
def test_encoding_tricks_do_not_unmask_a_column(veil: Veil, encoding: str, raw: bytes) -> None:
    with veil.veiled(MASKED) as conn:
        conn.execute(f"set client_encoding = '{encoding}'")
        result = conn.pgconn.exec_(raw)
        seen = [(result.error_message or b"").decode("latin-1")]
        seen += [(result.get_value(r, c) or b"").decode("latin-1")
                 for r in range(result.ntuples) for c in range(result.nfields)]
        assert leaked_canaries("\n".join(seen)) == []
        assert conn.execute("select 1").fetchone() == (1,)


def test_psql_in_latin1_from_its_startup_packet_stays_masked(veil: Veil) -> None:
    script = "select full_name, ssn, 'café' as x from gv.people where id = 1;\nselect nme from gv.people;\n"
    outputs = []
    for dsn in (veil.world.dsn(MASKED), veil.proxy.dsn(MASKED, PASSWORD, DATABASE)):
        done = subprocess.run([str(bin_dir() / "psql"), "-X", "-At", "-d", dsn, "-f", "-"],
                              input=script.encode("latin-1"), capture_output=True, timeout=60,
                              env={**os.environ, "PGCLIENTENCODING": "LATIN1"})
        outputs.append((done.stdout.decode("latin-1"), done.stderr.decode("latin-1")))
    veiled_rows, veiled_errors = outputs[1]
    assert "|café" in veiled_rows and leaked_canaries(veiled_rows) == []
    assert veiled_errors == outputs[0][1] and 'column "nme" does not exist' in veiled_errors


def test_invalid_bytes_in_another_client_encoding_get_postgresqls_error(veil: Veil) -> None:
    for encoding, raw in (("WIN1252", b"select '\x81'"), ("EUC_JP", b"select '\x8f\xa1'"),
                          ("EUC_KR", b"select '\xb0'")):
        for login in (MASKED, ADMIN):
            answers = []
            for connect in (veil.direct, veil.veiled):
                with connect(login) as conn:
                    conn.execute(f"set client_encoding = '{encoding}'")
                    result = conn.pgconn.exec_(raw)
                    answers.append(tuple(result.error_field(ord(c)) for c in "SVCMP"))
            assert answers[1] == answers[0] and answers[0][2] in (b"22021", b"22P05"), (encoding, login)


@pytest.mark.parametrize("encoding", ["SJIS", "BIG5", "GBK", "UHC", "GB18030", "JOHAB"])
def test_a_masked_login_cannot_use_an_encoding_whose_characters_hold_ascii_bytes(
    veil: Veil, encoding: str
) -> None:
    with veil.veiled(MASKED) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match=r"pgveil: session-setting: .*UTF8"):
            conn.execute(f"set client_encoding = '{encoding}'")
        assert conn.info.parameter_status("client_encoding") == "UTF8"


def test_a_position_in_another_client_encoding_counts_characters(veil: Veil) -> None:
    sql = "select 'àéîõü' as x, full_name from gv.people where nme = 1".encode("latin-1")
    answers = []
    for connect in (veil.direct, veil.veiled):
        with connect(MASKED) as conn:
            conn.execute("set client_encoding = 'LATIN1'")
            result = conn.pgconn.exec_(sql)
            answers.append((result.error_field(ord("C")), result.error_field(ord("P"))))
    assert answers[1] == answers[0] and answers[0][0] == b"42703"
