"""Review of the mypyc-compiled relay (commit a80ac9a): with a policy, the compiled Relay behaves
exactly as the plain-Python one. Every scenario runs twice in-process, once through the Relay
session.py picked (the compiled copy when current) and once through proxy/session/relay.py as plain
Python, against the real PostgreSQL and real drivers, and both must give the same answer."""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

import asyncpg
import psycopg
import pytest

import proxy.native as native
import proxy.session.session as session_module
from proxy.connection_policy import ClientInfo, Outcome
from proxy.guard.verdict import Allow, Refuse, Rewrite, Verdict
from proxy.session import relay as plain_relay
from proxy.wire.backend import DataRow, ErrorResponse, ReadyForQuery
from proxy.wire.frontend import Bind, Describe, Execute, Parse, Query, Sync
from tests import guard_setup
from tests.guard_setup import DATABASE, PASSWORD, POLICY, leaked_canaries
from tests.guard_setup import GuardDatabase as _GuardDatabase
from tests.proxy_harness import RawClient, RunningProxy, running_proxy

world = guard_setup.world

IMPLEMENTATIONS = ["compiled", "python"]


class ReviewPolicy:
    """Decides by words in the SQL: refuses, rewrites, raises at once or after an await, or thinks
    (suspends) before answering; raises on a ParameterStatus whose value starts with rv_; records
    what it is told."""

    outcomes: list[Outcome] = []
    binds: list[str] = []
    closes: list[str] = []
    parse_types: list[tuple[int, ...]] = []
    complete_raises = False

    def __init__(self, client: ClientInfo) -> None:
        self.client = client

    async def on_startup(self, params: Mapping[str, str], client: ClientInfo) -> Refuse | None:
        return None

    async def _decide(self, sql: str) -> Verdict:
        if "rv_think" in sql:
            await asyncio.sleep(0)
        if "rv_raise_now" in sql:
            raise RuntimeError("policy failed before awaiting")
        if "rv_raise_late" in sql:
            await asyncio.sleep(0)
            raise RuntimeError("policy failed after awaiting")
        if "rv_refuse" in sql:
            return Refuse("review-rule", "rv statements are refused; use another")
        if "rv_rewrite" in sql:
            return Rewrite("select 'rewritten'::text")
        return Allow(sql)

    async def on_query(self, sql: str) -> Verdict:
        return await self._decide(sql)

    async def on_parse(self, statement_name: str, sql: str, param_types: tuple[int, ...]) -> Verdict:
        self.parse_types.append(param_types)
        return await self._decide(sql)

    async def on_bind(self, statement_name: str) -> Verdict | None:
        self.binds.append(statement_name)
        if "rv_bind_raise" in statement_name:
            raise RuntimeError("on_bind failed")
        if "rv_bind_refuse" in statement_name:
            return Refuse("review-rule", "this prepared statement is refused")
        return None

    async def on_close_statement(self, statement_name: str) -> None:
        self.closes.append(statement_name)

    async def on_function_call(self, function_oid: int) -> Verdict:
        return Allow("")

    async def on_complete(self, outcome: Outcome) -> None:
        if self.complete_raises:
            raise RuntimeError("on_complete failed")
        self.outcomes.append(outcome)

    def on_parameter_status(self, name: str, value: str) -> None:
        if value.startswith("rv_"):  # only after login: while logging in a raise refuses the login
            raise RuntimeError("on_parameter_status failed")


def _relay_class(implementation: str) -> Any:
    if implementation == "python":
        return plain_relay.Relay
    return native.compiled(plain_relay).Relay


@pytest.fixture(scope="module", params=IMPLEMENTATIONS)
def proxy(request, upstream) -> Iterator[RunningProxy]:
    relay_class = _relay_class(request.param)
    if request.param == "compiled":
        assert relay_class is not plain_relay.Relay, native.IMPLEMENTATIONS  # really compiled
    saved = session_module.Relay
    session_module.Relay = relay_class  # the session builds this Relay (looked up per session)
    try:
        with running_proxy(upstream, policy_factory=ReviewPolicy) as running:
            yield running
    finally:
        session_module.Relay = saved


@pytest.fixture(autouse=True)
def fresh_records():
    for record in (ReviewPolicy.outcomes, ReviewPolicy.binds, ReviewPolicy.closes, ReviewPolicy.parse_types):
        record.clear()
    ReviewPolicy.complete_raises = False
    yield
    ReviewPolicy.complete_raises = False


def _error(exc: psycopg.Error) -> tuple[str | None, str | None]:
    return exc.sqlstate, exc.diag.message_primary


