"""`pgveil audit report` counts the row-budget breaches and honeytoken hits that a real `pgveil serve`
audited while psycopg clients passed a budget and read a honeytoken row."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from proxy.cli import main as pgveil
from tests.conftest import Upstream
from tests.proxy_harness import spawn_serve

pytest.importorskip("proxy.dlp.guard")  # row budgets and honeytokens (docs/policy.md)

DATABASE = "access_dlp_test"
PASSWORD = "acc-dlp-pw-77"
MARKER = "hny-7f3a9c0d5e"
POLICY = f"""\
version: 1
settings: {{default_role: deny}}
roles:
  capped:
    members: [dl_alice]
    statements: [select]
    tables: ["public.dl_people"]
    max_rows_per_statement: 2
  reader:
    members: [dl_bob]
    statements: [select]
    tables: ["public.dl_people"]
honeytokens:
  - name: canary-people
    table: public.dl_people
    column: note
    value: {MARKER}
    action: alert
"""


@pytest.fixture(scope="module")
def audit_log(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    upstream.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
    upstream.execute(f"CREATE DATABASE {DATABASE}")
    for login in ("dl_alice", "dl_bob"):
        upstream.execute(f"DROP ROLE IF EXISTS {login}; CREATE ROLE {login} LOGIN PASSWORD '{PASSWORD}'")
    upstream.execute("CREATE TABLE dl_people (id int, note text);"
                     "INSERT INTO dl_people SELECT g, 'note ' || g FROM generate_series(1, 4) g;"
                     f"INSERT INTO dl_people VALUES (5, '{MARKER}');"
                     "GRANT SELECT ON dl_people TO dl_alice, dl_bob", dbname=DATABASE)
    directory = tmp_path_factory.mktemp("access_dlp")
    policy = directory / "policy.yaml"
    policy.write_text(POLICY)
    log = directory / "audit.jsonl"
    with spawn_serve("--upstream", upstream.dsn(dbname=DATABASE), "--policy", str(policy),
                     "--listen", "127.0.0.1:0", "--audit-log", str(log)) as serve:
        with psycopg.connect(serve.dsn("dl_alice", PASSWORD, DATABASE), autocommit=True,
                             prepare_threshold=None) as conn:
            with pytest.raises(psycopg.Error, match="pgveil: row-budget"):
                conn.execute("SELECT id FROM dl_people WHERE id < 5").fetchall()
            assert conn.execute("SELECT id FROM dl_people WHERE id = 1").fetchall() == [(1,)]
        with psycopg.connect(serve.dsn("dl_bob", PASSWORD, DATABASE), autocommit=True,
                             prepare_threshold=None) as conn:
            assert len(conn.execute("SELECT * FROM dl_people").fetchall()) == 5  # alert: served
        serve.terminate()
        assert serve.wait() == 0
    yield log


def records(log: Path, kind: str) -> list[dict[str, Any]]:
    return [r for r in map(json.loads, log.read_text().splitlines()) if r["type"] == kind]


def test_report_counts_real_budget_breaches_and_honeytoken_hits(
        capsys: pytest.CaptureFixture[str], audit_log: Path) -> None:
    [breach], [hit] = records(audit_log, "budget"), records(audit_log, "honeytoken")
    capsys.readouterr()
    assert pgveil(["audit", "report", str(audit_log), "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["totals"]["budgetBreaches"], report["totals"]["honeytokenHits"]) == (1, 1)
    [budget] = report["budgetBreaches"]
    assert (budget["login"], budget["role"], budget["limit"], budget["limitValue"], budget["count"]) == (
        "dl_alice", "capped", "max_rows_per_statement", 2, 1)
    assert budget["maxRows"] == breach["rows"] and budget["last"] == breach["time"]
    [honeytoken] = report["honeytokenHits"]
    assert (honeytoken["token"], honeytoken["table"], honeytoken["action"], honeytoken["count"]) == (
        "canary-people", "public.dl_people", "alert", 1)
    assert honeytoken["logins"] == {"dl_bob": 1} and honeytoken["clients"] == {"127.0.0.1": 1}
    assert honeytoken["columns"] == {"note": 1}
    assert honeytoken["last"] == hit["time"]
    assert report["otherRecordTypes"] == {}
    assert pgveil(["audit", "report", str(audit_log)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    budget_row = lines[lines.index("Row-budget breaches") + 2].split()
    assert budget_row[:5] == ["dl_alice", "capped", "max_rows_per_statement", "2", "1"]
    hit_row = lines[lines.index("Honeytoken hits") + 2].split()
    assert hit_row[:6] == ["canary-people", "public.dl_people", "alert", "1", "dl_bob", "1"]


def test_catalog_names_relations_read_that_the_registry_lacks(
        capsys: pytest.CaptureFixture[str], audit_log: Path) -> None:
    capsys.readouterr()
    assert pgveil(["catalog", "--policy", str(audit_log.parent / "policy.yaml"),
                   "--access-from", str(audit_log)]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == []  # the policy lists no datasets
    assert "read in the window but not in the registry: public.dl_people" in err
