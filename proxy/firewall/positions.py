"""Where injected input lands in a statement: its conditions, sort keys and LIMIT/OFFSET (probe positions).

An application pastes a value into a string or number literal of a condition (`name = '...'`,
`id = ...`, `LIKE '%...%'`), a sort key (`ORDER BY ...`) or a row count (`LIMIT ...`, `OFFSET ...`).
Injected SQL placed there is evaluated for every row or decides how many rows come back, so a
probe in one of these positions shows its result through the page (rows, order, count, error or
time). Rules that must also judge roles whose SQL people write look for probes only here, and only
in statements that read user tables (people's own metadata queries read catalogs alone).
"""

from __future__ import annotations

from dataclasses import dataclass

from pglast import ast

from proxy.firewall.statement import SubmittedSql
from proxy.firewall.tree import children, is_catalog_relation


@dataclass(frozen=True, slots=True)
class ProbePosition:
    """One expression an injected value may land in, and what the statement uses it for."""

    place: str  # "condition", "sort key", "LIMIT" or "OFFSET"
    root: ast.Node


@dataclass(frozen=True, slots=True)
class PlacedStatement:
    """One statement of a submission, walked once: its nodes and those inside probe positions."""

    nodes: tuple[ast.Node, ...]  # every node, depth first in source order
    reads_user_relation: bool
    placed: tuple[tuple[ast.Node, str], ...]  # nodes inside a probe position, with the outermost one's place
    parents: dict[int, ast.Node]  # inside a position: each node's parent (a position's root has none)

    def ancestors(self, node: ast.Node) -> tuple[ast.Node, ...]:
        """The node's ancestors up to its position's root, outermost first."""
        found: list[ast.Node] = []
        parent = self.parents.get(id(node))
        while parent is not None:
            found.append(parent)
            parent = self.parents.get(id(parent))
        return tuple(reversed(found))


_last: list[tuple[SubmittedSql, tuple[PlacedStatement, ...]]] = []


def placed_statements(submitted: SubmittedSql) -> tuple[PlacedStatement, ...]:
    """The submission's statements with their probe positions; computed once per submission (the
    injection rules that need it run one after the other on the same one)."""
    if _last and _last[0][0] is submitted:
        return _last[0][1]
    placed = tuple(_place(raw.stmt) for raw in submitted.statements if raw.stmt is not None)
    _last[:] = [(submitted, placed)]
    return placed


def reads_user_relation(submitted: SubmittedSql) -> bool:
    """Does any statement read a relation that is neither a system catalog nor one of its own CTEs?"""
    cte_names = {str(node.ctename) for node in submitted.nodes_of(ast.CommonTableExpr)
                 if isinstance(node, ast.CommonTableExpr)}
    return any(isinstance(node, ast.RangeVar) and not is_catalog_relation(node)
               and not (node.schemaname is None and str(node.relname) in cte_names)
               for node in submitted.nodes_of(ast.RangeVar))


def _place(statement: ast.Node) -> PlacedStatement:
    nodes: list[ast.Node] = []
    placed: list[tuple[ast.Node, str]] = []
    parents: dict[int, ast.Node] = {}
    cte_names: set[str] = set()
    stack: list[tuple[ast.Node, str | None, ast.Node | None]] = [(statement, None, None)]
    while stack:
        node, place, parent = stack.pop()
        nodes.append(node)
        if isinstance(node, ast.CommonTableExpr) and node.ctename:
            cte_names.add(str(node.ctename))
        if place is not None:
            placed.append((node, place))
            if parent is not None:
                parents[id(node)] = parent
            stack.extend((child, place, node) for child in reversed(list(children(node))))
            continue
        roots = _roots(node)
        stack.extend((child, roots.get(id(child)) if roots else None, None)
                     for child in reversed(list(children(node))))
    reads_user = any(isinstance(node, ast.RangeVar) and not is_catalog_relation(node)
                     and not (node.schemaname is None and str(node.relname) in cte_names) for node in nodes)
    return PlacedStatement(tuple(nodes), reads_user, tuple(placed), parents)


def _roots(node: ast.Node) -> dict[int, str] | None:
    """ids of a node's children that are probe positions, with their place."""
    if isinstance(node, ast.SelectStmt):
        roots = {id(item): "sort key" for item in node.sortClause or ()}
        for place, root in (("condition", node.whereClause), ("condition", node.havingClause),
                            ("LIMIT", node.limitCount), ("OFFSET", node.limitOffset)):
            if isinstance(root, ast.Node):
                roots[id(root)] = place
        return roots
    if isinstance(node, ast.JoinExpr) and isinstance(node.quals, ast.Node):
        return {id(node.quals): "condition"}
    if isinstance(node, ast.UpdateStmt | ast.DeleteStmt) and isinstance(node.whereClause, ast.Node):
        return {id(node.whereClause): "condition"}
    return None


def row_count_and_sort_positions(submitted: SubmittedSql) -> list[ProbePosition]:
    """Statement sort keys and LIMIT/OFFSET expressions of every query level."""
    found: list[ProbePosition] = []
    for node in submitted.nodes_of(ast.SelectStmt):
        if not isinstance(node, ast.SelectStmt):
            continue
        found.extend(ProbePosition("sort key", item.node) for item in node.sortClause or ()
                     if isinstance(item, ast.SortBy) and isinstance(item.node, ast.Node))
        found.extend(ProbePosition(place, root) for place, root in (("LIMIT", node.limitCount),
                                                                    ("OFFSET", node.limitOffset))
                     if isinstance(root, ast.Node))
    return found
