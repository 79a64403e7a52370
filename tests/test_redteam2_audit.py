"""Red team, round 2: what the audit log keeps. `normalized_sql` is meant to carry the statement's
shape with literal values replaced by `$n`, so the log does not become a second copy of the
sensitive data (a searched-for SSN, a password). Some statement kinds keep their literals.

Statements go through a running pgveil with `--audit-log` (the canary database of
tests/guard_setup.py); the test reads the log file. Every test asserts the SAFE behaviour (the
secret is not in any audit record). A failing test is a hole; docs/redteam.md, *Round 2*, lists
them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from proxy.audit import JsonLinesFileSink, verify
from proxy.guard.normalize import normalized_sql
from tests import guard_setup
from tests.guard_setup import DATABASE, PASSWORD, POLICY, GuardWorld
from tests.guard_setup import GuardDatabase as _GuardDatabase
from tests.proxy_harness import RunningProxy, running_proxy

world = guard_setup.world
SSN = "914-27-6380"  # what the analyst searched for: the raw SSN of person 1
SECRET = "rt2-hunter2-password"


@pytest.fixture(scope="module")
def audited(world: GuardWorld,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningProxy, Path]]:
    directory = tmp_path_factory.mktemp("redteam2-audit")
    policy, log = directory / "policy.yaml", directory / "audit.jsonl"
    policy.write_text(POLICY)
    with running_proxy(_GuardDatabase(world), str(policy), audit_log=str(log)) as running:
        yield running, log


def access_records(log: Path) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    return [record for line in log.read_text().splitlines()
            if (record := json.loads(line)).get("type") == "access"]


def audited_statement(audited: tuple[RunningProxy, Path], login: str, sql: str) -> dict[str, Any]:
    """Send `sql` as `login` (errors from PostgreSQL are fine) and return its access record."""
    proxy, log = audited
    before = len(access_records(log))
    with psycopg.connect(proxy.dsn(login, PASSWORD, DATABASE), autocommit=True,
                         prepare_threshold=None) as conn, contextlib.suppress(psycopg.Error):
        conn.execute(sql.encode())
    deadline = time.monotonic() + 10
    while len(access_records(log)) <= before:
        assert time.monotonic() < deadline, "no access record was written"
        time.sleep(0.02)
    records = access_records(log)[before:]
    assert len(records) == 1, records
    return records[0]


# ---- blocked: literals are replaced --------------------------------------------------------------

REPLACED = {
    "select": ("gv_analyst", f"select id from gv.people where ssn = '{SSN}'"),
    "declare": ("gv_analyst", "begin; declare rt2_c cursor for select id from gv.people "
                              f"where ssn = '{SSN}'; commit"),
    "select into": ("gv_admin", f"select id into temp rt2_into from gv.people where ssn = '{SSN}'"),
    "alter role password": ("gv_admin", f"alter role gv_nobody password '{SECRET}'"),
}


@pytest.mark.parametrize("name", sorted(REPLACED))
def test_audit_record_replaces_literal_values(audited: tuple[RunningProxy, Path], name: str) -> None:
    login, sql = REPLACED[name]
    record = audited_statement(audited, login, sql)
    assert SSN not in json.dumps(record) and SECRET not in json.dumps(record), record["normalized_sql"]


# ---- holes --------------------------------------------------------------------------------------

KEPT = {
    "prepare": ("gv_analyst", f"prepare rt2_find as select id from gv.people where ssn = '{SSN}'"),
    "create table as": ("gv_admin", "create temp table rt2_ctas as select id from gv.people "
                                    f"where ssn = '{SSN}'"),
    "create view": ("gv_admin", f"create temp view rt2_view as select id from gv.people where ssn = '{SSN}'"),
    "comment": ("gv_admin", f"comment on table gv.scratch is '{SECRET}'"),
}


@pytest.mark.parametrize("name", sorted(KEPT))
def test_audit_record_does_not_keep_the_literal_values_of_the_statement(
        audited: tuple[RunningProxy, Path], name: str) -> None:
    login, sql = KEPT[name]
    record = audited_statement(audited, login, sql)
    assert SSN not in json.dumps(record) and SECRET not in json.dumps(record), record["normalized_sql"]


@pytest.mark.parametrize("sql", [
    f"create user rt2_u password '{SECRET}'",
    f"create function rt2_f() returns text language sql as $body$ select '{SSN}' $body$",
    "prepare rt2_p as select id from gv.people where id = 914276380",
    f"comment on column gv.people.ssn is E'{SECRET}'",
    f"do $$ begin perform '{SECRET}'; end $$",
])
def test_normalized_sql_keeps_no_constant_of_any_statement_kind(sql: str) -> None:
    normalized = normalized_sql(sql)
    assert normalized and not any(secret in normalized for secret in (SSN, SECRET, "914276380")), normalized


def test_audit_log_is_not_readable_by_other_users(audited: tuple[RunningProxy, Path]) -> None:
    _, log = audited
    audited_statement(audited, "gv_analyst", "select 1")
    assert os.stat(log).st_mode & 0o077 == 0, oct(os.stat(log).st_mode)


# ---- `pgveil audit verify` and records removed at the end ----------------------------------------

def _sealed_log(path: Path, count: int, **options: Any) -> None:
    async def write() -> None:
        sink = JsonLinesFileSink(path, **options)
        for number in range(count):
            await sink.write({"type": "access", "time": "2026-01-01T00:00:00+00:00", "request": number,
                              "normalized_sql": f"select $1 from t{number}", "decision": "allow"})
        await sink.close()

    asyncio.run(write())


def test_verify_detects_a_workers_log_emptied_in_a_log_directory(tmp_path: Path) -> None:
    """`--workers 2` writes one chain per worker into the directory; emptying one worker's file
    (every record of that worker gone) must not verify as an idle worker."""
    _sealed_log(tmp_path / "audit-w0.jsonl", 3)
    _sealed_log(tmp_path / "audit-w1.jsonl", 4)
    (tmp_path / "audit-w1.jsonl").write_text("")
    assert verify(tmp_path) != []


def test_verify_detects_the_active_file_removed_after_a_rotation(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    _sealed_log(log, 30, max_bytes=1500)
    assert log.exists() and (tmp_path / "audit.jsonl.1").exists()
    log.unlink()  # every record since the last rotation
    assert verify(log) != []


def test_verify_detects_the_last_records_cut_off(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    _sealed_log(log, 5, key=b"k" * 32)
    lines = log.read_text().splitlines(keepends=True)
    log.write_text("".join(lines[:2]))
    assert verify(log, key=b"k" * 32) != []


def test_a_restart_after_records_were_cut_off_keeps_the_gap_visible(tmp_path: Path) -> None:
    """The head file outlives the cut: a restarted writer goes on from it instead of sealing over
    the gap, so the cut still shows in the chain after new records were written."""
    log = tmp_path / "audit.jsonl"
    _sealed_log(log, 5)
    lines = log.read_text().splitlines(keepends=True)
    log.write_text("".join(lines[:2]))
    _sealed_log(log, 2)
    problems = verify(log)
    assert len(problems) == 1 and "record seq 5 does not follow seq 1" in problems[0], problems


def test_verify_reports_an_edited_head_file(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    _sealed_log(log, 5, key=b"k" * 32)
    head = tmp_path / "audit.jsonl-head"
    head.write_text(head.read_text().replace('"seq":4', '"seq":1'))
    assert [problem.split(": ")[0] for problem in verify(log, key=b"k" * 32)] == [str(head)]
