"""Elevation: the policy says who may assume which role, how long, with whose approval; grants expire."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from proxy.audit import JsonLinesFileSink
from proxy.audit.connection import AuditedConnection
from proxy.cli import main as pgveil
from proxy.connection_policy import ClientInfo, PassThrough
from proxy.elevation import GrantBook, GrantError, append_grant, create_grant, parse_duration
from proxy.guard.verdict import Allow, Verdict
from proxy.policy.loader import load_policy
from proxy.policy.model import Policy

POLICY = """\
version: 1
settings: {default_role: deny}
roles:
  engineer:
    members: [sven, "dev_*"]
    statements: [select]
    tables: ["public.*"]
  production_support:
    members: []
    statements: [select, update]
    tables: ["*"]
    reveal: [public, internal, confidential]
elevations:
  - role: production_support
    users: [sven, "dev_*"]
    max_duration: 30m
    approver_required: true
    approvers: [sam]
"""
KEY = b"grant-key-for-tests-0123456789"


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    return path


@pytest.fixture
def policy(policy_file: Path) -> Policy:
    return load_policy(policy_file)


def test_durations_read_like_the_policy_format() -> None:
    assert [parse_duration(t) for t in ("30m", "2h", "1h30m", "90s", "1d")] == [1800, 7200, 5400, 90, 86400]
    with pytest.raises(GrantError):
        parse_duration("soon")


@pytest.mark.parametrize(("user", "role", "seconds", "approver", "problem"), [
    ("mallory", "production_support", 600, "sam", "no entry under elevations"),
    ("sven", "production_support", 3600, "sam", "longer than the 1800s"),
    ("sven", "production_support", 600, None, "needs an approver"),
    ("sven", "production_support", 600, "sven", "cannot approve their own"),
    ("dev_kim", "production_support", 600, "eve", "'eve' may not approve"),
    ("sven", "dba", 600, "sam", "no role named 'dba'"),
])
def test_grants_the_policy_does_not_allow_are_refused(
        policy: Policy, user: str, role: str, seconds: int, approver: str | None, problem: str) -> None:
    with pytest.raises(GrantError, match=problem):
        create_grant(policy, user, role, seconds, "INC-1", approver)


def test_active_role_during_the_grant_and_base_role_after_expiry(policy: Policy, tmp_path: Path) -> None:
    grants = tmp_path / "grants.jsonl"
    book = GrantBook(grants, lambda: policy, KEY)
    now = time.time()
    assert book.active_role("dev_kim", now) is None
    append_grant(grants, create_grant(policy, "dev_kim", "production_support", 600, "INC-2", "sam", now), KEY)
    assert book.active_role("dev_kim", now + 1) == "production_support"
    assert book.active_role("sven", now + 1) is None  # grants are per login
    assert book.active_role("dev_kim", now + 601) is None
    events = [(e["event"], e["login"], e["elevated_role"]) for e in book.take_events()]
    assert events == [("granted", "dev_kim", "production_support"), ("used", "dev_kim", "production_support"),
                      ("expired", "dev_kim", "production_support")]


def test_forged_or_unsigned_grants_are_rejected(policy: Policy, tmp_path: Path) -> None:
    grants = tmp_path / "grants.jsonl"
    forged = create_grant(policy, "sven", "production_support", 600, "INC-3", "sam")
    append_grant(grants, forged, b"wrong key")
    book = GrantBook(grants, lambda: policy, KEY)
    assert book.active_role("sven", time.time()) is None
    (event,) = book.take_events()
    assert event["event"] == "rejected" and "bad signature" in event["problem"]
    assert GrantBook(grants, lambda: policy, None).active_role("sven", time.time()) is None


def test_a_reloaded_policy_without_the_elevation_ends_the_grant(policy: Policy, tmp_path: Path) -> None:
    grants = tmp_path / "grants.jsonl"
    current = [policy]
    book = GrantBook(grants, lambda: current[0], KEY)
    append_grant(grants, create_grant(policy, "sven", "production_support", 600, "INC-4", "sam"), KEY)
    assert book.active_role("sven", time.time()) == "production_support"
    current[0] = Policy(version="v2", settings=policy.settings, roles=policy.roles, datasets={})
    assert book.active_role("sven", time.time()) is None
    assert book.take_events()[-1]["event"] == "rejected"


class ElevationAwareGuard(PassThrough):
    """Stands in for the guard's use of `active_role`: the role name follows the grant book."""

    def __init__(self, book: GrantBook, login: str) -> None:
        self.book, self.login, self.role_name = book, login, "engineer"

    async def on_query(self, sql: str) -> Verdict:
        self.role_name = self.book.active_role(self.login, time.time()) or "engineer"
        return Allow(sql)


async def test_grant_use_is_audited_before_the_statement_it_elevates(policy: Policy, tmp_path: Path) -> None:
    grants, log = tmp_path / "grants.jsonl", tmp_path / "audit.jsonl"
    book = GrantBook(grants, lambda: policy, KEY)
    sink = JsonLinesFileSink(log)
    client = ClientInfo(1, "127.0.0.1:1", "sven", "postgres", "", False)
    audited = AuditedConnection(ElevationAwareGuard(book, "sven"), sink, client, events=book)
    await audited.on_query("SELECT 1")
    append_grant(grants, create_grant(policy, "sven", "production_support", 600, "INC-5", "sam"), KEY)
    await audited.on_query("UPDATE orders SET state = 'refunded' WHERE id = 1")
    await sink.close()
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["type"], r.get("event"), r["role"] if r["type"] == "access" else None) for r in records] == [
        ("access", None, "engineer"),
        ("elevation", "granted", None),
        ("elevation", "used", None),
        ("access", None, "production_support"),
    ]
    assert records[2]["reason"] == "INC-5" and records[2]["approver"] == "sam"


def test_elevate_command_appends_a_grant_or_says_why_not(
        policy_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    grants = tmp_path / "grants.jsonl"
    base = ["elevate", "--user", "sven", "--role", "production_support", "--reason", "INC-6",
            "--policy", str(policy_file), "--grants", str(grants)]
    monkeypatch.delenv("PGVEIL_GRANT_KEY", raising=False)
    assert pgveil([*base, "--for", "10m", "--approver", "sam"]) == 2
    monkeypatch.setenv("PGVEIL_GRANT_KEY", KEY.decode())
    assert pgveil([*base, "--for", "2h", "--approver", "sam"]) == 1
    assert "refused: 7200s is longer than the 1800s" in capsys.readouterr().err
    assert pgveil([*base, "--for", "10m", "--approver", "sam"]) == 0
    assert capsys.readouterr().out.startswith("granted ")
    book = GrantBook(grants, lambda: load_policy(policy_file), KEY)
    assert book.active_role("sven", time.time()) == "production_support"


def test_removing_a_grant_line_revokes_it(policy: Policy, tmp_path: Path) -> None:
    grants = tmp_path / "grants.jsonl"
    book = GrantBook(grants, lambda: policy, KEY)
    kept = create_grant(policy, "sven", "production_support", 600, "INC-7", "sam")
    revoked = create_grant(policy, "dev_kim", "production_support", 600, "INC-8", "sam")
    append_grant(grants, kept, KEY)
    append_grant(grants, revoked, KEY)
    assert book.active_role("dev_kim", time.time()) == "production_support"
    grants.write_text(grants.read_text().splitlines(keepends=True)[0])
    assert book.active_role("dev_kim", time.time()) is None
    assert book.active_role("sven", time.time()) == "production_support"
    assert [e["event"] for e in book.take_events() if e["grant_id"] == revoked.id] == [
        "granted", "used", "revoked"]
