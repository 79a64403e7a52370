"""Real drivers get the same results, errors and notices through pgveil as straight from PostgreSQL."""

from __future__ import annotations

import threading
import time
from decimal import Decimal

import asyncpg
import psycopg
import pytest
from psycopg import sql

from tests.proxy_harness import running_proxy


@pytest.fixture(scope="module")
def proxy(upstream):
    with running_proxy(upstream) as running:
        yield running


@pytest.fixture(scope="module")
def targets(upstream, proxy):
    return {"direct": upstream.dsn(), "pgveil": proxy.dsn()}


def same_through_pgveil(targets, scenario, *args):
    direct = scenario(targets["direct"], *args)
    relayed = scenario(targets["pgveil"], *args)
    assert relayed == direct
    return relayed


def error_of(exc: psycopg.Error) -> tuple[str | None, str | None, str | None]:
    return exc.sqlstate, exc.diag.message_primary, exc.diag.message_detail


# ---- psycopg 3 -------------------------------------------------------------------------------------

def types_scenario(dsn: str, binary: bool):
    with psycopg.connect(dsn) as conn:
        cur = conn.cursor(binary=binary)
        cur.execute(
            "select 1::int, 'ü text'::text, 1.5::numeric, '2024-01-02 03:04:05+00'::timestamptz,"
            " '\\x0102ff'::bytea, '{\"a\": [1, 2]}'::jsonb, array[1, 2, null], null::int, %s::text, %s::int",
            ["param", 42],
        )
        return cur.fetchall(), [(d.name, d.type_code) for d in cur.description]


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
def test_types_in_text_and_binary_format_are_identical(targets, binary):
    rows, _ = same_through_pgveil(targets, types_scenario, binary)
    assert rows[0][2] == Decimal("1.5") and rows[0][4] == b"\x01\x02\xff"


def multi_statement_scenario(dsn: str):
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.cursor()
        cur.execute(b"create temp table relay_multi (n int); insert into relay_multi values (1), (2);"
                    b" select sum(n) from relay_multi; select 'second'")
        results = []
        while True:
            results.append((cur.statusmessage, cur.fetchall() if cur.description else None))
            if not cur.nextset():
                break
        try:
            cur.execute(b"select 1; select 1/0; select 3")
        except psycopg.Error as exc:
            results.append(error_of(exc))
        return results


def test_simple_query_with_several_statements(targets):
    results = same_through_pgveil(targets, multi_statement_scenario)
    assert ("SELECT 1", [("second",)]) in results
    assert results[-1][0] == "22012"


def pipeline_scenario(dsn: str):
    out: list[object] = []
    with psycopg.connect(dsn) as conn:
        conn.execute("create temp table relay_pipe (id int primary key, v text)")
        conn.commit()
        with conn.pipeline() as pipeline:
            first = conn.execute("insert into relay_pipe values (%s, %s) returning id", [1, "a"])
            second = conn.execute("insert into relay_pipe values (%s, %s) returning id", [2, "b"])
            pipeline.sync()
            third = conn.execute("select v from relay_pipe order by id")
            out += [first.fetchall(), second.fetchall(), third.fetchall()]
        conn.commit()
        try:
            with conn.pipeline():
                conn.execute("insert into relay_pipe values (%s, 'dup')", [1])
                conn.execute("select 1")
        except psycopg.Error as exc:
            out.append(error_of(exc))
        out.append(conn.info.transaction_status.name)
        conn.rollback()
        out.append(conn.execute("select count(*) from relay_pipe").fetchall())
    return out


def test_pipeline_mode_including_an_error_mid_pipeline(targets):
    out = same_through_pgveil(targets, pipeline_scenario)
    assert out[3][0] == "23505"


