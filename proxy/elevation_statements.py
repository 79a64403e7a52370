"""The `PGVEIL ELEVATE ...` statements: recognising them, reading them, and answering with a result table.

A statement is one of pgveil's own only when, after leading whitespace and comments (`--` and
nested `/* */`, read as PostgreSQL reads them), its first word is PGVEIL. No PostgreSQL statement
starts with that word (PostgreSQL rejects it as a syntax error), so no application query is taken
for one, and the words inside a string literal or a comment of some other statement are never
read as one. The whole message must be the one statement (an optional `;`, then only whitespace
and comments):

    PGVEIL ELEVATE REQUEST <role> FOR <duration> REASON '<text>'
    PGVEIL ELEVATE APPROVE <id> [REASON '<text>']
    PGVEIL ELEVATE DENY <id> [REASON '<text>']
    PGVEIL ELEVATE REVOKE <id> [REASON '<text>']
    PGVEIL ELEVATE LIST

The answer is a SELECT of constants that pgveil sends PostgreSQL in place of the statement, so the
client gets an ordinary RowDescription, DataRows and CommandComplete (psql shows a table).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

Action = Literal["request", "approve", "deny", "revoke", "list"]
ACTIONS: tuple[Action, ...] = ("request", "approve", "deny", "revoke", "list")

SYNTAX = ("PGVEIL ELEVATE REQUEST <role> FOR <duration> REASON '<why>' | PGVEIL ELEVATE APPROVE <id> "
          "[REASON '<why>'] | PGVEIL ELEVATE DENY <id> [REASON '<why>'] | PGVEIL ELEVATE REVOKE <id> "
          "[REASON '<why>'] | PGVEIL ELEVATE LIST")

_MAYBE = re.compile(r"\s*(?:/\*|--|pgveil\b)", re.IGNORECASE)
_SPACES = re.compile(r"[ \t\n\r\f\v]*")
_COMMENT_MARK = re.compile(r"/\*|\*/")
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*")
_NUMBER_WORD = re.compile(r"[0-9][A-Za-z0-9]*")
_DURATION_TEXT = re.compile(r"^(?:\d+d)?(?:\d+h)?(?:\d+m)?(?:\d+s)?$", re.IGNORECASE)


class StatementSyntaxError(ValueError):
    """A statement that starts with PGVEIL but is not one pgveil knows; the message says the syntax."""


@dataclass(frozen=True, slots=True)
class ElevationCommand:
    """One PGVEIL ELEVATE statement, read."""

    action: Action
    role: str | None = None  # request
    duration: str | None = None  # request, as written (30m, 1h30m)
    request_id: int | None = None  # approve, deny, revoke
    reason: str | None = None

    @property
    def normalized(self) -> str:
        """What the audit's normalized_sql says (no reason text, no id)."""
        if self.action == "request":
            return f"PGVEIL ELEVATE REQUEST {self.role} FOR $1 REASON $2"
        if self.action == "list":
            return "PGVEIL ELEVATE LIST"
        return f"PGVEIL ELEVATE {self.action.upper()} $1" + (" REASON $2" if self.reason is not None else "")


def skip_space_and_comments(sql: str, position: int = 0) -> int:
    """The index of the first character at or after `position` that is not whitespace or part of
    a comment (PostgreSQL's nested /* */ included); len(sql) when there is none. An unterminated
    block comment runs to the end, as PostgreSQL reads it (and then rejects it)."""
    length = len(sql)
    while position < length:
        position = _SPACES.match(sql, position).end()  # type: ignore[union-attr]  # always matches
        if sql.startswith("--", position):
            newline = sql.find("\n", position)
            position = length if newline < 0 else newline + 1
        elif sql.startswith("/*", position):
            depth, position = 1, position + 2
            while depth:
                mark = _COMMENT_MARK.search(sql, position)
                if mark is None:
                    return length
                depth += 1 if mark.group() == "/*" else -1
                position = mark.end()
        else:
            break
    return position


def is_pgveil_statement(sql: str) -> bool:
    """Whether the message's first word (after whitespace and comments) is PGVEIL. Cheap for every
    other statement: one anchored regular expression that fails on its first character."""
    if _MAYBE.match(sql) is None:
        return False
    start = skip_space_and_comments(sql)
    word = _WORD.match(sql, start)
    return word is not None and word.group().lower() == "pgveil"


