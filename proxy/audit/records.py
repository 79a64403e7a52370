"""Reading audit records back, one at a time, within a time window: a file log (with its rotations,
or a directory of worker logs) or a PostgreSQL table sink. Nothing here checks the chain."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from proxy.audit.verify import logs_of

COMPLETION_GRACE = timedelta(days=1)
"""How long after the end of a window a completion record is still looked for (its statement was
decided in the window): rotated files and table rows starting later than this are not read."""

_CANONICAL = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_WINDOW = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
# The start of a sealed record as the sinks write it: enough to skip a line without parsing it.
_decode = json.JSONDecoder().decode
_TAIL = re.compile(rb'"prev":"([0-9a-f]{64})","chain":"[^"]*","hash":"([0-9a-f]{64})"\}\s*$')
_LEAD = re.compile(rb'^\{"seq":\d+,"type":"([^"\\]*)","time":"([^"\\]*)"')


def time_key(text: str) -> str:
    """A record's `time` as text that sorts in time order: pgveil writes UTC with microseconds
    (`2026-11-26T10:31:07.412093+00:00`), taken as it is; any other ISO 8601 form is converted.
    A time that is not ISO 8601 sorts first."""
    if len(text) == 32 and text[26:] == "+00:00" and _CANONICAL.match(text):
        return text
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return ""
    return canonical(moment)


def canonical(moment: datetime) -> str:
    """The canonical text of a moment (naive means UTC)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


@dataclass(frozen=True, slots=True)
class Window:
    """The records a report covers: `since` <= time < `until` (either bound may be open)."""

    since: datetime | None = None
    until: datetime | None = None

    @property
    def since_key(self) -> str:
        return canonical(self.since) if self.since else ""

    @property
    def until_key(self) -> str | None:
        return canonical(self.until) if self.until else None

    def describe(self) -> dict[str, str | None]:
        return {"since": canonical(self.since) if self.since else None,
                "until": canonical(self.until) if self.until else None}

    def text(self) -> str:
        since, until = self.describe().values()
        if since is None and until is None:
            return "all records"
        return f"{since or 'the first record'} to {until or 'the last record'}"


def parse_moment(text: str) -> datetime:
    """An ISO 8601 date or date and time (UTC unless it says otherwise)."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"expected an ISO 8601 time such as 2026-12-01 or 2026-12-01T09:00:00Z, "
                         f"got {text!r}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def parse_span(text: str) -> timedelta:
    """A window length such as `90m`, `24h`, `7d` or `2w`."""
    match = _WINDOW.match(text)
    if match is None or int(match.group(1)) == 0:
        raise ValueError(f"expected a window such as 24h, 7d or 2w, got {text!r}")
    return timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2)])


def parse_window(since: str | None, until: str | None, span: str | None,
                 now: datetime | None = None) -> Window:
    """The window the options `--since`, `--until` and `--window` name; `--window` alone ends now,
    with `--until` it ends there, and it cannot be given with `--since`. ValueError says what is wrong."""
    if span is not None and since is not None:
        raise ValueError("give --window or --since, not both")
    end = parse_moment(until) if until is not None else None
    start = parse_moment(since) if since is not None else None
    if span is not None:
        # without --until the window runs on to the last record
        start = (end if end is not None else (now or datetime.now(UTC))) - parse_span(span)
    if start is not None and end is not None and start >= end:
        raise ValueError("the window is empty: --since must be before --until")
    return Window(start, end)


def _lead(raw: bytes) -> tuple[str, str] | None:
    match = _LEAD.match(raw)
    if match is None:
        return None
    return match.group(1).decode(errors="replace"), match.group(2).decode(errors="replace")


def _first_time(path: Path) -> str | None:
    """The time of the first record of a file, or None when it cannot be told."""
    try:
        with path.open("rb") as handle:
            for raw in handle:
                if raw.strip():
                    lead = _lead(raw)
                    if lead is not None:
                        return time_key(lead[1])
                    try:
                        record = json.loads(raw)
                    except ValueError:
                        return None
                    value = record.get("time") if isinstance(record, dict) else None
                    return time_key(value) if isinstance(value, str) else None
    except OSError:
        return None
    return None


def _files_in_window(files: list[Path], window: Window) -> list[Path]:
    """The files (oldest first) that can hold records of the window or completions of them: a file
    whose successor starts before the window holds only earlier records, and a file starting more
    than COMPLETION_GRACE after the window's end holds only later ones."""
    starts = [_first_time(file) for file in files]
    since, until = window.since_key, window.until
    latest = canonical(until + COMPLETION_GRACE) if until is not None else None
    kept: list[Path] = []
    for index, file in enumerate(files):
        following = starts[index + 1] if index + 1 < len(files) else None
        if since and following is not None and following and following < since:
            continue
        start = starts[index]
        if latest is not None and start is not None and start > latest:
            break
        kept.append(file)
    return kept


