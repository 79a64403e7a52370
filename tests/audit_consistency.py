"""Checks that an audit log's access and completion records are in step, connection by connection.

Every access record has exactly one completion record (a completion covers the request numbers in
its `requests` list, else its `request`), no completion covers a request without an access record
before it, and request numbers rise strictly per connection. A `connect` record for a connection id
seen before begins a new connection (connection ids start again when pgveil restarts on the same
log), and the one before it must have been complete.

    from tests.audit_consistency import audit_problems
    assert audit_problems(path, wait=True) == []
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class _Connection:
    accessed: list[int] = field(default_factory=list)
    completed: set[int] = field(default_factory=set)
    last_completion: int = 0


def log_files(log: Path) -> list[Path]:
    """The log's rotations (`log.N`, higher is newer), oldest first, then the log itself."""
    rotated = [p for p in log.parent.glob(f"{log.name}.*") if p.name[len(log.name) + 1:].isdigit()]
    files = sorted(rotated, key=lambda p: int(p.name[len(log.name) + 1:]))
    return [*files, log] if log.exists() else files


def records_problems(records: list[dict[str, Any]], where: str = "") -> list[str]:
    """The problems of one chain of records (one log with its rotations), as readable lines."""
    problems: list[str] = []
    connections: dict[Any, _Connection] = {}

    def unfinished(key: Any, state: _Connection) -> None:
        missing = [n for n in state.accessed if n not in state.completed]
        if missing:
            problems.append(f"{where}connection {key}: access records without a completion: "
                            f"requests {missing}")

    for line, record in enumerate(records, 1):
        kind = record.get("type")
        key = record.get("connection_id")
        if kind == "connect":
            if key in connections:
                unfinished(key, connections.pop(key))
            connections[key] = _Connection()
            continue
        if kind not in ("access", "completion"):
            continue
        state = connections.setdefault(key, _Connection())
        number = record.get("request")
        if kind == "access":
            if not isinstance(number, int) or (state.accessed and number <= state.accessed[-1]):
                problems.append(f"{where}record {line}: connection {key}: access request {number!r} does not "
                                f"follow {state.accessed[-1] if state.accessed else None}")
            if isinstance(number, int):
                state.accessed.append(number)
            continue
        covered = record.get("requests") or [number]
        if not isinstance(number, int) or number <= state.last_completion:
            problems.append(f"{where}record {line}: connection {key}: completion request {number!r} does not "
                            f"follow {state.last_completion}")
        if isinstance(number, int):
            state.last_completion = max(state.last_completion, number)
        if number not in covered:
            problems.append(f"{where}record {line}: connection {key}: completion request {number} is not "
                            f"among the requests {covered} it covers")
        for request in covered:
            if request not in state.accessed:
                problems.append(f"{where}record {line}: connection {key}: completion of request {request} "
                                "without an access record before it")
            elif request in state.completed:
                problems.append(f"{where}record {line}: connection {key}: a second completion of request "
                                f"{request}")
            state.completed.add(request)
    for key, state in connections.items():
        unfinished(key, state)
    return problems


def _read(path: Path) -> list[dict[str, Any]]:
    records = []
    for text in path.read_text().splitlines():
        if text.strip():
            records.append(json.loads(text))
    return records


def audit_problems(path: Path | str, wait: bool = False, timeout: float = 10) -> list[str]:
    """The consistency problems of the audit log at `path` (with its rotations; with its per-worker
    logs, each checked alone). `wait`: completion records are written behind the client's answer,
    so poll until the log is consistent or `timeout` seconds have passed (a deadline, not a timing
    assertion)."""
    deadline = time.monotonic() + timeout
    while True:
        problems: list[str] = []
        path = Path(path)
        workers = sorted(path.parent.glob(f"{path.stem}-w*{path.suffix}"))
        for log in [path, *workers]:
            records: list[dict[str, Any]] = []
            for file in log_files(log):
                records += _read(file)
            problems += records_problems(records, f"{log.name}: ")
        if not problems or not wait or time.monotonic() > deadline:
            return problems
        time.sleep(0.05)
