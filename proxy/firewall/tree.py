"""Reading pglast parse trees: walking nodes, naming functions and relations, telling constants apart."""

from __future__ import annotations

from collections.abc import Iterator

from pglast import ast
from pglast.enums import A_Expr_Kind

_SKIPPED_SLOTS = frozenset({"ancestors", "location", "stmt_location", "stmt_len"})

# Schemas whose relations are system catalogs; unqualified `pg_*` names resolve there too.
CATALOG_SCHEMAS = frozenset({"pg_catalog", "information_schema"})

# Aggregates whose value depends on the rows even when called without a column (`count(*)`, `count(1)`).
AGGREGATES = frozenset({
    "count", "sum", "avg", "min", "max", "bool_and", "bool_or", "every", "string_agg", "array_agg",
    "json_agg", "jsonb_agg", "json_object_agg", "jsonb_object_agg", "stddev", "stddev_pop",
    "stddev_samp", "variance", "var_pop", "var_samp", "percentile_cont", "percentile_disc", "mode",
    "rank", "dense_rank", "row_number", "ntile", "lag", "lead", "first_value", "last_value",
    "nth_value", "cume_dist", "percent_rank", "grouping", "corr", "covar_pop", "covar_samp",
    "regr_avgx", "regr_avgy", "regr_count", "regr_intercept", "regr_r2", "regr_slope", "regr_sxx",
    "regr_sxy", "regr_syy", "bit_and", "bit_or", "bit_xor", "xmlagg", "range_agg", "any_value",
})

COMPARISON_OPERATORS = frozenset({
    "=", "<>", "!=", "<", ">", "<=", ">=", "~~", "~~*", "!~~", "!~~*", "~", "~*", "!~", "!~*",
})

_COMPARISON_KINDS = frozenset({
    A_Expr_Kind.AEXPR_LIKE, A_Expr_Kind.AEXPR_ILIKE, A_Expr_Kind.AEXPR_SIMILAR,
    A_Expr_Kind.AEXPR_DISTINCT, A_Expr_Kind.AEXPR_NOT_DISTINCT, A_Expr_Kind.AEXPR_IN,
    A_Expr_Kind.AEXPR_BETWEEN, A_Expr_Kind.AEXPR_NOT_BETWEEN, A_Expr_Kind.AEXPR_BETWEEN_SYM,
    A_Expr_Kind.AEXPR_NOT_BETWEEN_SYM, A_Expr_Kind.AEXPR_OP_ANY, A_Expr_Kind.AEXPR_OP_ALL,
})


_CHILD_SLOTS: dict[type, tuple[str, ...]] = {}


def children(node: ast.Node) -> Iterator[ast.Node]:
    """Direct child nodes, in field order (lists of nodes flattened)."""
    kind = type(node)
    slots = _CHILD_SLOTS.get(kind)
    if slots is None:  # pglast declares slots per node class
        slots = _CHILD_SLOTS[kind] = tuple(slot for slot in kind.__slots__  # type: ignore[attr-defined]
                                           if slot not in _SKIPPED_SLOTS)
    for slot in slots:
        value = getattr(node, slot, None)
        if isinstance(value, ast.Node):
            yield value
        elif isinstance(value, tuple | list):
            yield from _nodes_in(value)


def _nodes_in(values: tuple[object, ...] | list[object]) -> Iterator[ast.Node]:
    for value in values:
        if isinstance(value, ast.Node):
            yield value
        elif isinstance(value, tuple | list):
            yield from _nodes_in(value)


def walk(node: ast.Node | None) -> Iterator[ast.Node]:
    """Every node under `node` (itself included), depth first, in source order."""
    if node is None:
        return
    stack = [node]
    while stack:
        current = stack.pop()
        yield current
        stack.extend(reversed(list(children(current))))


def function_name(call: ast.FuncCall) -> str:
    """Lower-case unqualified name of a function call (`pg_catalog.version` -> `version`)."""
    return str(call.funcname[-1].sval).lower() if call.funcname else ""


def type_name(cast: ast.TypeCast) -> str:
    """Lower-case unqualified name of a cast's target type (`pg_catalog.int4` -> `int4`)."""
    names = cast.typeName.names or () if cast.typeName is not None else ()
    return str(names[-1].sval).lower() if names else ""


def operator_name(expr: ast.A_Expr) -> str:
    names = expr.name or ()
    return str(names[-1].sval) if names else ""


def is_catalog_relation(relation: ast.RangeVar) -> bool:
    """A system catalog or information_schema view (unqualified `pg_*` names resolve to pg_catalog)."""
    if relation.schemaname is not None:
        return str(relation.schemaname).lower() in CATALOG_SCHEMAS
    return str(relation.relname).lower().startswith("pg_")


def relation_name(relation: ast.RangeVar) -> str:
    if relation.schemaname is not None:
        return f"{relation.schemaname}.{relation.relname}".lower()
    return str(relation.relname).lower()


