"""Rule `tautology`: conditions that are the same for every row — injected tautologies and probes.

An injected `' OR 'a'='a`, `OR 5323=5323`, `AND 2>1` or `OR TRUE` compares constants with each
other, so the condition no longer depends on the row; blind injection pairs a true probe
(`5323=5323`) with a false one (`5323=5324`). Caught: any comparison (=, <>, <, >, LIKE, IN,
BETWEEN, IS DISTINCT FROM, `= ANY`) between row-independent values (literals, functions of
literals, uncorrelated subqueries such as `(SELECT 1234 FROM pg_sleep(5))`), anywhere in the
statement, and AND/OR with a constant operand (`OR TRUE`, `OR NOT false`).
Let through: the query-builder idioms `WHERE 1=1 [AND ...]`, `WHERE 1=0`, `WHERE TRUE [AND ...]` (as
the WHERE clause or its first conjunct), comparisons with a column, a `$n` parameter or an aggregate
(`HAVING count(*) > 5`), correlated subqueries.

The outcome depends on literal values (`1=1` is the idiom, `2=2` is not), so verdicts from this
rule must not be shared between statements that differ only in literals.
"""

from __future__ import annotations

from pglast import ast
from pglast.enums import A_Expr_Kind, BoolExprType

from proxy.firewall.statement import Finding, SubmittedSql, quote
from proxy.firewall.tree import is_comparison, is_row_independent, operator_name, type_name
from proxy.policy.model import Role

RULE = "tautology"


def find_tautology(submitted: SubmittedSql, role: Role) -> Finding | None:
    idioms = _builder_idioms(submitted)
    for node in submitted.nodes:
        if id(node) in idioms:
            continue
        if isinstance(node, ast.A_Expr) and is_comparison(node) and _compares_constants(node):
            return Finding(
                RULE,
                f"the condition `{quote(node)}` compares constants, so it holds for every row or for "
                "none (an injected tautology or blind probe); compare a column with a value or a parameter",
            )
        if isinstance(node, ast.BoolExpr) and node.boolop != BoolExprType.NOT_EXPR:
            for operand in node.args or ():
                if _is_bare_boolean(operand) and id(operand) not in idioms:
                    word = "OR" if node.boolop == BoolExprType.OR_EXPR else "AND"
                    return Finding(
                        RULE,
                        f"`{word} {quote(operand)}` makes the condition the same for every row (an "
                        "injected tautology); remove the constant operand",
                    )
    return None


def _compares_constants(node: ast.A_Expr) -> bool:
    operands: list[ast.Node] = [node.lexpr] if node.lexpr is not None else []
    if isinstance(node.rexpr, tuple | list):
        operands.extend(node.rexpr)
    elif isinstance(node.rexpr, ast.Node):
        operands.append(node.rexpr)
    return bool(operands) and all(is_row_independent(operand) for operand in operands)


def _is_bare_boolean(node: ast.Node) -> bool:
    """A boolean that involves no comparison and no row: `TRUE`, `NOT FALSE`, `'t'::boolean`."""
    if isinstance(node, ast.BoolExpr) and node.boolop == BoolExprType.NOT_EXPR and node.args:
        return _is_bare_boolean(node.args[0])
    if isinstance(node, ast.A_Const):
        return isinstance(node.val, ast.Boolean)
    if isinstance(node, ast.TypeCast):
        return isinstance(node.arg, ast.A_Const) and "bool" in type_name(node)
    return False


def _builder_idioms(submitted: SubmittedSql) -> set[int]:
    """ids of `1=1`/`1=0`/`TRUE` nodes that are a WHERE clause or its first conjunct."""
    idioms: set[int] = set()
    for node in submitted.nodes:
        where = getattr(node, "whereClause", None)
        if where is not None:
            first = where
            if isinstance(where, ast.BoolExpr) and where.boolop == BoolExprType.AND_EXPR and where.args:
                first = where.args[0]
            if _is_one_equals_one_or_zero(first) or _is_bare_boolean(first):
                idioms.add(id(first))
    return idioms


def _is_one_equals_one_or_zero(node: ast.Node) -> bool:
    if not isinstance(node, ast.A_Expr) or node.kind != A_Expr_Kind.AEXPR_OP or operator_name(node) != "=":
        return False
    return _integer_value(node.lexpr) == 1 and _integer_value(node.rexpr) in (0, 1)


def _integer_value(node: object) -> int | None:
    if isinstance(node, ast.A_Const) and isinstance(node.val, ast.Integer):
        return int(node.val.ival or 0)
    return None
