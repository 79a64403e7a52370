"""Prepared statements, SQL-level PREPARE/EXECUTE and cursors through pgveil: every re-execution is
audited before it runs, and one prepared under a policy, role or session that has changed since
(an elevation that expired, a policy reload) is refused as stale instead of running as prepared.

Real clients (psycopg with server-side prepare, asyncpg with its statement cache, pgbench -M
prepared) through `pgveil serve`'s own wiring (running_proxy with a policy path), on the shared
guard database whose protected columns hold canary values."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from proxy.audit import JsonLinesFileSink
from proxy.audit.sink import AuditSink, MappingWrites, Unsealed
from proxy.cli import main as pgveil
from proxy.embedded import bin_dir, free_port
from proxy.enforcement import Enforcement
from proxy.operations import build_connection_policy_factory
from tests import guard_setup
from tests.guard_setup import DATABASE, PASSWORD, POLICY, GuardWorld, leaked_canaries
from tests.guard_setup import GuardDatabase as _GuardDatabase
from tests.proxy_harness import RunningProxy, running_proxy

world = guard_setup.world

GRANT_KEY = "prepared-test-grant-key-0123456789abcdef"
ELEVATIONS = """
elevations:
  - role: admin
    users: [gv_public]
    max_duration: 10m
    approver_required: true
    approvers: [gv_lead]
"""
RAW_SSN = "914-27-6380"
BY_ID = "select ssn from gv.people where id = %s"


@dataclass
class Served:
    proxy: RunningProxy
    log: Path
    grants: Path
    policy: Path

    def records(self, connection_id: int | None = None) -> list[dict[str, Any]]:
        records = [json.loads(line) for line in self.log.read_text().splitlines()]
        if connection_id is None:
            return records
        return [r for r in records if r.get("connection_id") == connection_id]


@pytest.fixture(scope="module")
def served(world: GuardWorld, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """pgveil as `pgveil serve` builds it, with an audit log and elevation grants."""
    directory = tmp_path_factory.mktemp("prepared")
    policy, log, grants = directory / "policy.yaml", directory / "audit.jsonl", directory / "grants.jsonl"
    policy.write_text(POLICY + ELEVATIONS)
    extra = {"audit": {"fsync": "batch"}, "elevation": {"grants_file": str(grants)}}
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PGVEIL_GRANT_KEY", GRANT_KEY)
        with running_proxy(_GuardDatabase(world), str(policy), audit_log=str(log), extra=extra) as proxy:
            yield Served(proxy, log, grants, policy)


def connect(proxy: RunningProxy, login: str, **options: Any) -> psycopg.Connection[Any]:
    """A psycopg connection with an application_name of its own (to find its audit records)."""
    global _connections
    _connections += 1
    return psycopg.connect(proxy.dsn(login, PASSWORD, DATABASE), autocommit=True,
                           application_name=f"prepared-test-{os.getpid()}-{_connections}", **options)


_connections = 0


def connection_id(served: Served, conn: psycopg.Connection[Any]) -> int:
    """pgveil's id of a connection (from its connect record, found by its application_name)."""
    name = conn.info.parameter_status("application_name")
    assert name
    for record in served.records():
        if record["type"] == "connect" and record["application_name"] == name:
            return int(record["connection_id"])
    raise AssertionError(f"no connect record for {name!r}")


def last_request(served: Served, connection: int) -> int:
    return max([r["request"] for r in served.records(connection) if r["type"] == "access"] or [0])


def completions(served: Served, connection: int, deadline: float = 10) -> dict[int, dict[str, Any]]:
    """Completion records of a connection by each request they complete (written after the client
    has its answer, so polled)."""
    stop = time.monotonic() + deadline
    while True:
        found: dict[int, dict[str, Any]] = {}
        for record in served.records(connection):
            if record["type"] == "completion":
                for request in record.get("requests", [record["request"]]):
                    found[request] = record
        accesses = [r["request"] for r in served.records(connection) if r["type"] == "access"]
        if all(request in found for request in accesses) or time.monotonic() > stop:
            return found
        time.sleep(0.02)


