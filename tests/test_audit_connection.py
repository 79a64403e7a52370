"""AuditedConnection: the access record is durable before the verdict returns; no sink, no statement."""

from __future__ import annotations

import json
import os
from pathlib import Path

import psycopg

from proxy.audit import AuditError, JsonLinesFileSink, MappingWrites, StdoutSink, Unsealed, verify
from proxy.audit.connection import AuditedConnection
from proxy.audit.postgres import PostgresSink
from proxy.connection_policy import ClientInfo, Outcome, PassThrough
from proxy.guard.verdict import Allow, Refuse, StatementInfo, Verdict
from proxy.metrics import Metrics
from tests.conftest import Upstream

CLIENT = ClientInfo(connection_id=7, address="127.0.0.1:50000", user="alice", database="shop",
                    application_name="report", tls=False)
INFO = StatementInfo(kind="select", fingerprint="abc123",
                     normalized_sql="SELECT email FROM users WHERE id = $1", relations=("public.users",),
                     columns=("public.users.email",), masks=("public.users.email:email",))


class GuardStandIn(PassThrough):
    """A real ConnectionPolicy with fixed verdicts (the guard is tested on its own)."""

    role_name = "analyst"
    policy_version = "v-test"

    async def on_query(self, sql: str) -> Verdict:
        if "secret" in sql:
            return Refuse("tables", "role analyst may not read public.secret", info=INFO)
        return Allow(sql, info=INFO)


class FailingSink(MappingWrites):
    """A sink whose storage is gone."""

    def append(self, record: Unsealed) -> None:
        raise AuditError("disk gone")

    def append_behind(self, record: Unsealed) -> None:
        return None  # lost, as on a vanished disk

    async def flush(self) -> None:
        return None

    async def close(self) -> None:
        return None


