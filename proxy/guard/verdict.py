"""Verdicts: the value the guard returns for one statement and the session acts on."""

from __future__ import annotations

from dataclasses import dataclass, field

from proxy.guard.positions import Splices


@dataclass(frozen=True, slots=True)
class StatementInfo:
    """What the audit records about a statement (never literal values unless asked)."""

    kind: str = "unknown"  # statement class: select, insert, ..., ddl, admin, transaction, set
    fingerprint: str = ""  # pglast fingerprint (hex), "" when unparseable
    normalized_sql: str = ""  # literals replaced by $n placeholders
    relations: tuple[str, ...] = ()  # schema.name of every relation read or written
    columns: tuple[str, ...] = ()  # schema.table.column read
    masks: tuple[str, ...] = ()  # schema.table.column:protection applied
    findings: tuple[str, ...] = ()  # firewall rules that matched but did not refuse ("alert" mode)
    # user views or code (functions, operators, casts, domains) or unknown function names: definitions
    # PostgreSQL can change under pgveil, so its catalog must be current before this verdict is used
    reads_definitions: bool = False


@dataclass(frozen=True, slots=True)
class Allow:
    """Forward `sql` unchanged."""

    sql: str
    info: StatementInfo = field(default_factory=StatementInfo)
    decision = "allow"


class UpstreamTicket:
    """One of pgveil's prepared statements on an upstream connection: PENDING until the relay sees
    PostgreSQL complete its PREPARE (READY) or the request end without that (FAILED)."""

    PENDING = 0
    READY = 1
    FAILED = 2

    __slots__ = ("name", "state")

    def __init__(self, name: str) -> None:
        self.name = name
        self.state = UpstreamTicket.PENDING


@dataclass(frozen=True, slots=True)
class Rewrite:
    """Forward the rewritten `sql` in place of what the client sent.

    `splices` says where the rewrite replaced the client's text, so that error positions
    PostgreSQL reports in `sql` can be given back in the client's text (None: not known)."""

    sql: str
    info: StatementInfo = field(default_factory=StatementInfo)
    splices: Splices | None = field(default=None, compare=False)
    # set when `sql` PREPAREs one of pgveil's upstream statements (proxy/guard/upstream_prepare.py)
    prepares: UpstreamTicket | None = field(default=None, compare=False)
    decision = "rewrite"


@dataclass(frozen=True, slots=True)
class Refuse:
    """Do not forward; answer with SQLSTATE `sqlstate` and `pgveil: <rule>: <message>`.

    `native` refusals are PostgreSQL's own error for the statement (a syntax error, an unknown
    relation or prepared statement): the client gets `message` as it is, with `position` (1-based
    character in the client's text, 0: none) as PostgreSQL would send them; `rule` is for the
    audit and metrics only."""

    rule: str
    message: str
    info: StatementInfo = field(default_factory=StatementInfo)
    sqlstate: str = "42501"
    native: bool = False
    position: int = 0
    decision = "refuse"

    @property
    def text(self) -> str:
        return self.message if self.native else f"pgveil: {self.rule}: {self.message}"


Verdict = Allow | Rewrite | Refuse
