"""Three `pgveil serve` replicas sharing one state store: an elevation asked through one, approved
through another, is in force on the third (new and open connections) within 1 s; revocation ends
it everywhere; a stopped store does not stop serving; forged approvals are refused and audited."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from tests.conftest import Upstream
from tests.proxy_harness import ServeProcess, spawn_serve, wait_until

DATABASE = "replicas_app"
STATE_DATABASE = "replicas_state"
PASSWORD = "replica-pw-31415"
LOGINS = ("rp_sven", "rp_eve", "rp_sam")
POLICY = """\
version: 1
settings: {default_role: deny}
roles:
  rp_engineer:
    members: [rp_sven, rp_eve]
    statements: [select]
    tables: ["public.rp_items"]
  rp_security:
    members: [rp_sam]
    statements: [select]
    tables: ["public.rp_items"]
  rp_support:
    members: []
    statements: [select]
    tables: ["public.*"]
elevations:
  - role: rp_support
    users: [rp_sven, rp_eve]
    max_duration: 10m
    approver_required: true
    approvers: [rp_sam]
"""
SECRET = "SELECT secret FROM rp_secrets"
IN_FORCE_WITHIN = 1.0  # seconds: the bound for every replica to see an approval or revocation


@dataclass
class Fleet:
    upstream: Upstream
    directory: Path
    replicas: list[ServeProcess]

    def dsn(self, replica: int, login: str) -> str:
        return self.replicas[replica].dsn(login, PASSWORD, DATABASE)

    def audit(self, replica: int) -> list[dict[str, Any]]:
        path = self.directory / f"audit-{replica}.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def fleet(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    for database in (DATABASE, STATE_DATABASE):
        upstream.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
        upstream.execute(f"CREATE DATABASE {database}")
    for login in LOGINS:
        upstream.execute(f"DROP ROLE IF EXISTS {login}; CREATE ROLE {login} LOGIN PASSWORD '{PASSWORD}'")
    upstream.execute("CREATE TABLE rp_items (id int); CREATE TABLE rp_secrets (secret text);"
                     "INSERT INTO rp_secrets VALUES ('the vault code');"
                     f"GRANT SELECT ON rp_items, rp_secrets TO {', '.join(LOGINS)}", dbname=DATABASE)
    directory = tmp_path_factory.mktemp("replicas")
    policy = directory / "policy.yaml"
    policy.write_text(POLICY)
    replicas: list[ServeProcess] = []
    try:
        for index in range(3):
            replicas.append(spawn_serve(
                "--upstream", upstream.dsn(dbname=DATABASE), "--policy", str(policy),
                "--listen", "127.0.0.1:0", "--audit-log", str(directory / f"audit-{index}.jsonl"),
                "--state-dsn", upstream.dsn(dbname=STATE_DATABASE)))
        yield Fleet(upstream, directory, replicas)
    finally:
        for replica in replicas:
            replica.terminate()
        for replica in replicas:
            try:
                replica.wait(30)
            finally:
                replica.__exit__(None, None, None)


def connect(fleet: Fleet, replica: int, login: str) -> psycopg.Connection[Any]:
    return psycopg.connect(fleet.dsn(replica, login), autocommit=True, prepare_threshold=None)


def sees_secret(connection: psycopg.Connection[Any]) -> bool:
    try:
        connection.execute(SECRET).fetchall()
    except psycopg.errors.InsufficientPrivilege as exc:
        assert "table-not-allowed" in str(exc)
        return False
    return True


def within_bound(condition: Any, since: float, what: str) -> float:
    """Poll `condition` until it holds; it must hold within IN_FORCE_WITHIN seconds of `since`.
    Returns the seconds it took."""
    while not condition():
        assert time.monotonic() - since < IN_FORCE_WITHIN, f"{what} not within {IN_FORCE_WITHIN} s"
        time.sleep(0.02)
    return time.monotonic() - since


def request(fleet: Fleet, replica: int, login: str, reason: str = "INC-7 refunds stuck",
            duration: str = "5m") -> int:
    with connect(fleet, replica, login) as connection:
        row = connection.execute(
            f"PGVEIL ELEVATE REQUEST rp_support FOR {duration} REASON '{reason}'").fetchone()
    assert row is not None and row[1] == login and row[2] == "rp_support" and row[3] == "pending"
    return int(row[0])


def events_of(fleet: Fleet, replica: int, request_id: int) -> list[dict[str, Any]]:
    return [r for r in fleet.audit(replica) if r["type"] == "elevation" and r.get("request_id") == request_id]


def test_asked_on_a_approved_on_b_in_force_on_c_then_revoked_everywhere(fleet: Fleet) -> None:
    with connect(fleet, 2, "rp_sven") as open_on_c, connect(fleet, 1, "rp_sven") as open_on_b:
        assert not sees_secret(open_on_c)
        request_id = request(fleet, 0, "rp_sven")
        assert not sees_secret(open_on_c)  # asked is not granted

        async def approve() -> asyncpg.Record:  # asyncpg: Parse and Bind in separate requests
            connection = await asyncpg.connect(fleet.dsn(1, "rp_sam"))
            try:
                rows = await connection.fetch(f"PGVEIL ELEVATE APPROVE {request_id} REASON 'looked at INC-7'")
            finally:
                await connection.close()
            return rows[0]

        approved = asyncio.run(approve())
        approved_at = time.monotonic()
        assert (approved["id"], approved["state"]) == (request_id, "approved")
        assert approved["decided_by"] == "rp_sam"
        within_bound(lambda: sees_secret(open_on_c), approved_at, "the grant on C's open connection")
        with connect(fleet, 2, "rp_sven") as new_on_c:
            within_bound(lambda: sees_secret(new_on_c), approved_at, "the grant on a new connection to C")
        assert sees_secret(open_on_b)
        with connect(fleet, 0, "rp_eve") as eve:  # a grant is the requester's only
            assert not sees_secret(eve)

        async def revoke() -> None:  # asyncpg's execute: a simple Query
            connection = await asyncpg.connect(fleet.dsn(0, "rp_sam"))
            try:
                await connection.execute(f"PGVEIL ELEVATE REVOKE {request_id} REASON 'done'")
            finally:
                await connection.close()

        asyncio.run(revoke())
        revoked_at = time.monotonic()
        within_bound(lambda: not sees_secret(open_on_c), revoked_at, "the revocation on C")
        within_bound(lambda: not sees_secret(open_on_b), revoked_at, "the revocation on B")

    asked = [e for e in events_of(fleet, 0, request_id) if e["event"] == "request"]
    assert [(e["result"], e["actor"], e["elevated_role"], e["reason"]) for e in asked] == [
        ("done", "rp_sven", "rp_support", "INC-7 refunds stuck")]
    approvals = [e for e in events_of(fleet, 1, request_id) if e["event"] == "approve"]
    assert [(e["result"], e["actor"], e["login"], e["decision_reason"]) for e in approvals] == [
        ("done", "rp_sam", "rp_sven", "looked at INC-7")]
    revocations = [e for e in events_of(fleet, 0, request_id) if e["event"] == "revoke"]
    assert [(e["result"], e["actor"]) for e in revocations] == [("done", "rp_sam")]
    seen_on_c = [e["event"] for e in events_of(fleet, 2, request_id)]
    assert seen_on_c[:3] == ["granted", "used", "revoked"]  # C saw it come, used it, saw it go
    assert all("time" in e for e in events_of(fleet, 1, request_id))
    # one request is one grant id in every record (what `pgveil audit report` groups by)
    assert {e["grant_id"] for replica in range(3) for e in events_of(fleet, replica, request_id)} == {
        str(request_id)}


def test_forged_approvals_are_refused_and_audited(fleet: Fleet) -> None:
    request_id = request(fleet, 0, "rp_sven", reason="INC-8")
    # the requester approving themselves, through another replica
    with connect(fleet, 1, "rp_sven") as sven, pytest.raises(
            psycopg.errors.InsufficientPrivilege, match="cannot approve or deny its own"):
        sven.execute(f"PGVEIL ELEVATE APPROVE {request_id}")
    # a login the policy does not name as an approver
    with connect(fleet, 2, "rp_eve") as eve, pytest.raises(
            psycopg.errors.InsufficientPrivilege, match="'rp_eve' may not approve"):
        eve.execute(f"PGVEIL ELEVATE APPROVE {request_id}")
    # statements that only look like an approval, even from the approver: a string, a comment,
    # a nested comment that hides the word from a non-nesting reader, a second statement
    def sams_records() -> list[dict[str, Any]]:
        return [r for r in fleet.audit(1) if r["type"] == "access" and r["login"] == "rp_sam"]

    before = len(sams_records())
    with connect(fleet, 1, "rp_sam") as sam:
        assert sam.execute(f"SELECT 'PGVEIL ELEVATE APPROVE {request_id}'").fetchone() == (
            f"PGVEIL ELEVATE APPROVE {request_id}",)
        assert sam.execute(f"/* PGVEIL ELEVATE APPROVE {request_id} */ SELECT 1").fetchone() == (1,)
        assert sam.execute(f"/* /* */ PGVEIL ELEVATE APPROVE {request_id} */ SELECT 1").fetchone() == (1,)
        assert sam.execute(f"-- PGVEIL ELEVATE APPROVE {request_id}\nSELECT 2").fetchone() == (2,)
        with pytest.raises(psycopg.Error):
            sam.execute(f"SELECT 1; PGVEIL ELEVATE APPROVE {request_id}")
        with pytest.raises(psycopg.errors.SyntaxError, match="on its own"):
            sam.execute(f"PGVEIL ELEVATE APPROVE {request_id}; SELECT 1")
        listed = {row[0]: row[3] for row in sam.execute("PGVEIL ELEVATE LIST").fetchall()}
    assert listed[request_id] == "pending"  # nothing above approved it
    look_alikes = sams_records()[before:]  # each one audited as what it is
    assert [(r["statement_kind"], r["decision"]) for r in look_alikes][:4] == [("select", "allow")] * 4
    assert look_alikes[4]["decision"] == "refuse" and look_alikes[4]["statement_kind"] != "elevation"
    assert (look_alikes[5]["statement_kind"], look_alikes[5]["decision"]) == ("elevation", "refuse")
    assert not any(e["event"] == "approve" and e["actor"] == "rp_sam"
                   for e in events_of(fleet, 1, request_id))
    time.sleep(IN_FORCE_WITHIN)
    with connect(fleet, 2, "rp_sven") as sven:
        assert not sees_secret(sven)

    refused = [(e["actor"], e["problem"]) for replica in (1, 2) for e in events_of(fleet, replica, request_id)
               if e["event"] == "approve" and e["result"] == "refused"]
    assert ("rp_sven", "a login cannot approve or deny its own request") in refused
    assert any(actor == "rp_eve" and "may not approve" in problem for actor, problem in refused)
    assert len(refused) == 2
    access = [r for r in fleet.audit(1) if r["type"] == "access" and r["login"] == "rp_sven"
              and r["statement_kind"] == "elevation"]
    assert access and access[-1]["decision"] == "refuse" and access[-1]["rule"] == "elevation"


def test_a_stopped_store_does_not_stop_serving_and_workflow_steps_fail_closed(fleet: Fleet) -> None:
    request_id = request(fleet, 0, "rp_sven", reason="INC-9")
    with connect(fleet, 1, "rp_sam") as sam:
        sam.execute(f"PGVEIL ELEVATE APPROVE {request_id}")
    approved_at = time.monotonic()
    with connect(fleet, 2, "rp_sven") as sven_on_c:
        within_bound(lambda: sees_secret(sven_on_c), approved_at, "the grant on C")
        fleet.upstream.execute(f"ALTER DATABASE {STATE_DATABASE} ALLOW_CONNECTIONS false;"
                               "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                               f"WHERE datname = '{STATE_DATABASE}' AND pid <> pg_backend_pid()")
        try:
            time.sleep(3 * 0.5)  # several polling rounds fail meanwhile
            for replica in range(3):
                with connect(fleet, replica, "rp_eve") as eve:  # new connections, ordinary statements
                    assert eve.execute("SELECT count(*) FROM rp_items").fetchone() == (0,)
                    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="state store cannot be"):
                        eve.execute("PGVEIL ELEVATE REQUEST rp_support FOR 5m REASON 'during the outage'")
            assert sees_secret(sven_on_c)  # the last state read stays in force (until it expires)
            with connect(fleet, 0, "rp_sam") as sam, pytest.raises(
                    psycopg.errors.InsufficientPrivilege, match="state store cannot be"):
                sam.execute(f"PGVEIL ELEVATE REVOKE {request_id}")
        finally:
            fleet.upstream.execute(f"ALTER DATABASE {STATE_DATABASE} ALLOW_CONNECTIONS true")

        def revoked() -> bool:
            with connect(fleet, 0, "rp_sam") as sam:
                try:
                    sam.execute(f"PGVEIL ELEVATE REVOKE {request_id}")
                except psycopg.errors.InsufficientPrivilege as exc:
                    assert "state store cannot be" in str(exc)
                    return False
                return True

        wait_until(revoked, "the store to be reachable again", timeout=20)
        revoked_at = time.monotonic()
        within_bound(lambda: not sees_secret(sven_on_c), revoked_at, "the revocation after the outage")
    outage = [e for replica in range(3) for e in fleet.audit(replica)
              if e["type"] == "elevation" and e.get("result") == "refused"
              and "unreachable" in str(e.get("problem"))]
    assert {e["actor"] for e in outage} == {"rp_eve", "rp_sam"}
    assert {e["event"] for e in outage} == {"request", "revoke"}
