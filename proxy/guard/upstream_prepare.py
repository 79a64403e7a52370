"""Masked statements prepared once per upstream connection, so PostgreSQL does not parse and plan
the masked derived tables again for every simple-protocol execution.

A masked SELECT seen before (a verdict-cache hit) whose literals, if any, are all integers compared
with a column (`... WHERE id = 42`) is sent the first time as
`PREPARE pgveil_<process>_<n>(integer) AS <rewrite with $1>; EXECUTE pgveil_<process>_<n>(42)`
and afterwards as `EXECUTE pgveil_<process>_<n>(7)`. EXECUTE answers with the same RowDescription,
rows and CommandComplete tag as the statement itself; the relay hides the PREPARE's own
CommandComplete (`UpstreamTicket`). Integers in `column IN (...)`, LIMIT and OFFSET are parameters
too. Everything else stays literal: string, typed and float literals (their reading can depend on
DateStyle, TimeZone, ...), positional references and type modifiers (not such operands), NULL
(transform_null_equals), statements with several parts, comments or row filters, and `constant`
masks. The form is chosen once per
rewritten shape; a failed or unconfirmed PREPARE is never relied on (the next statement of that
shape prepares under a new name, or goes inline while one is in flight).
"""

from __future__ import annotations

import itertools
import logging
import secrets
from collections.abc import Hashable
from dataclasses import dataclass

from pglast import ast, parser
from pglast.enums import A_Expr_Kind

from proxy.guard.cache import shape
from proxy.guard.positions import Span, Splices
from proxy.guard.verdict import Rewrite, StatementInfo, UpstreamTicket

log = logging.getLogger("pgveil.guard")

NAME_PREFIX = f"pgveil_{secrets.token_hex(4)}_"
"""Names of pgveil's own upstream statements: per process, so replicas and clients do not collide."""

MAX_STATEMENTS = 256
"""Upstream statements pgveil leaves on one connection; past that, new shapes are sent inline
(a reload or catalog refresh prepares anew without deallocating the old ones)."""

_COMPARISONS = frozenset({"=", "<>", "!=", "<", ">", "<=", ">="})
_INT4_MAX = 2**31 - 1
_INT8_MAX = 2**63 - 1
_ELIGIBLE: dict[str, bool] = {}  # parameterised rewrite text -> may it be prepared
_ELIGIBLE_LIMIT = 4096


@dataclass(frozen=True, slots=True)
class PreparedForm:
    """A rewrite as a statement with parameters: its text and the types and values of `$1..$n`."""

    template: str
    types: tuple[str, ...]
    arguments: tuple[str, ...]
    sql: str  # the client's statement
    verdict: Rewrite

    def spans(self) -> tuple[Span, ...] | None:
        """Where the template replaced the client's text (for error positions in the PREPARE)."""
        shaped = shape(self.sql)
        if shaped is None or self.verdict.splices is None or len(shaped[2]) != len(self.arguments):
            return None
        literals = [(start, end, len(f"${number}")) for number, (start, end) in enumerate(shaped[2], start=1)]
        return tuple(sorted([*self.verdict.splices.spans, *literals]))


_TEMPLATES: dict[int, tuple[StatementInfo, str | None]] = {}  # id(verdict.info) -> its template
_TEMPLATES_LIMIT = 4096


def prepared_form(sql: str, verdict: Rewrite, *, row_filtered: bool) -> PreparedForm | None:
    """The parameterised form of `verdict` (the rewrite of the client's `sql`), or None when the
    statement must be sent as it is (see the module docstring). Only verdict-cache hits are
    prepared; their template is worked out once per cache entry (its StatementInfo)."""
    splices = verdict.splices
    if row_filtered or splices is None:
        return None
    literals = splices.literals
    if literals is None:
        return None  # a fresh analysis: the shape's next execution (a cache hit) may be prepared
    types: list[str] = []
    for literal in literals:
        if not literal.isdigit() or not literal.isascii():
            return None
        if len(literal) < 10:
            types.append("integer")
        else:
            value = int(literal)
            if value > _INT8_MAX:
                return None
            types.append("integer" if value <= _INT4_MAX else "bigint")
    info = verdict.info
    known = _TEMPLATES.get(id(info))
    if known is None or known[0] is not info:
        if len(_TEMPLATES) >= _TEMPLATES_LIMIT:
            _TEMPLATES.clear()
        try:
            template = _template(sql, verdict)
        except Exception:  # the inline rewrite is always correct: send it
            log.exception("pgveil could not work out the prepared form of a statement; sending it inline")
            template = None
        known = (info, template)
        _TEMPLATES[id(info)] = known
    template = known[1]
    if template is None:
        return None
    return PreparedForm(template, tuple(types), literals, sql, verdict)


def _template(sql: str, verdict: Rewrite) -> str | None:
    """The rewrite with every literal as `$n`, when the statement may be prepared at all."""
    info = verdict.info
    if (info.kind != "select" or verdict.splices is None
            or any(mask.endswith(":constant") for mask in info.masks)):
        return None
    shaped = shape(sql)
    if shaped is None or "null" in sql.lower() or "$" in sql:
        return None  # ($1 in a Query is PostgreSQL's error; it must not become pgveil's parameter)
    _key, literals, literal_spans = shaped
    if any(not literal.isdigit() for literal in literals):
        return None  # strings and floats stay literal
    edits = verdict.splices.spans
    rewritten = verdict.sql
    pieces: list[str] = []
    cursor = 0
    for number, ((start, end), literal) in enumerate(zip(literal_spans, literals, strict=True), start=1):
        shift = 0
        for edit_start, edit_end, length in edits:
            if edit_end <= start:
                shift += length - (edit_end - edit_start)
            elif edit_start < end:
                return None  # a literal inside a splice
        position = start + shift
        if rewritten[position : position + len(literal)] != literal or position < cursor:
            return None
        pieces.append(rewritten[cursor:position])
        pieces.append(f"${number}")
        cursor = position + len(literal)
    pieces.append(rewritten[cursor:])
    template = "".join(pieces).rstrip().rstrip(";").rstrip()
    return template if _eligible(template) else None


