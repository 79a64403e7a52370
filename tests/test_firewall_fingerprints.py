"""Fingerprint allow-lists: learn, enforce, approve and revoke, in a file and in a PostgreSQL table."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from proxy.catalog import CatalogSnapshot, Column, Relation
from proxy.cli import main
from proxy.firewall.fingerprints import (
    FileFingerprintStore,
    FingerprintAllowList,
    PostgresFingerprintStore,
    default_store_path,
)
from proxy.guard.pipeline import analyse
from proxy.guard.statement import GuardContext
from proxy.guard.verdict import Refuse, StatementInfo
from proxy.policy.model import Policy, Role, Settings
from tests.conftest import Upstream

LEARNING = Role(name="fw_fp_app", members=("fw_fp",), tables=("*",), fingerprints="learn")
ENFORCING = Role(name="fw_fp_app", members=("fw_fp",), tables=("*",), fingerprints="enforce")
CATALOG = CatalogSnapshot(
    database="fw", relations={"public.items": Relation("public", "items", "table", (
        Column("id", "integer", 23), Column("name", "text", 25)))},
    functions={}, role_settings={}, server_search_path=("public",), generation="fw-fp",
)


def info(sql: str) -> StatementInfo:
    """What the guard reports about a statement: its fingerprint and normalised text."""
    policy = Policy(version="fw-fp", settings=Settings(), roles={LEARNING.name: LEARNING}, datasets={})
    context = GuardContext(policy=policy, role=LEARNING, catalog=CATALOG, user="fw_fp",
                           search_path=("public",))
    return analyse(sql, context).verdict.info


def test_learn_records_each_shape_once_with_a_normalised_example_and_no_values(tmp_path: Path) -> None:
    allow_list = FingerprintAllowList(FileFingerprintStore(tmp_path / "policy.fingerprints.json"))
    assert allow_list.screen(LEARNING, info("SELECT name FROM items WHERE id = 42")) is None
    assert allow_list.screen(LEARNING, info("select name  from items where id = 7 -- other literal")) is None
    asyncio.run(allow_list.flush())
    stored = json.loads((tmp_path / "policy.fingerprints.json").read_text())["fingerprints"]
    assert len(stored) == 1
    assert stored[0]["status"] == "approved" and stored[0]["role"] == "fw_fp_app"
    assert stored[0]["example"] == "SELECT name FROM items WHERE id = $1"


def test_enforce_allows_learned_shapes_and_refuses_others_as_pending(tmp_path: Path) -> None:
    store = FileFingerprintStore(tmp_path / "p.fingerprints.json")
    learner = FingerprintAllowList(store)
    learner.screen(LEARNING, info("SELECT name FROM items WHERE id = 1"))
    asyncio.run(learner.flush())

    enforcer = FingerprintAllowList(store)
    asyncio.run(enforcer.refresh())
    assert enforcer.screen(ENFORCING, info("SELECT name FROM items WHERE id = 99")) is None
    refusal = enforcer.screen(ENFORCING, info("SELECT name FROM items WHERE id = 1 OR name LIKE $1"))
    assert isinstance(refusal, Refuse)
    assert refusal.rule == "unknown-fingerprint" and refusal.sqlstate == "42501"
    assert "is not on role fw_fp_app's allow-list" in refusal.message
    assert "pgveil fingerprints approve" in refusal.message
    asyncio.run(enforcer.flush())
    statuses = sorted(entry.status for entry in asyncio.run(store.load()))
    assert statuses == ["approved", "pending"]


def test_every_statement_of_a_message_must_be_known(tmp_path: Path) -> None:
    allow_list = FingerprintAllowList(FileFingerprintStore(tmp_path / "m.fingerprints.json"))
    allow_list.screen(LEARNING, info("SELECT name FROM items WHERE id = 1"))
    assert allow_list.screen(ENFORCING, info("SELECT name FROM items WHERE id = 1; SELECT 1")) is not None


def test_cli_approves_and_revokes_and_the_proxy_follows_after_refresh(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = tmp_path / "shop.yaml"
    store = FileFingerprintStore(default_store_path(policy))
    assert store.path == tmp_path / "shop.fingerprints.json"
    proxy_side = FingerprintAllowList(store)
    refused = info("SELECT id FROM items ORDER BY name")
    assert proxy_side.screen(ENFORCING, refused) is not None
    asyncio.run(proxy_side.flush())

    assert main(["fingerprints", "list", "--policy", str(policy), "--status", "pending"]) == 0
    listing = capsys.readouterr().out
    assert refused.fingerprint in listing and "SELECT id FROM items ORDER BY name" in listing

    assert main(["fingerprints", "approve", refused.fingerprint, "--policy", str(policy)]) == 0
    assert "approved for fw_fp_app" in capsys.readouterr().out
    asyncio.run(proxy_side.refresh())
    assert proxy_side.screen(ENFORCING, refused) is None

    assert main(["fingerprints", "revoke", refused.fingerprint, "--policy", str(policy)]) == 0
    asyncio.run(proxy_side.refresh())
    assert proxy_side.screen(ENFORCING, refused) is not None
    assert proxy_side.screen(LEARNING, refused) is not None  # revoked stays refused while learning
    assert main(["fingerprints", "approve", "0000000000000000", "--policy", str(policy)]) == 1


def test_two_worker_processes_can_share_one_file(tmp_path: Path) -> None:
    path = tmp_path / "shared.fingerprints.json"
    first = FingerprintAllowList(FileFingerprintStore(path))
    second = FingerprintAllowList(FileFingerprintStore(path))
    first.screen(LEARNING, info("SELECT name FROM items"))
    second.screen(LEARNING, info("SELECT id FROM items"))
    asyncio.run(first.flush())
    asyncio.run(second.flush())
    assert len(asyncio.run(FileFingerprintStore(path).load())) == 2
    assert not list(tmp_path.glob("*.tmp"))


def test_postgresql_store_serves_a_fleet_of_replicas(
        upstream: Upstream, capsys: pytest.CaptureFixture[str]) -> None:
    table = "public.fw_fingerprints_fleet"
    upstream.execute(f"DROP TABLE IF EXISTS {table}")
    replica_a = FingerprintAllowList(PostgresFingerprintStore(upstream.dsn(), table))
    replica_b = FingerprintAllowList(PostgresFingerprintStore(upstream.dsn(), table))
    learned = info("SELECT name FROM items WHERE id = 5")
    replica_a.screen(LEARNING, learned)
    asyncio.run(replica_a.flush())
    asyncio.run(replica_b.refresh())
    assert replica_b.screen(ENFORCING, learned) is None

    unknown = info("SELECT count(*) FROM items")
    assert replica_b.screen(ENFORCING, unknown) is not None
    asyncio.run(replica_b.flush())
    approve = ["fingerprints", "approve", unknown.fingerprint, "--dsn", upstream.dsn(), "--table", table]
    assert main(approve) == 0
    capsys.readouterr()
    asyncio.run(replica_a.refresh())
    assert replica_a.screen(ENFORCING, unknown) is None

    assert main(["fingerprints", "list", "--json", "--dsn", upstream.dsn(), "--table", table]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {entry["status"] for entry in listed} == {"approved"} and len(listed) == 2
    upstream.execute(f"DROP TABLE {table}")
