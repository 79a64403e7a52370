"""Rule `tautology`: conditions that are the same for every row — injected tautologies and probes.

An injected `' OR 'a'='a`, `OR 5323=5323`, `AND 2>1` or `OR TRUE` compares constants with each
other, so the condition no longer depends on the row; blind injection pairs a true probe
(`5323=5323`) with a false one (`5323=5324`). Caught: any comparison (=, <>, <, >, LIKE, IN,
BETWEEN, IS DISTINCT FROM, `= ANY`) between row-independent values (literals, functions of
literals, uncorrelated subqueries such as `(SELECT 1234 FROM pg_sleep(5))`), anywhere in the
statement; comparisons of an expression with itself (`OR name = name`, `id <> id`); OR with an
operand that reads no row and no table (`OR TRUE`, `OR NOT false`, `OR pg_sleep(5) IS NOT NULL`,
`OR (SELECT true)`); AND with a boolean literal (`AND TRUE`).
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
from proxy.firewall.tree import is_comparison, is_row_independent, operator_name, type_name, walk
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
        if isinstance(node, ast.A_Expr) and _compares_with_itself(node):
            return Finding(
                RULE,
                f"the condition `{quote(node)}` compares an expression with itself, so it holds for every "
                "row or for none (an injected tautology); compare a column with a value or a parameter",
            )
        if isinstance(node, ast.BoolExpr) and node.boolop != BoolExprType.NOT_EXPR:
            either = node.boolop == BoolExprType.OR_EXPR
            for operand in node.args or ():
                constant = _is_constant_condition(operand) if either else _is_bare_boolean(operand)
                if constant and id(operand) not in idioms:
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


# Comparisons that are always true, or always false, when both sides are the same expression.
_SELF_COMPARISONS = frozenset({"=", "<>", "!=", "<", ">", "<=", ">=", "~~", "~~*", "!~~", "!~~*"})
_SELF_KINDS = frozenset({A_Expr_Kind.AEXPR_DISTINCT, A_Expr_Kind.AEXPR_NOT_DISTINCT, A_Expr_Kind.AEXPR_LIKE,
                         A_Expr_Kind.AEXPR_ILIKE})


def _compares_with_itself(node: ast.A_Expr) -> bool:
    """`name = name`, `id >= id`, `x LIKE x`: pglast nodes compare equal without their locations."""
    if node.lexpr is None or not isinstance(node.rexpr, ast.Node):
        return False
    if node.kind == A_Expr_Kind.AEXPR_OP:
        if operator_name(node) not in _SELF_COMPARISONS:
            return False
    elif node.kind not in _SELF_KINDS:
        return False
    return bool(node.lexpr == node.rexpr)


def _is_constant_condition(node: ast.Node) -> bool:
    """An OR operand that reads no row and no table: `TRUE`, `NOT false`, `'t'::boolean`,
    `pg_sleep(5) IS NOT NULL`, `(SELECT true)`. Subqueries that read tables are conditions on data
    (`OR EXISTS (SELECT 1 FROM admins WHERE ...)`) and are left alone; under AND only bare booleans
    count (psql filters with `AND pg_relation_is_publishable('1259')`)."""
    if _is_bare_boolean(node):
        return True
    if isinstance(node, ast.A_Const | ast.A_Expr):
        return False  # literals of other types are type errors; comparisons are checked above
    return is_row_independent(node) and not any(isinstance(inner, ast.RangeVar) for inner in walk(node))


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
