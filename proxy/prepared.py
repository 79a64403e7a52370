"""What one session has prepared upstream (statements and cursors), under which verdict and basis.

PostgreSQL keeps a prepared statement (a Parse, or SQL `PREPARE`) and a cursor (`DECLARE`) for
later executions that never pass the guard again: a Bind, an `EXECUTE name`, a `FETCH`. This
book remembers, for each name, the client's original SQL, what was forwarded in its place, the
verdict and the basis it was decided on, so a later execution can be checked against the basis
in force then.

Changes (definitions and closes) are queued in the order the client sent them and applied when
the request that carried them completes: every change a successful request carried happened;
after an error, only what is certain whichever prefix of the request ran is kept, and a name
whose statement can no longer be told is `UNCERTAIN` (its executions are refused until it is
closed and prepared again). A name that may be absent upstream is harmless: PostgreSQL itself
refuses to run what does not exist.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Final, Literal

from pglast import ast, parser
from pglast.enums import DiscardMode

from proxy.firewall.tree import walk
from proxy.guard.verdict import Verdict

Namespace = Literal["statement", "cursor"]
Key = tuple[Namespace, str]
Effects = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class SessionObjectEvent:
    """One statement of a message that defines, removes or uses a prepared statement or cursor.
    `name` None with `define` never happens; with `forget` it means all of the namespace."""

    action: Literal["define", "forget", "use"]
    namespace: Namespace
    name: str | None


@dataclass(frozen=True, slots=True)
class Prepared:
    """A statement or cursor as it was prepared upstream."""

    sql: str  # the client's message that prepared it
    forwarded: str  # what pgveil forwarded in its place (the rewrite, or the same text)
    verdict: Verdict
    basis: tuple[object, ...]  # what the verdict depended on (policy state, role, search_path, settings)
    effects: Effects = ()  # session state an execution changes (SET search_path, transaction end)
    ddl: bool = False
    events: tuple[SessionObjectEvent, ...] = ()  # SQL-level PREPARE/EXECUTE/... it runs when executed


class _Uncertain:
    """After an error pgveil cannot tell which statement a name holds upstream."""

    def __repr__(self) -> str:
        return "UNCERTAIN"


UNCERTAIN: Final = _Uncertain()
State = Prepared | _Uncertain | None


SESSION_OBJECT_KEYWORDS = ("execute", "prepare", "deallocate", "discard", "declare", "fetch", "move", "close")
"""Lower-cased, one of these is in every statement that has session object events."""


def session_object_events(sql: str) -> tuple[SessionObjectEvent, ...]:
    """SQL-level PREPARE, EXECUTE, DEALLOCATE, DISCARD ALL, DECLARE, FETCH/MOVE and CLOSE in `sql`,
    in statement order. Cheap when none of their keywords occurs anywhere in the text (substring
    tests of its lower-cased text: PostgreSQL's keywords are ASCII and it folds their case as
    lower() does; lower() may find more, never fewer, which only costs a parse).
    Raises pglast.parser.ParseError for text PostgreSQL would not parse either."""
    lowered = sql.lower()
    for keyword in SESSION_OBJECT_KEYWORDS:
        if keyword in lowered:
            break
    else:
        return ()
    events: list[SessionObjectEvent] = []
    for raw in parser.parse_sql(sql):
        for node in walk(raw.stmt):
            if isinstance(node, ast.PrepareStmt):
                events.append(SessionObjectEvent("define", "statement", node.name))
            elif isinstance(node, ast.ExecuteStmt):
                events.append(SessionObjectEvent("use", "statement", node.name))
            elif isinstance(node, ast.DeallocateStmt):
                events.append(SessionObjectEvent("forget", "statement", None if node.isall else node.name))
            elif isinstance(node, ast.DiscardStmt) and node.target == DiscardMode.DISCARD_ALL:
                events.append(SessionObjectEvent("forget", "statement", None))
                events.append(SessionObjectEvent("forget", "cursor", None))
            elif isinstance(node, ast.DeclareCursorStmt):
                events.append(SessionObjectEvent("define", "cursor", node.portalname))
            elif isinstance(node, ast.FetchStmt):
                events.append(SessionObjectEvent("use", "cursor", node.portalname))
            elif isinstance(node, ast.ClosePortalStmt):
                events.append(SessionObjectEvent("forget", "cursor", node.portalname))
    return tuple(events)


@dataclass(frozen=True, slots=True)
class _Change:
    call: int  # the hook call that queued it (see StatementBook.call)
    key: Key | None  # None: every name of `namespace`
    namespace: Namespace
    entry: Prepared | None  # None: the name is removed


class StatementBook:
    """The prepared statements and cursors of one session, and the changes still in flight.

    The session's hook calls are counted with `call()`; a completed request reports how many calls
    it covered (`complete(calls, ok)`), which tells the book which queued changes it carried.
    """

    def __init__(self) -> None:
        self.entries: dict[Key, Prepared | _Uncertain] = {}
        self._calls = 0
        self._completed = 0
        self._pending: deque[_Change] = deque()

    def call(self) -> None:
        self._calls += 1

    def define(self, key: Key, entry: Prepared | None) -> None:
        """Queue a (re)definition of `key`; None: what the name held is dropped (a refused Parse)."""
        self._pending.append(_Change(self._calls, key, key[0], entry))

    def forget(self, namespace: Namespace, name: str | None) -> None:
        key: Key | None = None if name is None else (namespace, name)
        self._pending.append(_Change(self._calls, key, namespace, None))

    def current(self, key: Key) -> State:
        """What `key` will hold once the queued changes are done, assuming they all succeed; a
        redefinition of a name that may still exist upstream (PostgreSQL refuses those) is UNCERTAIN."""
        state: State = self.entries.get(key)
        for change in self._pending:
            if change.key == key or (change.key is None and change.namespace == key[0]):
                state = _optimistic(key, state, change)
        return state

    def refresh(self, key: Key, old: Prepared, new: Prepared) -> None:
        """`old` was checked again and still holds: remember the new basis (when nothing replaced it)."""
        if self.entries.get(key) is old:
            self.entries[key] = new

    def complete(self, calls: int, ok: bool) -> None:
        """A request covering the next `calls` hook calls finished (ok: without an error)."""
        self._completed += calls
        carried: list[_Change] = []
        while self._pending and self._pending[0].call <= self._completed:
            carried.append(self._pending.popleft())
        if not carried:
            return
        if ok:
            for change in carried:
                self._apply(change)
            return
        # Some prefix of the request ran. Keep for each name what it holds after every prefix, if
        # that is one statement (ignoring "absent"); else it is uncertain.
        touched: dict[Key, None] = {}
        for change in carried:
            if change.key is not None:
                touched[change.key] = None
            else:
                touched.update((key, None) for key in self.entries if key[0] == change.namespace)
        for key in touched:
            state: State = self.entries.get(key)
            possible: list[Prepared | _Uncertain] = [state] if state is not None else []
            for change in carried:
                if change.key == key or (change.key is None and change.namespace == key[0]):
                    state = change.entry
                    if state is not None and all(state is not seen for seen in possible):
                        possible.append(state)
            if not possible:
                self.entries.pop(key, None)
            elif len(possible) == 1:
                self.entries[key] = possible[0]
            else:
                self.entries[key] = UNCERTAIN

    def _apply(self, change: _Change) -> None:
        if change.key is None:
            for key in [key for key in self.entries if key[0] == change.namespace]:
                del self.entries[key]
        elif change.entry is None:
            self.entries.pop(change.key, None)
        else:
            self.entries[change.key] = change.entry


def _optimistic(key: Key, state: State, change: _Change) -> State:
    if change.entry is None:
        return None
    if state is None or key == ("statement", ""):  # the unnamed statement is replaced by every Parse
        return change.entry
    return UNCERTAIN