@dataclass
class Source:
    """Where records were read from and how much of it: for the report's header."""

    name: str
    files: int = 0
    lines: int = 0
    records: int = 0
    unreadable: int = 0


def log_records(path: str | Path, window: Window, source: Source | None = None
                ) -> Iterator[tuple[str, dict[str, Any]]]:
    """Records (as dicts) of the file log at `path` (its rotations oldest first, or every log of a
    directory; `-` is standard input) from the window's start on, each with the name of its chain
    (one per log). Lines are read one at a time (see `lines_records`)."""
    if str(path) == "-":
        yield from lines_records(sys.stdin.buffer, "-", window, source, interleaved=True)
        return
    path = Path(path)
    logs = logs_of(path)
    if not logs:
        raise FileNotFoundError(f"{path}: no audit log found")
    for active, files in logs:
        for file in _files_in_window(files, window):
            if source is not None:
                source.files += 1
            with file.open("rb") as handle:
                yield from lines_records(handle, str(active), window, source)


def lines_records(lines: Iterable[bytes], chain: str, window: Window, source: Source | None = None,
                  interleaved: bool = False) -> Iterator[tuple[str, dict[str, Any]]]:
    """The records of sealed lines of one chain. A record before the window is skipped without
    parsing; after the window's end only completion records are parsed (their statements may be
    in the window), and reading stops at the first record more than COMPLETION_GRACE after it.
    A last line without its newline is a record still being written: skipped.

    `interleaved`: the lines of several chains are mixed (workers writing to one standard output);
    each record is put in the chain whose last hash is its `prev` (a new chain when none is)."""
    since, until = window.since_key, window.until_key
    # past this, no completion can belong to a statement of the window: the rest is not read
    latest = canonical(window.until + COMPLETION_GRACE) if window.until is not None else None
    heads: dict[bytes, str] = {}  # last hash of each interleaved chain -> its name
    base = chain
    for raw in lines:
        if source is not None:
            source.lines += 1
        if interleaved:
            tail = _TAIL.search(raw, max(0, len(raw) - 200))
            if tail is not None:
                chain = heads.pop(tail.group(1), "") or f"{base}#{len(heads) + 1}"
                heads[tail.group(2)] = chain
        lead = _lead(raw)
        if lead is not None:
            kind, time = lead
            key = time_key(time)
            if key < since or (until is not None and key >= until and kind != "completion"):
                if latest is not None and key > latest:
                    return
                continue
        elif not raw.strip():
            continue
        try:
            record = _decode(raw.decode("utf-8", "replace"))
        except ValueError:
            record = None
        if not isinstance(record, dict):
            if source is not None and raw.endswith(b"\n"):
                source.unreadable += 1
            continue
        if source is not None:
            source.records += 1
        yield chain, record


async def table_records(dsn: str, table: str, window: Window, source: Source | None = None
                        ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """Records of a PostgreSQL table sink from the window's start on (and up to COMPLETION_GRACE
    after its end), chain by chain in `seq` order, read through a cursor (never all at once)."""
    import asyncpg

    from proxy.audit.postgres import _TABLE_NAME

    if not _TABLE_NAME.match(table):
        raise ValueError(f"audit table must be a plain [schema.]name, not {table!r}")
    conditions, arguments = [], []
    if window.since is not None:
        arguments.append(window.since)
        conditions.append(f"at >= ${len(arguments)}")
    if window.until is not None:
        arguments.append(window.until + COMPLETION_GRACE)
        conditions.append(f"at < ${len(arguments)}")
    where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
    connection = await asyncpg.connect(dsn)
    try:
        async with connection.transaction(readonly=True):
            cursor = connection.cursor(f"SELECT chain, line FROM {table}{where} ORDER BY chain, seq",
                                       *arguments, prefetch=2000)
            async for row in cursor:
                if source is not None:
                    source.lines += 1
                try:
                    record = json.loads(row["line"])
                except ValueError:
                    record = None
                if not isinstance(record, dict):
                    if source is not None:
                        source.unreadable += 1
                    continue
                if source is not None:
                    source.records += 1
                yield f"{table}:{row['chain']}", record
    finally:
        await connection.close()


def is_dsn(text: str) -> bool:
    """Whether an audit source names a PostgreSQL table sink rather than a file."""
    return text.startswith(("postgresql://", "postgres://"))