def copy_scenario(dsn: str):
    rows = [(i, f"row {i}", None if i % 7 == 0 else i * 1.5) for i in range(20_000)]
    with psycopg.connect(dsn) as conn:
        cur = conn.cursor()
        cur.execute("create temp table relay_copy (id int, label text, score float8)")
        with cur.copy("copy relay_copy from stdin") as copy:
            for row in rows:
                copy.write_row(row)
        with cur.copy("copy relay_copy (id, label, score) from stdin (format binary)") as copy:
            copy.set_types(["int4", "text", "float8"])
            copy.write_row((-1, "binary", 2.5))
        with cur.copy("copy (select * from relay_copy order by id) to stdout") as copy:
            text_out = b"".join(bytes(chunk) for chunk in copy)
        query = "copy (select id, label from relay_copy where id < 3 order by id) to stdout (format binary)"
        with cur.copy(query) as copy:
            copy.set_types(["int4", "text"])
            binary_out = list(copy.rows())
        try:
            with cur.copy("copy relay_copy (id) from stdin") as copy:
                copy.write(b"not a number\n")
        except psycopg.Error as exc:
            copy_error = error_of(exc)
        conn.rollback()
        return len(text_out), hash(text_out), binary_out, copy_error


def test_copy_in_and_out_text_and_binary(targets):
    length, _, binary_rows, error = same_through_pgveil(targets, copy_scenario)
    assert length > 300_000
    assert binary_rows == [(-1, "binary"), (0, "row 0"), (1, "row 1"), (2, "row 2")]
    assert error[0] == "22P02"


def server_side_cursor_scenario(dsn: str):
    with psycopg.connect(dsn) as conn, conn.cursor(name="relay_cursor") as cur:
        cur.itersize = 7
        cur.execute("select g, md5(g::text) from generate_series(1, 50) g")
        first = cur.fetchmany(10)
        cur.scroll(5)
        rest = cur.fetchall()
        return first, rest


def test_server_side_cursors(targets):
    first, rest = same_through_pgveil(targets, server_side_cursor_scenario)
    assert first[0][0] == 1 and rest[0][0] == 16 and rest[-1][0] == 50


def notice_scenario(dsn: str):
    notices = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.add_notice_handler(lambda d: notices.append((d.severity, d.sqlstate, d.message_primary)))
        conn.execute("do $$ begin raise notice 'relay notice %', 7; raise warning 'relay warning'; end $$")
        conn.execute("drop table if exists relay_table_that_does_not_exist")
        conn.execute("set client_min_messages = debug1")
        conn.execute("reset client_min_messages")
    return notices


def test_notices_and_warnings(targets):
    notices = same_through_pgveil(targets, notice_scenario)
    assert ("NOTICE", "00000", "relay notice 7") in notices
    assert ("WARNING", "01000", "relay warning") in notices


def parameter_status_scenario(dsn: str):
    with psycopg.connect(dsn, autocommit=True) as conn:
        before = conn.info.parameter_status("application_name")
        conn.execute("set application_name = 'relay_app'")
        after = conn.info.parameter_status("application_name")
        conn.execute("set timezone = 'Asia/Tokyo'")
        status = conn.info.parameter_status
        return before, after, status("TimeZone"), status("server_version")


def test_parameter_status_updates_reach_the_client(targets):
    assert same_through_pgveil(targets, parameter_status_scenario)[1:3] == ("relay_app", "Asia/Tokyo")


def listen_notify_scenario(dsn: str):
    with psycopg.connect(dsn, autocommit=True) as listener, psycopg.connect(dsn, autocommit=True) as sender:
        listener.execute("listen relay_channel")
        sender.execute("notify relay_channel, 'payload 1'")
        sender.execute("select pg_notify('relay_channel', 'payload 2')")
        got = list(listener.notifies(timeout=10, stop_after=2))
        return [(n.channel, n.payload, n.pid == sender.info.backend_pid) for n in got]


def test_listen_notify_with_the_senders_backend_pid(targets):
    assert same_through_pgveil(targets, listen_notify_scenario) == [
        ("relay_channel", "payload 1", True), ("relay_channel", "payload 2", True)]


