"""Who read what: folds audit records, one at a time, into per-dataset, per-column and per-reader
counts, refusals, budget breaches, honeytoken hits and elevations (pure: no I/O)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from proxy.audit.records import Window, time_key

READ_DECISIONS = frozenset({"allow", "rewrite"})


@dataclass(slots=True)
class Tally:
    """Statements (access records served), the rows their completions counted, the last one's time,
    and how many of them saw the column unmasked (columns only)."""

    statements: int = 0
    rows: int = 0
    last: str = ""
    unmasked: int = 0

    def add(self, when: str, unmasked: bool = False) -> None:
        self.statements += 1
        if when > self.last:
            self.last = when
        if unmasked:
            self.unmasked += 1

    def merge(self, other: Tally, unmasked: bool = False) -> None:
        """Add the statements and rows of `other` (all of them unmasked, or none)."""
        self.statements += other.statements
        self.rows += other.rows
        if other.last > self.last:
            self.last = other.last
        if unmasked:
            self.unmasked += other.statements


@dataclass(slots=True)
class Usage:
    """The reads of one dataset or column: in all, by role, by login; statement kinds (datasets) and
    refused statements that named it."""

    total: Tally = field(default_factory=Tally)
    roles: dict[str, Tally] = field(default_factory=dict)
    logins: dict[str, Tally] = field(default_factory=dict)
    kinds: Counter[str] = field(default_factory=Counter)
    refused: int = 0
    last_refused: str = ""

    def tallies(self, role: str, login: str) -> tuple[Tally, Tally, Tally]:
        by_role = self.roles.get(role)
        if by_role is None:
            by_role = self.roles[role] = Tally()
        by_login = self.logins.get(login)
        if by_login is None:
            by_login = self.logins[login] = Tally()
        return self.total, by_role, by_login


@dataclass(slots=True)
class Refusals:
    count: int = 0
    last: str = ""
    logins: Counter[str] = field(default_factory=Counter)
    roles: Counter[str] = field(default_factory=Counter)
    relations: Counter[str] = field(default_factory=Counter)
    at_connect: int = 0


@dataclass(slots=True)
class Breaches:
    count: int = 0
    last: str = ""
    limit_value: Any = None
    max_rows: int = 0
    fingerprints: Counter[str] = field(default_factory=Counter)


@dataclass(slots=True)
class Hits:
    count: int = 0
    last: str = ""
    logins: Counter[str] = field(default_factory=Counter)
    roles: Counter[str] = field(default_factory=Counter)
    clients: Counter[str] = field(default_factory=Counter)
    fingerprints: Counter[str] = field(default_factory=Counter)
    columns: Counter[str] = field(default_factory=Counter)


@dataclass(slots=True)
class Elevation:
    login: str | None = None
    elevated_role: str | None = None
    reason: str | None = None
    approver: str | None = None
    granted_at: str | None = None
    expires_at: str | None = None
    events: Counter[str] = field(default_factory=Counter)
    last: str = ""
    problems: list[str] = field(default_factory=list)


ShapeKey = tuple[str, str, str, tuple[str, ...], tuple[str, ...], tuple[str, ...]]
"""(login, role, statement kind, relations, columns, masks) of a served access record: the statements
of one shape are counted together and spread over datasets, columns and readers when read."""

ReaderKey = tuple[str, str, tuple[str, ...], tuple[str, ...]]
"""(login, role, columns read, those of them read unmasked)."""


def _text(value: Any, default: str = "?") -> str:
    return value if isinstance(value, str) and value else default


def _strings(value: Any) -> list[str]:
    return [item for item in value if isinstance(item, str)] if isinstance(value, list) else []


def client_host(address: Any) -> str:
    """The host of a `client_address` (`10.0.3.4:51522` -> `10.0.3.4`; a socket path as it is)."""
    text = _text(address)
    host, colon, port = text.rpartition(":")
    return host.strip("[]") if colon and port.isdigit() and host else text


class AccessSummary:
    """Feed it records (`add`) in each chain's order; read the counts from its attributes.

    An access record in the window that was served (`allow`, `rewrite`) counts as one statement for
    every relation in `relations` and every column in `columns` (a column is read unmasked when no
    entry of `masks` names it); its completion (same chain, connection and request, or listed in
    `requests`) adds its `rows` once to each of those. Refused access records count by rule.
    Records of types this version does not know are counted by type and otherwise ignored."""

    def __init__(self, window: Window | None = None) -> None:
        self.window = window or Window()
        self._since = self.window.since_key
        self._until = self.window.until_key
        self._shapes: dict[ShapeKey, Tally] = {}
        # rows of completions covering statements of several shapes: once per union of the shapes
        self._shared_rows: dict[ShapeKey, int] = {}
        self._refused_relations: dict[str, Tally] = {}
        self._refused_masks: set[str] = set()
        self._spread: tuple[int, int] | None = None  # (statements, rows) counted at the last spread
        self._datasets: dict[str, Usage] = {}
        self._columns: dict[str, Usage] = {}
        self._readers: dict[ReaderKey, Tally] = {}
        self._masked: set[str] = set()
        self.refusals: dict[str, Refusals] = {}
        self.budget: dict[tuple[str, str, str], Breaches] = {}
        self.honeytokens: dict[tuple[str, str, str], Hits] = {}
        self.elevations: dict[str, Elevation] = {}
        self.other_types: Counter[str] = Counter()
        self.counts: Counter[str] = Counter()
        self.first = ""
        self.last = ""
        self._pending: dict[tuple[str, Any, Any], tuple[ShapeKey, Tally]] = {}

    def add_all(self, records: Iterable[tuple[str, dict[str, Any]]]) -> AccessSummary:
        for chain, record in records:
            self.add(chain, record)
        return self

    def add(self, chain: str, record: dict[str, Any]) -> None:
        kind = record.get("type")
        raw_time = record.get("time")
        when = time_key(raw_time) if isinstance(raw_time, str) else ""
        if kind == "completion":
            if when >= self._since and (self._until is None or when < self._until):
                self.counts["records"] += 1
            self._completion(chain, record)
            return
        if when < self._since or (self._until is not None and when >= self._until):
            if kind == "access":  # a later statement with this number: not the one pending
                self._pending.pop((chain, record.get("connection_id"), record.get("request")), None)
            return
        self.counts["records"] += 1
        if when and (not self.first or when < self.first):
            self.first = when
        if when > self.last:
            self.last = when
        if kind == "access":
            self._access(chain, record, when)
        elif kind == "connect":
            self._connect(record, when)
        elif kind == "budget":
            self._budget(record, when)
        elif kind == "honeytoken":
            self._honeytoken(record, when)
        elif kind == "elevation":
            self._elevation(record, when)
        else:
            self.other_types[_text(kind, "(no type)")] += 1

    # ---- statements -----------------------------------------------------------------------------

    def _access(self, chain: str, record: dict[str, Any], when: str) -> None:
        self.counts["access"] += 1
        role, login = _text(record.get("role")), _text(record.get("login"))
        relations, columns = _strings(record.get("relations")), _strings(record.get("columns"))
        masks = _strings(record.get("masks"))
        decision = record.get("decision")
        key = (chain, record.get("connection_id"), record.get("request"))
        if decision not in READ_DECISIONS:
            self._pending.pop(key, None)
            self._refused_masks.update(masks)
            self._refused(_text(record.get("rule"), "(no rule)"), role, login, relations, when)
            return
        self.counts["served"] += 1
        shape_key: ShapeKey = (login, role, _text(record.get("statement_kind"), "unknown"),
                               tuple(relations), tuple(columns), tuple(masks))
        shape = self._shapes.get(shape_key)
        if shape is None:
            shape = self._shapes[shape_key] = Tally()
        shape.statements += 1
        if when > shape.last:
            shape.last = when
        self._pending[key] = (shape_key, shape)

    def _completion(self, chain: str, record: dict[str, Any]) -> None:
        covered = record.get("requests")
        connection = record.get("connection_id")
        if not isinstance(covered, list) or not covered:
            found = self._pending.pop((chain, connection, record.get("request")), None)
            if found is None:
                return
            shapes = [found]
        else:
            shapes = [found for number in covered
                      if (found := self._pending.pop((chain, connection, number), None)) is not None]
            if not shapes:
                return
        self.counts["completed"] += 1
        rows = record.get("rows")
        if not isinstance(rows, int) or isinstance(rows, bool) or rows <= 0:
            return
        self.counts["rows"] += rows
        if all(shape is shapes[0][1] for _, shape in shapes):
            shapes[0][1].rows += rows
            return
        # several shapes: the rows go once to each dataset, column and reader of any of them
        keys = [key for key, _ in shapes]
        union: ShapeKey = (keys[0][0], keys[0][1], "",
                           tuple(dict.fromkeys(name for key in keys for name in key[3])),
                           tuple(dict.fromkeys(name for key in keys for name in key[4])),
                           tuple(dict.fromkeys(name for key in keys for name in key[5])))
        self._shared_rows[union] = self._shared_rows.get(union, 0) + rows

    def _refused(self, rule: str, role: str, login: str, relations: list[str], when: str) -> None:
        self.counts["refused"] += 1
        refusals = self.refusals.get(rule)
        if refusals is None:
            refusals = self.refusals[rule] = Refusals()
        refusals.count += 1
        refusals.last = max(refusals.last, when)
        refusals.logins[login] += 1
        refusals.roles[role] += 1
        for relation in dict.fromkeys(relations):
            refusals.relations[relation] += 1
            tally = self._refused_relations.get(relation)
            if tally is None:
                tally = self._refused_relations[relation] = Tally()
            tally.add(when)

    def _connect(self, record: dict[str, Any], when: str) -> None:
        if record.get("decision") == "refuse":
            self.counts["connections_refused"] += 1
            rule = _text(record.get("rule"), "(no rule)")
            self._refused(rule, _text(record.get("role")), _text(record.get("login")), [], when)
            self.refusals[rule].at_connect += 1
        else:
            self.counts["connections"] += 1

    # ---- events ---------------------------------------------------------------------------------

    def _budget(self, record: dict[str, Any], when: str) -> None:
        self.counts["budget"] += 1
        key = (_text(record.get("login")), _text(record.get("role")), _text(record.get("limit")))
        breaches = self.budget.get(key)
        if breaches is None:
            breaches = self.budget[key] = Breaches()
        breaches.count += 1
        breaches.last = max(breaches.last, when)
        if record.get("limit_value") is not None:
            breaches.limit_value = record.get("limit_value")
        rows = record.get("rows")
        if isinstance(rows, int) and not isinstance(rows, bool):
            breaches.max_rows = max(breaches.max_rows, rows)
        fingerprint = record.get("fingerprint")
        if isinstance(fingerprint, str) and fingerprint:
            breaches.fingerprints[fingerprint] += 1

    def _honeytoken(self, record: dict[str, Any], when: str) -> None:
        self.counts["honeytoken"] += 1
        key = (_text(record.get("token")), _text(record.get("table")), _text(record.get("action")))
        hits = self.honeytokens.get(key)
        if hits is None:
            hits = self.honeytokens[key] = Hits()
        hits.count += 1
        hits.last = max(hits.last, when)
        hits.logins[_text(record.get("login"))] += 1
        if record.get("role") is not None:
            hits.roles[_text(record.get("role"))] += 1
        hits.clients[client_host(record.get("client_address"))] += 1
        if isinstance(record.get("column"), str):
            hits.columns[record["column"]] += 1
        fingerprint = record.get("fingerprint")
        if isinstance(fingerprint, str) and fingerprint:
            hits.fingerprints[fingerprint] += 1

    def _elevation(self, record: dict[str, Any], when: str) -> None:
        self.counts["elevation"] += 1
        grant = _text(record.get("grant_id"), "(no grant id)")
        elevation = self.elevations.get(grant)
        if elevation is None:
            elevation = self.elevations[grant] = Elevation()
        for name in ("login", "elevated_role", "reason", "approver", "granted_at", "expires_at"):
            value = record.get(name)
            if isinstance(value, str) and value:
                setattr(elevation, name, value)
        elevation.events[_text(record.get("event"))] += 1
        elevation.last = max(elevation.last, when)
        problem = record.get("problem")
        if isinstance(problem, str) and problem and problem not in elevation.problems:
            elevation.problems.append(problem)

    # ---- reading the counts ---------------------------------------------------------------------

    @property
    def datasets(self) -> dict[str, Usage]:
        """Per relation (`schema.name`): the served statements that named it, and refusals."""
        self._spread_shapes()
        return self._datasets

    @property
    def columns(self) -> dict[str, Usage]:
        """Per column (`schema.table.column`): the served statements that read it."""
        self._spread_shapes()
        return self._columns

    @property
    def masked_columns(self) -> set[str]:
        """Every column that some access record of the window masked."""
        self._spread_shapes()
        return self._masked

    def _spread_shapes(self) -> None:
        """Spread the statements of each shape over its datasets, columns and reader (again only
        when records were added since the last time)."""
        state = (self.counts["served"] + self.counts["refused"], self.counts["rows"])
        if self._spread == state:
            return
        self._spread = state
        datasets: dict[str, Usage] = {}
        columns: dict[str, Usage] = {}
        readers: dict[ReaderKey, Tally] = {}
        masked = {mask.rpartition(":")[0] for mask in self._refused_masks} - {""}
        shapes = [*self._shapes.items(),
                  *((key, Tally(rows=rows)) for key, rows in self._shared_rows.items())]
        for (login, role, kind, relations, names, masks), shape in shapes:
            for mask in masks:
                if column := mask.rpartition(":")[0]:
                    masked.add(column)
            for relation in dict.fromkeys(relations):
                usage = datasets.get(relation)
                if usage is None:
                    usage = datasets[relation] = Usage()
                if shape.statements:
                    usage.kinds[kind] += shape.statements
                for tally in usage.tallies(role, login):
                    tally.merge(shape)
            unmasked: list[str] = []
            for column in dict.fromkeys(names):
                prefix = f"{column}:"
                raw = not any(mask.startswith(prefix) for mask in masks)
                if raw:
                    unmasked.append(column)
                usage = columns.get(column)
                if usage is None:
                    usage = columns[column] = Usage()
                for tally in usage.tallies(role, login):
                    tally.merge(shape, raw)
            if names:
                reader_key: ReaderKey = (login, role, tuple(dict.fromkeys(names)), tuple(unmasked))
                reader = readers.get(reader_key)
                if reader is None:
                    reader = readers[reader_key] = Tally()
                reader.merge(shape, bool(unmasked))
        for relation, refused in self._refused_relations.items():
            usage = datasets.get(relation)
            if usage is None:
                usage = datasets[relation] = Usage()
            usage.refused, usage.last_refused = refused.statements, refused.last
        self._datasets, self._columns, self._readers, self._masked = datasets, columns, readers, masked

    def readers(self, sensitive: Callable[[str], bool]) -> list[dict[str, Any]]:
        """Per (login, role): the statements that read a column `sensitive` says is, those that read
        one unmasked, their rows, the last one's time and the columns; most unmasked reads first."""
        self._spread_shapes()
        readers: dict[tuple[str, str], dict[str, Any]] = {}
        for (login, role, columns, unmasked), tally in self._readers.items():
            chosen = [column for column in columns if sensitive(column)]
            if not chosen:
                continue
            raw = [column for column in unmasked if sensitive(column)]
            entry = readers.get((login, role))
            if entry is None:
                entry = readers[(login, role)] = {"login": login, "role": role, "statements": 0,
                                                  "unmaskedStatements": 0, "rows": 0, "lastRead": "",
                                                  "columns": {}}
            entry["statements"] += tally.statements
            entry["rows"] += tally.rows
            entry["lastRead"] = max(entry["lastRead"], tally.last)
            if raw:
                entry["unmaskedStatements"] += tally.statements
            for column in chosen:
                counts = entry["columns"].setdefault(column, {"statements": 0, "unmasked": 0})
                counts["statements"] += tally.statements
                if column in raw:
                    counts["unmasked"] += tally.statements
        def rank(entry: dict[str, Any]) -> tuple[int, int, int, str, str]:
            return (-entry["unmaskedStatements"], -entry["statements"], -entry["rows"],
                    entry["login"], entry["role"])
        ordered = sorted(readers.values(), key=rank)
        for entry in ordered:
            entry["columns"] = [{"column": column, **counts}
                                for column, counts in sorted(entry["columns"].items())]
        return ordered


def usage_json(usage: Usage | None, columns: bool = False) -> dict[str, Any]:
    """The access side of a catalog entry (zeros and nulls when nothing read it in the window)."""
    usage = usage or Usage()

    def tally_json(tally: Tally) -> dict[str, Any]:
        entry: dict[str, Any] = {"statements": tally.statements, "rows": tally.rows,
                                 "lastRead": tally.last or None}
        if columns:
            entry["unmaskedStatements"] = tally.unmasked
        return entry

    entry = tally_json(usage.total)
    entry["roles"] = {name: tally_json(tally) for name, tally in sorted(usage.roles.items())}
    entry["logins"] = {name: tally_json(tally) for name, tally in sorted(usage.logins.items())}
    if not columns:
        entry["statementKinds"] = dict(sorted(usage.kinds.items()))
        entry["refusedStatements"] = usage.refused
        entry["lastRefused"] = usage.last_refused or None
    return entry