def accesses_after(served: Served, connection: int, request: int) -> list[dict[str, Any]]:
    return [r for r in served.records(connection) if r["type"] == "access" and r["request"] > request]


# ---- every execution is audited ---------------------------------------------------------------------


def test_each_execution_of_a_psycopg_prepared_statement_has_its_own_access_and_completion_records(
    served: Served,
) -> None:
    with connect(served.proxy, "gv_analyst", prepare_threshold=0) as conn:
        me = connection_id(served, conn)
        start = last_request(served, me)
        names = [conn.execute("select full_name from gv.people where id = %s", (i,)).fetchone()
                 for i in (1, 2, 3, 1)]
    assert leaked_canaries(repr(names)) == []
    executions = accesses_after(served, me, start)
    # psycopg prepares in a request of its own (Parse, Sync), then binds each execution
    assert [r["protocol"] for r in executions] == ["parse", "bind", "bind", "bind", "bind"]
    assert all(r["decision"] == "rewrite" and r["relations"] == ["gv.people"] for r in executions)
    assert {r["statement_name"] for r in executions} == {"_pg3_0"}
    done = completions(served, me)
    assert [done[r["request"]]["rows"] for r in executions] == [0, 1, 1, 1, 1]


class ProbeSink(MappingWrites):
    """A real file sink that notes, once each access record is written, how many rows
    gv.scratch holds: a statement that ran before its record would already show up there."""

    def __init__(self, inner: AuditSink, world: GuardWorld) -> None:
        self.inner, self.world = inner, world
        self.seen: list[tuple[str, int]] = []

    def append(self, record: Unsealed) -> None:
        assert self.inner.append(record) is None  # the default mode: written at once
        if record.type == "access":
            with psycopg.connect(self.world.dsn()) as conn:
                count = conn.execute(
                    "select count(*) from gv.scratch where note = 'prepared-probe'").fetchone()
            assert count is not None
            self.seen.append((str(json.loads(f"{{{record.body}}}")["protocol"]), int(count[0])))

    def append_behind(self, record: Unsealed) -> None:
        self.inner.append_behind(record)

    async def flush(self) -> None:
        await self.inner.flush()

    async def close(self) -> None:
        await self.inner.close()


def test_each_prepared_insert_is_audited_before_it_reaches_postgresql(
    world: GuardWorld, tmp_path: Path,
) -> None:
    world.upstream.execute("delete from gv.scratch where note = 'prepared-probe'", dbname=DATABASE)
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    probe = ProbeSink(JsonLinesFileSink(tmp_path / "probe.jsonl"), world)
    factories: list[Any] = []
    with running_proxy(_GuardDatabase(world), policy_factory=lambda client: factories[0](client)) as proxy:
        enforcement = proxy.run(Enforcement.create(str(policy), world.dsn()))
        factories.append(build_connection_policy_factory(enforcement.connection_policy, probe, None))
        try:
            with connect(proxy, "gv_writer") as conn:
                for i in range(3):
                    conn.execute("insert into gv.scratch (id, note) values (%s, 'prepared-probe')", (i,),
                                 prepare=True)
        finally:
            proxy.run(probe.close())
    # psycopg prepares in a request of its own (Parse, Sync), then binds each execution
    assert probe.seen == [("parse", 0), ("bind", 0), ("bind", 1), ("bind", 2)]
    world.upstream.execute("delete from gv.scratch where note = 'prepared-probe'", dbname=DATABASE)


