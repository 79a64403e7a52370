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
Also caught: in a condition of a statement over user tables, a CASE whose choice a computed value,
the same for every row, makes (`id = 42 + CASE WHEN starts_with(current_user, 'p') THEN 1/0 ELSE 0
END`); CASE on columns or parameters passes.

The outcome depends on literal values (`1=1` is the idiom, `2=2` is not), so verdicts from this
rule must not be shared between statements that differ only in literals.
"""

from __future__ import annotations

from dataclasses import dataclass

from pglast import ast
from pglast.enums import A_Expr_Kind, BoolExprType, JoinType, NullTestType

from proxy.firewall.facts import DatabaseFacts
from proxy.firewall.positions import placed_statements, reads_user_relation
from proxy.firewall.sort_key import case_conditions, is_fixed_and_computed
from proxy.firewall.statement import Finding, SubmittedSql, quote
from proxy.firewall.timing import constant_number
from proxy.firewall.tree import (
    function_name,
    is_comparison,
    is_row_independent,
    operator_name,
    type_name,
    walk,
)
from proxy.policy.model import Role

RULE = "tautology"


def find_tautology(submitted: SubmittedSql, role: Role, facts: DatabaseFacts) -> Finding | None:
    idioms = _builder_idioms(submitted)
    for node in submitted.nodes:
        if id(node) in idioms:
            continue
        if isinstance(node, ast.A_Expr) and _is_test(node) and _compares_constants(node):
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
            if either:
                finding = _always_true_branch(node) or _widening_branch(node)
                if finding is not None:
                    return finding
    return _not_null_branch(submitted, facts) or _fixed_case_in_condition(submitted, facts)


def _fixed_case_in_condition(submitted: SubmittedSql, facts: DatabaseFacts) -> Finding | None:
    """A CASE in a condition of a statement over user tables whose choice a computed value, the same
    for every row, makes (`id = 42 + CASE WHEN starts_with(current_user, 'p') THEN 1/0 ELSE 0 END`):
    a blind probe answering through an error, the time taken or the rows."""
    fixed = {id(case) for case in submitted.nodes_of(ast.CaseExpr) if isinstance(case, ast.CaseExpr)
             and any(is_fixed_and_computed(test, facts) for test in case_conditions(case))}
    if not fixed or not reads_user_relation(submitted):
        return None  # the common case: CASE on columns (TPC-H), no second walk
    for statement in placed_statements(submitted):
        for node, place in statement.placed:
            if place != "condition" or id(node) not in fixed or not isinstance(node, ast.CaseExpr):
                continue
            test = next((test for test in case_conditions(node) if is_fixed_and_computed(test, facts)),
                        None)
            if test is not None:
                return Finding(RULE, f"the CASE in the condition is chosen by `{quote(test)}`, which is the "
                                     "same for every row (an injected blind probe); choose with a parameter")
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
    """`name = name`, `id >= id`, `x LIKE x`, `id = id + 0`, `id < id + 1`: pglast nodes compare equal
    without their locations; adding or subtracting a constant leaves the outcome fixed."""
    if node.lexpr is None or not isinstance(node.rexpr, ast.Node):
        return False
    if node.kind == A_Expr_Kind.AEXPR_OP:
        if operator_name(node) not in _SELF_COMPARISONS:
            return False
        return bool(_shifted(node.lexpr) == _shifted(node.rexpr))
    if node.kind not in _SELF_KINDS:
        return False
    return bool(node.lexpr == node.rexpr)


def _shifted(node: ast.Node) -> ast.Node:
    """The expression under `+ c`, `- c`, `c +` (numeric constants c), `* 1`, `1 *` and `/ 1`."""
    while isinstance(node, ast.A_Expr) and node.kind == A_Expr_Kind.AEXPR_OP:
        operator, left, right = operator_name(node), node.lexpr, node.rexpr
        if left is None or not isinstance(right, ast.Node):
            break
        if operator in ("+", "-") and constant_number(right) is not None:
            node = left
        elif operator == "+" and constant_number(left) is not None:
            node = right
        elif operator in ("*", "/") and constant_number(right) == 1:
            node = left
        elif operator == "*" and constant_number(left) == 1:
            node = right
        else:
            break
    return node


# Operators that test containment or a match (both sides constant: a constant outcome, like `=`).
_TEST_OPERATORS = frozenset({"@>", "<@", "&&", "^@", "@?", "@@", "?", "?|", "?&"})


def _is_test(node: ast.A_Expr) -> bool:
    if is_comparison(node):
        return True
    return (node.kind == A_Expr_Kind.AEXPR_OP and node.lexpr is not None
            and operator_name(node) in _TEST_OPERATORS)


def _is_constant_condition(node: ast.Node) -> bool:
    """An OR operand that reads no row and takes no parameter: `TRUE`, `NOT false`, `'t'::boolean`,
    `pg_sleep(5) IS NOT NULL`, `(SELECT true)`, uncorrelated subqueries (`EXISTS (SELECT 1 FROM t)`,
    `1 IN (SELECT 1 FROM t)`, `(SELECT true FROM t LIMIT 1)`): the same for every row. A parameter
    makes it the application's switch (`OR EXISTS (SELECT 1 FROM admins WHERE name = $1)`); under
    AND only bare booleans count (psql filters with `AND pg_relation_is_publishable('1259')`)."""
    if _is_bare_boolean(node):
        return True
    if isinstance(node, ast.A_Const | ast.A_Expr):
        return False  # literals of other types are type errors; comparisons are checked above
    return is_row_independent(node) and not any(isinstance(inner, ast.ParamRef) for inner in walk(node))


def _is_bare_boolean(node: ast.Node) -> bool:
    """A boolean that involves no comparison and no row: `TRUE`, `NOT FALSE`, `'t'::boolean`, `'t'`."""
    if isinstance(node, ast.BoolExpr) and node.boolop == BoolExprType.NOT_EXPR and node.args:
        return _is_bare_boolean(node.args[0])
    if isinstance(node, ast.A_Const):  # an untyped 't' is read as a boolean here
        return isinstance(node.val, ast.Boolean | ast.String)
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


def _always_true_branch(disjunction: ast.BoolExpr) -> Finding | None:
    """OR operands that hold for every row whatever its values: a pattern that matches every string
    (`LIKE '%'`, `~ ''`, `~ '.*'`), `x IS NULL OR x IS NOT NULL`."""
    null_tests: dict[tuple[tuple[str, ...], bool], ast.Node] = {}
    for operand in disjunction.args or ():
        if _matches_everything(operand):
            return Finding(
                RULE,
                f"`OR {quote(operand)}` holds for every row (an injected tautology); remove the operand",
            )
        tested = _null_test(operand)
        if tested is not None:
            opposite = null_tests.get((tested[0], not tested[1]))
            if opposite is not None:
                return Finding(RULE, f"`{quote(opposite)} OR {quote(operand)}` holds for every row (an "
                                     "injected tautology); remove the operand")
            null_tests[tested] = operand
    return None


def _null_test(node: ast.Node) -> tuple[tuple[str, ...], bool] | None:
    """(column key, tests for NULL) of `x IS NULL`, `x IS NOT NULL`, `NOT (x IS NULL)`."""
    negated = False
    if isinstance(node, ast.BoolExpr) and node.boolop == BoolExprType.NOT_EXPR and node.args:
        node, negated = node.args[0], True
    if not isinstance(node, ast.NullTest) or node.arg is None:
        return None
    key = _column_key(node.arg)
    if key is None:
        return None
    return key, (node.nulltesttype == NullTestType.IS_NULL) != negated


_MATCH_ALL_REGEXES = frozenset({"", ".*", "^", "$", "^.*", ".*$", "^.*$"})


def _matches_everything(node: ast.Node) -> bool:
    if not isinstance(node, ast.A_Expr) or not isinstance(node.rexpr, ast.Node):
        return False
    pattern = _string_value(node.rexpr)
    if pattern is None:
        return False
    if node.kind in (A_Expr_Kind.AEXPR_LIKE, A_Expr_Kind.AEXPR_ILIKE):
        return operator_name(node) in ("~~", "~~*") and bool(pattern) and set(pattern) == {"%"}
    if node.kind == A_Expr_Kind.AEXPR_SIMILAR:
        return operator_name(node) == "~" and pattern in ("%", ".*", "%*")
    return (node.kind == A_Expr_Kind.AEXPR_OP and operator_name(node) in ("~", "~*")
            and pattern in _MATCH_ALL_REGEXES)


def _string_value(node: ast.Node) -> str | None:
    if isinstance(node, ast.TypeCast) and node.arg is not None:
        return _string_value(node.arg)
    if isinstance(node, ast.FuncCall) and function_name(node) == "similar_to_escape" and node.args:
        return _string_value(node.args[0])  # how pglast writes SIMILAR TO's pattern
    if isinstance(node, ast.A_Const) and isinstance(node.val, ast.String):
        return str(node.val.sval)
    return None


def _widening_branch(disjunction: ast.BoolExpr) -> Finding | None:
    """`id = 10 OR id > -1`: an OR operand that includes another one on the same column, so the OR
    only widens the condition (an injected tautology that reads a column). Linear in the operands:
    long `id = 1 OR id = 2 OR ...` chains are ordinary and must stay cheap to judge."""
    by_column: dict[tuple[str, ...], dict[tuple[str, float | str], ast.Node]] = {}
    for operand in disjunction.args or ():
        found = _range_of(operand)
        if found is not None:
            by_column.setdefault(found[0], {}).setdefault((found[1].op, found[1].value), operand)
    for key, sets in by_column.items():
        entries = [(_ValueSet(op, value), node) for (op, value), node in sets.items()]
        if key[0] in _NON_NEGATIVE:
            always = next((node for value_set, node in entries if _NOT_NEGATIVE.within(value_set)), None)
            if always is not None:
                return Finding(RULE, f"`OR {quote(always)}` holds for every row ({key[0]}() is never "
                                     "negative): an injected tautology; remove the operand")
        pair = _included_pair(entries)
        if pair is not None:
            narrow, wide = pair
            return Finding(
                RULE,
                f"`OR {quote(wide)}` already includes `{quote(narrow)}`, so it only widens the condition "
                "(an injected tautology); remove the operand",
            )
        pair = _covering_pair(entries)
        if pair is not None:
            return Finding(
                RULE,
                f"`{quote(pair[0])} OR {quote(pair[1])}` holds for every value of the column (an injected "
                "tautology); remove the operand",
            )
    return None


# Functions whose value is never negative, and the set of values they can take.
_NON_NEGATIVE = frozenset({"length", "char_length", "character_length", "octet_length", "bit_length", "abs"})


def _covering_pair(sets: list[tuple[_ValueSet, ast.Node]]) -> tuple[ast.Node, ast.Node] | None:
    """Two operands that together let every value through: `x = 1 OR x <> 1`, `x <> 1 OR x <> 2`,
    `x < 5 OR x >= 5`, `x <> 5 OR x > 3` (called when no operand includes another)."""
    equal = {value_set.value: node for value_set, node in sets if value_set.op == "="}
    unequal = [(value_set, node) for value_set, node in sets if value_set.op == "<>"]
    rays = [(value_set, node) for value_set, node in sets if value_set.op not in ("=", "<>")]
    if len(unequal) >= 2:
        return unequal[0][1], unequal[1][1]
    for value_set, node in unequal:
        if value_set.value in equal:
            return equal[value_set.value], node
        for ray, ray_node in rays:
            if ray.holds(value_set.value):
                return node, ray_node
    upward = [entry for entry in rays if entry[0].op in (">", ">=")]
    downward = [entry for entry in rays if entry[0].op in ("<", "<=")]
    for low, low_node in upward:
        for high, high_node in downward:
            meet = high.value == low.value and (low.op == ">=" or high.op == "<=")
            if meet or (high.holds(low.value) and high.value != low.value):
                return high_node, low_node
    return None


def _included_pair(sets: list[tuple[_ValueSet, ast.Node]]) -> tuple[ast.Node, ast.Node] | None:
    """(narrow, wide) operands of distinct value sets where the first is included in the second."""
    rays: dict[bool, tuple[_ValueSet, ast.Node]] = {}
    unequal: list[tuple[_ValueSet, ast.Node]] = []
    for entry in sets:
        value_set, node = entry
        if value_set.op == "<>":
            unequal.append(entry)
        elif value_set.op != "=":
            upward = value_set.op in (">", ">=")
            other = rays.get(upward)
            if other is not None:  # two rays in one direction: one includes the other
                return (node, other[1]) if value_set.within(other[0]) else (other[1], node)
            rays[upward] = entry
    for value_set, node in sets:
        if value_set.op != "=":
            continue
        for ray, ray_node in rays.values():
            if value_set.within(ray):
                return node, ray_node
        wider = next((entry for entry in unequal if entry[0].value != value_set.value), None)
        if wider is not None:
            return node, wider[1]
    for ray, ray_node in rays.values():
        for value_set, node in unequal:
            if ray.within(value_set):
                return ray_node, node
    return None


@dataclass(frozen=True, slots=True)
class _ValueSet:
    """The values a comparison with one constant lets through: `op` against `value`."""

    op: str  # one of = <> < <= > >=
    value: float | str

    def holds(self, value: float | str) -> bool:
        if self.op in ("=", "<>"):
            return (value == self.value) == (self.op == "=")
        if isinstance(value, str) or isinstance(self.value, str):
            return False
        return {"<": value < self.value, "<=": value <= self.value,
                ">": value > self.value, ">=": value >= self.value}[self.op]

    def within(self, other: _ValueSet) -> bool:
        """Is every value this set lets through let through by `other` too?"""
        if self.op == "=":
            return other.holds(self.value)
        if self.op == "<>":
            return other.op == "<>" and other.value == self.value
        if isinstance(self.value, str) or other.op in ("=",):
            return False
        if other.op == "<>":
            return not self.holds(other.value)
        if (self.op in ("<", "<=")) != (other.op in ("<", "<=")):
            return False
        if self.value == other.value:
            return self.op == other.op or len(other.op) == 2
        return other.holds(self.value)


_NOT_NEGATIVE = _ValueSet(">=", 0.0)
_FLIPPED = {"=": "=", "<>": "<>", "!=": "<>", "<": ">", "<=": ">=", ">": "<", ">=": "<="}


def _range_of(node: ast.Node) -> tuple[tuple[str, ...], _ValueSet] | None:
    """(column key, values) of `column <op> constant` or `constant <op> column` (a column possibly
    cast): numbers with = <> < <= > >=, strings with = and <> (their order depends on the collation)."""
    if not (isinstance(node, ast.A_Expr) and node.kind == A_Expr_Kind.AEXPR_OP and node.lexpr is not None
            and isinstance(node.rexpr, ast.Node) and operator_name(node) in _FLIPPED):
        return None
    op = operator_name(node)
    left, right = node.lexpr, node.rexpr
    if _literal(left) is not None and _literal(right) is None:
        left, right, op = right, left, _FLIPPED[op]
    key = _column_key(left)
    value = _literal(right)
    if key is None or value is None:
        return None
    op = "<>" if op == "!=" else op
    if isinstance(value, str) and op not in ("=", "<>"):
        return None
    return key, _ValueSet(op, value)


def _column_key(node: ast.Node) -> tuple[str, ...] | None:
    """`t.id` -> ('t', 'id'); `t.id::text` -> ('t', 'id', '::text'); `length(t.name)` ->
    ('length', 't', 'name'); other expressions: None."""
    if isinstance(node, ast.FuncCall) and function_name(node) in _NON_NEGATIVE and len(node.args or ()) == 1:
        inner = _column_key(node.args[0]) if node.args else None
        return None if inner is None else (function_name(node), *inner)
    if isinstance(node, ast.TypeCast) and node.arg is not None:
        inner = _column_key(node.arg)
        return None if inner is None else (*inner, f"::{type_name(node)}")
    if isinstance(node, ast.ColumnRef):
        names = tuple(str(part.sval) for part in node.fields or () if isinstance(part, ast.String))
        return names if names and len(names) == len(node.fields or ()) else None
    return None


def _literal(node: ast.Node) -> float | str | None:
    number = constant_number(node)
    if number is not None:
        return number
    return _string_value(node) if isinstance(node, ast.A_Const | ast.TypeCast) else None


def _not_null_branch(submitted: SubmittedSql, facts: DatabaseFacts) -> Finding | None:
    """`OR id IS NOT NULL` (or `OR NOT (id IS NULL)`) on a NOT NULL column of the query's own FROM."""
    for node in submitted.nodes:
        where = getattr(node, "whereClause", None)
        if not isinstance(where, ast.Node):
            continue
        disjunctions = [inner for inner in _boolean_tree(where)
                        if isinstance(inner, ast.BoolExpr) and inner.boolop == BoolExprType.OR_EXPR]
        if not disjunctions:
            continue
        required = _not_null_columns(node, facts)
        for disjunction in disjunctions:
            for operand in disjunction.args or ():
                column = _tested_not_null(operand)
                if column is not None and column in required:
                    return Finding(
                        RULE,
                        f"`OR {quote(operand)}` holds for every row: the column is NOT NULL (an injected "
                        "tautology); remove the operand",
                    )
    return None


