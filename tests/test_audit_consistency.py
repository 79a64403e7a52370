"""Audit records in step with what ran: every statement, refused ones included, has one access record
and one completion carrying its own request number, whatever refuses it or ends the session; a
statement that never reached PostgreSQL has a completion that says so."""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import Awaitable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from proxy.audit import AuditError, AuditSink, verify
from proxy.audit.sink import Unsealed
from proxy.connection_policy import ClientInfo, ConnectionPolicy, PassThrough
from proxy.guard.verdict import Allow, Verdict
from proxy.operations import AuditSettings, build_connection_policy_factory, open_audit_sink
from proxy.wire.frontend import Bind, Execute, Parse, Query, Sync, Terminate
from tests.audit_consistency import audit_problems, records_problems
from tests.conftest import Upstream
from tests.proxy_harness import RawClient, RunningProxy, running_proxy, wait_until

TABLE = "audit_step_rows"


class Troublesome(PassThrough):
    """Allows everything, except: SQL containing `boom` makes it raise, `odd` makes it answer
    something that is not a verdict, and `wait` makes it wait until `released` is set."""

    released: threading.Event = threading.Event()

    async def _decide(self, sql: str) -> Verdict:
        if "boom" in sql:
            raise RuntimeError("the policy broke on this statement")
        if "odd" in sql:
            return "not a verdict"  # type: ignore[return-value]
        if "wait" in sql:
            while not self.released.is_set():
                await asyncio.sleep(0.01)
        return Allow(sql)

    async def on_query(self, sql: str) -> Verdict:
        return await self._decide(sql)

    async def on_parse(self, statement_name: str, sql: str, param_types: tuple[int, ...]) -> Verdict:
        return await self._decide(sql)

    async def on_bind(self, statement_name: str) -> Verdict | None:
        return Allow("")  # every re-execution is decided (and audited)


@dataclass
class Audited:
    proxy: RunningProxy
    log: Path
    upstream: Upstream
    sink: Any

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]

    def of(self, app: str) -> list[dict[str, Any]]:
        records = self.records()
        ids = {r["connection_id"] for r in records if r.get("application_name") == app}
        return [r for r in records if r.get("connection_id") in ids and r["type"] in ("access", "completion")]

    def rows(self, tag: str) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.upstream.dsn(), autocommit=True) as conn:
            return conn.execute(f"SELECT n FROM {TABLE} WHERE tag = %s ORDER BY n", (tag,)).fetchall()


class Faltering:
    """A real file sink whose `append` (what a statement waits for) fails while `broken` is set;
    records queued behind still reach the file."""

    def __init__(self, inner: AuditSink) -> None:
        self.inner = inner
        self.broken = threading.Event()

    def append(self, record: Unsealed) -> Awaitable[None] | None:
        if self.broken.is_set():
            raise AuditError("injected: no space left on device")
        return self.inner.append(record)

    def append_behind(self, record: Unsealed) -> None:
        self.inner.append_behind(record)

    async def flush(self) -> None:
        await self.inner.flush()

    async def close(self) -> None:
        await self.inner.close()


@contextmanager
def audited_proxy(upstream: Upstream, directory: Path, faltering: bool = False) -> Iterator[Audited]:
    """pgveil with the Troublesome policy behind the audit layer, as `serve` wires a policy."""
    log = directory / f"audit-{uuid.uuid4().hex[:6]}.jsonl"
    sink: AuditSink | None = open_audit_sink(AuditSettings(log=str(log)))
    assert sink is not None
    if faltering:
        sink = Faltering(sink)

    def inner(client: ClientInfo) -> ConnectionPolicy:
        return Troublesome()

    factory = build_connection_policy_factory(inner, sink, None)
    with running_proxy(upstream, policy_factory=factory) as proxy:
        try:
            yield Audited(proxy, log, upstream, sink)
        finally:
            wait_until(lambda: proxy.open_sessions() == 0, "the sessions to end")
            proxy.run(sink.close())


@pytest.fixture
def audited(upstream: Upstream, tmp_path: Path) -> Iterator[Audited]:
    upstream.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (n int, tag text)")
    Troublesome.released.clear()
    with audited_proxy(upstream, tmp_path) as running:
        yield running
    Troublesome.released.set()


def test_the_checker_finds_what_is_out_of_step() -> None:
    """The checker itself: the issue's example (no access record for a refused statement, its
    completion carrying the number of the request before) and its neighbours are found."""
    access = {"type": "access", "connection_id": 1}
    completion = {"type": "completion", "connection_id": 1}
    assert records_problems([{**access, "request": 1}, {**completion, "request": 1},
                             {**access, "request": 2}, {**completion, "request": 2, "requests": [2, 3]},
                             {**access, "request": 3}]) != []
    assert records_problems([{**access, "request": 1}, {**completion, "request": 1},
                             {**completion, "request": 1}]) != []
    assert records_problems([{**access, "request": 1}, {**access, "request": 2},
                             {**completion, "request": 1}]) != []
    assert records_problems([{**access, "request": 2}, {**access, "request": 1},
                             {**completion, "request": 2}, {**completion, "request": 1}]) != []
    assert records_problems([{**access, "request": 1}, {**access, "request": 2},
                             {**completion, "request": 1, "requests": [1, 2]},
                             {"type": "connect", "connection_id": 1}, {**access, "request": 1},
                             {**completion, "request": 1}]) == []


