"""DataGuard: the per-connection row budgets and honeytoken decisions the relay asks for as results pass.

The relay (proxy/session/relay.py) does the per-message work: it counts DataRow and CopyData
messages, searches each relayed chunk for honeytoken values once, and cuts the stream. It calls
this object only per statement and per result (never per row): which result belongs to which
statement, portal or cursor, how many rows the next result may hand the client, and what to do
on a breach or a hit (audit record, metric, log line: through the listeners the policy wrappers
attach).
"""

from __future__ import annotations

import fnmatch
import logging
import os
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy.dlp.cursors import cursor_uses
from proxy.dlp.honeytokens import HoneytokenMatcher, LockoutBook, Lockouts, default_lockout_dir
from proxy.dlp.ledger import MemoryLedger, RowLedger
from proxy.policy.model import Honeytoken, Policy, Role
from proxy.wire import ErrorResponse

log = logging.getLogger("pgveil.dlp")

BUDGET_SQLSTATE = "54000"
"""program_limit_exceeded: a quota, not a missing privilege (the same statement, narrowed, runs)."""
HONEYTOKEN_SQLSTATE = "42501"
LOCKOUT_DIR_ENV = "PGVEIL_HONEYTOKEN_LOCKOUTS"
_CARRIED_KEPT = 1024  # portal and cursor counts kept per connection (oldest dropped beyond)
HOUR_STEP = 4096
"""Rows of a login's hourly budget one result sets aside at a time (more when it has used them):
concurrent statements of one login share what is left of the hour instead of each having it."""

_CURSOR_WORDS = re.compile(r"\b(?:fetch|declare)\b", re.IGNORECASE)
_FETCH = re.compile(r'^\s*fetch\b.*?("(?:[^"]|"")+"|[^\s;"]+)\s*;?\s*$', re.IGNORECASE | re.DOTALL)
_DECLARE = re.compile(r'^\s*declare\s+("(?:[^"]|"")+"|[^\s;"]+)', re.IGNORECASE)

Listener = Callable[[dict[str, Any]], None]


def _cursor_name(token: str) -> str:
    if token.startswith('"'):
        return token[1:-1].replace('""', '"')
    return token.lower()


def fetched_cursor(sql: str) -> str | None:
    """The cursor a FETCH statement reads (its last word), else None."""
    match = _FETCH.match(sql)
    return None if match is None else _cursor_name(match.group(1))


def declared_cursor(sql: str) -> str | None:
    match = _DECLARE.match(sql)
    return None if match is None else _cursor_name(match.group(1))


def may_have_row_budget(policy: Policy, role: Role | None, login: str) -> bool:
    """Whether a connection of `login` under `role` must count rows: its role has a budget, or an
    `elevations:` entry lets the login assume a role that has one (an elevation binds a connection
    opened before it; without a limit the relay's scanner only keeps a count)."""
    if role is not None and role.has_row_budget:
        return True
    for elevation in policy.elevations:
        target = policy.roles.get(elevation.role)
        if (target is not None and target.has_row_budget
                and any(fnmatch.fnmatchcase(login, user) for user in elevation.users)):
            return True
    return False


@dataclass(slots=True)
class Expected:
    """One result a request will produce: what its rows count towards (a portal or a cursor, so
    that chunks add up; None: this result alone) and the fingerprint of its statement."""

    key: str | None
    fingerprint: str
    sticky: bool = False  # stands for every result of its request (a Query with no cursor in it)


class DlpRuntime:
    """Shared by every connection of one serving process: the policy's honeytoken matcher, the
    rolling-hour ledger, the lockout book."""

    def __init__(self, policy_path: str | Path, ledger: RowLedger | None = None,
                 lockouts: Lockouts | None = None) -> None:
        self.ledger: RowLedger = ledger if ledger is not None else MemoryLedger()
        directory = os.environ.get(LOCKOUT_DIR_ENV) or default_lockout_dir(policy_path)
        self.lockouts: Lockouts = lockouts if lockouts is not None else LockoutBook(directory)
        self._matcher: tuple[Policy | None, HoneytokenMatcher | None] = (None, None)

    def matcher(self, policy: Policy) -> HoneytokenMatcher | None:
        known = self._matcher
        if known[0] is not policy:
            known = self._matcher = (policy, HoneytokenMatcher.of(policy.honeytokens))
        return known[1]

    def lockout_refusal(self, login: str) -> str | None:
        """Why `login` may not connect now (a honeytoken lockout in force), else None."""
        lockout = self.lockouts.locked(login)
        if lockout is None:
            return None
        return (f"login {login} is locked out after reading honeytoken data; it may connect again "
                "when the lockout ends or an operator clears it (pgveil honeytokens clear)")