def _eligible(template: str) -> bool:
    """One plain SELECT in which every parameter (if any) is an operand of a comparison with a
    column (`=`, `<>`, `<`, `>`, `<=`, `>=`, an item of `column IN (...)`) or a LIMIT or OFFSET."""
    known = _ELIGIBLE.get(template)
    if known is not None:
        return known
    try:
        statements = parser.parse_sql(template)
    except parser.ParseError:
        result = False
    else:
        result = (len(statements) == 1 and isinstance(statements[0].stmt, ast.SelectStmt)
                  and statements[0].stmt.intoClause is None and _parameters_compared(statements[0].stmt))
    if len(_ELIGIBLE) >= _ELIGIBLE_LIMIT:
        _ELIGIBLE.clear()
    _ELIGIBLE[template] = result
    return result


def _parameters_compared(root: ast.Node) -> bool:
    compared: set[int] = set()
    seen: list[int] = []

    def visit(node: object) -> None:
        if isinstance(node, tuple | list):
            for item in node:
                visit(item)
            return
        if not isinstance(node, ast.Node):
            return
        if isinstance(node, ast.ParamRef):
            seen.append(id(node))
            return
        if (isinstance(node, ast.A_Expr) and node.kind == A_Expr_Kind.AEXPR_OP
                and node.name and len(node.name) == 1 and isinstance(node.name[0], ast.String)
                and node.name[0].sval in _COMPARISONS):
            for operand, other in ((node.lexpr, node.rexpr), (node.rexpr, node.lexpr)):
                if isinstance(operand, ast.ParamRef) and isinstance(other, ast.ColumnRef):
                    compared.add(id(operand))
        elif (isinstance(node, ast.A_Expr) and node.kind == A_Expr_Kind.AEXPR_IN
                and isinstance(node.lexpr, ast.ColumnRef) and isinstance(node.rexpr, tuple | list)):
            compared.update(id(item) for item in node.rexpr if isinstance(item, ast.ParamRef))
        elif isinstance(node, ast.SelectStmt):  # LIMIT n, OFFSET n, FETCH FIRST n ROWS
            compared.update(id(item) for item in (node.limitCount, node.limitOffset)
                            if isinstance(item, ast.ParamRef))
        for slot in getattr(type(node), "__slots__", ()):
            child = getattr(node, slot, None)
            if child is not None and not isinstance(child, str | int | float | bool):
                visit(child)

    visit(root)
    return all(node in compared for node in seen)


_NUMBERS = itertools.count(1)
"""Numbers of pgveil's upstream statements, per process: a name is never used by two sessions, so an
upstream connection shared behind pgveil (a transaction pooler) never runs one session's statement
(made for its role's masks) for another."""


class UpstreamStatements:
    """pgveil's prepared statements on one upstream connection (they live as long as it does)."""

    def __init__(self) -> None:
        self._tickets: dict[Hashable, UpstreamTicket] = {}
        self._live = 0  # ... of which PostgreSQL may still hold (bounded by MAX_STATEMENTS)

    def forward(self, key: Hashable, form: PreparedForm, verdict: Rewrite) -> Rewrite:
        """What to send for one execution of `form`: EXECUTE of a statement PostgreSQL confirmed,
        PREPARE and EXECUTE in one Query when there is none, or the inline rewrite while a PREPARE of
        the same shape is still unanswered (pipelining) or too many statements are kept."""
        full_key = (key, form.template, form.types)
        ticket = self._tickets.get(full_key)
        arguments = f"({', '.join(form.arguments)})" if form.arguments else ""  # no `()` without any
        if ticket is not None and ticket.state == UpstreamTicket.READY:
            return Rewrite(f"EXECUTE {ticket.name}{arguments}", verdict.info, None, ticket)
        if ticket is not None and ticket.state == UpstreamTicket.PENDING:
            return verdict
        spans = form.spans()
        if self._live >= MAX_STATEMENTS or spans is None:
            return verdict
        self._live += 1
        ticket = UpstreamTicket(f"{NAME_PREFIX}{next(_NUMBERS)}")
        self._tickets[full_key] = ticket
        types = f"({', '.join(form.types)})" if form.types else ""
        prefix = f"PREPARE {ticket.name}{types} AS "
        text = f"{prefix}{form.template}; EXECUTE {ticket.name}{arguments}"
        splices = Splices([(0, 0, len(prefix)), *spans])
        return Rewrite(text, verdict.info, splices, ticket)

    def forget_all(self, deallocated: bool = False) -> None:
        """Rely on none of them any more: prepare again, under new names. `deallocated`: the client
        ran DEALLOCATE or DISCARD (perhaps ALL), so PostgreSQL may hold none of them either."""
        self._tickets.clear()
        if deallocated:
            self._live = 0

    def __len__(self) -> int:
        return len(self._tickets)


def may_drop_statements(sql: str) -> bool:
    """Whether the client's SQL could deallocate prepared statements (checked before forwarding)."""
    lowered = sql.lower()
    return "deallocate" in lowered or "discard" in lowered