def records(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_access_record_is_in_the_file_before_the_verdict_returns(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    sink = JsonLinesFileSink(log, fsync="batch")
    audited = AuditedConnection(GuardStandIn(), sink)
    await audited.on_startup({"user": "alice"}, CLIENT)
    verdict = await audited.on_query("SELECT email FROM users WHERE id = 42")
    assert isinstance(verdict, Allow)
    access = records(log)[-1]  # read before anything else happens: already written
    assert access["type"] == "access"
    fields = ("connection_id", "client_address", "login", "role", "database", "application_name",
              "statement_kind", "fingerprint", "normalized_sql", "relations", "columns", "masks", "rule",
              "decision", "policy_version")
    assert {k: access[k] for k in fields} == {
        "connection_id": 7, "client_address": "127.0.0.1:50000", "login": "alice", "role": "analyst",
        "database": "shop", "application_name": "report", "statement_kind": "select",
        "fingerprint": "abc123", "normalized_sql": "SELECT email FROM users WHERE id = $1",
        "relations": ["public.users"], "columns": ["public.users.email"],
        "masks": ["public.users.email:email"], "rule": None, "decision": "allow", "policy_version": "v-test"}
    assert "id = 42" not in log.read_text()  # no literal values by default
    await audited.on_complete(Outcome(rows=1, sqlstate=None, upstream_seconds=0.002))
    await sink.flush()  # completions are queued behind, not waited for
    completion = records(log)[-1]
    assert (completion["type"], completion["request"], completion["rows"], completion["sqlstate"]) == (
        "completion", access["request"], 1, None)
    await sink.close()
    assert verify(log) == []


async def test_refused_statements_are_audited_with_their_rule(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    sink = JsonLinesFileSink(log)
    audited = AuditedConnection(GuardStandIn(), sink, CLIENT)
    verdict = await audited.on_query("SELECT * FROM secret")
    assert isinstance(verdict, Refuse)
    last = records(log)[-1]
    assert (last["decision"], last["rule"]) == ("refuse", "tables")
    await sink.close()


async def test_statements_are_refused_when_the_sink_cannot_write() -> None:
    metrics = Metrics()
    audited = AuditedConnection(GuardStandIn(), FailingSink(), CLIENT, timer=metrics)
    verdict = await audited.on_query("SELECT 1")
    assert isinstance(verdict, Refuse)
    assert verdict.rule == "audit-unavailable" and verdict.sqlstate == "42501"
    assert verdict.text.startswith("pgveil: audit-unavailable: ")
    assert metrics.registry.get_sample_value("pgveil_audit_failures_total", {"type": "access"}) == 1
    refusal = await audited.on_startup({}, CLIENT)
    assert refusal is not None and refusal.rule == "audit-unavailable"


async def test_on_audit_failure_allow_serves_the_statement_unaudited() -> None:
    audited = AuditedConnection(GuardStandIn(), FailingSink(), CLIENT, on_audit_failure="allow")
    assert isinstance(await audited.on_query("SELECT 1"), Allow)


async def test_a_full_disk_refuses_statements(tmp_path: Path) -> None:
    audited = AuditedConnection(GuardStandIn(), JsonLinesFileSink("/dev/full", fsync="never"), CLIENT)
    verdict = await audited.on_query("SELECT 1")
    assert isinstance(verdict, Refuse) and verdict.rule == "audit-unavailable"


async def test_literals_are_recorded_only_when_asked(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    sink = JsonLinesFileSink(log)
    audited = AuditedConnection(GuardStandIn(), sink, CLIENT, include_literals=True)
    await audited.on_query("SELECT email FROM users WHERE id = 42")
    assert records(log)[-1]["sql"] == "SELECT email FROM users WHERE id = 42"
    await sink.close()


async def test_stdout_sink_writes_chained_lines_to_its_descriptor(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    sink = StdoutSink(fd=write_end)
    await sink.write({"type": "access", "request": 1})
    await sink.write({"type": "completion", "request": 1})
    await sink.close()
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        lines = [json.loads(line) for line in pipe.read().splitlines()]
    assert [r["seq"] for r in lines] == [0, 1] and lines[1]["prev"] == lines[0]["hash"]


async def test_postgres_sink_stores_each_batch_before_writers_return(upstream: Upstream) -> None:
    upstream.execute("DROP TABLE IF EXISTS ops_audit_records")
    sink = PostgresSink(upstream.dsn(), table="ops_audit_records")
    audited = AuditedConnection(GuardStandIn(), sink, CLIENT)
    await audited.on_query("SELECT email FROM users")
    await audited.on_complete(Outcome(rows=3, sqlstate=None, upstream_seconds=0.001))
    await sink.flush()
    with psycopg.connect(upstream.dsn()) as conn:
        rows = conn.execute("SELECT seq, type, line::jsonb ->> 'login' FROM ops_audit_records "
                            "WHERE chain = %s ORDER BY seq", (sink.chain_id,)).fetchall()
    assert rows == [(0, "access", "alice"), (1, "completion", "alice")]
    await sink.close()


async def test_postgres_sink_failure_refuses_statements(upstream: Upstream) -> None:
    sink = PostgresSink(f"postgresql://postgres@{upstream.host}:1/postgres", table="ops_audit_records",
                        timeout_seconds=1.0)
    audited = AuditedConnection(GuardStandIn(), sink, CLIENT)
    verdict = await audited.on_query("SELECT 1")
    assert isinstance(verdict, Refuse) and verdict.rule == "audit-unavailable"


async def test_pipelined_requests_get_completions_in_decision_order(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    sink = JsonLinesFileSink(log)
    audited = AuditedConnection(GuardStandIn(), sink, CLIENT)
    await audited.on_query("SELECT 1")
    await audited.on_query("SELECT 2")
    await audited.on_parse("", "SELECT 3", ())
    await audited.on_parse("", "SELECT 4", ())
    await audited.on_complete(Outcome(rows=1, sqlstate=None, upstream_seconds=0.001))
    await audited.on_complete(Outcome(rows=1, sqlstate=None, upstream_seconds=0.001))
    await audited.on_complete(Outcome(rows=2, sqlstate=None, upstream_seconds=0.001, verdicts=2))
    await sink.flush()
    completions = [r for r in records(log) if r["type"] == "completion"]
    assert [(c["request"], c.get("requests")) for c in completions] == [(1, None), (2, None), (3, [3, 4])]
    await sink.close()


async def test_audit_verify_checks_the_chains_of_a_postgres_table(upstream: Upstream) -> None:
    from proxy.audit.postgres import verify_table

    upstream.execute("DROP TABLE IF EXISTS ops_audit_verified")
    sink = PostgresSink(upstream.dsn(), table="ops_audit_verified")
    for n in range(3):
        await sink.write({"type": "access", "request": n})
    await sink.close()
    assert await verify_table(upstream.dsn(), "ops_audit_verified") == []
    upstream.execute("UPDATE ops_audit_verified SET line = replace(line, '\"request\":1', '\"request\":7')")
    assert await verify_table(upstream.dsn(), "ops_audit_verified") == [
        f"ops_audit_verified:{sink.chain_id}:seq 1: record seq 1 does not match its hash: it was edited "
        "(or the log was written with an HMAC key: pass it)"]


async def test_a_completion_is_durable_before_the_connections_next_statement_runs(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    sink = JsonLinesFileSink(log, fsync="batch")
    audited = AuditedConnection(GuardStandIn(), sink, CLIENT)
    await audited.on_query("SELECT 1")
    await audited.on_complete(Outcome(rows=1, sqlstate=None, upstream_seconds=0.001))
    await audited.on_query("SELECT 2")
    assert [(r["type"], r["request"]) for r in records(log)] == [
        ("access", 1), ("completion", 1), ("access", 2)]
    await sink.close()


class RaisingFastPath(GuardStandIn):
    """A guard whose synchronous answers (FastPath) all raise."""

    def fast_query(self, sql: str) -> Verdict | None:
        raise RuntimeError("fast_query broke")

    def fast_parse(self, statement_name: str, sql: str, param_types: tuple[int, ...]) -> Verdict | None:
        raise RuntimeError("fast_parse broke")

    def fast_bind(self, statement_name: str) -> Verdict | None:
        raise RuntimeError("fast_bind broke")

    def fast_complete(self, outcome: Outcome) -> bool:
        return False


async def test_a_raising_fast_path_is_refused_and_audited_for_every_message(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    sink = JsonLinesFileSink(log)
    audited = AuditedConnection(RaisingFastPath(), sink, CLIENT)
    answers = [audited.fast_query("SELECT 1"), audited.fast_parse("s1", "SELECT 1", ()),
               audited.fast_bind("s1")]
    for answer in answers:  # refused, each with its own access record (not left to the relay)
        assert isinstance(answer, Refuse) and answer.rule == "internal-error"
    accesses = [r for r in records(log) if r["type"] == "access"]
    assert [(r["decision"], r["rule"]) for r in accesses] == [("refuse", "internal-error")] * 3
    await sink.close()
