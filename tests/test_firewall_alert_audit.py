"""A firewall rule in `alert` mode lets the statement through, and its finding is audited and counted."""

from __future__ import annotations

import json
import time
from pathlib import Path

import psycopg

from proxy.embedded import free_port
from tests.guard_setup import DATABASE, PASSWORD, POLICY, GuardWorld, world  # noqa: F401
from tests.proxy_harness import running_proxy
from tests.test_prepared_statements import _GuardDatabase, sample, scrape


def test_an_alert_mode_finding_is_in_the_access_record_and_in_the_metrics(
    world: GuardWorld, tmp_path: Path,  # noqa: F811
) -> None:
    policy, log, port = tmp_path / "policy.yaml", tmp_path / "audit.jsonl", free_port()
    policy.write_text(POLICY.replace("members: [gv_analyst]\n", "members: [gv_analyst]\n    injection: alert\n"))
    tautology = "select id from gv.orders where id = 10 or 'a' = 'a'"
    with running_proxy(_GuardDatabase(world), str(policy), audit_log=str(log),
                       metrics=f"127.0.0.1:{port}") as proxy:
        with psycopg.connect(proxy.dsn("gv_analyst", PASSWORD, DATABASE), autocommit=True) as conn:
            rows = conn.execute(tautology, prepare=False).fetchall()
        assert rows  # alert: served, not refused
        deadline = time.monotonic() + 10
        text = scrape(port)
        while sample(text, "pgveil_findings_total", 'rule="tautology"') < 1 and time.monotonic() < deadline:
            text = scrape(port)
    assert sample(text, "pgveil_findings_total", 'rule="tautology"') == 1
    access = [r for r in map(json.loads, log.read_text().splitlines())
              if r.get("type") == "access" and r.get("login") == "gv_analyst"]
    assert access[-1]["decision"] != "refuse" and access[-1]["findings"] == ["tautology"]