class _Reader:
    def __init__(self, sql: str) -> None:
        self.sql = sql
        self.position = skip_space_and_comments(sql)

    def fail(self, what: str) -> StatementSyntaxError:
        near = self.sql[self.position:self.position + 20].split("\n")[0]
        where = f" at {near!r}" if near else " at the end"
        return StatementSyntaxError(f"{what}{where}; the syntax is {SYNTAX}")

    def _next(self) -> None:
        self.position = skip_space_and_comments(self.sql, self.position)

    def keyword(self, *words: str) -> str:
        match = _WORD.match(self.sql, self.position)
        if match is None or match.group().lower() not in words:
            raise self.fail(f"expected {' or '.join(word.upper() for word in words)}")
        self.position = match.end()
        self._next()
        return match.group().lower()

    def maybe_keyword(self, word: str) -> bool:
        match = _WORD.match(self.sql, self.position)
        if match is None or match.group().lower() != word:
            return False
        self.keyword(word)
        return True

    def identifier(self) -> str:
        if self.sql.startswith('"', self.position):
            end = self.position + 1
            parts: list[str] = []
            while True:
                close = self.sql.find('"', end)
                if close < 0:
                    raise self.fail("unterminated quoted name")
                parts.append(self.sql[end:close])
                if self.sql.startswith('""', close):
                    parts.append('"')
                    end = close + 2
                    continue
                self.position = close + 1
                break
            name = "".join(parts)
        else:
            match = _WORD.match(self.sql, self.position)
            if match is None:
                raise self.fail("expected a role name")
            name = match.group().lower()
            self.position = match.end()
        self._next()
        if not name:
            raise self.fail("expected a role name")
        return name

    def string(self, what: str) -> str:
        if not self.sql.startswith("'", self.position):
            raise self.fail(f"expected {what} as a quoted string")
        end = self.position + 1
        parts: list[str] = []
        while True:
            close = self.sql.find("'", end)
            if close < 0:
                raise self.fail("unterminated string")
            parts.append(self.sql[end:close])
            if self.sql.startswith("''", close):
                parts.append("'")
                end = close + 2
                continue
            self.position = close + 1
            break
        self._next()
        return "".join(parts)

    def number(self) -> int:
        match = _NUMBER_WORD.match(self.sql, self.position)
        if match is None or not match.group().isdigit() or len(match.group()) > 18:
            raise self.fail("expected a request number")
        self.position = match.end()
        self._next()
        return int(match.group())

    def duration(self) -> str:
        if self.sql.startswith("'", self.position):
            text = self.string("a duration")
        else:
            match = _NUMBER_WORD.match(self.sql, self.position)
            if match is None:
                raise self.fail("expected a duration like 30m, 2h or 1h30m")
            text = match.group()
            self.position = match.end()
            self._next()
        if not text or not _DURATION_TEXT.match(text.strip()):
            raise self.fail("expected a duration like 30m, 2h or 1h30m")
        return text.strip().lower()

    def end(self) -> None:
        if self.sql.startswith(";", self.position):
            self.position = skip_space_and_comments(self.sql, self.position + 1)
        if self.position < len(self.sql):
            raise self.fail("send a PGVEIL statement on its own (nothing may follow it)")


def parse_statement(sql: str) -> ElevationCommand:
    """Read a message for which `is_pgveil_statement` holds; StatementSyntaxError says what is wrong."""
    reader = _Reader(sql)
    reader.keyword("pgveil")
    reader.keyword("elevate")
    action = reader.keyword(*ACTIONS)
    command: ElevationCommand
    if action == "request":
        role = reader.identifier()
        reader.keyword("for")
        duration = reader.duration()
        reason = reader.string("the reason") if reader.maybe_keyword("reason") else None
        command = ElevationCommand("request", role=role, duration=duration, reason=reason)
    elif action == "list":
        command = ElevationCommand("list")
    else:
        number = reader.number()
        reason = reader.string("the reason") if reader.maybe_keyword("reason") else None
        command = ElevationCommand(_action(action), request_id=number, reason=reason)
    reader.end()
    return command


def _action(word: str) -> Action:
    for action in ACTIONS:
        if action == word:
            return action
    raise ValueError(word)


# -- the answer ---------------------------------------------------------------------------------

Value = str | int | datetime | None
ColumnType = Literal["bigint", "integer", "text", "timestamptz"]


def _literal(value: Value, column_type: ColumnType) -> str:
    if value is None:
        return f"NULL::{column_type}"
    if isinstance(value, bool):
        raise TypeError("no boolean columns")
    if isinstance(value, int):
        return f"{int(value)}::{column_type}"
    text = value.isoformat() if isinstance(value, datetime) else str(value)
    # E'' reads the same whatever standard_conforming_strings is; every character outside printable
    # ASCII as a \u escape, so the answer is the same bytes in every client encoding (in SJIS, BIG5,
    # GBK, ... a non-ASCII byte can swallow the backslash that doubles another, and a reason ending
    # in one then closed the literal early and ran as SQL no policy had checked)
    escaped = "".join(_ESCAPES.get(char) or (char if " " <= char <= "~" else _unicode_escape(char))
                      for char in text.replace("\x00", ""))
    return f"E'{escaped}'::{column_type}"


_ESCAPES = {"\\": "\\\\", "'": "''"}


def _unicode_escape(char: str) -> str:
    code = ord(char)
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def _name(column: str) -> str:
    return '"' + column.replace('"', '""') + '"'


def result_sql(columns: list[tuple[str, ColumnType]], rows: list[tuple[Value, ...]]) -> str:
    """A SELECT of constants whose result is `rows` under `columns` (name, PostgreSQL type)."""
    if not rows:
        names = ", ".join(f"{_literal(None, kind)} AS {_name(name)}" for name, kind in columns)
        return f"SELECT {names} WHERE false"
    values = ", ".join(
        "(" + ", ".join(_literal(value, kind) for value, (_, kind) in zip(row, columns, strict=True)) + ")"
        for row in rows)
    names = ", ".join(_name(name) for name, _ in columns)
    return f"SELECT * FROM (VALUES {values}) AS pgveil_elevation ({names})"