def test_pgbench_prepared_transactions_are_each_audited(served: Served, tmp_path: Path) -> None:
    script = tmp_path / "lookup.sql"
    script.write_text("\\set id random(1, 3)\nselect full_name, email from gv.people where id = :id;\n")
    known = {r.get("connection_id") for r in served.records()}
    result = subprocess.run(
        [str(bin_dir() / "pgbench"), "-n", "-M", "prepared", "-t", "6", "-c", "1", "-f", str(script),
         "-h", served.proxy.host, "-p", str(served.proxy.port), "-U", "gv_analyst", DATABASE],
        capture_output=True, text=True, env={**os.environ, "PGPASSWORD": PASSWORD}, timeout=60)
    assert result.returncode == 0, result.stderr
    (me,) = {r["connection_id"] for r in served.records() if r.get("connection_id") not in known
             and r["type"] == "access"}
    executions = [r for r in served.records(me) if r["type"] == "access"]
    assert [r["protocol"] for r in executions] == ["parse"] + ["bind"] * 6
    done = completions(served, me)
    assert [done[r["request"]]["rows"] for r in executions] == [0] + [1] * 6


def test_several_parses_and_binds_under_one_sync_pair_with_one_completion(served: Served) -> None:
    with connect(served.proxy, "gv_analyst") as conn:
        me = connection_id(served, conn)
        conn.execute("select id from gv.orders where id = %s", (10,), prepare=True)  # prepared: _pg3_0
        start = last_request(served, me)
        with conn.pipeline():
            for order in (11, 12):
                conn.execute("select id from gv.orders where id = %s", (order,), prepare=True)
            conn.execute("select count(*) from gv.orders where amount > %s", (1,), prepare=False)
            conn.execute("select id from gv.orders where id = %s", (13,), prepare=True)
    batch = accesses_after(served, me, start)
    assert [r["protocol"] for r in batch] == ["bind", "bind", "parse", "bind"]
    done = completions(served, me)
    (completion,) = {id(done[r["request"]]): done[r["request"]] for r in batch}.values()
    assert completion["requests"] == [r["request"] for r in batch]
    assert completion["rows"] == 4


# ---- re-executions under a changed role ------------------------------------------------------------


def test_statements_and_cursors_prepared_while_elevated_are_refused_once_the_grant_expires(
    served: Served,
) -> None:
    with connect(served.proxy, "gv_public") as conn:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("PGVEIL_GRANT_KEY", GRANT_KEY)
            assert pgveil(["elevate", "--user", "gv_public", "--role", "admin", "--for", "2s",
                           "--reason", "INC-7 prepared statements", "--approver", "gv_lead",
                           "--policy", str(served.policy), "--grants", str(served.grants)]) == 0
        assert conn.execute(BY_ID, (1,), prepare=True).fetchall() == [(RAW_SSN,)]
        conn.execute("prepare elevated_ssn as select ssn from gv.people where id = 1")
        conn.execute("begin")
        conn.execute("declare elevated_cursor cursor with hold for select ssn from gv.people order by id")
        conn.execute("commit")
        deadline = time.monotonic() + 20
        while True:  # the grant runs out while the session stays open
            try:
                assert conn.execute(BY_ID, (1,), prepare=True).fetchall() == [(RAW_SSN,)]
            except psycopg.errors.InsufficientPrivilege as refused:
                assert "pgveil: prepared-statement-stale:" in str(refused)
                break
            assert time.monotonic() < deadline, "the elevation never expired"
            time.sleep(0.1)
        for later in ("execute elevated_ssn", "fetch all from elevated_cursor"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="prepared-statement-stale"):
                conn.execute(later)
        masked = conn.execute(BY_ID, (1,), prepare=False).fetchall()  # a new statement: masked
    assert masked and leaked_canaries(repr(masked)) == []


# ---- re-executions after a policy reload ----------------------------------------------------------


@dataclass
class Reloadable:
    proxy: RunningProxy
    policy: Path

    def write(self, text: str) -> None:
        self.policy.write_text(text)
        self.proxy.run(self.proxy.server.reload())


PUBLIC_SEES_ALL = (POLICY.replace("members: [gv_admin]", "members: [gv_admin, gv_public]")
                   .replace("members: [gv_public]", "members: [gv_nobody]"))


