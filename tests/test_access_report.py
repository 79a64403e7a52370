"""Who read what: `pgveil catalog --access-from` and `pgveil audit report` on an audit trail that a
real `pgveil serve` wrote (file log with rotations and the PostgreSQL table sink at once) while two
logins, through psycopg and asyncpg, read masked and unmasked columns and were refused."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from proxy.audit import JsonLinesFileSink, verify
from proxy.audit.connection import now_iso
from proxy.audit.file import rotated_files
from proxy.cli import main as pgveil
from tests.conftest import Upstream
from tests.proxy_harness import spawn_serve

DATABASE = "access_report_test"
PASSWORD = "acc-pw-5151"
TABLE = "acc_audit"
POLICY = """\
version: 1
settings: {default_role: deny}
roles:
  analyst:
    members: [acc_alice]
    statements: [select]
    tables: ["public.acc_people"]
    reveal: [public, internal]
  auditor:
    members: [acc_bob]
    statements: [select]
    tables: ["*"]
    reveal: [public, internal, confidential, restricted]
datasets:
  public.acc_people:
    description: People
    columns:
      id: {sensitivity: internal}
      email: {sensitivity: confidential, protection: email}
      ssn: {sensitivity: restricted, protection: redact}
  public.acc_secret:
    columns:
      code: {sensitivity: restricted, protection: redact}
