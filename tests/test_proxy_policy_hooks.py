"""The session asks the ConnectionPolicy before forwarding, forwards its SQL, and keeps the
protocol exactly in step when it refuses (simple, extended, pipelined, in transactions)."""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Mapping

import asyncpg
import psycopg
import pytest

from proxy.connection_policy import ClientInfo, Outcome
from proxy.guard.verdict import Allow, Refuse, Rewrite, Verdict
from proxy.wire.backend import ErrorResponse, FunctionCallResponse, ReadyForQuery
from proxy.wire.frontend import Bind, CopyData, CopyDone, Describe, Execute, FunctionCall, Parse, Query, Sync
from tests.proxy_harness import RawClient, running_proxy


class ScriptedPolicy:
    """Refuses SQL mentioning 'forbidden' (and function 177), rewrites 'select 41', optionally
    thinks before answering (suspends), and records everything it is told."""

    outcomes: list[Outcome] = []
    asked: list[str] = []
    suspend = False

    def __init__(self, client: ClientInfo) -> None:
        self.client = client

    async def on_startup(self, params: Mapping[str, str], client: ClientInfo) -> Refuse | None:
        if client.user == "relay_nobody":
            return Refuse("default-deny", "relay_nobody matches no role; ask for one", sqlstate="28000")
        return None

    async def _think(self) -> None:
        if self.suspend:
            await asyncio.sleep(0.001)

    def _decide(self, sql: str) -> Verdict:
        self.asked.append(sql)
        if "forbidden" in sql:
            return Refuse("test-rule", "this statement is forbidden; use the allowed one")
        if "boom" in sql:
            raise RuntimeError("the policy failed")
        if sql.strip().lower() == "select 41":
            return Rewrite("select 42")
        return Allow(sql)

    async def on_query(self, sql: str) -> Verdict:
        await self._think()
        return self._decide(sql)

    async def on_parse(self, statement_name: str, sql: str, param_types: tuple[int, ...]) -> Verdict:
        await self._think()
        return self._decide(sql)

    async def on_function_call(self, function_oid: int) -> Verdict:
        await self._think()
        if function_oid == 177:
            return Refuse("test-rule", "fast-path int4pl is forbidden")
        return Allow("")

    async def on_complete(self, outcome: Outcome) -> None:
        await self._think()
        self.outcomes.append(outcome)


@pytest.fixture(scope="module", params=["answers-at-once", "suspends"])
def proxy(upstream, request):
    ScriptedPolicy.suspend = request.param == "suspends"
    with running_proxy(upstream, policy_factory=ScriptedPolicy) as running:
        yield running
    ScriptedPolicy.suspend = False


@pytest.fixture(autouse=True)
def fresh_records():
    ScriptedPolicy.outcomes.clear()
    ScriptedPolicy.asked.clear()


def error_of(exc: psycopg.Error) -> tuple[str | None, str | None]:
    return exc.sqlstate, exc.diag.message_primary


def test_refused_query_is_an_ordinary_error_and_the_connection_stays_usable(proxy):
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.Error) as caught:
            conn.execute("select 'forbidden'")
        assert error_of(caught.value) == (
            "42501", "pgveil: test-rule: this statement is forbidden; use the allowed one")
        assert conn.execute("select 'fine'").fetchone() == ("fine",)


def test_refusal_inside_a_transaction_aborts_it_as_postgres_would(proxy):
    with psycopg.connect(proxy.dsn()) as conn:
        conn.execute("select 1")
        with pytest.raises(psycopg.Error):
            conn.execute("select 'forbidden'")
        assert conn.info.transaction_status.name == "INERROR"
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("select 2")
        conn.rollback()
        assert conn.execute("select 3").fetchone() == (3,)


def test_rewritten_sql_is_what_postgres_runs(proxy):
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        assert conn.execute("select 41").fetchone() == (42,)  # simple protocol
        assert conn.execute("select 41", prepare=True).fetchone() == (42,)
        assert conn.cursor(binary=True).execute("select 41").fetchone() == (42,)  # extended


def test_refused_parse_in_a_pipeline_skips_to_sync_like_a_real_error(proxy, upstream):
    def run(dsn: str, bad: str) -> list[object]:
        seen: list[object] = []
        with psycopg.connect(dsn) as conn:
            try:
                with conn.pipeline() as pipeline:
                    first = conn.execute("select %s::int", [1])
                    conn.execute(bad, [2])
                    conn.execute("select %s::int", [3])
                    pipeline.sync()
            except psycopg.Error as exc:
                seen.append(exc.sqlstate)
            seen.append(first.fetchall())
            seen.append(conn.info.transaction_status.name)
            conn.rollback()
            with conn.pipeline():
                after = conn.execute("select %s::int", [4])
            seen.append(after.fetchall())
        return seen

    relayed = run(proxy.dsn(), "select 'forbidden', %s::int")
    direct = run(upstream.dsn(), "select * from relay_no_such_table where %s::int = 1")
    assert relayed[1:] == direct[1:]
    assert (relayed[0], direct[0]) == ("42501", "42P01")


def test_messages_after_a_refused_parse_stay_in_step_on_the_wire(proxy):
    with RawClient.connect(proxy.host, proxy.port) as client:
        client.send(Parse("s1", "select 'forbidden'"), Bind("", "s1"), Execute(""),
                    Parse("s2", "select 2"), Bind("", "s2"), Describe("P", ""), Execute(""), Sync(),
                    Parse("", "select 3"), Bind("", ""), Execute(""), Sync())
        first = client.until_ready()
        second = client.until_ready()
    assert [type(m).__name__ for m in first] == ["ErrorResponse", "ReadyForQuery"]
    assert first[0].get("C") == "42501" and first[0].get("M").startswith("pgveil: test-rule:")
    assert [type(m).__name__ for m in second] == [
        "ParseComplete", "BindComplete", "DataRow", "CommandComplete", "ReadyForQuery"]