@pytest.fixture(scope="module")
def reloadable(world: GuardWorld, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Reloadable]:
    policy = tmp_path_factory.mktemp("prepared-reload") / "policy.yaml"
    policy.write_text(POLICY)
    with running_proxy(_GuardDatabase(world), str(policy)) as proxy:
        yield Reloadable(proxy, policy)


@pytest.fixture
def public_sees_all(reloadable: Reloadable) -> Iterator[Reloadable]:
    reloadable.write(PUBLIC_SEES_ALL)
    try:
        yield reloadable
    finally:
        reloadable.write(POLICY)


def test_reload_that_masks_a_prepared_statements_table_refuses_its_next_execution(
    public_sees_all: Reloadable,
) -> None:
    with connect(public_sees_all.proxy, "gv_public") as conn:
        assert conn.execute(BY_ID, (1,), prepare=True).fetchall() == [(RAW_SSN,)]
        conn.execute("prepare before_reload as select ssn from gv.people where id = 1")
        public_sees_all.write(POLICY)
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="prepared-statement-stale"):
            conn.execute(BY_ID, (1,), prepare=True)
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="prepared-statement-stale"):
            conn.execute("execute before_reload")
        conn.execute("deallocate before_reload")  # prepared again, it is decided anew: masked
        conn.execute("prepare before_reload as select ssn from gv.people where id = 1")
        again = conn.execute("execute before_reload").fetchall()
    assert again and leaked_canaries(repr(again)) == []


def test_reload_that_leaves_a_statement_as_it_was_lets_cached_statements_run_on(
    reloadable: Reloadable,
) -> None:
    async def session() -> tuple[list[Any], list[Any]]:
        conn = await asyncpg.connect(reloadable.proxy.dsn("gv_analyst", PASSWORD, DATABASE))
        try:
            query = "select id, full_name from gv.people where region = $1 order by id"
            before = [await conn.fetch(query, "north") for _ in range(3)]
            await conn.execute("prepare by_region as select id, email from gv.people where id = 2")
            reloadable.write(POLICY + "\n# reloaded: nothing about gv.people changed\n")
            after = [await conn.fetch(query, "north") for _ in range(3)]
            after.append(await conn.fetch("execute by_region"))
            return before, after
        finally:
            await conn.close()

    before, after = asyncio.run(session())
    assert [list(map(tuple, rows)) for rows in after[:3]] == [list(map(tuple, rows)) for rows in before]
    assert after[3] and leaked_canaries(repr(before + after)) == []


# ---- the book follows closes and deallocations -------------------------------------------------------


def test_psycopg_evicting_and_preparing_again_keeps_working(served: Served) -> None:
    with connect(served.proxy, "gv_analyst", prepare_threshold=0) as conn:
        conn.prepared_max = 1  # every other query evicts the previous one (DEALLOCATE)
        for _ in range(3):
            for column in ("id", "amount"):
                query = f"select {column} from gv.orders where id = %s"
                assert conn.execute(query, (10,)).fetchone() is not None


def test_asyncpg_closing_cached_statements_keeps_working(served: Served) -> None:
    async def session() -> list[int]:
        conn = await asyncpg.connect(served.proxy.dsn("gv_analyst", PASSWORD, DATABASE),
                                     statement_cache_size=1)
        try:
            counts = []
            for _ in range(3):
                for table in ("gv.orders", "gv.people"):
                    counts.append(await conn.fetchval(f"select count(*) from {table}"))
            statement = await conn.prepare("select id from gv.orders where id = $1")
            counts.append(await statement.fetchval(11))
            return counts
        finally:
            await conn.close()

    counts = asyncio.run(session())
    assert counts[-1] == 11 and len(counts) == 7


def test_executing_a_deallocated_or_unknown_statement_is_refused_and_the_session_goes_on(
    served: Served,
) -> None:
    with connect(served.proxy, "gv_analyst") as conn:
        conn.execute("prepare short_lived as select id from gv.orders where id = 10")
        assert conn.execute("execute short_lived").fetchall() == [(10,)]
        conn.execute("deallocate short_lived")
        with pytest.raises(psycopg.errors.InvalidSqlStatementName,  # PostgreSQL's own 26000
                           match='^prepared statement "short_lived" does not exist$'):
            conn.execute("execute short_lived")
        assert conn.execute("select 1").fetchone() == (1,)


