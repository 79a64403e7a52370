"""Rule `inference-probe`: a subquery that tests a confidential or restricted column against a constant
(boolean-blind inference, one character or one bit per request).

An injected `AND starts_with((SELECT ssn FROM people WHERE id = 2), '1')` shows a row or not depending
on another customer's SSN; repeated with '2', '3', ... it reads the value without ever returning it.
Caught (application roles, columns of sensitivity `confidential` or `restricted` in the policy):
inside a subquery (scalar, EXISTS, IN, ANY, anywhere in the statement), a comparison, pattern match or
containment (`=`, `<`, LIKE, `~`, `^@`, `@>`, IN, BETWEEN, ...) between such a column (or an expression
of it, or a whole-row reference to its table) and a constant: `EXISTS (SELECT 1 FROM people p WHERE
substr(p.ssn, 1, 1) = '1')`, `id IN (SELECT id FROM people WHERE ssn LIKE '1%')`; and a subquery whose
result is such a column, compared with a constant or passed with one to a function that decides a
condition or an ordering (`(SELECT ssn ...) ^@ '1'`, `regexp_like((SELECT ssn ...), '^1')`,
`jsonb_path_exists((SELECT to_jsonb(p) FROM people p ...), '$.ssn ? (@ starts with "1")')`,
`CASE (SELECT ...) WHEN '1' THEN ...`, `'1' = ANY (SELECT substr(ssn, 1, 1) ...)`); the same through
a user function whose body reads such a table, and through the names derived tables and CTEs give
the column (`(SELECT ssn AS x FROM people) t ... t.x LIKE '1%'`).
Let through: the same tests with a parameter (`WHERE email = $1`), tests in the query's own FROM
(the application's own filter), subqueries that return sensitive values without testing them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

from pglast import ast
from pglast.enums import A_Expr_Kind, SubLinkType

from proxy.firewall.facts import DatabaseFacts
from proxy.firewall.statement import Finding, SubmittedSql, quote
from proxy.firewall.tree import (
    children,
    function_name,
    is_row_independent,
    operator_name,
    select_leaves,
)
from proxy.policy.model import Role

RULE = "inference-probe"

# Operators that compute a value rather than test one (their result is tested further up).
_ARITHMETIC = frozenset({"+", "-", "*", "/", "%", "^", "||", "|/", "||/", "@", "&", "|", "#", "<<", ">>"})
_TESTED_SUBLINKS = frozenset({SubLinkType.ANY_SUBLINK, SubLinkType.ALL_SUBLINK})


@dataclass(frozen=True, slots=True)
class _Scope:
    """Sensitive column names and the names of row sources holding them, visible inside a subquery."""

    columns: frozenset[str]
    sources: frozenset[str]


def find_inference_probe(submitted: SubmittedSql, role: Role, facts: DatabaseFacts) -> Finding | None:
    if not role.application or not facts.knows_sensitive_columns or not _may_read_sensitive(submitted, facts):
        return None
    probe = SensitiveReads(submitted, facts)
    for raw in submitted.statements:
        found = probe.search(raw.stmt, None) if raw.stmt is not None else None
        if found is not None:
            node, column = found
            return Finding(
                RULE,
                f"`{quote(node)}` tests {column} (confidential or restricted in the policy) from a subquery "
                "against a constant: a blind-inference probe that reads the value one guess at a time; "
                "pass compared values as parameters ($1) instead of literals",
            )
    return None


def _may_read_sensitive(submitted: SubmittedSql, facts: DatabaseFacts) -> bool:
    """Only subqueries and user functions read another table's columns inside an expression."""
    return any(isinstance(node, ast.SubLink)
               or (isinstance(node, ast.FuncCall) and facts.function_reads_sensitive(node) is not None)
               for node in submitted.nodes)


def _decision_positions(submitted: SubmittedSql) -> set[int]:
    """ids of expressions whose value decides a condition or an ordering (WHERE, ON, HAVING, FILTER,
    CASE WHEN, AND/OR/NOT operands, IS [NOT] TRUE/NULL, ORDER BY items)."""
    positions: set[int] = set()
    for node in submitted.nodes:
        if not isinstance(node, _DECIDING_NODES):
            continue
        deciding: list[object] = [getattr(node, name, None) for name in _DECIDING_SLOTS]
        if isinstance(node, ast.CaseWhen):
            deciding.append(node.expr)
        elif isinstance(node, ast.BooleanTest | ast.NullTest):
            deciding.append(node.arg)
        elif isinstance(node, ast.SortBy):
            deciding.append(node.node)
        elif isinstance(node, ast.BoolExpr):
            deciding.extend(node.args or ())
        positions.update(id(value) for value in deciding if isinstance(value, ast.Node))
    return positions


_DECIDING_SLOTS = ("whereClause", "havingClause", "quals", "agg_filter")
_DECIDING_NODES = (ast.SelectStmt, ast.UpdateStmt, ast.DeleteStmt, ast.JoinExpr, ast.FuncCall,
                   ast.CaseWhen, ast.BooleanTest, ast.NullTest, ast.SortBy, ast.BoolExpr, ast.MergeStmt,
                   ast.MergeWhenClause)


