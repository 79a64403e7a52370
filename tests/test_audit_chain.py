"""Audit file sink and chain: durable, hash-chained across rotations, and verify finds tampering."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.audit import AuditError, JsonLinesFileSink, verify
from proxy.cli import main as pgveil


def access(n: int) -> dict[str, object]:
    return {"type": "access", "time": "2026-01-01T00:00:00+00:00", "request": n,
            "normalized_sql": f"SELECT $1 FROM t{n}", "relations": ["public.t"], "decision": "allow"}


async def write_records(path: Path, count: int, **options: object) -> None:
    sink = JsonLinesFileSink(path, **options)  # type: ignore[arg-type]
    await asyncio.gather(*(sink.write(access(n)) for n in range(count)))
    await sink.close()


def lines_of(path: Path) -> list[str]:
    return path.read_text().splitlines()


@pytest.mark.parametrize("fsync", ["always", "batch", "never"])
async def test_concurrent_writes_are_all_recorded_in_one_intact_chain(tmp_path: Path, fsync: str) -> None:
    log = tmp_path / "audit.jsonl"
    await write_records(log, 50, fsync=fsync)
    records = [json.loads(line) for line in lines_of(log)]
    assert [r["seq"] for r in records] == list(range(50))
    assert sorted(r["request"] for r in records) == list(range(50))
    assert verify(log) == []


async def test_chain_continues_across_rotations_and_restarts(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    await write_records(log, 30, max_bytes=1500)
    await write_records(log, 10, max_bytes=1500)  # a restart resumes the chain of what is on disk
    rotated = sorted(tmp_path.glob("audit.jsonl.*"))
    assert len(rotated) >= 3
    first_of_second_file = json.loads(lines_of(tmp_path / "audit.jsonl.2")[0])
    last_of_first_file = json.loads(lines_of(tmp_path / "audit.jsonl.1")[-1])
    assert first_of_second_file["prev"] == last_of_first_file["hash"]
    seqs = [json.loads(line)["seq"] for f in [*rotated, log] for line in lines_of(f)]
    assert seqs == list(range(40))
    assert verify(log) == []
    assert verify(tmp_path) == []


async def test_verify_names_file_and_line_of_a_one_character_edit(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    await write_records(log, 5)
    lines = lines_of(log)
    lines[2] = lines[2].replace("FROM t", "FROM s", 1)
    log.write_text("\n".join(lines) + "\n")
    problems = verify(log)
    assert len(problems) == 1
    assert problems[0].startswith(f"{log}:3: record seq 2 does not match its hash")


async def test_verify_detects_a_removed_record(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    await write_records(log, 5)
    lines = lines_of(log)
    del lines[1]
    log.write_text("\n".join(lines) + "\n")
    assert verify(log) == [f"{log}:2: record seq 2 does not follow seq 0: a record before it was removed, "
                           "inserted or reordered"]


async def test_verify_detects_reordered_records(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    await write_records(log, 5)
    lines = lines_of(log)
    lines[1], lines[2] = lines[2], lines[1]
    log.write_text("\n".join(lines) + "\n")
    problems = verify(log)
    assert problems and all("does not follow" in p for p in problems)
    assert problems[0].startswith(f"{log}:2:")


async def test_verify_detects_a_removed_rotated_file(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    await write_records(log, 30, max_bytes=1500)
    (tmp_path / "audit.jsonl.2").unlink()
    problems = verify(log)
    assert len(problems) == 1 and "audit.jsonl.3:1: record seq" in problems[0]


async def test_an_hmac_keyed_log_cannot_be_verified_or_resealed_without_the_key(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    await write_records(log, 3, key=b"k" * 32)
    assert verify(log, key=b"k" * 32) == []
    assert len(verify(log)) == 3


def test_audit_verify_command_exit_status_and_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "audit.jsonl"
    asyncio.run(write_records(log, 3))
    assert pgveil(["audit", "verify", str(log)]) == 0
    log.write_text(log.read_text().replace('"allow"', '"allOw"', 1))
    capsys.readouterr()
    assert pgveil(["audit", "verify", str(log)]) == 1
    assert capsys.readouterr().out.startswith(f"{log}:1: record seq 0 does not match its hash")


async def test_a_full_disk_raises_audit_error(tmp_path: Path) -> None:
    sink = JsonLinesFileSink("/dev/full", fsync="never")
    with pytest.raises(AuditError, match="No space left on device"):
        await sink.write(access(1))
    await sink.close()


async def test_an_unwritable_path_raises_audit_error(tmp_path: Path) -> None:
    with pytest.raises(AuditError, match="cannot open audit log"):
        JsonLinesFileSink(tmp_path / "missing-directory" / "audit.jsonl")


FILE_SIZE_LIMITED_WRITER = """
import asyncio, resource, signal, sys
from proxy.audit import AuditError, JsonLinesFileSink
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))
async def main():
    sink = JsonLinesFileSink(sys.argv[1], fsync="batch", max_bytes=None)
    written = 0
    for n in range(100):
        try:
            await sink.write({"type": "access", "request": n, "normalized_sql": "SELECT 1"})
            written += 1
        except AuditError as exc:
            print(written, exc)
            return
asyncio.run(main())
"""


def test_a_file_size_limit_stops_writes_without_leaving_a_torn_record(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    result = subprocess.run([sys.executable, "-c", FILE_SIZE_LIMITED_WRITER, str(log)],
                            capture_output=True, text=True, check=True, env={**os.environ})
    written, message = result.stdout.split(" ", 1)
    assert 0 < int(written) < 100
    assert "File too large" in message
    assert len(lines_of(log)) == int(written)
    assert verify(log) == []


async def test_verify_checks_each_log_of_a_directory_as_its_own_chain(tmp_path: Path) -> None:
    await write_records(tmp_path / "audit-w0.jsonl", 3)
    await write_records(tmp_path / "audit-w1.jsonl", 4)
    assert verify(tmp_path) == []
    edited = tmp_path / "audit-w1.jsonl"
    edited.write_text(edited.read_text().replace("FROM t3", "FROM t4"))
    assert [p.split(": ")[0] for p in verify(tmp_path)] == [f"{edited}:4"]


async def test_a_record_torn_by_a_crash_is_reported_and_the_chain_goes_on_after_it(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    await write_records(log, 3)
    with log.open("a") as handle:
        handle.write('{"seq":3,"type":"acc')  # the process died in the middle of a write
    await write_records(log, 2)
    assert verify(log) == [f"{log}:4: not a JSON record (torn or edited line)"]
    assert [json.loads(line)["seq"] for line in lines_of(log)[4:]] == [3, 4]


def test_an_empty_log_fails_verification_alone_but_not_as_an_idle_workers_log_in_a_directory(
        tmp_path: Path) -> None:
    (tmp_path / "audit-w1.jsonl").touch()
    assert verify(tmp_path / "audit-w1.jsonl") == [f"{tmp_path / 'audit-w1.jsonl'}: the log holds no records"]
    assert verify(tmp_path) == []