INTERNAL = ("42501", "pgveil: internal-error: pgveil could not decide about this statement; "
                     "the pgveil log says why")
REFUSED = ("42501", "pgveil: review-rule: rv statements are refused; use another")


@pytest.mark.parametrize("word", ["rv_raise_now", "rv_raise_late", "rv_think rv_raise_now"])
@pytest.mark.parametrize("prepare", [False, True])
def test_a_policy_that_raises_refuses_the_statement_and_the_connection_stays_usable(proxy, word, prepare):
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.Error) as caught:
            conn.execute(f"select '{word}'", prepare=prepare)
        assert _error(caught.value) == INTERNAL
        assert conn.execute("select 'after'", prepare=prepare).fetchone() == ("after",)


@pytest.mark.parametrize("think", ["", "rv_think "])
def test_refusals_and_rewrites_through_both_protocols(proxy, think):
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        for prepare in (False, True):
            with pytest.raises(psycopg.Error) as caught:
                conn.execute(f"select '{think}rv_refuse'", prepare=prepare)
            assert _error(caught.value) == REFUSED
            assert conn.execute(f"select '{think}rv_rewrite'", prepare=prepare).fetchone() == ("rewritten",)


def test_pipelined_statements_behind_a_pending_verdict_keep_their_order(proxy):
    words = ["rv_think a", "rv_refuse b", "rv_think rv_raise_late c", "d", "rv_think rv_rewrite e", "f"]
    with RawClient.connect(proxy.host, proxy.port) as client:
        # one write: every extended-protocol request waits behind the verdicts before it
        client.send(*[part for word in words for part in
                      (Parse("", f"select '{word}'::text"), Bind("", ""), Execute("", 0), Sync())])
        answers: list[object] = []
        for _ in words:
            messages = client.until_ready()
            errors = [m.get("M") for m in messages if isinstance(m, ErrorResponse)]
            rows = [bytes(m.values[0]).decode() for m in messages if type(m).__name__ == "DataRow"]
            answers.append(errors[0] if errors else rows[0])
        client.send(Query("select 'ok'"))
        assert not [m for m in client.until_ready() if isinstance(m, ErrorResponse)]
    assert answers == ["rv_think a", REFUSED[1], INTERNAL[1], "d", "rewritten", "f"]


def test_simple_query_pipeline_in_one_write_with_a_pending_verdict(proxy):
    with RawClient.connect(proxy.host, proxy.port) as client:
        client.send(Query("select 'rv_think 1'"), Query("select 'rv_refuse 2'"),
                    Query("select 'rv_think rv_raise_late 3'"), Query(""), Query("select 4"))
        errors: list[str | None] = []
        readies = 0
        while readies < 5:
            message = client.receive()
            if isinstance(message, ErrorResponse):
                errors.append(message.get("M"))
            elif isinstance(message, ReadyForQuery):
                readies += 1
        assert errors == [REFUSED[1], INTERNAL[1]]


def test_a_refused_bind_and_a_raising_bind_are_refused_in_an_extended_request(proxy, upstream):
    with RawClient.connect(proxy.host, proxy.port) as client:
        # Parse in one request, Bind in the next: on_bind decides
        for name in ("rv_bind_refuse_s", "rv_bind_raise_s", "rv_ok_s"):
            client.send(Parse(name, "select 1"), Sync())
            assert isinstance(client.until_ready()[-1], ReadyForQuery)
        answers = []
        for name in ("rv_bind_refuse_s", "rv_bind_raise_s", "rv_ok_s"):
            client.send(Bind("", name), Execute("", 0), Sync())
            messages = client.until_ready()
            errors = [m.get("M") for m in messages if isinstance(m, ErrorResponse)]
            answers.append(errors)
        assert answers == [["pgveil: review-rule: this prepared statement is refused"], [INTERNAL[1]], []]
        assert ReviewPolicy.binds == ["rv_bind_refuse_s", "rv_bind_raise_s", "rv_ok_s"]


