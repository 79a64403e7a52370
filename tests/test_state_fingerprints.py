"""Fingerprint allow-lists folded into the state store: same behaviour as the PostgreSQL table
store, a legacy table copied in by the migration, the CLI, and a change reaching the keepers of
other replicas at once (not after their refresh interval)."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from proxy.cli import main
from proxy.firewall.fingerprints import FingerprintAllowList, PostgresFingerprintStore
from proxy.state import StateStore
from proxy.state.fingerprints import StateFingerprintStore, keeper_on_state
from tests.conftest import Upstream
from tests.test_firewall_fingerprints import ENFORCING, LEARNING, info


def test_the_state_store_serves_a_fleet_as_the_table_store_does(
        upstream: Upstream, capsys: pytest.CaptureFixture[str]) -> None:
    database = f"state_fp_{uuid.uuid4().hex[:8]}"
    upstream.execute(f"CREATE DATABASE {database}")
    dsn = upstream.dsn(dbname=database)
    # an allow-list kept in the legacy table before the state store existed
    legacy = FingerprintAllowList(PostgresFingerprintStore(dsn))
    known = info("SELECT name FROM items WHERE id = 5")
    legacy.screen(LEARNING, known)
    asyncio.run(legacy.flush())

    async def main_flow() -> None:
        a, b = StateStore(dsn, poll_interval=10.0), StateStore(dsn, poll_interval=10.0)
        # a long refresh interval and a long poll: only the notification can make b re-read soon
        keeper_b = keeper_on_state(b, refresh_seconds=3600)
        await a.open(watch=False)
        await b.open()
        try:
            replica_a = FingerprintAllowList(StateFingerprintStore(a))
            await replica_a.refresh()
            assert replica_a.screen(ENFORCING, known) is None  # copied in by the migration
            unknown = info("SELECT count(*) FROM items")
            assert await keeper_b.screen(ENFORCING, unknown) is not None  # pending, written
            await replica_a.refresh()
            assert replica_a.entries[(ENFORCING.name, unknown.fingerprint)].status == "pending"
            assert await StateFingerprintStore(a).set_status(unknown.fingerprint, "approved") == 1
            for _ in range(100):
                if await keeper_b.screen(ENFORCING, unknown) is None:
                    break
                await asyncio.sleep(0.05)
            assert await keeper_b.screen(ENFORCING, unknown) is None
        finally:
            await a.close()
            await b.close()

    try:
        asyncio.run(main_flow())
        revoke = ["fingerprints", "revoke", known.fingerprint, "--state-dsn", dsn]
        assert main(revoke) == 0
        assert "revoked for fw_fp_app" in capsys.readouterr().out
        assert main(["fingerprints", "list", "--state-dsn", dsn, "--status", "revoked"]) == 0
        assert known.fingerprint in capsys.readouterr().out
    finally:
        upstream.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
