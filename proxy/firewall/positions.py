"""Where injected input lands in a statement: its conditions, sort keys and LIMIT/OFFSET (probe positions).

An application pastes a value into a string or number literal of a condition (`name = '...'`,
`id = ...`, `LIKE '%...%'`), a sort key (`ORDER BY ...`) or a row count (`LIMIT ...`, `OFFSET ...`).
Injected SQL placed there is evaluated for every row or decides how many rows come back, so a
probe in one of these positions shows its result through the page (rows, order, count, error or
time). Rules that must also judge roles whose SQL people write look for probes only here, and only
in statements that read user tables (people's own metadata queries read catalogs alone).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from pglast import ast

from proxy.firewall.tree import children, is_catalog_relation


@dataclass(frozen=True, slots=True)
class ProbePosition:
    """One expression an injected value may land in, and what the statement uses it for."""

    place: str  # "condition", "sort key", "LIMIT" or "OFFSET"
    root: ast.Node


def probe_positions(nodes: tuple[ast.Node, ...]) -> list[ProbePosition]:
    """The conditions (WHERE, HAVING, JOIN ON), statement sort keys and LIMIT/OFFSET of every query
    level, outermost first (nested levels appear both inside their parent's position and alone)."""
    found: list[ProbePosition] = []
    for node in nodes:
        if isinstance(node, ast.SelectStmt):
            for place, root in (("condition", node.whereClause), ("condition", node.havingClause),
                                ("LIMIT", node.limitCount), ("OFFSET", node.limitOffset)):
                if isinstance(root, ast.Node):
                    found.append(ProbePosition(place, root))
            found.extend(ProbePosition("sort key", item.node) for item in node.sortClause or ()
                         if isinstance(item, ast.SortBy) and isinstance(item.node, ast.Node))
        elif isinstance(node, ast.JoinExpr) and isinstance(node.quals, ast.Node):
            found.append(ProbePosition("condition", node.quals))
        elif isinstance(node, ast.UpdateStmt | ast.DeleteStmt) and isinstance(node.whereClause, ast.Node):
            found.append(ProbePosition("condition", node.whereClause))
    return found


def reads_user_relation(nodes: tuple[ast.Node, ...]) -> bool:
    """Does the statement read a relation that is neither a system catalog nor one of its own CTEs?"""
    cte_names = {str(node.ctename) for node in nodes if isinstance(node, ast.CommonTableExpr)}
    return any(isinstance(node, ast.RangeVar) and not is_catalog_relation(node)
               and not (node.schemaname is None and str(node.relname) in cte_names) for node in nodes)


def walk_with_parents(root: ast.Node) -> Iterator[tuple[ast.Node, tuple[ast.Node, ...]]]:
    """Every node under `root` with its ancestors (innermost last), depth first."""
    stack: list[tuple[ast.Node, tuple[ast.Node, ...]]] = [(root, ())]
    while stack:
        node, ancestors = stack.pop()
        yield node, ancestors
        inner = (*ancestors, node)
        stack.extend((child, inner) for child in reversed(list(children(node))))