def test_a_statement_the_policy_fails_on_gets_its_own_access_and_completion(audited: Audited) -> None:
    app = f"step_{uuid.uuid4().hex[:8]}"
    dsn = audited.proxy.dsn() + f"?application_name={app}"
    with psycopg.connect(dsn, autocommit=True, prepare_threshold=None) as conn:
        conn.execute("SELECT 1")
        for sql in ("SELECT 'boom'", "SELECT 'odd'"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="pgveil: internal-error"):
                conn.execute(sql)
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="pgveil: internal-error"):
            conn.execute("SELECT %s::text || 'boom'", ("x",))  # extended protocol: Parse
        conn.execute("SELECT 2")
    assert audit_problems(audited.log, wait=True) == []
    records = audited.of(app)
    accesses = [(r["request"], r["decision"], r["rule"]) for r in records if r["type"] == "access"]
    assert accesses == [(1, "allow", None), (2, "refuse", "internal-error"), (3, "refuse", "internal-error"),
                        (4, "refuse", "internal-error"), (5, "allow", None)]
    completions = [(r["request"], r["sqlstate"]) for r in records if r["type"] == "completion"]
    assert completions == [(1, None), (2, "42501"), (3, "42501"), (4, "42501"), (5, None)]


def test_statements_skipped_after_an_error_until_sync_are_covered_by_the_request_completion(
        audited: Audited) -> None:
    tag, app = uuid.uuid4().hex, f"step_{uuid.uuid4().hex[:8]}"
    with RawClient.connect(audited.proxy.host, audited.proxy.port, application_name=app) as client:
        client.send(Parse("", "SELECT 1/0"), Bind("", ""), Execute(""),
                    Parse("", f"INSERT INTO {TABLE} VALUES (1, '{tag}')"), Bind("", ""), Execute(""),
                    Parse("", "SELECT 'boom'"), Bind("", ""), Execute(""), Sync())
        client.until_ready()
        client.send(Query(f"INSERT INTO {TABLE} VALUES (2, '{tag}')"))
        client.until_ready()
        client.send(Terminate())
        client.read_to_end()
    assert audited.rows(tag) == [(2,)]
    assert audit_problems(audited.log, wait=True) == []
    completions = [r for r in audited.of(app) if r["type"] == "completion"]
    assert [(r["request"], r.get("requests"), r["sqlstate"]) for r in completions] == [
        (1, [1, 2, 3], "22012"), (4, None, None)]


def test_a_statement_whose_client_left_before_its_verdict_has_a_completion_saying_it_was_not_sent(
        audited: Audited) -> None:
    tag, app = uuid.uuid4().hex, f"step_{uuid.uuid4().hex[:8]}"
    client = RawClient.connect(audited.proxy.host, audited.proxy.port, application_name=app)
    client.send(Query(f"INSERT INTO {TABLE} SELECT 1, '{tag}' WHERE 'wait' <> ''"))
    client.close()  # no Terminate: a client that went away
    wait_until(lambda: audited.proxy.open_sessions() == 0, "the session to end")
    Troublesome.released.set()
    wait_until(lambda: any(r["type"] == "completion" for r in audited.of(app)), "the completion record")
    assert audit_problems(audited.log, wait=True) == []
    completions = [r for r in audited.of(app) if r["type"] == "completion"]
    assert [(r["request"], r.get("forwarded")) for r in completions] == [(1, False)]
    assert audited.rows(tag) == []
    assert verify(audited.log) == []  # `pgveil audit verify` takes the record as any other


def test_a_statement_cancelled_because_its_client_left_has_a_completion_saying_it_was_not_answered(
        audited: Audited) -> None:
    app = f"step_{uuid.uuid4().hex[:8]}"
    client = RawClient.connect(audited.proxy.host, audited.proxy.port, application_name=app)
    client.send(Query("SELECT 1"))
    client.until_ready()
    client.send(Query("SELECT pg_sleep(600)"))
    with psycopg.connect(audited.upstream.dsn(), autocommit=True) as conn:
        wait_until(lambda: conn.execute("SELECT 1 FROM pg_stat_activity WHERE application_name = %s "
                                        "AND state = 'active'", (app,)).fetchall(), "the statement to run")
    client.close()
    assert audit_problems(audited.log, wait=True) == []
    completions = [r for r in audited.of(app) if r["type"] == "completion"]
    assert [(r["request"], r.get("answered")) for r in completions] == [(1, None), (2, False)]


SERVE_POLICY = """version: 1
settings: {{default_role: deny}}
roles:
  everything:
    members: ["{login}"]
    statements: [select, insert]
    tables: ["public.{table}"]
    reveal: [public, internal, confidential, restricted]
"""