"""
SCHEMA = """
CREATE TABLE acc_people (id int, email text, ssn text);
INSERT INTO acc_people SELECT g, 'u' || g || '@example.org', '123-45-' || g FROM generate_series(1, 5) g;
CREATE TABLE acc_secret (code text);
INSERT INTO acc_secret VALUES ('launch');
GRANT SELECT, DELETE ON ALL TABLES IN SCHEMA public TO acc_alice, acc_bob;
"""


@dataclass
class Trail:
    """The audit trail of one pgveil run, and what the test did while it ran."""

    directory: Path
    policy: Path
    log: Path
    table_dsn: str
    upstream: Upstream

    def records(self) -> list[dict[str, Any]]:
        files = [*rotated_files(self.log), self.log]
        return [json.loads(line) for file in files for line in file.read_text().splitlines() if line]

    def accesses(self, login: str) -> list[dict[str, Any]]:
        return [r for r in self.records() if r["type"] == "access" and r["login"] == login]


@pytest.fixture(scope="module")
def trail(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trail]:
    upstream.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
    upstream.execute(f"CREATE DATABASE {DATABASE}")
    for login in ("acc_alice", "acc_bob", "acc_carol"):
        upstream.execute(f"DROP ROLE IF EXISTS {login}; CREATE ROLE {login} LOGIN PASSWORD '{PASSWORD}'")
    upstream.execute(SCHEMA, dbname=DATABASE)
    upstream.execute(f"DROP TABLE IF EXISTS {TABLE}", dbname=DATABASE)
    directory = tmp_path_factory.mktemp("access")
    policy = directory / "policy.yaml"
    policy.write_text(POLICY)
    table_dsn = upstream.dsn(dbname=DATABASE)
    config = directory / "config.yaml"
    # small files, so the trail spans rotations; the same records also go to a table sink
    config.write_text(json.dumps({"audit": {"max_bytes": 3000, "postgres_dsn": table_dsn,
                                            "postgres_table": TABLE}}))
    log = directory / "audit.jsonl"
    with spawn_serve("--upstream", upstream.dsn(dbname=DATABASE), "--policy", str(policy),
                     "--listen", "127.0.0.1:0", "--audit-log", str(log), "--config", str(config)) as serve:
        # psycopg: no automatic server-side prepare, so each execute is one access record
        with psycopg.connect(serve.dsn("acc_alice", PASSWORD, DATABASE), autocommit=True,
                             prepare_threshold=None) as conn:
            assert len(conn.execute("SELECT * FROM acc_people").fetchall()) == 5
            assert conn.execute("SELECT email FROM acc_people WHERE id = %s", (2,)).fetchall() == [
                ("u***@example.org",)]
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="pgveil: table-not-allowed"):
                conn.execute("SELECT code FROM acc_secret")
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="pgveil: statement-class"):
                conn.execute("DELETE FROM acc_people")

        async def as_bob() -> None:
            conn = await asyncpg.connect(serve.dsn("acc_bob", PASSWORD, DATABASE))
            try:
                assert len(await conn.fetch("SELECT ssn FROM acc_people WHERE id < $1", 3)) == 2
                assert len(await conn.fetch("SELECT ssn FROM acc_people WHERE id < $1", 4)) == 3
                # fetch, not fetchval: fetchval executes with a row limit (the portal is suspended, no
                # CommandComplete), and completion records count rows from CommandComplete only
                assert await conn.fetch("SELECT count(*) FROM acc_people") == [(5,)]
                assert await conn.fetch("SELECT code FROM acc_secret") == [("launch",)]
            finally:
                await conn.close()
        asyncio.run(as_bob())
        with pytest.raises(psycopg.OperationalError, match="pgveil: "):  # no role: refused at startup
            psycopg.connect(serve.dsn("acc_carol", PASSWORD, DATABASE)).close()
        serve.terminate()
        assert serve.wait() == 0  # stopped cleanly: every record written, the log checked on exit
    yield Trail(directory, policy, log, table_dsn, upstream)


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = pgveil(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def catalog(capsys: pytest.CaptureFixture[str], trail: Trail, *args: str) -> dict[str, dict[str, Any]]:
    code, out, err = run(capsys, "catalog", "--policy", str(trail.policy), *args)
    assert code == 0, err
    assert "not checked" in err and "pgveil audit verify" in err
    return {entry["name"]: entry for entry in json.loads(out)}


def columns_of(entry: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {column["name"]: column["access"] for column in entry["schema"]}


def test_the_trail_spans_rotations_and_is_intact(trail: Trail) -> None:
    assert rotated_files(trail.log), "the log should have rotated (audit.max_bytes 3000)"
    assert verify(trail.log) == []


def check_people(people: dict[str, Any], trail: Trail) -> None:
    alice, bob = trail.accesses("acc_alice"), trail.accesses("acc_bob")
    access = people["access"]
    # alice: SELECT * (5 rows), SELECT email (1 row); bob: 2 + 3 rows of ssn, count(*) (1 row)
    assert (access["statements"], access["rows"]) == (5, 12)
    assert access["roles"] == {
        "analyst": {"statements": 2, "rows": 6, "lastRead": alice[1]["time"]},
        "auditor": {"statements": 3, "rows": 6, "lastRead": bob[2]["time"]},
    }
    assert access["logins"] == {
        "acc_alice": {"statements": 2, "rows": 6, "lastRead": alice[1]["time"]},
        "acc_bob": {"statements": 3, "rows": 6, "lastRead": bob[2]["time"]},
    }
    assert access["lastRead"] == bob[2]["time"]
    assert access["statementKinds"] == {"select": 5}
    assert access["refusedStatements"] == 1  # alice's DELETE
    assert access["lastRefused"] == trail.records()[[r.get("rule") for r in trail.records()].index(
        "statement-class")]["time"]
    columns = columns_of(people)
    ssn = columns["ssn"]
    # SELECT * by alice (masked), two reads by bob (unmasked); count(*) reads no column
    assert (ssn["statements"], ssn["rows"], ssn["unmaskedStatements"]) == (3, 10, 2)
    assert ssn["roles"]["analyst"] == {"statements": 1, "rows": 5, "lastRead": alice[0]["time"],
                                       "unmaskedStatements": 0}
    assert ssn["roles"]["auditor"] == {"statements": 2, "rows": 5, "lastRead": bob[1]["time"],
                                       "unmaskedStatements": 2}
    assert ssn["lastRead"] == bob[1]["time"]
    email = columns["email"]
    assert (email["statements"], email["rows"], email["unmaskedStatements"]) == (2, 6, 0)
    assert set(email["logins"]) == {"acc_alice"}
    # `id` is read by SELECT * and by both WHERE clauses
    assert (columns["id"]["statements"], columns["id"]["unmaskedStatements"]) == (4, 4)


def test_catalog_access_from_the_file_log(capsys: pytest.CaptureFixture[str], trail: Trail) -> None:
    entries = catalog(capsys, trail, "--access-from", str(trail.log))
    check_people(entries["public.acc_people"], trail)
    secret = entries["public.acc_secret"]["access"]
    bob = trail.accesses("acc_bob")
    assert (secret["statements"], secret["rows"], secret["refusedStatements"]) == (1, 1, 1)
    assert secret["logins"] == {"acc_bob": {"statements": 1, "rows": 1, "lastRead": bob[3]["time"]}}
    code = columns_of(entries["public.acc_secret"])["code"]
    assert (code["statements"], code["unmaskedStatements"], list(code["roles"])) == (1, 1, ["auditor"])


def test_catalog_access_from_the_table_sink(capsys: pytest.CaptureFixture[str], trail: Trail) -> None:
    entries = catalog(capsys, trail, "--access-from", trail.table_dsn, "--access-table", TABLE)
    check_people(entries["public.acc_people"], trail)
    assert PASSWORD not in capsys.readouterr().err


def test_catalog_without_access_flags_is_unchanged(capsys: pytest.CaptureFixture[str], trail: Trail) -> None:
    code, out, err = run(capsys, "catalog", "--policy", str(trail.policy))
    assert code == 0 and err == ""
    assert all("access" not in entry and all("access" not in c for c in entry["schema"])
               for entry in json.loads(out))
    code, _, err = run(capsys, "catalog", "--policy", str(trail.policy), "--window", "7d")
    assert code == 2 and "--access-from" in err


def test_catalog_window(capsys: pytest.CaptureFixture[str], trail: Trail) -> None:
    alice, bob = trail.accesses("acc_alice"), trail.accesses("acc_bob")
    # from bob's first statement on: only bob's reads
    entries = catalog(capsys, trail, "--access-from", str(trail.log), "--since", bob[0]["time"])
    access = entries["public.acc_people"]["access"]
    assert (access["statements"], access["rows"], list(access["logins"])) == (3, 6, ["acc_bob"])
    # up to (not including) alice's second statement: only her SELECT *
    entries = catalog(capsys, trail, "--access-from", str(trail.log), "--until", alice[1]["time"])
    access = entries["public.acc_people"]["access"]
    assert (access["statements"], access["rows"], access["lastRead"]) == (1, 5, alice[0]["time"])
    # a window after everything: nothing read, nothing last read
    entries = catalog(capsys, trail, "--access-from", str(trail.log), "--since", "2999-01-01")
    access = entries["public.acc_people"]["access"]
    assert (access["statements"], access["rows"], access["lastRead"], access["roles"]) == (0, 0, None, {})
    assert columns_of(entries["public.acc_people"])["ssn"]["lastRead"] is None
    code, _, err = run(capsys, "catalog", "--policy", str(trail.policy), "--access-from", str(trail.log),
                       "--since", "2026-01-01", "--window", "7d")
    assert code == 2 and "not both" in err


def report_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    code, out, err = run(capsys, "audit", "report", *args, "--format", "json")
    assert code == 0, err
    return json.loads(out)  # type: ignore[no-any-return]


def check_report(report: dict[str, Any], trail: Trail) -> None:
    assert report["chainChecked"] is False and "pgveil audit verify" in report["note"]
    totals = report["totals"]
    assert (totals["served"], totals["refused"], totals["rows"]) == (6, 2, 13)
    assert (totals["connections"], totals["connectionsRefused"]) == (2, 1)
    readers = report["topReaders"]
    bob = trail.accesses("acc_bob")
    # bob read restricted columns unmasked: first; alice only masked
    assert [(r["login"], r["role"], r["statements"], r["unmaskedStatements"], r["rows"])
            for r in readers] == [("acc_bob", "auditor", 3, 3, 6), ("acc_alice", "analyst", 2, 0, 6)]
    assert readers[0]["lastRead"] == bob[3]["time"]
    assert readers[0]["columns"] == [
        {"column": "public.acc_people.ssn", "statements": 2, "unmasked": 2},
        {"column": "public.acc_secret.code", "statements": 1, "unmasked": 1}]
    rules = {entry["rule"]: entry for entry in report["refusals"]}
    assert rules["table-not-allowed"]["count"] == 1
    assert rules["table-not-allowed"]["logins"] == {"acc_alice": 1}
    assert rules["table-not-allowed"]["relations"] == {"public.acc_secret": 1}
    assert rules["statement-class"]["count"] == 1
    connect_refusals = [entry for entry in report["refusals"] if entry["atConnect"]]
    assert [(entry["count"], entry["logins"]) for entry in connect_refusals] == [(1, {"acc_carol": 1})]


def test_report_from_the_file_log_as_json(capsys: pytest.CaptureFixture[str], trail: Trail) -> None:
    report = report_json(capsys, str(trail.log), "--policy", str(trail.policy))
    check_report(report, trail)
    assert report["sources"][0]["files"] == len(rotated_files(trail.log)) + 1
    assert report["budgetBreaches"] == [] and report["honeytokenHits"] == []
    # restricted only: email (confidential) is no longer a sensitive column, so alice drops out
    report = report_json(capsys, str(trail.log), "--policy", str(trail.policy),
                         "--min-sensitivity", "restricted")
    alice = [r for r in report["topReaders"] if r["login"] == "acc_alice"]
    assert [c["column"] for c in alice[0]["columns"]] == ["public.acc_people.ssn"]


def test_report_from_the_table_sink(capsys: pytest.CaptureFixture[str], trail: Trail) -> None:
    report = report_json(capsys, trail.table_dsn, "--table", TABLE, "--policy", str(trail.policy))
    check_report(report, trail)
    count = len(trail.records())
    assert report["sources"] == [{"name": TABLE, "files": 0, "lines": count, "records": count,
                                  "unreadableLines": 0}]
    # the window is a WHERE on the table's `at` column
    bob = trail.accesses("acc_bob")
    report = report_json(capsys, trail.table_dsn, "--table", TABLE, "--since", bob[0]["time"],
                         "--until", bob[3]["time"])
    assert (report["totals"]["served"], report["totals"]["rows"]) == (3, 6)
    assert report["sources"][0]["lines"] < count


def test_report_without_policy_takes_masked_columns_as_sensitive(
        capsys: pytest.CaptureFixture[str], trail: Trail) -> None:
    report = report_json(capsys, str(trail.log))
    # alice's SELECT * masked email and ssn; acc_secret.code was never masked for anyone
    assert report["sensitiveColumns"]["read"] == ["public.acc_people.email", "public.acc_people.ssn"]
    assert [(r["login"], r["statements"], r["unmaskedStatements"]) for r in report["topReaders"]] == [
        ("acc_bob", 2, 2), ("acc_alice", 2, 0)]


def test_report_as_text(capsys: pytest.CaptureFixture[str], trail: Trail) -> None:
    code, out, err = run(capsys, "audit", "report", str(trail.log), "--policy", str(trail.policy))
    assert code == 0, err
    assert "NOTE: the integrity chain was not checked" in out
    assert "statements: 6 served, 2 refused; rows 13; connections 2 (1 refused)" in out
    lines = out.splitlines()
    header = lines.index("Top readers of sensitive columns (confidential and above in "
                         f"{trail.policy})")
    assert lines[header + 1].split()[:5] == ["LOGIN", "ROLE", "STATEMENTS", "UNMASKED", "ROWS"]
    assert lines[header + 2].split()[:5] == ["acc_bob", "auditor", "3", "3", "6"]
    assert lines[header + 3].split()[:5] == ["acc_alice", "analyst", "2", "0", "6"]
    refusals = lines.index("Refusals by rule")
    assert any(line.split()[:2] == ["table-not-allowed", "1"] for line in lines[refusals:refusals + 5])
    assert "Row-budget breaches\n  (none)" in out and "Honeytoken hits\n  (none)" in out


def test_report_counts_budget_and_honeytoken_records_written_by_the_audit_writer(
        capsys: pytest.CaptureFixture[str], trail: Trail, tmp_path: Path) -> None:
    """The two record types other features write: appended through the file sink's own writer, so
    the chain stays intact, next to an unknown type (tolerated, counted)."""
    copy = tmp_path / "audit.jsonl"
    for file in [*rotated_files(trail.log), trail.log, trail.log.with_name("audit.jsonl-head")]:
        shutil.copy(file, tmp_path / file.name)
    who = {"connection_id": 9, "client_address": "10.0.3.4:51522", "login": "acc_bob", "database": DATABASE,
           "application_name": "exfil", "role": "auditor", "policy_version": "x"}
    records: list[dict[str, Any]] = [
        {"type": "budget", "time": now_iso(), **who, "limit": "max_rows_per_statement", "limit_value": 100,
         "rows": 101, "fingerprint": "aa11"},
        {"type": "budget", "time": now_iso(), **who, "limit": "max_rows_per_statement", "limit_value": 100,
         "rows": 101, "fingerprint": "aa11"},
        {"type": "budget", "time": now_iso(), **who, "login": "acc_alice", "role": "analyst",
         "limit": "max_rows_per_hour", "limit_value": 1000, "rows": 1500, "fingerprint": "bb22"},
        {"type": "honeytoken", "time": now_iso(), **who, "token": "canary-1", "table": "public.acc_people",
         "action": "terminate", "fingerprint": "cc33"},
        {"type": "honeytoken", "time": now_iso(), **who, "client_address": "10.0.3.4:40000",
         "token": "canary-1", "table": "public.acc_people", "action": "terminate", "fingerprint": "cc33"},
        {"type": "some-future-type", "time": now_iso(), "detail": 1},
        {"type": "elevation", "time": now_iso(), "event": "granted", "grant_id": "g-1", "login": "acc_dev",
         "elevated_role": "auditor", "reason": "INC-7", "approver": "acc_lead",
         "granted_at": "2026-12-01T10:00:00+00:00", "expires_at": "2026-12-01T10:30:00+00:00"},
        {"type": "elevation", "time": now_iso(), "event": "used", "grant_id": "g-1", "login": "acc_dev",
         "elevated_role": "auditor", "reason": "INC-7", "approver": "acc_lead"},
    ]

    async def append() -> None:
        sink = JsonLinesFileSink(copy)
        for record in records:
            await sink.write(record)
        await sink.close()
    asyncio.run(append())
    assert verify(copy) == []
    report = report_json(capsys, str(copy), "--policy", str(trail.policy))
    check_report(report, trail)  # the statements are counted as before
    assert report["totals"]["budgetBreaches"] == 3 and report["totals"]["honeytokenHits"] == 2
    assert report["budgetBreaches"] == [
        {"login": "acc_bob", "role": "auditor", "limit": "max_rows_per_statement", "limitValue": 100,
         "count": 2, "maxRows": 101, "last": records[1]["time"], "fingerprints": {"aa11": 2}},
        {"login": "acc_alice", "role": "analyst", "limit": "max_rows_per_hour", "limitValue": 1000,
         "count": 1, "maxRows": 1500, "last": records[2]["time"], "fingerprints": {"bb22": 1}},
    ]
    assert report["honeytokenHits"] == [
        {"token": "canary-1", "table": "public.acc_people", "action": "terminate", "count": 2,
         "last": records[4]["time"], "logins": {"acc_bob": 2}, "roles": {"auditor": 2},
         "clients": {"10.0.3.4": 2}, "fingerprints": {"cc33": 2}, "columns": {}}]
    assert report["otherRecordTypes"] == {"some-future-type": 1}
    assert report["elevations"] == [
        {"grant": "g-1", "login": "acc_dev", "elevatedRole": "auditor", "approver": "acc_lead",
         "reason": "INC-7", "grantedAt": "2026-12-01T10:00:00+00:00",
         "expiresAt": "2026-12-01T10:30:00+00:00", "events": {"granted": 1, "used": 1},
         "last": records[-1]["time"], "problems": []}]
    code, out, _ = run(capsys, "audit", "report", str(copy))
    assert code == 0
    lines = out.splitlines()
    budget = lines.index("Row-budget breaches")
    assert lines[budget + 2].split() == ["acc_bob", "auditor", "max_rows_per_statement", "100", "2", "101",
                                         *lines[budget + 2].split()[-2:]]
    hits = lines.index("Honeytoken hits")
    assert lines[hits + 2].split()[:6] == ["canary-1", "public.acc_people", "terminate", "2", "acc_bob", "2"]
    assert "Other record types: some-future-type 1" in out
    elevations = lines.index("Elevations")
    assert lines[elevations + 2].split()[:7] == [
        "g-1", "acc_dev", "auditor", "acc_lead", "INC-7", "granted", "1,"]


def test_report_errors(capsys: pytest.CaptureFixture[str], trail: Trail, tmp_path: Path) -> None:
    code, _, err = run(capsys, "audit", "report", str(tmp_path / "nothing.jsonl"))
    assert code == 1 and "no audit log found" in err
    code, _, err = run(capsys, "audit", "report", str(trail.log), "--window", "7 weeks")
    assert code == 2 and "24h, 7d or 2w" in err
    code, _, err = run(capsys, "audit", "report", str(trail.log), "--since", "yesterday")
    assert code == 2 and "ISO 8601" in err


def test_a_window_skips_rotated_files_it_cannot_need(capsys: pytest.CaptureFixture[str],
                                                     trail: Trail) -> None:
    everything = report_json(capsys, str(trail.log), "--policy", str(trail.policy))
    carol = [r for r in trail.records() if r["type"] == "connect" and r["login"] == "acc_carol"]
    late = report_json(capsys, str(trail.log), "--since", carol[0]["time"])
    assert late["sources"][0]["files"] < everything["sources"][0]["files"]
    assert (late["totals"]["connectionsRefused"], late["totals"]["statements"]) == (1, 0)
    early = report_json(capsys, str(trail.log), "--until", trail.records()[1]["time"])
    assert early["totals"]["connections"] == 1 and early["totals"]["statements"] == 0


def test_a_directory_of_worker_logs(capsys: pytest.CaptureFixture[str], trail: Trail, tmp_path: Path) -> None:
    """Each worker's log is its own chain with its own connection ids: completions match within one."""
    for worker in ("audit-w0.jsonl", "audit-w1.jsonl"):
        with (tmp_path / worker).open("w") as out:
            for file in [*rotated_files(trail.log), trail.log]:
                out.write(file.read_text())
    report = report_json(capsys, str(tmp_path), "--policy", str(trail.policy))
    assert (report["totals"]["served"], report["totals"]["rows"]) == (12, 26)
    assert [(r["login"], r["statements"], r["rows"]) for r in report["topReaders"]] == [
        ("acc_bob", 6, 12), ("acc_alice", 4, 12)]


