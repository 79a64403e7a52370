"""A client's Terminate is an orderly close: everything it sent before reaches PostgreSQL, in order,
and the results come back, exactly as they do straight.

Each case sends the same raw bytes to PostgreSQL directly and through pgveil (without a policy:
the lean relay; with a policy and an audit log: the policy path, where each statement waits for
its access record) and compares what the backend did (rows the statements wrote) and what the
client received (message types in order). The audit log must hold one completion per access.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from proxy.wire import ReceiveBuffer, StartupMessage
from proxy.wire.frontend import (
    Bind,
    CopyData,
    CopyDone,
    Execute,
    Flush,
    Parse,
    Query,
    Sync,
    Terminate,
)
from tests.audit_consistency import audit_problems
from tests.conftest import Upstream
from tests.proxy_harness import running_proxy, wait_until

DATABASE = "terminate_test"
TABLE = "term_rows"
POLICY = """\
version: 1
settings: {{default_role: deny}}
roles:
  writer:
    members: ["{login}"]
    statements: [select, insert, copy_in]
    tables: ["public.{table}"]
    reveal: [public, internal, confidential, restricted]
"""
TERMINATE = Terminate().encode()


@dataclass
class Database:
    """The test upstream with this module's database as the proxy's default database."""

    upstream: Upstream

    @property
    def superuser(self) -> str:
        return self.upstream.superuser

    @property
    def superpassword(self) -> str | None:
        return self.upstream.superpassword

    @property
    def host(self) -> str:
        return self.upstream.host

    @property
    def port(self) -> int:
        return self.upstream.port

    def dsn(self, user: str | None = None, password: str | None = None, dbname: str = DATABASE) -> str:
        return self.upstream.dsn(user, password, dbname)

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            return conn.execute(sql).fetchall()  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def database(upstream_any: Upstream) -> Database:
    upstream_any.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
    upstream_any.execute(f"CREATE DATABASE {DATABASE}")
    upstream_any.execute(f"CREATE TABLE {TABLE} (n int, tag text)", dbname=DATABASE)
    return Database(upstream_any)


@dataclass
class Route:
    name: str
    host: str
    port: int
    audit_log: Path | None = None


@pytest.fixture(scope="module", params=["plain", "policy", "policy-strict"])
def route(request: pytest.FixtureRequest, database: Database,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Route]:
    """pgveil without a policy (the lean relay); with a policy and an audit log in its default
    mode (a verdict is there at once); and in strict mode (each statement waits for the fsync of
    its record: what the client sends meanwhile waits behind the verdict)."""
    if request.param == "plain":
        with running_proxy(database) as proxy:
            yield Route("plain", proxy.host, proxy.port)
        return
    directory = tmp_path_factory.mktemp("terminate")
    policy, log = directory / "policy.yaml", directory / "audit.jsonl"
    policy.write_text(POLICY.format(login=database.superuser, table=TABLE))
    audit = {"fsync_interval_ms": 0} if request.param == "policy-strict" else {}
    with running_proxy(database, str(policy), audit_log=str(log), extra={"audit": audit}) as proxy:
        yield Route(request.param, proxy.host, proxy.port, log)


@contextmanager
def raw_session(route: Route, database: Database, app: str) -> Iterator[socket.socket]:
    """A logged-in socket (trust authentication, the superuser), startup messages read."""
    sock = socket.create_connection((route.host, route.port), timeout=30)
    try:
        params = (("user", database.superuser), ("database", DATABASE), ("application_name", app))
        sock.sendall(StartupMessage(3 << 16, params).encode())
        buffer = ReceiveBuffer(1 << 30)
        while True:
            message = buffer.next_message()
            if message is not None:
                assert message[0] != ord("E"), message
                if message[0] == ord("Z"):
                    break
                continue
            data = sock.recv(65536)
            assert data, "the server closed the connection during startup"
            buffer.feed(data)
        yield sock
    finally:
        sock.close()


def read_to_end(sock: socket.socket) -> list[str]:
    """The type of each message until the server closes the connection (an ErrorResponse as
    E:<SQLSTATE>)."""
    buffer = ReceiveBuffer(1 << 30)
    types: list[str] = []
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if data:
            buffer.feed(data)
        while (message := buffer.next_message()) is not None:
            tag, body = message
            if tag == ord("E"):
                fields = dict((part[:1], part[1:]) for part in body.split(b"\x00") if part)
                types.append(f"E:{fields[b'C'].decode()}")
            else:
                types.append(chr(tag))
        if not data:
            return types


def backend_gone(database: Database, app: str) -> bool:
    return not database.rows(f"SELECT pid FROM pg_stat_activity WHERE application_name = '{app}'")


def rows_of(database: Database, tag: str) -> list[tuple[Any, ...]]:
    return database.rows(f"SELECT n FROM {TABLE} WHERE tag = '{tag}' ORDER BY n")


def exchange(route: Route, database: Database, writes: list[bytes],
             then: str = "read") -> tuple[list[str], str]:
    """Send `writes` (one sendall each) after startup; `then`: "read" (read to the end), "half"
    (shut the sending side, then read to the end) or "close" (close the socket at once, read
    nothing). Returns the message types received and the application_name used."""
    app = f"term_{uuid.uuid4().hex[:10]}"
    types: list[str] = []
    with raw_session(route, database, app) as sock:
        for data in writes:
            sock.sendall(data)
        if then == "half":
            sock.shutdown(socket.SHUT_WR)
        if then != "close":
            types = read_to_end(sock)
    wait_until(lambda: backend_gone(database, app), "the backend to end")
    return types, app


def outcome(route: Route, database: Database, build: Any, then: str = "read",
            split: bool = False) -> tuple[list[str], list[tuple[Any, ...]]]:
    """(message types received, rows written) of the byte sequence `build(tag)` sent over `route`."""
    tag = uuid.uuid4().hex
    data: list[bytes] = build(tag)
    writes = data if split else [b"".join(data)]
    types, _ = exchange(route, database, writes, then)
    return types, rows_of(database, tag)


def straight(database: Database) -> Route:
    return Route("straight", database.host, database.port)


def assert_like_postgresql(route: Route, database: Database, build: Any, then: str = "read",
                           split: bool = False) -> None:
    if then == "close":
        # Straight, PostgreSQL may notice the closed socket when it writes a result and stop before
        # the rest of a pipeline (it varies with timing); what pgveil forwards runs in full, as it
        # does straight when the client reads.
        expected = ([], outcome(straight(database), database, build, "read", split)[1])
    else:
        expected = outcome(straight(database), database, build, then, split)
    got = outcome(route, database, build, then, split)
    assert got == expected
    if route.audit_log is not None:
        assert audit_problems(route.audit_log, wait=True) == []


def insert(tag: str, n: int = 1) -> bytes:
    return Query(f"INSERT INTO {TABLE} VALUES ({n}, '{tag}')").encode()


# ---- a Query, then Terminate ------------------------------------------------------------------------


@pytest.mark.parametrize("then", ["read", "half", "close"])
@pytest.mark.parametrize("split", [False, True], ids=["one-write", "two-writes"])
def test_a_query_then_terminate_runs_and_its_results_arrive(route: Route, database: Database,
                                                            then: str, split: bool) -> None:
    def build(tag: str) -> list[bytes]:
        return [insert(tag, 1) + insert(tag, 2), TERMINATE]

    types, rows = outcome(straight(database), database, build, then, split)
    assert rows == [(1,), (2,)]
    assert types == ([] if then == "close" else ["C", "Z", "C", "Z"])
    assert_like_postgresql(route, database, build, then, split)


@pytest.mark.parametrize("route", ["policy", "policy-strict"], indirect=True)  # a refusal needs a policy
def test_a_refused_query_before_terminate_is_refused_and_audited(route: Route, database: Database) -> None:
    tag = uuid.uuid4().hex
    writes = [Query("SELECT * FROM pg_authid").encode() + insert(tag) + TERMINATE]
    types, _ = exchange(route, database, writes)
    assert types == ["E:42501", "Z", "C", "Z"]
    assert rows_of(database, tag) == [(1,)]
    assert route.audit_log is not None
    assert audit_problems(route.audit_log, wait=True) == []
    records = [json.loads(line) for line in route.audit_log.read_text().splitlines()]
    refused = [r for r in records if r["type"] == "access" and r["decision"] == "refuse"]
    assert refused and refused[-1]["relations"] == ["pg_catalog.pg_authid"]


# ---- the extended protocol -------------------------------------------------------------------------


@pytest.mark.parametrize("then", ["read", "close"])
@pytest.mark.parametrize("split", [False, True], ids=["one-write", "two-writes"])
def test_a_parse_bind_execute_sync_pipeline_then_terminate(route: Route, database: Database,
                                                           then: str, split: bool) -> None:
    def build(tag: str) -> list[bytes]:
        messages = []
        for n in (1, 2, 3):
            messages += [Parse("", f"INSERT INTO {TABLE} VALUES ({n}, '{tag}')"), Bind("", ""), Execute(""),
                         Sync()]
        return [b"".join(m.encode() for m in messages), TERMINATE]

    assert_like_postgresql(route, database, build, then, split)


def test_an_execute_without_sync_then_terminate(route: Route, database: Database) -> None:
    def build(tag: str) -> list[bytes]:
        messages = [Parse("", f"INSERT INTO {TABLE} VALUES (5, '{tag}')"), Bind("", ""), Execute(""), Flush()]
        return [b"".join(m.encode() for m in messages), TERMINATE]

    assert_like_postgresql(route, database, build, "read", True)


# ---- COPY FROM STDIN --------------------------------------------------------------------------------


@pytest.mark.parametrize("then", ["read", "close"])
def test_copy_data_and_copy_done_then_terminate(route: Route, database: Database, then: str) -> None:
    def build(tag: str) -> list[bytes]:
        return [Query(f"COPY {TABLE} FROM STDIN").encode(),
                CopyData(f"1\t{tag}\n2\t{tag}\n".encode()).encode() + CopyDone().encode() + TERMINATE]

    assert_like_postgresql(route, database, build, then, split=True)


def test_terminate_in_the_middle_of_copy_data_is_an_error_as_postgresql_makes_it(
        route: Route, database: Database) -> None:
    def build(tag: str) -> list[bytes]:
        return [Query(f"COPY {TABLE} FROM STDIN").encode(),
                CopyData(f"1\t{tag}\n".encode()).encode() + TERMINATE]

    assert_like_postgresql(route, database, build, "half", split=True)


# ---- Terminate while a statement runs ---------------------------------------------------------------


@pytest.mark.parametrize("then", ["read", "half", "close"])
def test_terminate_while_a_statement_runs_lets_it_finish(route: Route, database: Database, then: str) -> None:
    def run(over: Route) -> tuple[list[str], list[tuple[Any, ...]]]:
        tag, app = uuid.uuid4().hex, f"term_{uuid.uuid4().hex[:10]}"
        types: list[str] = []
        with raw_session(over, database, app) as sock:
            sock.sendall(Query(f"INSERT INTO {TABLE} SELECT 7, '{tag}' FROM pg_sleep(0.5)").encode())
            wait_until(lambda: database.rows(
                f"SELECT 1 FROM pg_stat_activity WHERE application_name = '{app}' AND state = 'active'"),
                "the statement to run")
            sock.sendall(TERMINATE)
            if then == "half":
                sock.shutdown(socket.SHUT_WR)
            if then != "close":
                types = read_to_end(sock)
        wait_until(lambda: backend_gone(database, app), "the backend to end")
        return types, rows_of(database, tag)

    expected = run(straight(database))
    assert expected[1] == [(7,)]
    assert run(route) == expected
    if route.audit_log is not None:
        assert audit_problems(route.audit_log, wait=True) == []


# ---- a real driver --------------------------------------------------------------------------------


def test_psycopg_send_query_then_finish_runs_the_statement(route: Route, database: Database) -> None:
    """libpq's fire-and-forget: PQsendQuery, then PQfinish at once (Terminate, close); in a
    process of its own (libpq's blocking calls hold the GIL the in-process pgveil needs)."""
    def run(over: Route) -> list[tuple[Any, ...]]:
        tag, app = uuid.uuid4().hex, f"term_{uuid.uuid4().hex[:10]}"
        dsn = (f"host={over.host} port={over.port} dbname={DATABASE} user={database.superuser} "
               f"application_name={app} sslmode=disable gssencmode=disable")
        two = f"INSERT INTO {TABLE} VALUES (1, '{tag}'); INSERT INTO {TABLE} VALUES (2, '{tag}')"
        script = ("import sys, psycopg\n"
                  "conn = psycopg.pq.PGconn.connect(sys.argv[1].encode())\n"
                  "assert conn.status == psycopg.pq.ConnStatus.OK, conn.error_message\n"
                  "assert conn.send_query(sys.argv[2].encode()) is None\n"
                  "conn.finish()\n")
        subprocess.run([sys.executable, "-c", script, dsn, two], check=True, timeout=60)
        wait_until(lambda: backend_gone(database, app), "the backend to end")
        return rows_of(database, tag)

    assert run(straight(database)) == [(1,), (2,)]
    assert run(route) == [(1,), (2,)]
    if route.audit_log is not None:
        assert audit_problems(route.audit_log, wait=True) == []