def test_statements_refused_by_every_rule_of_the_serve_runtime_are_audited_in_step(
        upstream: Upstream, tmp_path: Path) -> None:
    """Through the policy runtime `serve` uses: a table refused, a statement over
    max_statement_size, bytes that are not UTF8, a refusal inside a pipeline, a Terminate right
    behind them."""
    upstream.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (n int, tag text)")
    policy, log = tmp_path / "policy.yaml", tmp_path / "audit.jsonl"
    policy.write_text(SERVE_POLICY.format(login=upstream.superuser, table=TABLE))
    tag = uuid.uuid4().hex
    too_large = f"SELECT n FROM {TABLE} WHERE tag IN ({', '.join(repr(str(i)) for i in range(2000))})"
    with running_proxy(upstream, str(policy), audit_log=str(log), max_statement_size=4096,
                       extra={"audit": {"fsync_interval_ms": 0}}) as proxy, \
            RawClient.connect(proxy.host, proxy.port) as client:
        invalid = b"SELECT '\xff'"
        client.send(Query("SELECT * FROM pg_authid"), Query(too_large),
                    b"Q" + (len(invalid) + 5).to_bytes(4, "big") + invalid + b"\x00",
                    Parse("", f"INSERT INTO {TABLE} VALUES (1, '{tag}')"), Bind("", ""), Execute(""), Sync(),
                    Parse("", "SELECT * FROM pg_authid"), Bind("", ""), Execute(""),
                    Parse("", f"INSERT INTO {TABLE} VALUES (2, '{tag}')"), Bind("", ""), Execute(""), Sync(),
                    Query(f"INSERT INTO {TABLE} VALUES (3, '{tag}')"), Terminate())
        received = client.read_to_end()
    errors = [m.get("C") for m in received if type(m).__name__ == "ErrorResponse"]
    assert errors == ["42501", "42501", "22021", "42501"]
    with psycopg.connect(upstream.dsn(), autocommit=True) as conn:
        rows = conn.execute(f"SELECT n FROM {TABLE} WHERE tag = %s ORDER BY n", (tag,)).fetchall()
    assert rows == [(1,), (3,)]
    assert audit_problems(log) == []
    records = [json.loads(line) for line in log.read_text().splitlines()]
    accesses = [(r["request"], r["rule"]) for r in records if r["type"] == "access"]
    catalog = accesses[0][1]
    assert catalog is not None
    assert [number for number, _ in accesses] == [1, 2, 3, 4, 5, 6, 7]
    assert [accesses[i] for i in (0, 1, 3, 4, 5, 6)] == [(1, catalog), (2, "statement-too-large"), (4, None),
                                                         (5, catalog), (6, None), (7, None)]


def test_a_statement_under_a_foreign_client_encoding_is_audited_in_step(
        upstream: Upstream, tmp_path: Path) -> None:
    """The issue's example: a client_encoding LATIN9 session sending a byte that is € in LATIN9
    (once refused as internal-error with no access record, and a completion carrying the
    number of the request before); whatever pgveil decides, the records are in step."""
    upstream.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (n int, tag text)")
    policy, log = tmp_path / "policy.yaml", tmp_path / "audit.jsonl"
    policy.write_text(SERVE_POLICY.format(login=upstream.superuser, table=TABLE))
    euro = b"SELECT '\xa4' AS euro"
    with running_proxy(upstream, str(policy), audit_log=str(log)) as proxy, \
            RawClient.connect(proxy.host, proxy.port) as client:
        client.send(Query("SET client_encoding TO 'LATIN9'"))
        client.until_ready()
        client.send(b"Q" + (len(euro) + 5).to_bytes(4, "big") + euro + b"\x00")
        client.until_ready()
        client.send(Query("SELECT 1"))
        client.until_ready()
        client.send(Terminate())
        client.read_to_end()
    assert audit_problems(log) == []
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["request"] for r in records if r["type"] == "access"] == [1, 2, 3]


def test_a_statement_whose_access_record_could_not_be_written_gets_no_completion_either(
        upstream: Upstream, tmp_path: Path) -> None:
    """Refused as audit-unavailable: nothing in the log about it, not even when the sink works
    again by the time its completion would be written; the next statement is numbered on."""
    app = f"step_{uuid.uuid4().hex[:8]}"
    with audited_proxy(upstream, tmp_path, faltering=True) as audited:
        dsn = audited.proxy.dsn() + f"?application_name={app}"
        with psycopg.connect(dsn, autocommit=True, prepare_threshold=None) as conn:
            conn.execute("SELECT 1")
            audited.sink.broken.set()
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="pgveil: audit-unavailable"):
                conn.execute("SELECT 2")
            audited.sink.broken.clear()
            conn.execute("SELECT 3")
        assert audit_problems(audited.log, wait=True) == []
        numbers = [(r["type"], r["request"]) for r in audited.of(app)]
        assert numbers == [("access", 1), ("completion", 1), ("access", 3), ("completion", 3)]