def _boolean_tree(node: ast.Node) -> list[ast.Node]:
    """A condition and its AND/OR/NOT operands, recursively (not into subqueries)."""
    found = [node]
    if isinstance(node, ast.BoolExpr):
        for operand in node.args or ():
            found.extend(_boolean_tree(operand))
    return found


def _tested_not_null(node: ast.Node) -> tuple[str | None, str] | None:
    """(qualifier, column) of `col IS NOT NULL` or `NOT (col IS NULL)`."""
    if isinstance(node, ast.BoolExpr) and node.boolop == BoolExprType.NOT_EXPR and node.args:
        inner = node.args[0]
        if isinstance(inner, ast.NullTest) and inner.nulltesttype == NullTestType.IS_NULL:
            return _column_name(inner.arg)
        return None
    if isinstance(node, ast.NullTest) and node.nulltesttype == NullTestType.IS_NOT_NULL:
        return _column_name(node.arg)
    return None


def _column_name(node: ast.Node | None) -> tuple[str | None, str] | None:
    if not isinstance(node, ast.ColumnRef):
        return None
    names = [str(part.sval) for part in node.fields or () if isinstance(part, ast.String)]
    if len(names) != len(node.fields or ()) or not 1 <= len(names) <= 2:
        return None
    return (names[0] if len(names) == 2 else None), names[-1]


def _not_null_columns(statement: ast.Node, facts: DatabaseFacts) -> set[tuple[str | None, str]]:
    """(qualifier, column) and (None, column) of NOT NULL columns of relations in a statement's own
    FROM; nothing when an outer join may make them NULL or a name is ambiguous."""
    items: list[ast.Node] = list(getattr(statement, "fromClause", None) or ())
    relation = getattr(statement, "relation", None)
    if isinstance(relation, ast.RangeVar):
        items.append(relation)
    found: set[tuple[str | None, str]] = set()
    unqualified: dict[str, int] = {}
    while items:
        item = items.pop()
        if isinstance(item, ast.JoinExpr):
            if item.jointype != JoinType.JOIN_INNER:
                return set()
            items.extend(side for side in (item.larg, item.rarg) if side is not None)
        elif isinstance(item, ast.RangeVar):
            resolved = facts.relation(item)
            if resolved is None:
                continue
            name = str(item.alias.aliasname) if item.alias is not None else str(item.relname)
            for column in resolved.columns:
                unqualified[column.name] = unqualified.get(column.name, 0) + 1
                if column.not_null:
                    found.add((name, column.name))
    found.update((None, column) for qualifier, column in list(found) if unqualified.get(column) == 1)
    return found
