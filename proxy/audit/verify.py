"""Check an audit log's integrity chain and say where it is broken (file:line: what is wrong)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from proxy.audit.chain import GENESIS, unseal
from proxy.audit.file import rotated_files


def logs_of(path: Path) -> list[list[Path]]:
    """The logs at `path`, each as its files oldest first: a file and its rotations, or every
    `*.jsonl` log of a directory (one per worker with --workers); each log is its own chain."""
    if path.is_dir():
        return [[*rotated_files(active), active] for active in sorted(path.glob("*.jsonl"))]
    files = [*rotated_files(path), path] if path.exists() else rotated_files(path)
    return [files] if files else []


def verify(path: str | Path, key: bytes | None = None) -> list[str]:
    """Problems found in the chain of the log at `path` (with its rotated files); [] when intact.

    Detects a record whose content does not match its hash (edited), and a record whose `prev`
    is not the hash of the record before it (removed, inserted or reordered). Records cut off the
    end of the newest file cannot be detected from the file alone.
    """
    path = Path(path)
    logs = logs_of(path)
    if not logs:
        return [f"{path}: no audit log found"]

    def lines(files: list[Path]) -> Iterator[tuple[str, str]]:
        for file in files:
            with file.open("rb") as handle:
                for number, raw in enumerate(handle, start=1):
                    yield f"{file}:{number}", raw.rstrip(b"\n").decode(errors="replace")

    # In a directory an empty log is a worker that served nobody; a file named alone must hold records.
    return [problem for files in logs
            for problem in verify_lines(lines(files), key, str(files[-1]), allow_empty=path.is_dir())]


def verify_lines(lines: Iterable[tuple[str, str]], key: bytes | None, name: str,
                 allow_empty: bool = False) -> list[str]:
    """Check one chain given as (where, sealed line) pairs in order; `where` prefixes each problem."""
    problems: list[str] = []
    expected_prev, expected_seq = GENESIS, 0
    records = 0
    for where, text in lines:
        if not text.strip():
            continue
        try:
            record, intact = unseal(text, key)
        except ValueError:
            problems.append(f"{where}: not a JSON record (torn or edited line)")
            continue
        records += 1
        seq = record.get("seq")
        if not intact:
            hint = "" if key else " (or the log was written with an HMAC key: pass it)"
            problems.append(f"{where}: record seq {seq} does not match its hash: it was edited{hint}")
        if record.get("prev") != expected_prev:
            if records == 1:
                problems.append(f"{where}: the chain starts at seq {seq}, not 0: earlier records "
                                "or files are missing")
            else:
                problems.append(f"{where}: record seq {seq} does not follow seq {expected_seq - 1}: "
                                "a record before it was removed, inserted or reordered")
        elif seq != expected_seq:
            problems.append(f"{where}: record seq {seq} where seq {expected_seq} was expected")
        expected_prev = str(record.get("hash"))
        expected_seq = seq + 1 if isinstance(seq, int) else expected_seq + 1
    if records == 0 and not allow_empty:
        problems.append(f"{name}: the log holds no records")
    return problems
