"""Long statements and unauthenticated clients: statements of LONG_STATEMENT characters or more are
judged on an analysis worker thread with the same verdicts as short ones, statements over
max_statement_size are refused at once, and before authentication every client message is held to
PostgreSQL's own cap with a FATAL the client can read."""

from __future__ import annotations

import os
import socket
import struct
import tempfile
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from proxy.enforcement import LONG_STATEMENT
from proxy.session.session import PG_MAX_AUTH_TOKEN_LENGTH
from proxy.wire import StartupMessage
from tests import guard_setup
from tests.guard_setup import DATABASE, PASSWORD, POLICY, GuardWorld
from tests.guard_setup import GuardDatabase as _GuardDatabase
from tests.proxy_harness import RunningProxy, running_proxy

world = guard_setup.world

MAX_STATEMENT_SIZE = 20_000


@pytest.fixture(scope="module")
def proxy(world: GuardWorld) -> Iterator[RunningProxy]:
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "policy.yaml")
        with open(path, "w") as handle:
            handle.write(POLICY)
        with running_proxy(_GuardDatabase(world), path, max_statement_size=MAX_STATEMENT_SIZE) as running:
            yield running


def connect(proxy: RunningProxy, login: str = "gv_analyst") -> psycopg.Connection[Any]:
    return psycopg.connect(proxy.dsn(login, PASSWORD, DATABASE), autocommit=True)


def in_list(length: int) -> str:
    """`select ... from gv.people where id in (1, 2, 3, ...)`, at least `length` characters long."""
    values = ",".join(str(number) for number in range(1, length // 3))
    return f"select id, ssn, email from gv.people where id in ({values}) order by id"


def test_a_long_statement_is_masked_like_a_short_one_also_when_its_verdict_is_reused(
        proxy: RunningProxy) -> None:
    sql = in_list(LONG_STATEMENT + 100)
    assert LONG_STATEMENT < len(sql) < MAX_STATEMENT_SIZE
    with connect(proxy) as conn:
        short = conn.execute(
            "select id, ssn, email from gv.people where id in (1, 2, 3) order by id").fetchall()
        first = conn.execute(sql.encode()).fetchall()
        again = conn.execute(sql.replace("(1,", "(2,").encode()).fetchall()
    assert first == short and again == short[1:]
    assert "914-27-6380" not in repr(first) and "quokkamail7731" not in repr(first)


def test_a_long_statement_on_a_table_outside_the_role_is_refused(proxy: RunningProxy) -> None:
    sql = in_list(LONG_STATEMENT + 100).replace("gv.people", "pg_catalog.pg_authid")
    with connect(proxy) as conn:
        with pytest.raises(psycopg.Error) as refused:
            conn.execute(sql.encode())
        assert refused.value.sqlstate == "42501"
        assert conn.execute("select 1").fetchone() == (1,)


def test_a_long_prepare_is_tracked_and_its_execute_masked(proxy: RunningProxy) -> None:
    sql = in_list(LONG_STATEMENT + 100)
    with connect(proxy) as conn:
        conn.execute(f"prepare long_people as {sql}".encode())
        rows = conn.execute("execute long_people").fetchall()
    assert [row[0] for row in rows] == [1, 2, 3] and "914-27-6380" not in repr(rows)


def test_a_statement_over_max_statement_size_is_refused_at_once_and_the_connection_stays_usable(
        proxy: RunningProxy) -> None:
    sql = in_list(MAX_STATEMENT_SIZE + 1)
    with connect(proxy, "gv_admin") as conn:
        with pytest.raises(psycopg.Error) as refused:
            conn.execute(sql.encode())
        assert refused.value.sqlstate == "42501"
        assert "statement-too-large" in str(refused.value)
        assert conn.execute("select 1").fetchone() == (1,)


def _password_message(size: int) -> bytes:
    """An answer to the password request, `size` bytes of body."""
    return b"p" + struct.pack("!I", 4 + size) + b"x" * (size - 1) + b"\x00"


def _answer_to_password_message(proxy: RunningProxy, size: int) -> bytes:
    with socket.create_connection((proxy.host, proxy.port), timeout=30) as client:
        client.sendall(StartupMessage(3 << 16, (("user", "gv_analyst"), ("database", DATABASE))).encode())
        assert client.recv(1) == b"R"
        client.sendall(_password_message(size))
        answer = b""
        while chunk := client.recv(65536):
            answer += chunk
    return answer


def test_an_oversized_message_before_authentication_gets_a_fatal_protocol_violation(
        proxy: RunningProxy) -> None:
    answer = _answer_to_password_message(proxy, PG_MAX_AUTH_TOKEN_LENGTH + 1)
    assert b"FATAL" in answer and b"08P01" in answer
    assert b"before authentication" in answer


def test_a_password_message_within_postgresqls_cap_still_reaches_postgresql(proxy: RunningProxy) -> None:
    answer = _answer_to_password_message(proxy, PG_MAX_AUTH_TOKEN_LENGTH)
    assert b"28P01" in answer  # PostgreSQL judged the (wrong) password


async def test_an_analysis_that_passes_its_deadline_is_refused_and_the_analysis_threads_stay_usable(
        world: GuardWorld) -> None:
    from proxy.connection_policy import ClientInfo
    from proxy.enforcement import ANALYSIS_WORKERS, Enforcement
    from proxy.guard.verdict import Refuse

    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "policy.yaml")
        with open(path, "w") as handle:
            handle.write(POLICY)
        enforcement = await Enforcement.create(path, world.dsn())
    try:
        enforcement.analysis_deadline = 0.05  # judging a 50,000-value IN list takes over a second
        connection = enforcement.connection_policy()
        client = ClientInfo(1, "test", "gv_analyst", DATABASE, "", False)
        assert await connection.on_startup({"user": "gv_analyst", "database": DATABASE}, client) is None
        for extra in range(ANALYSIS_WORKERS + 1):  # new shapes: every thread interrupted, none lost
            refused = await connection.on_query(in_list(150_000 + 30 * extra))
            assert isinstance(refused, Refuse) and refused.rule == "too-complex", refused
        again = await connection.on_query(in_list(150_000).replace("(1,", "(7,"))  # the shape is refused
        assert isinstance(again, Refuse) and again.rule == "too-complex"
        enforcement.analysis_deadline = 60.0
        judged = await connection.on_query(in_list(LONG_STATEMENT + 100))
        assert not isinstance(judged, Refuse), judged
    finally:
        await enforcement.close()