def test_non_utf8_statement_names_in_parse_bind_close(proxy):
    name = b"rv_\xff\xfe_stmt"
    with RawClient.connect(proxy.host, proxy.port) as client:
        # hand-built messages: a statement name that is not UTF-8
        def msg(tag: bytes, body: bytes) -> bytes:
            return tag + (len(body) + 4).to_bytes(4, "big") + body

        parse = msg(b"P", name + b"\x00select 7\x00\x00\x00")
        bind = msg(b"B", b"\x00" + name + b"\x00\x00\x00\x00\x00\x00\x00")
        close = msg(b"C", b"S" + name + b"\x00")
        codes = []
        for messages in ((parse, Sync()), (bind, Execute("", 0), Sync()), (close, Sync())):
            client.send(*messages)
            codes.append([m.get("C") for m in client.until_ready() if isinstance(m, ErrorResponse)])
        # PostgreSQL itself rejects the bytes; pgveil relays its error and the session goes on
        assert codes == [["22021"], ["22021"], ["22021"]]
        client.send(Query("select 'still here'"))
        assert isinstance(client.until_ready()[-1], ReadyForQuery)
    # the policy heard the names (surrogate-escaped), no TypeError/UnicodeError in typed code
    assert ReviewPolicy.binds == ["rv_\udcff\udcfe_stmt"] and ReviewPolicy.closes == ["rv_\udcff\udcfe_stmt"]


def test_parse_with_many_parameter_types_reaches_the_policy(proxy):
    types = tuple([23] * 300)
    sql = "select " + " + ".join(f"${i}" for i in range(1, 301))
    with RawClient.connect(proxy.host, proxy.port) as client:
        client.send(Parse("", sql, types), Describe("S", ""), Sync())
        messages = client.until_ready()
        assert not [m for m in messages if isinstance(m, ErrorResponse)], messages
    assert ReviewPolicy.parse_types == [types]


def test_a_query_of_one_mebibyte_and_an_empty_query(proxy):
    big = "select '" + "x" * (1 << 20) + "' as rv_big"
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        assert len(conn.execute(big).fetchone()[0]) == 1 << 20
        conn.execute("")
        assert conn.execute("select 1").fetchone() == (1,)


def test_on_complete_raising_changes_nothing(proxy):
    ReviewPolicy.complete_raises = True
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("set application_name = 'rv_app'")
        conn.execute("set TimeZone = 'UTC'")
        assert conn.execute("select 'rv_think done'").fetchone() == ("rv_think done",)
        assert conn.execute("show application_name").fetchone() == ("rv_app",)


def test_a_setting_report_the_policy_cannot_take_ends_the_session(proxy):
    """on_parameter_status raising (here for search_path = rv_...): the policy would go on judging
    under a setting the session no longer has, so the session ends with a FATAL (fail closed);
    a new one works."""
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("create temporary table rv_zone_probe (n int)")
        with pytest.raises(psycopg.Error) as ended:
            conn.execute("set search_path = rv_elsewhere, public")
        assert "pgveil: internal-error: pgveil could not follow a change of a session setting" in str(
            ended.value)
        with pytest.raises(psycopg.OperationalError):  # the session is over
            conn.execute("select 1")
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def test_on_complete_hears_rows_and_sqlstates(proxy):
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("select generate_series(1, 5)")
        with pytest.raises(psycopg.Error):
            conn.execute("select 'rv_refuse'")
        with pytest.raises(psycopg.Error):
            conn.execute("select 1/0")
    seen = [(o.rows, o.sqlstate, o.verdicts) for o in ReviewPolicy.outcomes]
    assert (5, None, 1) in seen and (0, "42501", 1) in seen and (0, "22012", 1) in seen


def test_copy_in_the_extended_protocol_with_a_policy(proxy, upstream):
    upstream.execute("drop table if exists rv_copy_target; create table rv_copy_target (n int)")
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        with conn.cursor().copy("copy rv_copy_target from stdin") as copy:
            for n in range(100):
                copy.write_row((n,))
        assert conn.execute("select count(*) from rv_copy_target").fetchone() == (100,)

    async def with_asyncpg() -> int:
        connection = await asyncpg.connect(proxy.dsn())
        try:
            await connection.copy_records_to_table("rv_copy_target", records=[(n,) for n in range(10)])
            return await connection.fetchval("select count(*) from rv_copy_target")
        finally:
            await connection.close()

    assert asyncio.run(with_asyncpg()) == 110
    upstream.execute("drop table rv_copy_target")


def test_function_call_with_a_policy(proxy):
    from proxy.wire.frontend import FunctionCall

    with RawClient.connect(proxy.host, proxy.port) as client:
        # int4pl (oid 177) 2 + 3 through the fast-path interface
        client.send(FunctionCall(177, (1,), ((2).to_bytes(4, "big"), (3).to_bytes(4, "big")), 1))
        messages = client.until_ready()
        assert not [m for m in messages if isinstance(m, ErrorResponse)], messages