def test_a_multi_statement_query_is_judged_as_one(proxy):
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.Error) as caught:
            conn.execute(b"create temp table relay_never (x int); select 'forbidden'")
        assert caught.value.sqlstate == "42501"
        with pytest.raises(psycopg.errors.UndefinedTable):
            conn.execute("select * from relay_never")
    assert "create temp table relay_never (x int); select 'forbidden'" in ScriptedPolicy.asked


def test_function_call_is_asked_about_and_can_be_refused(proxy):
    add = struct.pack("!i", 2), struct.pack("!i", 3)
    with RawClient.connect(proxy.host, proxy.port) as client:
        client.send(FunctionCall(177, (1,), add, 1))  # int4pl(2, 3), refused
        refused = client.until_ready()
        client.send(FunctionCall(1317, (1,), (struct.pack("!i", 5),), 0))  # int4abs... any other oid
        other = client.until_ready()
        client.send(Query("select 'still in step'"))
        after = client.until_ready()
    assert isinstance(refused[0], ErrorResponse)
    assert refused[0].get("M") == "pgveil: test-rule: fast-path int4pl is forbidden"
    assert isinstance(refused[-1], ReadyForQuery) and refused[-1].status == "I"
    assert isinstance(other[-1], ReadyForQuery)
    assert after[1].values == (b"still in step",)


def test_function_call_allowed_is_relayed(upstream):
    with running_proxy(upstream) as proxy, RawClient.connect(proxy.host, proxy.port) as client:
        client.send(FunctionCall(177, (1,), (struct.pack("!i", 2), struct.pack("!i", 3)), 1))
        answer = client.until_ready()
    assert answer[0] == FunctionCallResponse(struct.pack("!i", 5))


def test_startup_refusal_is_fatal_with_its_sqlstate(proxy, upstream):
    upstream.execute("drop role if exists relay_nobody; create role relay_nobody login")
    with RawClient.connect(proxy.host, proxy.port, user="relay_nobody") as client:
        fatal = client.startup_messages[-1]
    assert fatal.get("S") == "FATAL" and fatal.get("C") == "28000"
    assert fatal.get("M") == "pgveil: default-deny: relay_nobody matches no role; ask for one"


def test_a_policy_that_raises_refuses_the_statement_and_the_session_carries_on(proxy):
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.Error) as caught:
            conn.execute("select 'boom'")
        assert caught.value.sqlstate == "42501" and "internal-error" in str(caught.value)
        assert conn.execute("select 'after'").fetchone() == ("after",)


def test_on_complete_reports_rows_sqlstate_and_order(proxy):
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("select generate_series(1, 5)")
        with pytest.raises(psycopg.Error):
            conn.execute("select 1/0")
        with pytest.raises(psycopg.Error):
            conn.execute("select 'forbidden'")
        conn.execute("select %s::int", [7])
    expected = [(5, None), (0, "22012"), (0, "42501"), (1, None)]
    deadline = time.monotonic() + 10  # the last on_complete may still be running when the client is done
    while time.monotonic() < deadline:
        got = [(o.rows, o.sqlstate) for o in ScriptedPolicy.outcomes]
        if got[-4:] == expected:
            break
        time.sleep(0.005)
    assert got[-4:] == expected
    assert all(o.upstream_seconds >= 0 for o in ScriptedPolicy.outcomes)


async def test_asyncpg_prepared_statements_go_through_the_policy(proxy):
    conn = await asyncpg.connect(proxy.dsn())
    try:
        assert await conn.fetchval("select 41") == 42
        with pytest.raises(asyncpg.PostgresError) as caught:
            await conn.fetchval("select 'forbidden'")
        assert caught.value.sqlstate == "42501"
        statement = await conn.prepare("select $1::int * 2")
        assert [await statement.fetchval(i) for i in range(3)] == [0, 2, 4]
    finally:
        await conn.close()


def test_copy_from_stdin_in_the_extended_protocol_keeps_requests_in_step(proxy):
    # PostgreSQL ignores the Sync sent behind Execute(COPY ... FROM STDIN) and answers the one after
    # CopyDone: one ReadyForQuery for two Syncs, which request tracking must follow.
    with RawClient.connect(proxy.host, proxy.port) as client:
        client.send(Query("create temp table relay_ext_copy (n int)"))
        client.until_ready()
        client.send(Parse("", "copy relay_ext_copy from stdin"), Bind("", ""), Execute(""), Sync())
        assert type(client.receive()).__name__ == "ParseComplete"
        assert type(client.receive()).__name__ == "BindComplete"
        assert type(client.receive()).__name__ == "CopyInResponse"
        client.send(CopyData(b"1\n2\n3\n"), CopyDone(), Sync())
        finished = client.until_ready()
        client.send(Query("select count(*) from relay_ext_copy"))
        counted = client.until_ready()
    assert [type(m).__name__ for m in finished] == ["CommandComplete", "ReadyForQuery"]
    assert counted[1].values == (b"3",)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and [o.rows for o in ScriptedPolicy.outcomes][-3:] != [0, 3, 1]:
        time.sleep(0.005)
    assert [o.rows for o in ScriptedPolicy.outcomes][-3:] == [0, 3, 1]  # create, copy, select
