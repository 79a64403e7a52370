"""The elevation workflow through one `pgveil serve` on its state store: the PGVEIL ELEVATE syntax
and what is (not) taken for it, expiry by the replica's clock, request timeouts, self-service,
the store inside the upstream database kept out of reach, the CLI, and the metrics."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from proxy.elevation_statements import (
    StatementSyntaxError,
    is_pgveil_statement,
    parse_statement,
    skip_space_and_comments,
)
from proxy.embedded import free_port
from proxy.policy.loader import load_policy
from proxy.state import StateStore
from proxy.state.elevations import ElevationWorkflow
from tests.conftest import Upstream
from tests.proxy_harness import ServeProcess, spawn_serve, wait_until
from tests.test_audit_e2e import sample, scrape

DATABASE = "workflow_app"
PASSWORD = "workflow-pw-2718"
LOGINS = ("wf_sven", "wf_sam", "wf_kim")
POLICY = """\
version: 1
settings: {default_role: deny}
roles:
  wf_engineer:
    members: [wf_sven, wf_kim]
    statements: [select]
    tables: ["public.wf_items"]
  wf_security:
    members: [wf_sam]
    statements: [select]
    tables: ["public.wf_items"]
  wf_support:
    members: []
    statements: [select, update, insert]
    tables: ["*"]
  wf_oncall:
    members: []
    statements: [select]
    tables: ["public.*"]
elevations:
  - role: wf_support
    users: [wf_sven]
    max_duration: 10m
    approver_required: true
    approvers: ["wf_s*"]
  - role: wf_oncall
    users: [wf_kim]
    max_duration: 5m
    approver_required: false
"""
CONFIG = """\
elevation:
  request_timeout: 10m
state:
  poll_interval_ms: 200