@pytest.fixture(scope="module", params=IMPLEMENTATIONS)
def guarded(request, world) -> Iterator[RunningProxy]:
    saved = session_module.Relay
    session_module.Relay = _relay_class(request.param)
    try:
        with tempfile.TemporaryDirectory() as directory:
            path = os.path.join(directory, "policy.yaml")
            with open(path, "w") as handle:
                handle.write(POLICY)
            with running_proxy(_GuardDatabase(world), policy_path=path) as running:
                yield running
    finally:
        session_module.Relay = saved


def test_masked_login_gets_no_canary_through_rows_errors_or_notices(guarded):
    seen: list[str] = []
    with psycopg.connect(guarded.dsn("gv_analyst", PASSWORD, DATABASE), autocommit=True) as conn:
        conn.add_notice_handler(lambda diagnostic: seen.append(str(diagnostic.message_primary)))
        for sql in ("select * from gv.people", "select full_name, email, ssn from gv.people",
                    "select ssn::int from gv.people", "select notes from gv.people where id = 1"):
            for prepare in (False, True):
                try:
                    seen.append(repr(conn.execute(sql, prepare=prepare).fetchall()))
                except psycopg.Error as exc:
                    seen.append(f"{exc.sqlstate} {exc.diag.message_primary} {exc.diag.message_detail}")
        assert conn.execute("select 1").fetchone() == (1,)
    assert leaked_canaries("\n".join(seen)) == []


class OddPolicy(ReviewPolicy):
    async def on_query(self, sql: str) -> Any:
        if "rv_none_now" in sql:
            return None
        if "rv_none_late" in sql:
            await asyncio.sleep(0)
            return None
        if "rv_cancel_now" in sql:
            raise asyncio.CancelledError()
        if "rv_cancel_late" in sql:
            await asyncio.sleep(0)
            raise asyncio.CancelledError()
        if "rv_str" in sql:
            return "select 1"
        return await self._decide(sql)


class NoClosePolicy(ReviewPolicy):
    on_close_statement = None  # type: ignore[assignment]


@pytest.fixture(scope="module", params=IMPLEMENTATIONS)
def odd(request, upstream) -> Iterator[RunningProxy]:
    saved = session_module.Relay
    session_module.Relay = _relay_class(request.param)
    try:
        with running_proxy(upstream, policy_factory=OddPolicy) as running:
            yield running
    finally:
        session_module.Relay = saved


@pytest.mark.parametrize("word", ["rv_none_now", "rv_none_late", "rv_cancel_now", "rv_str"])
def test_a_policy_answering_nonsense_refuses_the_statement_and_the_session_goes_on(odd, upstream, word):
    """Not a Verdict (None, a str, at once or after an await) or a CancelledError raised before any
    await: the statement is refused as internal-error, nothing is run, and the session is usable
    (a None after an await used to leave the session stuck, its client bytes piling up unread)."""
    upstream.execute("create table if not exists rv_nonsense_log (word text)")
    with RawClient.connect(odd.host, odd.port, timeout=20) as client:  # a stuck session times out
        client.send(Query(f"insert into rv_nonsense_log values ('{word}')"))
        errors = [m for m in client.until_ready() if isinstance(m, ErrorResponse)]
        assert [(e.get("C"), e.get("M")) for e in errors] == [INTERNAL]
        client.send(Query("select 3"))
        assert [m.values for m in client.until_ready() if isinstance(m, DataRow)] == [(b"3",)]
    with psycopg.connect(odd.dsn(), autocommit=True) as conn:
        counted = conn.execute("select count(*) from rv_nonsense_log where word = %s", (word,))
        assert counted.fetchone() == (0,)


def test_a_policy_cancelled_after_awaiting_refuses_the_statement(odd):
    with psycopg.connect(odd.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.Error) as caught:
            conn.execute("select 'rv_cancel_late'")
        assert _error(caught.value) == INTERNAL
        assert conn.execute("select 2").fetchone() == (2,)


def test_more_than_the_backlog_limit_pipelined_behind_a_pending_verdict(proxy):
    big = "select '" + "y" * (256 * 1024) + "' as filler"
    with RawClient.connect(proxy.host, proxy.port) as client:
        client.send(Query("select 'rv_think first'"), *([Query(big)] * 4), Query("select 'rv_think last'"))
        lengths = []
        for _ in range(6):
            messages = client.until_ready()
            assert not [m for m in messages if isinstance(m, ErrorResponse)]
            lengths += [len(bytes(m.values[0])) for m in messages if type(m).__name__ == "DataRow"]
        assert lengths == [len("rv_think first"), *([256 * 1024] * 4), len("rv_think last")]
