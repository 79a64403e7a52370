"""Rule `time-based-probe`: statements whose only purpose is to take time (time-based blind injection).

Caught (application roles): `pg_sleep(5)`, `pg_sleep_for('5 s')`, `pg_sleep_until(...)` anywhere,
`generate_series(1, 5000000)` spanning more than 100,000 values given as literals (the heavy-query
probe), `repeat('x', 10000000)` longer than 1,000,000 characters.
Let through: `generate_series` over small ranges, dates or columns; `repeat` of short strings. Roles
that are not applications may sleep (people test timeouts and cancellation with it).

The outcome depends on literal values (the size of a series), so verdicts from this rule must not
be shared between statements that differ only in literals.
"""

from __future__ import annotations

from pglast import ast

from proxy.firewall.statement import Finding, SubmittedSql, quote
from proxy.firewall.tree import function_name, operator_name
from proxy.policy.model import Role

RULE = "time-based-probe"

SLEEP_FUNCTIONS = frozenset({"pg_sleep", "pg_sleep_for", "pg_sleep_until"})
MAX_SERIES_SPAN = 100_000
MAX_REPEAT_COUNT = 1_000_000


def find_time_based_probe(submitted: SubmittedSql, role: Role) -> Finding | None:
    if not role.application:
        return None
    for node in submitted.nodes_of(ast.FuncCall):
        assert isinstance(node, ast.FuncCall)
        name = function_name(node)
        arguments = list(node.args or ())
        if name in SLEEP_FUNCTIONS:
            return Finding(RULE, f"`{quote(node)}` only makes the query slow, the tool of time-based blind "
                                 "injection; an application has no use for it")
        if name == "generate_series" and len(arguments) >= 2:
            start, stop = _number(arguments[0]), _number(arguments[1])
            if start is not None and stop is not None and abs(stop - start) > MAX_SERIES_SPAN:
                return Finding(RULE, f"`{quote(node)}` generates more than {MAX_SERIES_SPAN:,} rows, the "
                                     "heavy-query probe of time-based injection; generate a smaller series")
        if name == "repeat" and len(arguments) == 2:
            count = _number(arguments[1])
            if count is not None and count > MAX_REPEAT_COUNT:
                return Finding(RULE, f"`{quote(node)}` builds a string of more than {MAX_REPEAT_COUNT:,} "
                                     "copies, the heavy-query probe of time-based injection")
    return None


def _number(node: ast.Node | None) -> float | None:
    """The value of a numeric literal, possibly signed or cast (`5000000`, `-5`, `5::bigint`)."""
    if isinstance(node, ast.TypeCast):
        return _number(node.arg)
    if isinstance(node, ast.A_Const):
        if isinstance(node.val, ast.Integer):
            return float(node.val.ival or 0)
        if isinstance(node.val, ast.Float):
            return float(node.val.fval or 0)
    if isinstance(node, ast.A_Expr) and node.lexpr is None and isinstance(node.rexpr, ast.Node):
        value = _number(node.rexpr)
        return -value if value is not None and operator_name(node) == "-" else value
    return None