def _common_tables(submitted: SubmittedSql) -> dict[str, ast.Node]:
    """WITH queries by name (a subquery reading a CTE reads what the CTE reads)."""
    return {str(node.ctename).lower(): node.ctequery for node in submitted.nodes
            if isinstance(node, ast.CommonTableExpr) and node.ctename and node.ctequery is not None}


class SensitiveReads:
    """Which confidential or restricted columns the expressions of one submission read."""

    def __init__(self, submitted: SubmittedSql, facts: DatabaseFacts) -> None:
        self.submitted = submitted
        self.facts = facts
        self.common_tables = _common_tables(submitted)
        self.common_table_nodes: dict[str, list[ast.CommonTableExpr]] = {}
        for node in submitted.nodes_of(ast.CommonTableExpr):
            if isinstance(node, ast.CommonTableExpr) and node.ctename:
                self.common_table_nodes.setdefault(str(node.ctename).lower(), []).append(node)
        self.own_names: dict[int, tuple[frozenset[str], frozenset[str]]] = {}
        self.outputs: dict[tuple[int, _Scope], str | None] = {}

    @cached_property
    def decisions(self) -> set[int]:
        return _decision_positions(self.submitted)

    def search(self, node: ast.Node, scope: _Scope | None) -> tuple[ast.Node, str] | None:
        """The first test of a sensitive value against a constant under `node`, with the column."""
        stack: list[tuple[ast.Node, _Scope | None]] = [(node, scope)]
        while stack:
            current, current_scope = stack.pop()
            column = self._tested(current, current_scope)
            if column is not None:
                return current, column
            if isinstance(current, ast.SubLink) and isinstance(current.subselect, ast.SelectStmt):
                if current.testexpr is not None:
                    stack.append((current.testexpr, current_scope))
                stack.append((current.subselect, self.scope_of(current.subselect, current_scope)))
                continue
            stack.extend((child, current_scope) for child in children(current))
        return None

    def scope_of(self, select: ast.SelectStmt, outer: _Scope | None) -> _Scope:
        """Sensitive names a SELECT's own tables (and CTEs) bring into scope, plus the enclosing ones."""
        own = self.own_names.get(id(select))
        if own is None:
            relations, common = self._relations(select)
            columns, sources = self.facts.sensitive_names(relations)
            if columns:
                own = self._renamed(select, common, _Scope(columns, sources | common))
            else:
                own = (columns, sources)
            self.own_names[id(select)] = own
        columns, sources = own
        if outer is not None:
            columns, sources = columns | outer.columns, sources | outer.sources
        return _Scope(columns, sources)

    def _renamed(self, select: ast.SelectStmt, common: set[str], scope: _Scope,
                 ) -> tuple[frozenset[str], frozenset[str]]:
        """Add the names derived tables and CTEs give sensitive values (`(SELECT ssn AS x ...) t`:
        `x`, and `t` as a row source), innermost first."""
        columns, sources = set(scope.columns), set(scope.sources)
        derived: list[tuple[ast.Node, str, tuple[str, ...]]] = []
        for node in _own_level(select):
            if isinstance(node, ast.RangeSubselect) and node.subquery is not None and node.alias is not None:
                derived.append((node.subquery, str(node.alias.aliasname),
                                tuple(str(name.sval) for name in node.alias.colnames or ()
                                      if isinstance(name, ast.String))))
        for name in common:
            for node in self.common_table_nodes.get(name, ()):
                renames = tuple(str(column.sval) for column in node.aliascolnames or ()
                                if isinstance(column, ast.String))
                if node.ctequery is not None:
                    derived.append((node.ctequery, name, renames))
        for query, alias, renames in reversed(derived):
            if not isinstance(query, ast.SelectStmt):
                continue
            current = _Scope(frozenset(columns), frozenset(sources))
            for leaf in select_leaves(query):
                for position, target in enumerate(leaf.targetList or ()):
                    if not isinstance(target, ast.ResTarget) or target.val is None:
                        continue
                    if self.reads(target.val, current):
                        columns.add(renames[position] if position < len(renames) else _output_name(target))
                        sources.add(alias.lower())
        columns.discard("")
        return frozenset(columns), frozenset(sources)

    def _relations(self, select: ast.Node) -> tuple[list[ast.RangeVar], set[str]]:
        """Tables a subquery reads, through the CTEs it names, and the names of those CTEs."""
        found: list[ast.RangeVar] = []
        pending, common = [select], set()
        while pending:
            for relation in _own_relations(pending.pop()):
                name = str(relation.relname).lower()
                query = self.common_tables.get(name) if relation.schemaname is None else None
                if query is None:
                    found.append(relation)
                elif name not in common:
                    common.add(name)
                    pending.append(query)
        return found, common

    def _tested(self, node: ast.Node, scope: _Scope | None) -> str | None:
        """The sensitive column `node` tests against a constant, if it is such a test."""
        operands: list[ast.Node] = []
        if isinstance(node, ast.A_Expr):
            if node.kind == A_Expr_Kind.AEXPR_OP and operator_name(node) in _ARITHMETIC:
                return None
            operands = [node.lexpr] if node.lexpr is not None else []
            if isinstance(node.rexpr, tuple | list):
                operands.extend(node.rexpr)
            elif isinstance(node.rexpr, ast.Node):
                operands.append(node.rexpr)
        elif isinstance(node, ast.FuncCall) and id(node) in self.decisions:
            operands = list(node.args or ())
        elif isinstance(node, ast.CaseExpr) and node.arg is not None:
            operands = [node.arg, *(when.expr for when in node.args or ()
                                    if isinstance(when, ast.CaseWhen) and when.expr is not None)]
        elif (isinstance(node, ast.SubLink) and node.subLinkType in _TESTED_SUBLINKS
              and node.testexpr is not None and isinstance(node.subselect, ast.SelectStmt)):
            inner = self.scope_of(node.subselect, scope)
            output = self.output_reads(node.subselect, inner)
            return output if output is not None and _constant(node.testexpr) else None
        if len(operands) < 2:
            return None
        for index, operand in enumerate(operands):
            column = self._reads(operand, scope)
            if column is not None and any(_constant(other) for other_index, other in enumerate(operands)
                                          if other_index != index):
                return column
        return None

    def _reads(self, expr: ast.Node, scope: _Scope | None) -> str | None:
        return next(iter(self.reads(expr, scope)), None)

    def reads(self, expr: ast.Node, scope: _Scope | None) -> list[str]:
        """Sensitive columns an expression reads: in a subquery's scope by name (or a whole-row
        reference to a table that has one), through a user function, or as the result of a scalar
        or array subquery."""
        found: list[str] = []
        stack = [expr]
        while stack:
            node = stack.pop()
            if isinstance(node, ast.ColumnRef) and scope is not None:
                column = _column_in(node, scope)
                if column is not None:
                    found.append(column)
            if isinstance(node, ast.FuncCall):
                column = self.facts.function_reads_sensitive(node)
                if column is not None:
                    found.append(column)
            if isinstance(node, ast.SubLink):
                if (node.subLinkType in (SubLinkType.EXPR_SUBLINK, SubLinkType.ARRAY_SUBLINK)
                        and isinstance(node.subselect, ast.SelectStmt)):
                    column = self.output_reads(node.subselect, self.scope_of(node.subselect, scope))
                    if column is not None:
                        found.append(column)
                continue
            stack.extend(children(node))
        return found

    def output_reads(self, select: ast.SelectStmt, scope: _Scope) -> str | None:
        """The sensitive column a subquery returns, if it returns one (memoised: subqueries nest)."""
        key = (id(select), scope)
        if key not in self.outputs:
            self.outputs[key] = self._output_reads(select, scope)
        return self.outputs[key]

    def _output_reads(self, select: ast.SelectStmt, scope: _Scope) -> str | None:
        for leaf in select_leaves(select):
            for target in leaf.targetList or ():
                if isinstance(target, ast.ResTarget) and target.val is not None:
                    column = self._reads(target.val, scope)
                    if column is not None:
                        return column
        return None