def is_comparison(node: ast.Node) -> bool:
    """A predicate comparing two values: `=`, `<`, LIKE, IN, BETWEEN, IS DISTINCT FROM, `= ANY`."""
    if isinstance(node, ast.A_Expr):
        if node.kind == A_Expr_Kind.AEXPR_OP:
            return operator_name(node) in COMPARISON_OPERATORS and node.lexpr is not None
        return node.kind in _COMPARISON_KINDS
    return False


def is_null_constant(node: ast.Node | None) -> bool:
    return isinstance(node, ast.A_Const) and bool(node.isnull)


def is_concatenation(node: ast.Node) -> bool:
    return isinstance(node, ast.A_Expr) and node.kind == A_Expr_Kind.AEXPR_OP and operator_name(node) == "||"


def concatenation_operands(node: object) -> list[ast.Node]:
    """Operands of a `a || b || c` chain (parenthesised sub-chains included)."""
    if isinstance(node, ast.A_Expr) and is_concatenation(node):
        return concatenation_operands(node.lexpr) + concatenation_operands(node.rexpr)
    return [node] if isinstance(node, ast.Node) else []


def select_leaves(select: ast.SelectStmt) -> list[ast.SelectStmt]:
    """The plain SELECTs combined by a UNION/INTERSECT/EXCEPT tree (the statement itself if none)."""
    leaves: list[ast.SelectStmt] = []
    pending = [select]
    while pending:  # iterative and linear: UNION chains of thousands of branches are left-deep trees
        current = pending.pop()
        if current.larg is None or current.rarg is None:
            leaves.append(current)
        else:
            pending.extend((current.rarg, current.larg))
    return leaves


def relations_in(node: ast.Node) -> Iterator[ast.RangeVar]:
    for child in walk(node):
        if isinstance(child, ast.RangeVar):
            yield child


def _range_names(select: ast.SelectStmt) -> set[str]:
    """Names a SELECT's FROM clause brings into scope (aliases, relation names, CTE names)."""
    names: set[str] = set()
    for item in select.fromClause or ():
        for node in walk(item):
            if isinstance(node, ast.RangeVar):
                names.add(str(node.relname).lower())
            alias = getattr(node, "alias", None)
            if isinstance(alias, ast.Alias) and alias.aliasname:
                names.add(str(alias.aliasname).lower())
    return names


def references_outer_row(select: ast.SelectStmt, visible: frozenset[str] = frozenset()) -> bool:
    """Does this subquery read a column of an enclosing query (is it correlated)?

    Qualified column references whose qualifier is no name of the subquery's own FROM are outer
    references; unqualified ones are taken as the subquery's own unless it has no FROM at all.
    """
    for leaf in select_leaves(select):
        names = visible | _range_names(leaf)
        for node in _own_nodes(leaf):
            if isinstance(node, ast.ColumnRef):
                fields = node.fields or ()
                if len(fields) >= 2 and isinstance(fields[0], ast.String):
                    if str(fields[0].sval).lower() not in names:
                        return True
                elif not leaf.fromClause:
                    return True
            elif isinstance(node, ast.SubLink) and isinstance(node.subselect, ast.SelectStmt):
                if references_outer_row(node.subselect, frozenset(names)):
                    return True
            elif (isinstance(node, ast.RangeSubselect) and isinstance(node.subquery, ast.SelectStmt)
                  and not node.lateral and references_outer_row(node.subquery, frozenset())):
                return True
    return False


def _own_nodes(select: ast.SelectStmt) -> Iterator[ast.Node]:
    """Nodes of one SELECT level, stopping at (but yielding) nested subqueries."""
    stack: list[ast.Node] = list(children(select))
    while stack:
        current = stack.pop()
        yield current
        if isinstance(current, ast.SubLink | ast.RangeSubselect):
            continue
        stack.extend(children(current))


def is_row_independent(expr: ast.Node | None) -> bool:
    """True when `expr` has the same value for every row: literals, casts and functions of literals,
    uncorrelated subqueries. Column references, parameters ($n) and aggregates make it row-dependent.
    """
    stack: list[ast.Node] = [expr] if expr is not None else []
    while stack:
        node = stack.pop()
        if isinstance(node, ast.ColumnRef | ast.ParamRef | ast.GroupingFunc):
            return False
        if isinstance(node, ast.FuncCall):
            if node.agg_star or node.agg_distinct or node.over is not None or node.agg_filter is not None:
                return False
            if function_name(node) in AGGREGATES:
                return False
        if isinstance(node, ast.SubLink):
            if node.testexpr is not None:
                stack.append(node.testexpr)
            if isinstance(node.subselect, ast.SelectStmt) and references_outer_row(node.subselect):
                return False
            continue
        stack.extend(children(node))
    return True
