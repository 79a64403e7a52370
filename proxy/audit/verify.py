"""Check an audit log's integrity chain and say where it is broken (file:line: what is wrong)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from proxy.audit.chain import GENESIS, ChainState, unseal
from proxy.audit.file import HEAD_SUFFIX, head_path, read_head_file, rotated_files


def logs_of(path: Path) -> list[tuple[Path, list[Path]]]:
    """The logs at `path`, each as its active file and its files oldest first: a file and its
    rotations, or every `*.jsonl` log of a directory (one per worker with --workers) and every log
    a head file names there; each log is its own chain."""
    if path.is_dir():
        heads = path.glob(f"*.jsonl{HEAD_SUFFIX}")
        actives = {*path.glob("*.jsonl"), *(head.with_name(head.name[: -len(HEAD_SUFFIX)]) for head in heads)}
        return [(active, [*rotated_files(active), *([active] if active.exists() else [])])
                for active in sorted(actives)]
    files = [*rotated_files(path), path] if path.exists() else rotated_files(path)
    return [(path, files)] if files or head_path(path).exists() else []


def verify(path: str | Path, key: bytes | None = None) -> list[str]:
    """Problems found in the chain of the log at `path` (with its rotated files); [] when intact.

    Detects a record whose content does not match its hash (edited), and a record whose `prev`
    is not the hash of the record before it (removed, inserted or reordered). The log's head file
    (`<log>-head`: seq and hash of the last record written) catches records cut off the end, the
    newest file removed, and a worker's log emptied; a log without a head file cannot show those.
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

    problems: list[str] = []
    for active, files in logs:
        head: ChainState | str | None
        try:  # read before the log: a live writer updates the head after the records it names
            head = read_head_file(active, key)
        except (OSError, ValueError) as exc:
            head = f"{head_path(active)}: unreadable head ({exc}): it was edited"
        # In a directory an empty log without a head is a worker that served nobody; a file named
        # alone must hold records.
        problems.extend(verify_lines(lines(files), key, str(active), allow_empty=path.is_dir(),
                                     head=head, head_name=str(head_path(active))))
    return problems


def verify_lines(lines: Iterable[tuple[str, str]], key: bytes | None, name: str,
                 allow_empty: bool = False, head: ChainState | str | None = None,
                 head_name: str = "the head") -> list[str]:
    """Check one chain given as (where, sealed line) pairs in order; `where` prefixes each problem.

    `head`, when the log has one, is where the chain stood at the last write: the chain must reach
    it, with the same hash at that seq. A string is why the head could not be read; it is reported
    unless records fail their hashes too (then the key is wrong, which those problems say)."""
    problems: list[str] = []
    expected_prev, expected_seq = GENESIS, 0
    records = edited = 0
    head_error = head if isinstance(head, str) else None
    head = head if isinstance(head, ChainState) else None
    last_seq: int | None = None
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
            edited += 1
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
        if head is not None and seq == head.seq and record.get("hash") != head.last_hash:
            problems.append(f"{where}: record seq {seq} is not the one {head_name} names: the log "
                            "was rewritten from there")
        expected_prev = str(record.get("hash"))
        expected_seq = seq + 1 if isinstance(seq, int) else expected_seq + 1
        if isinstance(seq, int):
            last_seq = seq if last_seq is None else max(last_seq, seq)
    if head is not None and head.seq >= 0 and (last_seq is None or last_seq < head.seq):
        ends = "holds no records" if last_seq is None else f"ends at seq {last_seq}"
        problems.append(f"{name}: the log {ends} but {head_name} says seq {head.seq} was written: "
                        "records were cut off the end or the newest file was removed")
    elif records == 0 and not allow_empty:
        problems.append(f"{name}: the log holds no records")
    if head_error is not None and not edited:
        hint = "" if key else " (or the log was written with an HMAC key: pass it)"
        problems.append(f"{head_error}{hint}")
    return problems