class DataGuard:
    """One connection's budgets and honeytokens. `counts_rows`: the relay counts rows (the role
    had a budget when the connection opened); `pattern`: the honeytoken search, or None."""

    def __init__(self, runtime: DlpRuntime, policy: Policy, role: Callable[[], Role | None], login: str,
                 lockout_seconds: int) -> None:
        self.runtime = runtime
        self.login = login
        self._role = role
        self.lockout_seconds = lockout_seconds
        current = role()
        self.counts_rows = may_have_row_budget(policy, current, login)
        if current is not None and current.max_rows_per_hour is not None:
            watch = getattr(runtime.ledger, "watch", None)  # a shared ledger reads its total early
            if watch is not None:
                watch(login)
        matcher = runtime.matcher(policy)
        self.matcher = matcher
        self.pattern: re.Pattern[bytes] | None = matcher.pattern if matcher is not None else None
        self.forms: tuple[bytes, ...] = tuple(matcher.tokens) if matcher is not None else ()
        self.listeners: list[Listener] = []
        self._statements: dict[str, Expected] = {}  # prepared statement -> what its Executes count to
        self._portals: dict[str, str] = {}  # portal -> its statement
        self._carried: dict[str, int] = {}  # portal or cursor -> rows its earlier chunks passed
        # the most rows a count dropped from _carried had: a portal or cursor whose count is not
        # kept (dropped beyond _CARRIED_KEPT) starts from it, never from zero (fail closed)
        self._dropped_floor = 0
        # the result being counted: its expectation, rows carried in, the limit that binds it
        self._open: Expected | None = None
        self._prior = 0
        self._binding: tuple[str, int, int] = ("", 0, 0)  # (limit name, its value, rows counted before)
        self._reported = 0  # rows of the open result already added to the hour ledger
        self._held = 0  # rows of the hour set aside for the open result and not received yet
        self._allowance = -1  # the open result's allowance (grows as more of the hour is set aside)
        self._statement_left = -1  # what its statement limit allowed it when it began (-1: none)
        self._alerted: dict[str, Any] = {}  # token -> the request its last alert was for (one per statement)

    # -- statements as the client sends them ---------------------------------------------------

    def query(self, sql: str, fingerprint: str, request: Any) -> None:
        """A Query message forwarded (`request` is the relay's record of it)."""
        if _CURSOR_WORDS.search(sql) is None:
            request.dlp = deque((Expected(None, fingerprint, sticky=True),))
            return
        expected: deque[Expected] = deque()
        for declared, cursor in cursor_uses(sql) or ():  # as PostgreSQL parses it (comments and all)
            if declared is not None:
                self._keep("c:" + declared, 0)
            expected.append(Expected(None if cursor is None else "c:" + cursor, fingerprint))
        request.dlp = expected or deque((Expected(None, fingerprint, sticky=True),))

    def parse(self, statement: str, sql: str, fingerprint: str) -> None:
        uses = cursor_uses(sql) if _CURSOR_WORDS.search(sql) is not None else None
        declared, cursor = uses[0] if uses and len(uses) == 1 else (None, None)
        if declared is not None:
            self._keep("c:" + declared, 0)
        self._statements[statement] = Expected(None if cursor is None else "c:" + cursor, fingerprint)
        if len(self._statements) > _CARRIED_KEPT:
            del self._statements[next(iter(self._statements))]

    def _keep(self, key: str, rows: int) -> None:
        """Remember `rows` for a portal or cursor, as the newest entry; beyond _CARRIED_KEPT the
        oldest is dropped and its count raises the floor every unknown portal or cursor starts from."""
        carried = self._carried
        carried.pop(key, None)
        carried[key] = rows
        if len(carried) > _CARRIED_KEPT:
            oldest = next(iter(carried))
            self._dropped_floor = max(self._dropped_floor, carried.pop(oldest))

    def bind(self, portal: str, statement: str) -> None:
        self._portals[portal] = statement
        self._keep("p:" + portal, 0)  # a new portal of that name starts from zero
        if len(self._portals) > _CARRIED_KEPT:
            del self._portals[next(iter(self._portals))]

    def execute(self, body: bytes, request: Any) -> None:
        """An Execute message (its body) in the extended-protocol request `request`."""
        end = body.find(b"\x00")
        portal = body[:end].decode("utf-8", "replace") if end >= 0 else ""
        statement = self._statements.get(self._portals.get(portal, ""))
        if statement is None:
            statement = self._statements.get("") if portal == "" else None
        fingerprint = statement.fingerprint if statement is not None else ""
        key = statement.key if statement is not None and statement.key is not None else "p:" + portal
        if request.dlp is None:
            request.dlp = deque()
        request.dlp.append(Expected(key, fingerprint))

    # -- results as PostgreSQL sends them ------------------------------------------------------

    def _next(self, request: Any) -> Expected | None:
        expected = None if request is None else request.dlp
        if not expected:
            return None
        head: Expected = expected[0]
        if not head.sticky:
            expected.popleft()
        return head

    def result_start(self, request: Any) -> int:
        """The first row of a result: how many rows it may hand the client (-1: no limit)."""
        self._open = opened = self._next(request)
        key = opened.key if opened is not None else None
        self._prior = self._carried.get(key, self._dropped_floor) if key is not None else 0
        self._reported = 0
        self._release()
        role = self._role()
        allowance = -1
        self._statement_left = -1
        if role is not None:
            if role.max_rows_per_statement is not None:
                allowance = self._statement_left = max(0, role.max_rows_per_statement - self._prior)
                self._binding = ("max_rows_per_statement", role.max_rows_per_statement, self._prior)
            if role.max_rows_per_hour is not None:
                ledger = self.runtime.ledger
                used = ledger.used(self.login)
                want = HOUR_STEP if allowance < 0 else min(allowance, HOUR_STEP)
                granted = self._held = ledger.reserve(self.login, want, role.max_rows_per_hour)
                if allowance < 0 or granted < allowance:
                    allowance = granted
                    self._binding = ("max_rows_per_hour", role.max_rows_per_hour, used)
        self._allowance = allowance
        return allowance

    def extend(self, rows: int) -> int:
        """The open result has passed `rows`, its whole allowance: its new allowance, larger when
        more of the login's hour could be set aside for it (and the statement limit allows)."""
        role = self._role()
        allowance = self._allowance
        if role is None or role.max_rows_per_hour is None or self._binding[0] != "max_rows_per_hour":
            return allowance
        self.progress(rows)
        want = HOUR_STEP
        if self._statement_left >= 0:
            want = min(want, self._statement_left - allowance)
        ledger = self.runtime.ledger
        granted = ledger.reserve(self.login, want, role.max_rows_per_hour) if want > 0 else 0
        if granted == 0:
            if want <= 0 and role.max_rows_per_statement is not None:  # the statement's limit binds now
                self._binding = ("max_rows_per_statement", role.max_rows_per_statement, self._prior)
            else:
                self._binding = ("max_rows_per_hour", role.max_rows_per_hour, ledger.used(self.login) - rows)
            return allowance
        self._held += granted
        self._allowance = allowance + granted
        return self._allowance

    def _release(self) -> None:
        """Give the login's hour back what the open result had set aside and not received."""
        if self._held:
            self.runtime.ledger.release(self.login, self._held)
            self._held = 0

    def min_allowance(self) -> int:
        """Rows that no result may be refused now, whatever it continues (the relay's scanner
        counts that many without reporting each one); -1: no limit."""
        role = self._role()
        if role is None:
            return 0
        quota = -1
        if role.max_rows_per_statement is not None:
            carried = max(self._carried.values(), default=self._dropped_floor)
            carried = max(carried, self._dropped_floor)
            quota = max(0, role.max_rows_per_statement - carried)
        if role.max_rows_per_hour is not None:  # the free part of the hour, and what the open result holds
            left = self.runtime.ledger.free(self.login, role.max_rows_per_hour) + self._held
            if quota < 0 or left < quota:
                quota = left
        return quota

    def progress(self, rows: int) -> None:
        """`rows` rows of the open result have passed so far (the hour ledger hears them)."""
        if rows > self._reported:
            received = rows - self._reported
            ledger = self.runtime.ledger
            ledger.add(self.login, received)
            taken = min(received, self._held)  # set aside before, received now
            if taken:
                ledger.release(self.login, taken)
                self._held -= taken
            self._reported = rows

    def result_end(self, request: Any, rows: int, suspended: bool) -> None:
        """A result (or a chunk of a portal: `suspended`) ended after `rows` rows passed; with
        rows=0 and no result_start, a result without rows."""
        opened = self._open
        if opened is None and rows == 0:
            opened = self._next(request)
        else:
            self.progress(rows)
        self._release()
        self._open = None
        key = opened.key if opened is not None else None
        if key is not None:
            if suspended or key.startswith("c:"):
                self._keep(key, self._prior + rows)
            else:
                self._carried.pop(key, None)  # ended (a new Bind of its name starts from zero)
        self._prior = 0

    def breach(self, rows: int) -> bytes:
        """The open result would pass its limit with one more row: the ErrorResponse for the
        client; the audit record, metric and log line through the listeners."""
        self.progress(rows)
        self._release()
        limit, value, before = self._binding
        role = self._role()
        role_name = role.name if role is not None else "unknown"
        counted = before + rows
        fingerprint = self._open.fingerprint if self._open is not None else ""
        if limit == "max_rows_per_hour":
            text = (f"pgveil: row-budget: login {self.login} (role {role_name}) has received its "
                    f"{value} rows of the last hour (max_rows_per_hour); the statement was cancelled: "
                    "wait, or ask for a higher budget")
        else:
            text = (f"pgveil: row-budget: role {role_name} may receive at most {value} rows per statement "
                    f"(max_rows_per_statement); the statement was cancelled after {counted} rows: narrow "
                    "it (WHERE, LIMIT) or ask for a higher budget")
        log.warning("row budget: login %s role %s passed %s=%d (%d rows); statement %s cancelled",
                    self.login, role_name, limit, value, counted, fingerprint or "?")
        self._emit({"type": "budget", "limit": limit, "limit_value": value, "rows": counted,
                    "role": role_name, "fingerprint": fingerprint})
        return ErrorResponse.build("ERROR", BUDGET_SQLSTATE, text).encode()

    # -- honeytokens ---------------------------------------------------------------------------

    def honeytoken(self, found: bytes, tag: int, request: Any) -> bool:
        """A honeytoken value is in a message (type `tag`) about to reach the client: report it
        (once per token and request for `alert`); True when the session must end (`terminate`)."""
        matcher = self.matcher
        token: Honeytoken | None = matcher.tokens.get(found) if matcher is not None else None
        if token is None:
            return False
        terminate = token.action == "terminate"
        if not terminate and request is not None:
            # the request itself, not its id(): a later request may get a freed one's address
            if self._alerted.get(token.name) is request:
                return False
            self._alerted[token.name] = request
        role = self._role()
        role_name = role.name if role is not None else "unknown"
        expected = None if request is None or not request.dlp else request.dlp[0]
        fingerprint = self._open.fingerprint if self._open is not None else (
            expected.fingerprint if expected is not None else "")
        log.error("HONEYTOKEN %s (%s) read by login %s role %s in a %r message, statement %s: %s",
                  token.name, token.table, self.login, role_name, chr(tag), fingerprint or "?",
                  "session terminated, login locked out" if terminate else "alert")
        if terminate:
            try:
                self.runtime.lockouts.lock(self.login, self.lockout_seconds, token.name)
            except Exception as exc:
                log.error("could not record the lockout of login %s: %s", self.login, exc)
        self._emit({"type": "honeytoken", "token": token.name, "table": token.table,
                    "column": token.column, "action": token.action, "role": role_name,
                    "fingerprint": fingerprint, "message_type": chr(tag)})
        return terminate

    def terminate_error(self) -> bytes:
        return ErrorResponse.build(
            "FATAL", HONEYTOKEN_SQLSTATE,
            "pgveil: honeytoken: this statement read data that no legitimate query reads; the session "
            "is ended and the login locked out (the pgveil log says why)").encode()

    def _emit(self, event: dict[str, Any]) -> None:
        for listener in self.listeners:
            try:
                listener(event)
            except Exception:
                log.exception("a DLP event listener failed")