def _column_in(node: ast.ColumnRef, scope: _Scope) -> str | None:
    fields = node.fields or ()
    names = [str(part.sval).lower() for part in fields if isinstance(part, ast.String)]
    if fields and isinstance(fields[-1], ast.A_Star):
        if not names and scope.columns:
            return "every column (*)"
        return f"{names[-1]}.*" if names and names[-1] in scope.sources else None
    if not names:
        return None
    if names[-1] in scope.columns:
        return names[-1]
    return f"the row {names[0]}" if len(names) == 1 and names[0] in scope.sources else None


def _constant(node: ast.Node) -> bool:
    """A value that is the same for every row: a literal, a function of literals, `(SELECT '1')`."""
    return is_row_independent(node)


def _output_name(target: ast.ResTarget) -> str:
    """The column name a select-list item gets: its alias, else the column it reads, else ''."""
    if target.name:
        return str(target.name).lower()
    if isinstance(target.val, ast.ColumnRef) and target.val.fields:
        last = target.val.fields[-1]
        return str(last.sval).lower() if isinstance(last, ast.String) else ""
    if isinstance(target.val, ast.FuncCall):
        return function_name(target.val)
    return ""


def _own_level(select: ast.Node) -> Iterator[ast.Node]:
    """Nodes of a query without those of the subqueries (SubLinks) in its expressions: they bring
    their own tables into scope when they are reached, so each level is read once."""
    stack = [select]
    while stack:
        node = stack.pop()
        yield node
        if node is not select and isinstance(node, ast.SubLink):
            continue
        stack.extend(children(node))


def _own_relations(select: ast.Node) -> Iterator[ast.RangeVar]:
    return (node for node in _own_level(select) if isinstance(node, ast.RangeVar))
