"""Rule `time-based-probe`: statements whose only purpose is to take time (time-based blind injection).

Caught (application roles): `pg_sleep(5)`, `pg_sleep_for('5 s')`, `pg_sleep_until(...)` anywhere,
`generate_series(1, 5000000)` spanning more than 100,000 values given as literals (the heavy-query
probe), `repeat('x', 10000000)` longer than 1,000,000 characters.
For every role (people included) the same calls, products and recursions are caught inside a
condition, a sort key or LIMIT/OFFSET of a statement over user tables: `ORDER BY (SELECT 1 FROM
pg_sleep(5))`, `WHERE name = 'x' || (SELECT '' FROM pg_sleep(5)) || ''`, `LIMIT (SELECT 20 FROM
pg_sleep(5))`, and in a statement stacked after such a statement in one query (`... ORDER BY price;
SELECT pg_sleep(5)`).
Let through: `generate_series` over small ranges, dates or columns; `repeat` of short strings. Roles
that are not applications may sleep elsewhere (people test timeouts and cancellation with
`SELECT pg_sleep(5)` or `SELECT *, pg_sleep(0.1) FROM t`).

The outcome depends on literal values (the size of a series), so verdicts from this rule must not
be shared between statements that differ only in literals.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

from pglast import ast
from pglast.enums import A_Expr_Kind

from proxy.firewall.facts import DatabaseFacts
from proxy.firewall.positions import placed_statements, reads_user_relation
from proxy.firewall.statement import Finding, SubmittedSql, quote
from proxy.firewall.tree import function_name, operator_name, walk
from proxy.policy.model import Role

RULE = "time-based-probe"

SLEEP_FUNCTIONS = frozenset({"pg_sleep", "pg_sleep_for", "pg_sleep_until"})
MAX_SERIES_SPAN = 100_000
MAX_REPEAT_COUNT = 1_000_000
_MAYBE_HEAVY = SLEEP_FUNCTIONS | {"generate_series", "array_fill", "unnest", "repeat", "lpad", "rpad"}


def find_time_based_probe(submitted: SubmittedSql, role: Role, facts: DatabaseFacts) -> Finding | None:
    if not role.application:
        return _probe_in_position(submitted)
    common_tables = {str(node.ctename).lower(): node for node in submitted.nodes
                     if isinstance(node, ast.CommonTableExpr) and node.ctename}
    for node in submitted.nodes:
        if isinstance(node, ast.FuncCall):
            finding = _heavy_call(node)
        elif isinstance(node, ast.SelectStmt):
            finding = _heavy_product(node, common_tables)
        elif isinstance(node, ast.WithClause) and node.recursive:
            finding = _long_recursion(node)
        else:
            continue
        if finding is not None:
            return finding
    return None


def _probe_in_position(submitted: SubmittedSql) -> Finding | None:
    """A sleep or heavy query where injected input lands (a condition, a sort key, LIMIT/OFFSET) of a
    statement over user tables, or in a statement stacked after one: there it delays the page, which
    is all a time-based probe needs (psql sends a script's statements one query at a time)."""
    calls = (node for node in submitted.nodes_of(ast.FuncCall) if isinstance(node, ast.FuncCall))
    recursions = (node for node in submitted.nodes_of(ast.WithClause)
                  if isinstance(node, ast.WithClause) and node.recursive)
    if not any(function_name(call) in _MAYBE_HEAVY for call in calls) and next(recursions, None) is None:
        return None
    if not reads_user_relation(submitted):
        return None  # the common case: nothing to place, no second walk
    common_tables = {str(node.ctename).lower(): node for node in submitted.nodes_of(ast.CommonTableExpr)
                     if isinstance(node, ast.CommonTableExpr) and node.ctename}
    statements = placed_statements(submitted)
    over_user_data = any(statement.reads_user_relation for statement in statements)
    for statement in statements:
        if not statement.reads_user_relation:
            if over_user_data:  # `...; SELECT pg_sleep(5)` stacked after the application's query
                finding = next((found for node in statement.nodes
                                if (found := _heavy(node, common_tables)) is not None), None)
                if finding is not None:
                    return Finding(RULE, f"stacked after a query over user data: {finding.message}")
            continue
        for node, place in statement.placed:
            finding = _heavy(node, common_tables)
            if finding is not None:
                return Finding(RULE, f"in the {place}: {finding.message}")
    return None


def _heavy(node: ast.Node, common_tables: dict[str, ast.CommonTableExpr]) -> Finding | None:
    if isinstance(node, ast.FuncCall):
        return _heavy_call(node)
    if isinstance(node, ast.SelectStmt):
        return _heavy_product(node, common_tables)
    if isinstance(node, ast.WithClause) and node.recursive:
        return _long_recursion(node)
    return None


def _heavy_call(node: ast.FuncCall) -> Finding | None:
    name = function_name(node)
    arguments = list(node.args or ())
    if name in SLEEP_FUNCTIONS:
        return Finding(RULE, f"`{quote(node)}` only makes the query slow, the tool of time-based blind "
                             "injection; an application has no use for it")
    rows = rows_of(node)
    if rows is not None and rows > MAX_SERIES_SPAN:
        return Finding(RULE, f"`{quote(node)}` makes more than {MAX_SERIES_SPAN:,} rows or elements, the "
                             "heavy-query probe of time-based injection; generate a smaller series")
    if name in ("repeat", "lpad", "rpad") and len(arguments) >= 2:
        count = constant_number(arguments[1])
        if count is not None and count > MAX_REPEAT_COUNT:
            return Finding(RULE, f"`{quote(node)}` builds a string of more than {MAX_REPEAT_COUNT:,} "
                                 "characters or copies, the heavy-query probe of time-based injection")
    return None


def _heavy_product(select: ast.SelectStmt, common_tables: dict[str, ast.CommonTableExpr]) -> Finding | None:
    """Row sources of one FROM clause multiply: two series of 99,999 rows make 10^10 combinations
    (series directly, in derived tables or in CTEs)."""
    sized = _sized_items(select.fromClause or (), common_tables, set())
    if len(sized) < 2 or math.prod(rows for rows, _ in sized) <= MAX_SERIES_SPAN:
        return None
    items = ", ".join(f"`{quote(node)}`" for _, node in sized)
    return Finding(RULE, f"the FROM clause combines {items} into more than {MAX_SERIES_SPAN:,} rows, the "
                         "heavy-query probe of time-based injection")


def _sized_items(items: Iterable[ast.Node], common_tables: dict[str, ast.CommonTableExpr],
                 seen: set[str]) -> list[tuple[float, ast.Node]]:
    """(rows, node) of the FROM items whose size is known from constants."""
    sized: list[tuple[float, ast.Node]] = []
    pending = list(items)
    while pending:
        item = pending.pop()
        rows: float | None = None
        if isinstance(item, ast.JoinExpr):
            pending.extend(side for side in (item.larg, item.rarg) if side is not None)
        elif isinstance(item, ast.RangeFunction):
            sized.extend((size, call) for call in _range_calls(item) if (size := rows_of(call)) is not None)
        elif isinstance(item, ast.RangeSubselect) and isinstance(item.subquery, ast.SelectStmt):
            rows = _select_rows(item.subquery, common_tables, seen)
        elif isinstance(item, ast.RangeVar) and item.schemaname is None:
            name = str(item.relname).lower()
            common = common_tables.get(name)
            if common is not None and name not in seen and isinstance(common.ctequery, ast.SelectStmt):
                rows = _select_rows(common.ctequery, common_tables, seen | {name})
        if rows is not None:
            sized.append((rows, item))
    return sized


def _select_rows(select: ast.SelectStmt, common_tables: dict[str, ast.CommonTableExpr],
                 seen: set[str]) -> float | None:
    """Rows a plain SELECT makes, from the known sizes of its FROM items and of set-returning calls in
    its select list (`SELECT generate_series(1, 99999)`), capped by a constant LIMIT."""
    if select.larg is not None:
        return None
    sizes = [rows for rows, _ in _sized_items(select.fromClause or (), common_tables, seen)]
    listed = [rows for target in select.targetList or () if isinstance(target, ast.ResTarget)
              and isinstance(target.val, ast.FuncCall) and (rows := rows_of(target.val)) is not None]
    if not sizes and not listed:
        return None
    rows = math.prod(sizes) * max(listed, default=1.0)
    limit = constant_number(select.limitCount) if select.limitCount is not None else None
    return min(rows, limit) if limit is not None else rows


def _long_recursion(with_clause: ast.WithClause) -> Finding | None:
    """`WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 100000000)`: a
    recursive term bounded by a constant beyond the series limit."""
    for common in with_clause.ctes or ():
        if not isinstance(common, ast.CommonTableExpr) or not isinstance(common.ctequery, ast.SelectStmt):
            continue
        recursive = common.ctequery.rarg
        if recursive is None or recursive.whereClause is None:
            continue
        for node in walk(recursive.whereClause):
            if isinstance(node, ast.A_Expr) and isinstance(node.rexpr, ast.Node) and node.lexpr is not None:
                bound = max((abs(number) for side in (node.lexpr, node.rexpr)
                             if (number := constant_number(side)) is not None), default=0.0)
                if bound > MAX_SERIES_SPAN:
                    return Finding(RULE, f"the recursive query `{quote(common)}` runs up to `{quote(node)}`, "
                                         f"more than {MAX_SERIES_SPAN:,} steps: the heavy-query probe of "
                                         "time-based injection")
    return None


def _range_calls(item: ast.RangeFunction) -> list[ast.FuncCall]:
    """The calls of a FROM-clause function item (`f(...)` or `ROWS FROM (f(...), g(...))`)."""
    entries = [entry if isinstance(entry, tuple | list) else (entry,) for entry in item.functions or ()]
    return [node for entry in entries for node in entry if isinstance(node, ast.FuncCall)]


def rows_of(call: ast.FuncCall) -> float | None:
    """How many rows or elements a call makes, when its arguments are constants: `generate_series`
    (integer bounds and step), `array_fill` (dimensions), `unnest` of those or of an ARRAY[...]."""
    name = function_name(call)
    arguments = list(call.args or ())
    if name == "generate_series" and len(arguments) >= 2:
        start, stop = constant_number(arguments[0]), constant_number(arguments[1])
        step = constant_number(arguments[2]) if len(arguments) >= 3 else 1.0
        if start is None or stop is None or step is None or step == 0:
            return None
        return abs(stop - start) / abs(step)
    if name == "array_fill" and len(arguments) >= 2:
        dimensions = _array_numbers(arguments[1])
        return math.prod(dimensions) if dimensions else None
    if name == "unnest" and len(arguments) == 1:
        argument = arguments[0]
        if isinstance(argument, ast.FuncCall):
            return rows_of(argument)
        if isinstance(argument, ast.A_ArrayExpr):
            return float(len(argument.elements or ()))
    return None


def _array_numbers(node: ast.Node) -> list[float] | None:
    """Numbers of `ARRAY[1000, 1000]` or `'{1000,1000}'` (possibly cast)."""
    if isinstance(node, ast.TypeCast) and node.arg is not None:
        return _array_numbers(node.arg)
    if isinstance(node, ast.A_ArrayExpr):
        numbers = [constant_number(element) for element in node.elements or ()]
        return None if any(number is None for number in numbers) else [n for n in numbers if n is not None]
    if isinstance(node, ast.A_Const) and isinstance(node.val, ast.String):
        text = str(node.val.sval).strip().strip("{}")
        try:
            return [float(part) for part in text.split(",")]
        except ValueError:
            return None
    return None


def constant_number(node: ast.Node | None) -> float | None:
    """The value of a numeric constant expression: literals, signs, casts and + - * / % ^ between
    them (`5000000`, `-5`, `5::bigint`, `50000 * 1000`, `10 ^ 9`); too large values are infinite."""
    if isinstance(node, ast.TypeCast):
        return constant_number(node.arg)
    if isinstance(node, ast.A_Const):
        if isinstance(node.val, ast.Integer):
            return float(node.val.ival or 0)
        if isinstance(node.val, ast.Float):
            return float(node.val.fval or 0)
        return None
    if not (isinstance(node, ast.A_Expr) and node.kind == A_Expr_Kind.AEXPR_OP
            and isinstance(node.rexpr, ast.Node)):
        return None
    right = constant_number(node.rexpr)
    operator = operator_name(node)
    if node.lexpr is None:
        return -right if right is not None and operator == "-" else right if operator == "+" else None
    left = constant_number(node.lexpr)
    if left is None or right is None:
        return None
    try:
        return _ARITHMETIC[operator](left, right) if operator in _ARITHMETIC else None
    except (OverflowError, ZeroDivisionError, ValueError):
        return math.inf if operator in ("*", "^") else None


_ARITHMETIC: dict[str, Callable[[float, float], float]] = {
    "+": lambda left, right: left + right,
    "-": lambda left, right: left - right,
    "*": lambda left, right: left * right,
    "/": lambda left, right: left / right,
    "%": lambda left, right: math.fmod(left, right),
    "^": lambda left, right: left ** right,
}
