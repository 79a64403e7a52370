"""Re-gate pass: the rewritten SQL is parsed by pglast again and must say what the guard meant.

Same statements of the same kinds; every reference to a relation masked for the role sits inside
one of the derived tables the rewrite inserted (and each inserted one holds exactly one); every
resolved relation is written schema-qualified."""

from __future__ import annotations

from pglast import parse_sql, parser

from proxy.guard.mask import Edit
from proxy.guard.protected import relation_masks
from proxy.guard.resolve import collect
from proxy.guard.statement import GuardContext, GuardStatement
from proxy.guard.verdict import Refuse


def substituted_spans(edits: list[Edit] | tuple[Edit, ...]) -> list[tuple[int, int]]:
    """Where each derived table landed in the rewritten text."""
    spans: list[tuple[int, int]] = []
    shift = 0
    for edit in edits:
        if edit.substitutes is not None:
            spans.append((edit.start + shift, edit.start + shift + len(edit.text)))
        shift += len(edit.text) - (edit.end - edit.start)
    return spans


def regate(text: str, statements: tuple[GuardStatement, ...], edits: list[Edit] | tuple[Edit, ...],
           context: GuardContext) -> Refuse | None:
    try:
        raw_statements = parse_sql(text)
    except parser.ParseError as exc:
        return _failed(f"the rewritten SQL does not parse ({exc.args[0]})")
    if len(raw_statements) != len(statements):
        return _failed("the rewritten SQL has a different number of statements")
    spans = substituted_spans(edits)
    inside = [0] * len(spans)
    for raw, original in zip(raw_statements, statements, strict=True):
        if type(raw.stmt) is not type(original.node):
            return _failed("the rewritten SQL changed the kind of statement")
        check = GuardStatement(sql=text, start=0, end=len(text), node=raw.stmt)
        collect(check)
        for ref in check.relations:
            if ref.cte:
                continue
            relation = context.catalog.resolve(ref.parts, context.search_path, context.user)
            if relation is None:
                continue
            if len(ref.parts) < 2 and ref.position != "other":
                return _failed(f"{ref.parts[-1]} is not schema-qualified after the rewrite")
            if not relation_masks(context.policy, context.role, relation).protected:
                continue
            if ref.position in ("target", "other", "sample"):
                continue  # checked by the DML/DDL rules on the original statement
            location = ref.node.location or -1
            hits = [i for i, (start, end) in enumerate(spans) if start <= location < end]
            if not hits:
                return _failed(f"{relation.schema}.{relation.name} is read outside a masked derived table")
            inside[hits[0]] += 1
    if any(count != 1 for count in inside):
        return _failed("a masked derived table does not read exactly its one relation")
    return None


def _failed(why: str) -> Refuse:
    return Refuse("rewrite-check-failed", f"{why}; pgveil refuses rather than forward it")