def test_a_pipeline_completion_covering_several_statements_counts_its_rows_once(
        capsys: pytest.CaptureFixture[str], trail: Trail, tmp_path: Path) -> None:
    log = tmp_path / "pipeline.jsonl"
    with spawn_serve("--upstream", trail.upstream.dsn(dbname=DATABASE), "--policy", str(trail.policy),
                     "--listen", "127.0.0.1:0", "--audit-log", str(log)) as serve:
        with psycopg.connect(serve.dsn("acc_alice", PASSWORD, DATABASE), autocommit=True,
                             prepare_threshold=None) as conn, conn.pipeline():
            first = conn.execute("SELECT email FROM acc_people WHERE id <= %s", (2,))
            second = conn.execute("SELECT id FROM acc_people WHERE id <= %s", (3,))
            conn.execute("SELECT ssn FROM acc_people WHERE id <= %s", (1,))
        assert len(first.fetchall()) == 2 and len(second.fetchall()) == 3
        serve.terminate()
        assert serve.wait() == 0
    records = [json.loads(line) for line in log.read_text().splitlines()]
    completions = [r for r in records if r["type"] == "completion"]
    covering = [r for r in completions if len(r.get("requests", [])) > 1]
    assert covering, f"psycopg's pipeline should give one completion for several requests: {completions}"
    entries = catalog(capsys, trail, "--access-from", str(log))
    people = entries["public.acc_people"]["access"]
    assert people["statements"] == 3
    assert people["rows"] == sum(r["rows"] for r in completions)  # each completion's rows once
    columns = columns_of(entries["public.acc_people"])
    assert columns["email"]["statements"] == 1 and columns["ssn"]["statements"] == 1