def wait_until_running(upstream_dsn: str, pid: int, deadline_s: float = 10) -> None:
    """Poll PostgreSQL (directly) until backend `pid` is executing a statement."""
    deadline = time.monotonic() + deadline_s
    with psycopg.connect(upstream_dsn, autocommit=True) as watcher:
        while time.monotonic() < deadline:
            row = watcher.execute(
                "select state, wait_event from pg_stat_activity where pid = %s", [pid]).fetchone()
            if row and row[0] == "active" and row[1] == "PgSleep":
                return
            time.sleep(0.01)
    raise AssertionError(f"backend {pid} never started its statement")


def cancel_scenario(dsn: str, upstream_dsn: str, protocol: str):
    with psycopg.connect(f"{dsn}?max_protocol_version={protocol}") as conn:
        pid = conn.info.backend_pid
        canceller = threading.Thread(
            target=lambda: (wait_until_running(upstream_dsn, pid), conn.cancel_safe()))
        canceller.start()
        try:
            conn.execute("select pg_sleep(60)")
        except psycopg.Error as exc:
            outcome = error_of(exc)
        canceller.join()
        conn.rollback()
        return outcome, conn.execute("select 'usable'").fetchone()


@pytest.mark.parametrize("protocol", ["3.0", "3.2"])
def test_cancel_maps_pgveils_key_to_the_upstream_key(targets, upstream, protocol):
    outcome = same_through_pgveil(targets, cancel_scenario, upstream.dsn(), protocol)
    assert outcome == (("57014", "canceling statement due to user request", None), ("usable",))


# ---- asyncpg --------------------------------------------------------------------------------------

async def asyncpg_scenario(dsn: str):
    conn = await asyncpg.connect(dsn)
    try:
        statement = await conn.prepare("select $1::int + $2::int as total, $3::text as label")
        prepared = [tuple(await statement.fetchrow(i, i, f"n{i}")) for i in range(3)]
        series = [r["g"] for r in await conn.fetch("select g from generate_series(1, $1) g", 5)]
        await conn.execute("create temp table relay_asyncpg (id int, label text, at date)")
        await conn.executemany("insert into relay_asyncpg values ($1, $2, null)",
                               [(i, f"l{i}") for i in range(5)])
        copied = await conn.copy_records_to_table(
            "relay_asyncpg", records=[(100 + i, f"copied {i}", None) for i in range(1000)])
        count = await conn.fetchval("select count(*) from relay_asyncpg")
        try:
            await conn.execute("select * from relay_missing_table")
        except asyncpg.PostgresError as exc:
            missing = (exc.sqlstate, exc.message)
        try:
            await conn.execute("select pg_sleep(60)", timeout=0.5)
        except TimeoutError:
            timed_out = True
        after = await conn.fetchval("select 'still usable'", timeout=15)
        return prepared, series, copied, count, missing, timed_out, after
    finally:
        await conn.close()


async def test_asyncpg_prepared_statements_copy_and_a_cancelling_timeout(targets):
    direct = await asyncpg_scenario(targets["direct"])
    relayed = await asyncpg_scenario(targets["pgveil"])
    assert relayed == direct
    assert relayed[2] == "COPY 1000" and relayed[3] == 1005 and relayed[6] == "still usable"


async def test_asyncpg_many_connections_at_once(proxy):
    import asyncio

    async def one(i: int) -> int:
        conn = await asyncpg.connect(proxy.dsn())
        try:
            return int(await conn.fetchval("select $1::int * 2", i))
        finally:
            await conn.close()

    assert await asyncio.gather(*(one(i) for i in range(20))) == [i * 2 for i in range(20)]


def test_sql_composition_and_large_values_round_trip(proxy):
    big = "x" * 3_000_000
    with psycopg.connect(proxy.dsn()) as conn:
        query = sql.SQL("select length({}), {}").format(sql.Literal(big), sql.Literal("ok"))
        assert conn.execute(query).fetchone() == (3_000_000, "ok")
        assert conn.execute("select %s::text", [big]).fetchone()[0] == big
