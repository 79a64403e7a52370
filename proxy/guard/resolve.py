"""Resolve pass: find every relation, function and column reference and resolve relations through
the catalog and the session's search_path, honouring CTE scoping exactly as PostgreSQL does."""

from __future__ import annotations

from pglast import ast

from proxy.guard.statement import FunctionRef, GuardContext, GuardStatement, RelationRef
from proxy.guard.verdict import Refuse

# (parent node type, field) -> position of a RangeVar found directly in that field
_POSITIONS: dict[tuple[str, str], str] = {
    ("SelectStmt", "fromClause"): "from",
    ("UpdateStmt", "fromClause"): "from",
    ("DeleteStmt", "usingClause"): "from",
    ("JoinExpr", "larg"): "from",
    ("JoinExpr", "rarg"): "from",
    ("MergeStmt", "sourceRelation"): "from",
    ("InsertStmt", "relation"): "target",
    ("UpdateStmt", "relation"): "target",
    ("DeleteStmt", "relation"): "target",
    ("MergeStmt", "relation"): "target",
    ("CopyStmt", "relation"): "copy",
    ("RangeTableSample", "relation"): "sample",
}

_CTE_POSITIONS = frozenset({"from", "sample"})
_MODIFICATIONS = (ast.InsertStmt, ast.UpdateStmt, ast.DeleteStmt, ast.MergeStmt)


class _Collector:
    def __init__(self, statement: GuardStatement) -> None:
        self.statement = statement
        self.cte_names: set[str] = set()

    def visit(self, node: object, position: str, scope: frozenset[str]) -> None:
        if isinstance(node, tuple | list):
            for item in node:
                self.visit(item, position, scope)
            return
        if not isinstance(node, ast.Node):
            return
        if isinstance(node, ast.RangeVar):
            self._relation(node, position, scope)
            return
        if isinstance(node, ast.FuncCall):
            self.statement.functions.append(FunctionRef(_name_parts(node.funcname), node))
        elif isinstance(node, ast.ColumnRef):
            self.statement.column_refs.append(node)
        elif isinstance(node, ast.TypeName | ast.A_Expr):
            names = node.names if isinstance(node, ast.TypeName) else node.name
            if names and len(names) > 1 and isinstance(names[0], ast.String):
                self.statement.schemas_named.add(names[0].sval or "")
            if names and isinstance(node, ast.TypeName):
                self.statement.type_names.append(_name_parts(names))
            elif names:
                self.statement.operator_names.append(_name_parts(names))
        elif isinstance(node, ast.SortBy | ast.SubLink):  # ORDER BY ... USING op, x op ANY (SELECT ...)
            names = node.useOp if isinstance(node, ast.SortBy) else node.operName
            if names:
                self.statement.operator_names.append(_name_parts(names))
                if len(names) > 1 and isinstance(names[0], ast.String):
                    self.statement.schemas_named.add(names[0].sval or "")
        elif isinstance(node, ast.A_Indirection):
            self.statement.field_selections.extend(
                item.sval or "" for item in node.indirection or () if isinstance(item, ast.String))
        elif isinstance(node, _MODIFICATIONS) and node is not self.statement.node:
            self.statement.modifications.append(node)
        with_clause = getattr(node, "withClause", None)
        if isinstance(with_clause, ast.WithClause):
            scope = self._with(with_clause, scope)
        kind = type(node).__name__
        for slot in getattr(type(node), "__slots__", ()):
            if slot == "withClause":
                continue
            child = getattr(node, slot, None)
            if child is None or isinstance(child, str | int | float | bool):
                continue
            self.visit(child, _POSITIONS.get((kind, slot), "other"), scope)

    def _with(self, clause: ast.WithClause, outer: frozenset[str]) -> frozenset[str]:
        ctes = [cte for cte in clause.ctes or () if isinstance(cte, ast.CommonTableExpr)]
        names = [cte.ctename or "" for cte in ctes]
        self.cte_names.update(names)
        for index, cte in enumerate(ctes):
            visible = names if clause.recursive else names[:index]
            self.visit(cte.ctequery, "other", outer | frozenset(visible))
        return outer | frozenset(names)

    def _relation(self, node: ast.RangeVar, position: str, scope: frozenset[str]) -> None:
        parts = tuple(p for p in (node.catalogname, node.schemaname, node.relname) if p)
        cte = (
            position in _CTE_POSITIONS
            and node.schemaname is None
            and node.catalogname is None
            and node.relname in scope
        )
        self.statement.relations.append(RelationRef(node=node, position=position, parts=parts, cte=cte))


def _name_parts(names: object) -> tuple[str, ...]:
    parts: list[str] = []
    for item in names if isinstance(names, tuple | list) else ():
        if isinstance(item, ast.String):
            parts.append(item.sval or "")
    return tuple(parts)


def collect(statement: GuardStatement) -> None:
    """Fill `relations`, `functions`, `column_refs` and `cte_names` of the statement."""
    collector = _Collector(statement)
    collector.visit(statement.node, "other", frozenset())
    statement.cte_names = frozenset(collector.cte_names)


def resolve(statement: GuardStatement, context: GuardContext) -> Refuse | None:
    """Resolve every non-CTE relation reference; unknown ones are refused for masked roles."""
    collect(statement)
    for ref in statement.relations:
        if ref.cte:
            continue
        if len(ref.parts) == 3 and ref.parts[0] != context.catalog.database:
            continue  # PostgreSQL rejects cross-database references itself
        relation = context.catalog.resolve(ref.parts, context.search_path, context.user)
        if relation is None:
            if context.masked and ref.position != "other":
                return unknown_relation(ref)
            continue
        ref.relation = relation
        ref.qualified = f"{relation.schema}.{relation.name}"
    return None


def unknown_relation(ref: RelationRef) -> Refuse:
    """PostgreSQL's own error for a relation it does not have (pgveil's catalog is PostgreSQL's, so
    this tells the client nothing PostgreSQL would not): 42P01 `relation "schema.name" does not
    exist`, the name as written (the database part dropped, as PostgreSQL prints it) and, except
    for COPY's table, the position of the name."""
    names = ref.parts[-2:]
    position = 0 if ref.position == "copy" or ref.node.location is None else ref.node.location + 1
    return Refuse("unknown-relation", f'relation "{".".join(names)}" does not exist', sqlstate="42P01",
                  native=True, position=position)