"""


# -- the syntax ---------------------------------------------------------------------------------

@pytest.mark.parametrize("sql", [
    "PGVEIL ELEVATE LIST",
    "pgveil elevate list;",
    "  -- why\n/* who /* nested */ */ PgVeil ELEVATE approve 17 REASON 'ok';  -- done\n",
    "PGVEIL ELEVATE REQUEST wf_support FOR 1h30m REASON 'it''s INC-1'",
    "PGVEIL ELEVATE REQUEST \"wf_support\" FOR '30m' REASON 'x'",
])
def test_pgveil_statements_are_recognised(sql: str) -> None:
    assert is_pgveil_statement(sql)
    parse_statement(sql)


@pytest.mark.parametrize("sql", [
    "SELECT 'PGVEIL ELEVATE APPROVE 1'",
    "/* PGVEIL ELEVATE APPROVE 1 */ SELECT 1",
    "/* /* */ PGVEIL ELEVATE APPROVE 1 */ SELECT 1",  # the word is still inside the outer comment
    "-- PGVEIL ELEVATE APPROVE 1\nSELECT 1",
    "SELECT 1; PGVEIL ELEVATE APPROVE 1",
    "SELECT $$PGVEIL ELEVATE APPROVE 1$$",
    "PGVEILX ELEVATE APPROVE 1",
    "/* unterminated PGVEIL ELEVATE APPROVE 1",
    "",
])
def test_statements_that_only_contain_the_words_are_not_recognised(sql: str) -> None:
    assert not is_pgveil_statement(sql)


@pytest.mark.parametrize(("sql", "problem"), [
    ("PGVEIL ELEVATE APPROVE 1; DELETE FROM wf_items", "on its own"),
    ("PGVEIL ELEVATE APPROVE 1 /* x */ ; SELECT 1", "on its own"),
    ("PGVEIL ELEVATE APPROVE seventeen", "request number"),
    ("PGVEIL ELEVATE REQUEST wf_support FOR soon REASON 'x'", "duration"),
    ("PGVEIL ELEVATE REQUEST wf_support FOR 1h REASON unquoted", "quoted string"),
    ("PGVEIL ELEVATE REQUEST wf_support FOR 1h REASON 'open", "unterminated"),
    ("PGVEIL GRANT ME EVERYTHING", "expected ELEVATE"),
])
def test_malformed_pgveil_statements_say_the_syntax(sql: str, problem: str) -> None:
    assert is_pgveil_statement(sql)
    with pytest.raises(StatementSyntaxError, match=problem) as caught:
        parse_statement(sql)
    assert "PGVEIL ELEVATE REQUEST <role>" in str(caught.value)


def test_comments_are_skipped_as_postgresql_nests_them() -> None:
    assert skip_space_and_comments("/* a /* b */ c */x") == len("/* a /* b */ c */")
    assert skip_space_and_comments("-- a\n  x") == len("-- a\n  ")
    assert skip_space_and_comments("/* a") == 4


# -- one replica --------------------------------------------------------------------------------

@dataclass
class Served:
    upstream: Upstream
    directory: Path
    policy: Path
    process: ServeProcess
    metrics_port: int

    def dsn(self, login: str) -> str:
        return self.process.dsn(login, PASSWORD, DATABASE)

    def audit(self) -> list[dict[str, Any]]:
        path = self.directory / "audit.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def served(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    upstream.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
    upstream.execute(f"CREATE DATABASE {DATABASE}")
    for login in LOGINS:
        upstream.execute(f"DROP ROLE IF EXISTS {login}; CREATE ROLE {login} LOGIN PASSWORD '{PASSWORD}'")
    upstream.execute("CREATE TABLE wf_items (id int); CREATE TABLE wf_secrets (secret text);"
                     "INSERT INTO wf_secrets VALUES ('kept');"
                     f"GRANT SELECT ON wf_items, wf_secrets TO {', '.join(LOGINS)}", dbname=DATABASE)
    directory = tmp_path_factory.mktemp("workflow")
    policy, config = directory / "policy.yaml", directory / "pgveil.yaml"
    policy.write_text(POLICY)
    config.write_text(CONFIG)
    port = free_port()
    # the store in the upstream database itself, under the upstream DSN's login
    with spawn_serve("--upstream", upstream.dsn(dbname=DATABASE), "--policy", str(policy),
                     "--config", str(config), "--listen", "127.0.0.1:0",
                     "--audit-log", str(directory / "audit.jsonl"), "--metrics", f"127.0.0.1:{port}",
                     "--state-dsn", "upstream") as process:
        yield Served(upstream, directory, policy, process, port)
        process.terminate()
        process.wait(30)


def connect(served: Served, login: str, **options: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(served.dsn(login), autocommit=True, **options)


def sees_secret(connection: psycopg.Connection[Any]) -> bool:
    try:
        connection.execute("SELECT secret FROM wf_secrets").fetchall()
    except psycopg.errors.InsufficientPrivilege:
        return False
    return True


def ask(served: Served, login: str, role: str, duration: str, reason: str = "INC-3") -> tuple[Any, ...]:
    with connect(served, login, prepare_threshold=None) as connection:
        row = connection.execute(f"PGVEIL ELEVATE REQUEST {role} FOR {duration} REASON '{reason}'").fetchone()
    assert row is not None
    return tuple(row)


def test_a_grant_ends_at_its_expiry_by_the_replicas_clock_on_an_open_connection(served: Served) -> None:
    request_id = ask(served, "wf_sven", "wf_support", "2s")[0]
    with connect(served, "wf_sven", prepare_threshold=None) as sven:
        with connect(served, "wf_sam", prepare_threshold=None) as sam:
            sam.execute(f"PGVEIL ELEVATE APPROVE {request_id} REASON 'short one'")
        wait_until(lambda: sees_secret(sven), "the grant", timeout=5)
        wait_until(lambda: not sees_secret(sven), "the expiry", timeout=10)  # no store change needed
    events = [(e["event"], e.get("result")) for e in served.audit()
              if e["type"] == "elevation" and e.get("request_id") == request_id]
    assert ("approve", "done") in events and ("used", None) in events and ("expired", None) in events


def test_a_request_not_decided_in_time_times_out(served: Served) -> None:
    async def ask_on_the_store() -> int:  # as a replica with elevation.request_timeout: 1s would
        store = StateStore(served.upstream.dsn(dbname=DATABASE))
        await store.open(watch=False)
        try:
            workflow = ElevationWorkflow(store, lambda: load_policy(served.policy), request_timeout=1)
            answer = await workflow.request("wf_sven", "wf_support", "5m", "nobody around")
        finally:
            await store.close()
        return int(str(answer.rows[0][0]))

    request_id = asyncio.run(ask_on_the_store())
    time.sleep(1.2)
    with connect(served, "wf_sam", prepare_threshold=None) as sam:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="timed out, not pending"):
            sam.execute(f"PGVEIL ELEVATE APPROVE {request_id}")
        listed = {row[0]: row[3] for row in sam.execute("PGVEIL ELEVATE LIST").fetchall()}
    assert listed[request_id] == "timed_out"
    assert any(e["event"] == "timeout" and e.get("request_id") == request_id for e in served.audit()
               if e["type"] == "elevation")


def test_self_service_elevation_is_in_force_at_once_and_recorded(served: Served) -> None:
    row = ask(served, "wf_kim", "wf_oncall", "1m", "pager")
    assert row[3] == "approved"
    with connect(served, "wf_kim", prepare_threshold=None) as kim:
        wait_until(lambda: sees_secret(kim), "the self-service grant", timeout=5)
        kim.execute(f"PGVEIL ELEVATE REVOKE {row[0]} REASON 'done early'")  # the requester may end it
        wait_until(lambda: not sees_secret(kim), "the revocation", timeout=5)
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="longer than the 5m"):
        ask(served, "wf_kim", "wf_oncall", "6m")
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="no entry under elevations"):
        ask(served, "wf_kim", "wf_support", "1m")


def test_the_state_schema_in_the_upstream_database_is_out_of_reach_even_when_elevated(served: Served) -> None:
    request_id = ask(served, "wf_sven", "wf_support", "5m", "needs every table")[0]
    other = ask(served, "wf_sven", "wf_support", "5m", "a second one")[0]
    with connect(served, "wf_sam", prepare_threshold=None) as sam:
        sam.execute(f"PGVEIL ELEVATE APPROVE {request_id}")
    with connect(served, "wf_sven", prepare_threshold=None) as sven:
        wait_until(lambda: sees_secret(sven), "the grant", timeout=5)
        # the role may use every table and update, but PostgreSQL keeps the state schema closed
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied for schema"):
            sven.execute("UPDATE pgveil_state.elevation_requests SET state = 'approved', "
                         f"decided_by = 'wf_sam' WHERE id = {other}")
        sven.execute(f"PGVEIL ELEVATE REVOKE {request_id}")
    with connect(served, "wf_sam", prepare_threshold=None) as sam:
        listed = {row[0]: row[3] for row in sam.execute("PGVEIL ELEVATE LIST").fetchall()}
    assert listed[other] == "pending" and listed[request_id] == "revoked"


def test_named_prepared_statements_and_the_extended_protocol(served: Served) -> None:
    # prepare_threshold=0: psycopg prepares every statement under a name and executes it by Bind
    with connect(served, "wf_sam", prepare_threshold=0) as sam:
        for _ in range(2):
            rows = sam.execute("PGVEIL ELEVATE LIST").fetchall()
            assert all(isinstance(row[0], int) for row in rows)
        cursor = sam.execute("PGVEIL ELEVATE LIST")
        assert [column.name for column in cursor.description or []][:4] == ["id", "login", "role", "state"]
        assert sam.execute("SELECT count(*) FROM wf_items").fetchone() == (0,)  # the session goes on


def test_the_command_line_through_a_replica_and_on_the_store(served: Served) -> None:
    def pgveil(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "proxy", "elevate", *args], capture_output=True,
                              text=True, timeout=60)

    asked = pgveil("request", "wf_support", "--for", "3m", "--reason", "from the shell",
                   "--dsn", served.dsn("wf_sven"))
    assert asked.returncode == 0, asked.stderr
    request_id = int(asked.stdout.splitlines()[2].split("|")[0])
    refused = pgveil("approve", str(request_id), "--dsn", served.dsn("wf_sven"))
    assert refused.returncode == 1 and "cannot approve or deny its own" in refused.stderr
    # on the store itself, the CLI's own login is the actor: the superuser is no approver
    store = served.upstream.dsn(dbname=DATABASE)
    refused = pgveil("approve", str(request_id), "--state-dsn", store, "--policy", str(served.policy))
    assert refused.returncode == 1 and "may not approve" in refused.stderr
    approved = pgveil("approve", str(request_id), "--reason", "ok", "--dsn", served.dsn("wf_sam"))
    assert approved.returncode == 0, approved.stderr
    assert "approved" in approved.stdout
    listed = pgveil("list", "--state-dsn", store, "--policy", str(served.policy))
    assert listed.returncode == 0 and listed.stdout.startswith("id | login")  # only what it may decide
    listed = pgveil("list", "--dsn", served.dsn("wf_sam"))
    assert listed.returncode == 0 and any(line.startswith(f"{request_id} ") and "approved" in line
                                          for line in listed.stdout.splitlines())
    usage = pgveil("approve", "--dsn", served.dsn("wf_sam"))
    assert usage.returncode == 2
    revoked = pgveil("revoke", str(request_id), "--dsn", served.dsn("wf_sam"))
    assert revoked.returncode == 0, revoked.stderr


def test_metrics_count_the_steps_and_the_grants_in_force(served: Served) -> None:
    before = scrape(served.metrics_port)[1]
    row = ask(served, "wf_kim", "wf_oncall", "1m", "metrics")
    assert row[3] == "approved"
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        ask(served, "wf_kim", "wf_oncall", "9m")

    def active() -> float:
        return sample(scrape(served.metrics_port)[1], "pgveil_elevations_active")

    wait_until(lambda: active() >= 1, "the gauge", timeout=5)
    after = scrape(served.metrics_port)[1]
    for result, more in (("done", 1), ("refused", 1)):
        assert (sample(after, "pgveil_elevation_requests_total", result=result)
                - sample(before, "pgveil_elevation_requests_total", result=result)) == more
    with connect(served, "wf_kim", prepare_threshold=None) as kim:
        kim.execute(f"PGVEIL ELEVATE REVOKE {row[0]}")
    wait_until(lambda: active() == 0, "the gauge to drop", timeout=5)
    assert sample(scrape(served.metrics_port)[1], "pgveil_elevation_revocations_total", result="done") >= 1