def test_report_from_standard_input_and_damaged_lines(trail: Trail, tmp_path: Path) -> None:
    """`-` reads a collector's stream; a line that is not JSON is counted and warned about, a last
    line without its newline (a record being written) is not."""
    stream = tmp_path / "stream.jsonl"
    text = "".join(file.read_text() for file in [*rotated_files(trail.log), trail.log])
    stream.write_text(text + "not a record\n" + '{"seq":99,"type":"access","ti')
    result = subprocess.run([sys.executable, "-m", "proxy", "audit", "report", "-", "--format", "json",
                             "--policy", str(trail.policy)], stdin=stream.open("rb"),
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    check_report(report, trail)
    assert report["sources"][0]["name"] == "-" and report["sources"][0]["unreadableLines"] == 1
    text_result = subprocess.run([sys.executable, "-m", "proxy", "audit", "report", "-"],
                                 stdin=stream.open("rb"), capture_output=True, text=True, timeout=60,
                                 check=False)
    assert "WARNING: -: 1 line is not JSON records (torn or edited)" in text_result.stdout


def test_standard_input_with_workers_chains_interleaved(trail: Trail, tmp_path: Path) -> None:
    """Workers writing to one standard output mix their chains (same connection ids in each): the
    report follows each chain by its `prev` hashes, so every completion meets its own access."""
    from proxy.audit.chain import ChainState, HashChain, serialise

    ours = [line + "\n" for file in [*rotated_files(trail.log), trail.log]
            for line in file.read_text().splitlines()]
    other, chain, state = [], HashChain(key=b"another worker"), ChainState()
    for line in ours:
        record = {k: v for k, v in json.loads(line).items() if k not in ("seq", "prev", "chain", "hash")}
        sealed, state = chain.seal_body(serialise(record)[1:-1], state)
        other.append(sealed.decode())
    stream = tmp_path / "stdout.jsonl"
    stream.write_text("".join(line for pair in zip(ours, other, strict=True) for line in pair))
    result = subprocess.run([sys.executable, "-m", "proxy", "audit", "report", "-", "--format", "json",
                             "--policy", str(trail.policy)], stdin=stream.open("rb"),
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["totals"]["served"], report["totals"]["rows"]) == (12, 26)


def test_window_options() -> None:
    from datetime import UTC, datetime

    from proxy.audit.records import parse_window, time_key

    now = datetime(2026, 12, 8, 12, 0, tzinfo=UTC)
    window = parse_window(None, None, "7d", now=now)
    assert window.describe() == {"since": "2026-12-01T12:00:00.000000+00:00", "until": None}
    window = parse_window(None, "2026-12-08", "36h", now=now)
    assert window.describe() == {"since": "2026-12-06T12:00:00.000000+00:00",
                                 "until": "2026-12-08T00:00:00.000000+00:00"}
    window = parse_window("2026-12-01T09:00:00+01:00", "2026-12-02T00:00:00Z", None)
    assert window.describe() == {"since": "2026-12-01T08:00:00.000000+00:00",
                                 "until": "2026-12-02T00:00:00.000000+00:00"}
    for bad in [("2026-12-02", "2026-12-01", None), ("2026-12-01", None, "1d"), (None, None, "0d")]:
        with pytest.raises(ValueError):
            parse_window(*bad)
    # records written with another offset or precision still sort by the moment they name
    assert time_key("2026-12-01T10:00:00+01:00") == "2026-12-01T09:00:00.000000+00:00"
    assert time_key("2026-12-01T09:00:00.000001+00:00") > time_key("2026-12-01T10:00:00+01:00")


def test_reading_stops_a_day_after_the_window() -> None:
    """Past the window only completions are parsed, and nothing more than a day after it is read."""
    from proxy.audit.chain import ChainState, HashChain, serialise
    from proxy.audit.records import Source, lines_records, parse_window

    chain, state, lines = HashChain(), ChainState(), []
    for day in range(1, 6):
        for kind in ("access", "completion"):
            line, state = chain.seal_body(serialise(
                {"type": kind, "time": f"2026-11-0{day}T12:00:00.000000+00:00", "connection_id": 1,
                 "request": day})[1:-1], state)
            lines.append(line)
    source = Source("test")
    window = parse_window("2026-11-02", "2026-11-03", None)
    got = [record["type"] for _, record in lines_records(lines, "c", window, source)]
    assert got == ["access", "completion", "completion"]  # day 2; day 3's completion
    assert source.lines == 7  # days 1-3 and the first record of day 4: then it stops