# ---- metrics -------------------------------------------------------------------------------------------


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())


def sample(text: str, name: str, labels: str) -> float:
    prefix = f"{name}{{{labels}}} "
    return sum(float(line[len(prefix):]) for line in text.splitlines() if line.startswith(prefix))


def test_re_executions_are_counted_and_the_harness_relays_through_serves_metrics(
    world: GuardWorld, tmp_path: Path,
) -> None:
    policy, port = tmp_path / "policy.yaml", free_port()
    policy.write_text(POLICY)
    with running_proxy(_GuardDatabase(world), str(policy), metrics=f"127.0.0.1:{port}") as proxy:
        with connect(proxy, "gv_analyst", prepare_threshold=0) as conn:
            for order in (10, 11, 12):
                conn.execute("select id from gv.orders where id = %s", (order,))
        # a Parse (in a request of its own, with prepare_threshold=0) and three Binds; the last
        # one is counted when its request completes, which may be just after the client has
        # its answer: poll the endpoint until it shows, with a deadline
        labels = 'decision="rewrite",kind="select",role="analyst"'
        deadline = time.monotonic() + 10
        text = scrape(port)
        while sample(text, "pgveil_statements_total", labels) < 4 and time.monotonic() < deadline:
            text = scrape(port)
    assert sample(text, "pgveil_statements_total", labels) == 4
    assert sample(text, "pgveil_bytes_relayed_total", 'direction="server_to_client"') > 0
    assert sample(text, "pgveil_connections_total", 'result="accepted"') >= 1


# ---- fingerprint allow-lists ------------------------------------------------------------------------------


def test_a_revoked_fingerprint_stops_the_re_executions_of_a_prepared_statement(
    world: GuardWorld, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    policy = tmp_path / "policy.yaml"
    enforcing = "members: [gv_analyst]\n    fingerprints: enforce\n"
    policy.write_text(POLICY.replace("members: [gv_analyst]\n", enforcing))
    query = "select id, amount from gv.orders where id = %s"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PGVEIL_FINGERPRINTS_REFRESH_SECONDS", "0")
        with running_proxy(_GuardDatabase(world), str(policy)) as proxy, \
                connect(proxy, "gv_analyst") as conn:
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="unknown-fingerprint"):
                conn.execute(query, (10,), prepare=True)
            capsys.readouterr()
            assert pgveil(["fingerprints", "list", "--json", "--policy", str(policy)]) == 0
            (pending,) = json.loads(capsys.readouterr().out)
            assert pgveil(["fingerprints", "approve", pending["fingerprint"], "--policy", str(policy)]) == 0
            for order in (10, 11):  # prepared, then executed again (Bind)
                assert conn.execute(query, (order,), prepare=True).fetchone() is not None
            assert pgveil(["fingerprints", "revoke", pending["fingerprint"], "--policy", str(policy)]) == 0
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="unknown-fingerprint"):
                conn.execute(query, (12,), prepare=True)


def test_a_statement_whose_first_execution_failed_in_the_same_request_runs_again(served: Served) -> None:
    query = "select 100 / %s::integer from gv.orders where id = 10"
    with connect(served.proxy, "gv_analyst") as conn:
        with pytest.raises(psycopg.errors.DivisionByZero), conn.pipeline():
            conn.execute(query, (0,), prepare=True)  # Parse, Bind, Execute under one Sync: fails
        assert conn.execute(query, (4,), prepare=True).fetchone() == (25,)
        assert conn.execute(query, (5,), prepare=True).fetchone() == (20,)
        me = connection_id(served, conn)
    # psycopg prepares it again under a new name; its executions after that are Binds
    assert [r["protocol"] for r in served.records(me) if r["type"] == "access"] == [
        "parse", "parse", "bind", "bind"]
