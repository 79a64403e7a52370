"""Re-gate pass: the rewritten SQL is parsed by pglast again and must say what the guard meant.

Same statements of the same kinds; every reference to a relation masked for the role sits inside
one of the derived tables the rewrite inserted (and each inserted one holds exactly one); every
relation the catalog knows is written schema-qualified unless it names a CTE of the statement.
The check reads libpg_query's JSON text directly (only RangeVars matter, and it is on the miss path)."""

from __future__ import annotations

import json
import re
from typing import Any

from pglast import ast, parser

from proxy.guard.mask import Edit
from proxy.guard.protected import scanned_masks
from proxy.guard.statement import GuardContext, GuardStatement
from proxy.guard.verdict import Refuse

_RELNAME = re.compile(r'"relname":')
_STATEMENT = re.compile(r'\{"stmt":\{"(\w+)"')
_DECODER = json.JSONDecoder()
_NAME_FIELDS = ("catalogname", "schemaname", "relname")


def substituted_spans(edits: list[Edit] | tuple[Edit, ...]) -> list[tuple[int, int]]:
    """Where each derived table landed in the rewritten text."""
    spans: list[tuple[int, int]] = []
    shift = 0
    for edit in edits:
        if edit.substitutes is not None:
            spans.append((edit.start + shift, edit.start + shift + len(edit.text)))
        shift += len(edit.text) - (edit.end - edit.start)
    return spans


def range_vars(tree_json: str) -> list[tuple[bool, dict[str, Any]]] | None:
    """(is a target `relation` field, fields) of every RangeVar in libpg_query's JSON tree.

    RangeVar is the only node with a `relname`; typed RangeVar fields (DML/COPY targets, DDL
    objects) are written without the {"RangeVar": ...} wrapper, so both forms are found by it."""
    found: list[tuple[bool, dict[str, Any]]] = []
    for match in _RELNAME.finditer(tree_json):
        start = tree_json.rfind("{", 0, match.start())
        try:
            fields, _ = _DECODER.raw_decode(tree_json, start)
        except ValueError:
            return None
        if not isinstance(fields, dict) or "relname" not in fields:
            return None
        found.append((tree_json.endswith('"relation":', 0, start), fields))
    return found


def regate(text: str, statements: tuple[GuardStatement, ...], edits: list[Edit] | tuple[Edit, ...],
           context: GuardContext) -> Refuse | None:
    try:
        tree_json = parser.parse_sql_json(text)
    except parser.ParseError as exc:
        return _failed(f"the rewritten SQL does not parse ({exc.args[0]})")
    kinds = _STATEMENT.findall(tree_json)
    if kinds != [statement.node_type for statement in statements]:
        return _failed("the rewritten SQL has other statements than the client's")
    found = range_vars(tree_json)
    if found is None:
        return _failed("the rewritten SQL's relations cannot be read back")
    copies_out = any(isinstance(s.node, ast.CopyStmt) and not s.node.is_from for s in statements)
    spans = substituted_spans(edits)
    inside = [0] * len(spans)
    cte_names = frozenset(name for statement in statements for name in statement.cte_names)
    for is_target, range_var in found:
        parts = tuple(range_var[name] for name in _NAME_FIELDS if name in range_var)
        if len(parts) == 1 and parts[0] in cte_names:
            continue
        relation = context.catalog.resolve(parts, context.search_path, context.user)
        if relation is None:
            continue
        exempt = is_target and not copies_out  # DML targets: checked by the DML rules
        if len(parts) < 2 and not exempt:
            return _failed(f"{parts[-1]} is not schema-qualified after the rewrite")
        if exempt or not scanned_masks(context.policy, context.role, relation, context.catalog,
                                       inherit=bool(range_var.get("inh"))).protected:
            continue
        location = range_var.get("location", -1)
        hits = [i for i, (start, end) in enumerate(spans) if start <= location < end]
        if not hits:
            return _failed(f"{relation.schema}.{relation.name} is read outside a masked derived table")
        inside[hits[0]] += 1
    if any(count != 1 for count in inside):
        return _failed("a masked derived table does not read exactly its one relation")
    return None


def _failed(why: str) -> Refuse:
    return Refuse("rewrite-check-failed", f"{why}; pgveil refuses rather than forward it")
