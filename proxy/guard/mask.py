"""Mask rewrite pass: table substitution by splicing the original text at pglast's token positions.

Every FROM-item reference to a relation the role may not see whole becomes
`(SELECT c1, <mask>(c2) AS c2, ... FROM schema.tbl [WHERE <row filter>] [OFFSET 0]) AS <alias>`
with the catalog's column order; every other resolved relation reference is written fully
qualified as the guard resolved it (for roles with masked data or limited tables); column
references qualified with the table's own name are re-pointed at the alias. The rest of the
client's text is kept byte for byte, so literals, dollar quoting and escapes reach PostgreSQL
exactly as they were analysed."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from pglast import ast, parser

from proxy.guard.protected import UNPROTECTED, RelationMasks, scanned_masks
from proxy.guard.rules import role_is_restricted
from proxy.guard.statement import GuardContext, GuardStatement, RelationRef
from proxy.guard.verdict import Refuse
from proxy.policy.protections import ProtectionError, mask_expression

_COMMENTS = frozenset({"C_COMMENT", "SQL_COMMENT"})


@dataclass(frozen=True, slots=True)
class Edit:
    """Replace `sql[start:end]` with `text`; `substitutes` names the relation a derived table replaced."""

    start: int
    end: int
    text: str
    substitutes: str | None = None


def quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def derived_table(relation_sql: str, masks: RelationMasks, columns: list[tuple[str, str]], only: bool) -> str:
    """The masked derived table that stands in for one relation (without its alias)."""
    select_list = []
    for name, type_sql in columns:
        column = quote_identifier(name)
        protection = masks.masks.get(name)
        if protection is None:
            select_list.append(column)
        else:
            select_list.append(f"{mask_expression(column, type_sql, protection)} AS {column}")
    text = f"(SELECT {', '.join(select_list)} FROM {'ONLY ' if only else ''}{relation_sql}"
    if masks.row_filter is not None:
        # OFFSET 0 keeps the client's predicates above the filter: evaluated below it they could
        # raise errors carrying values of rows the role may not see.
        text += f" WHERE ({masks.row_filter}) OFFSET 0"
    return text + ")"


class _Splicer:
    def __init__(self, sql: str, context: GuardContext) -> None:
        self.sql = sql
        self.context = context
        self.tokens = [token for token in parser.scan(sql) if token.name not in _COMMENTS]
        self.by_start = {token.start: index for index, token in enumerate(self.tokens)}
        self.edits: list[Edit] = []
        self.masks: list[str] = []
        self.aliases: dict[str, set[str]] = {}  # substituted relation -> aliases it got
        # Names are written as resolved where the resolution decides something (masking, the
        # table allow-list); a role that sees and may touch everything has its text forwarded as
        # sent, so PostgreSQL resolves it as it would without pgveil (temporary tables included).
        self.qualify = context.masked or role_is_restricted(context.role)

    def name_span(self, location: int | None, count: int) -> tuple[int, int] | None:
        """Token indexes (first, last) of a dotted name of `count` parts starting at `location`."""
        if location is None or location not in self.by_start:
            return None
        first = self.by_start[location]
        last = first + 2 * count - 2
        if last >= len(self.tokens):
            return None
        if any(self.tokens[i].name != "ASCII_46" for i in range(first + 1, last, 2)):
            return None
        return first, last

    def token(self, index: int) -> str:
        return self.tokens[index].name if 0 <= index < len(self.tokens) else ""

    def relation(self, ref: RelationRef, statement: ast.Node) -> Refuse | None:
        relation = ref.relation
        if ref.cte or relation is None:
            return None
        relname = ref.node.relname or ""
        span = self.name_span(ref.node.location, len(ref.parts))
        if span is None:
            return Refuse("rewrite-failed", f"pgveil could not locate {'.'.join(ref.parts)} in the text; "
                          "write the relation name plainly")
        first, last = span
        qualified_sql = f"{quote_identifier(relation.schema)}.{quote_identifier(relation.name)}"
        # COPY tbl TO copies the table's own rows only (children and partitions are not included).
        only = not ref.node.inh or (ref.position == "copy" and relation.kind != "partitioned")
        masks = scanned_masks(self.context.policy, self.context.role, relation, self.context.catalog,
                              inherit=not only) if self.context.masked else UNPROTECTED
        copies_out = isinstance(statement, ast.CopyStmt) and not statement.is_from
        substitute = masks.protected and (ref.position == "from" or (ref.position == "copy" and copies_out))
        if not substitute:
            if self.qualify:
                self.add(self.tokens[first].start, self.tokens[last].end + 1, qualified_sql)
            return None
        if masks.child_row_filter and substitute:
            return Refuse("row-filtered-child", f"a child or partition of {ref.qualified} has its own row "
                          f"filter for role {self.context.role.name}; read it with ONLY or read the children")
        columns = [(column.name, column.type_sql) for column in relation.columns]
        try:
            derived = derived_table(qualified_sql, masks, columns, only=only)
        except ProtectionError as exc:
            return Refuse("mask-unavailable", f"{ref.qualified}: {exc}; fix the policy")
        qualified = f"{relation.schema}.{relation.name}"
        self.masks.extend(f"{qualified}.{name}:{type(p).__name__.lower()}" for name, p in masks.masks.items())
        alias = ref.alias
        self.aliases.setdefault(qualified, set()).add(alias or relname)
        start, end = self.tokens[first].start, self.tokens[last].end + 1
        if ref.position == "copy":
            if self.token(last + 1) == "ASCII_40":  # COPY t (a, b) TO
                close = self._closing_paren(last + 1)
                if close is None:
                    return Refuse("rewrite-failed", "pgveil could not read COPY's column list")
                columns_sql = self.sql[self.tokens[last + 1].start + 1 : self.tokens[close].start]
                end = self.tokens[close].end + 1
            else:
                columns_sql = "*"
            text = f"(SELECT {columns_sql} FROM {derived} AS {quote_identifier(relname)})"
            self.add(start, end, text, qualified)
            return None
        before = first - 1
        parenthesised = self.token(before) == "ASCII_40" and self.token(last + 1) == "ASCII_41"
        if parenthesised and self.token(before - 1) == "ONLY":
            start, end = self.tokens[before - 1].start, self.tokens[last + 1].end + 1
            before -= 2
        elif self.token(before) == "ONLY":
            start = self.tokens[before].start
            before -= 1
        if self.token(last + 1) == "ASCII_42":  # legacy `tbl *`: children included anyway
            end = self.tokens[last + 1].end + 1
        text = derived if alias else f"{derived} AS {quote_identifier(relname)}"
        if self.token(before) == "TABLE":
            start = self.tokens[before].start
            text = f"SELECT * FROM {derived} AS {quote_identifier(relname)}"
        self.add(start, end, text, qualified)
        return None

    def _closing_paren(self, open_index: int) -> int | None:
        depth = 0
        for index in range(open_index, len(self.tokens)):
            depth += {"ASCII_40": 1, "ASCII_41": -1}.get(self.tokens[index].name, 0)
            if depth == 0:
                return index
        return None

    def column_ref(self, node: ast.ColumnRef) -> Refuse | None:
        fields = node.fields or ()
        names = [f.sval or "" for f in fields if isinstance(f, ast.String)]
        star = bool(fields) and isinstance(fields[-1], ast.A_Star)
        table_parts = names if star else names[:-1]
        if len(table_parts) < 2:
            return None
        qualified = f"{table_parts[-2]}.{table_parts[-1]}"
        aliases = self.aliases.get(qualified)
        if not aliases:
            return None
        if len(aliases) > 1:
            return Refuse("ambiguous-column-reference", f"{'.'.join(names)} could mean several masked "
                          f"references to {qualified}; give each an alias and use it")
        span = self.name_span(node.location, len(table_parts))
        if span is None:
            return Refuse("rewrite-failed", f"pgveil could not locate {'.'.join(names)} in the text")
        first, last = span
        self.add(self.tokens[first].start, self.tokens[last].end + 1, quote_identifier(next(iter(aliases))))
        return None

    def add(self, start: int, end: int, text: str, substitutes: str | None = None) -> None:
        self.edits.append(Edit(start, end, text, substitutes))


def rewrite_statements(
    statements: tuple[GuardStatement, ...], context: GuardContext
) -> tuple[list[Edit], tuple[str, ...]] | Refuse:
    """Edits that mask and qualify every statement of the message, and the masks applied."""
    if context.masked and "pg_catalog" in context.search_path and context.search_path[0] != "pg_catalog":
        return Refuse("search-path", "the session's search_path puts a schema before pg_catalog, which "
                      "could replace the functions masking uses; fix the role's search_path setting")
    splicer = _Splicer(statements[0].sql, context) if statements else None
    if splicer is None:
        return [], ()
    for statement in statements:
        for ref in statement.relations:
            refusal = splicer.relation(ref, statement.node)
            if refusal is not None:
                return refusal
    for statement in statements:
        for column_ref in statement.column_refs:
            refusal = splicer.column_ref(column_ref)
            if refusal is not None:
                return refusal
        statement.columns_read = _columns_read(statement)
    edits = sorted(splicer.edits, key=lambda edit: edit.start)
    for previous, following in itertools.pairwise(edits):
        if following.start < previous.end:
            return Refuse("rewrite-failed", "pgveil could not rewrite this unambiguously; simplify it")
    return edits, tuple(dict.fromkeys(splicer.masks))


def _columns_read(statement: GuardStatement) -> tuple[str, ...]:
    """schema.table.column of every column a reference may mean (names matched against the
    relations of the statement: an over-approximation the audit can rely on)."""
    relations = [ref.relation for ref in statement.relations if ref.relation is not None]
    found: list[str] = []
    for column_ref in statement.column_refs:
        fields = column_ref.fields or ()
        if fields and isinstance(fields[-1], ast.A_Star):
            found.extend(f"{r.schema}.{r.name}.{c.name}" for r in relations for c in r.columns)
            continue
        names = [f.sval or "" for f in fields if isinstance(f, ast.String)]
        if not names:
            continue
        for relation in relations:
            if relation.column(names[-1]) is not None:
                found.append(f"{relation.schema}.{relation.name}.{names[-1]}")
            elif names[-1] == relation.name or (len(names) == 1 and names[0] == relation.name):
                found.extend(f"{relation.schema}.{relation.name}.{c.name}" for c in relation.columns)
    return tuple(dict.fromkeys(found))
