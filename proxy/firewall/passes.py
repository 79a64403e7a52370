"""The firewall's rules as guard passes (`Rule = Callable[[GuardStatement, GuardContext], Refuse | None]`)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from functools import lru_cache

from pglast import ast
from pglast.enums import BoolExprType

from proxy.catalog import CatalogSnapshot
from proxy.firewall.facts import DatabaseFacts
from proxy.firewall.injection import screen_injection
from proxy.firewall.lineage import LineageAnalysis
from proxy.firewall.sensitive import (
    SensitiveColumns,
    find_join_on_sensitive_key,
    find_quasi_identifier_concentration,
    trace,
)
from proxy.firewall.statement import Finding, SubmittedSql
from proxy.firewall.timing import constant_number
from proxy.firewall.tree import function_name, is_comparison, is_row_independent, operator_name
from proxy.guard.statement import GuardContext, GuardStatement
from proxy.guard.verdict import Refuse

log = logging.getLogger("pgveil.firewall")
Pass = Callable[[GuardStatement, GuardContext], Refuse | None]


def _fail_closed(rule: str) -> Callable[[Pass], Pass]:
    """A statement a firewall pass cannot analyse (an internal error) is refused, never let through."""
    def decorate(check: Pass) -> Pass:
        @functools.wraps(check)
        def guarded(statement: GuardStatement, context: GuardContext) -> Refuse | None:
            try:
                return check(statement, context)
            except Exception:
                log.exception("firewall rule %s failed on a statement; refusing it", rule)
                return Refuse(rule, "pgveil could not analyse this statement for this rule (internal "
                                    "error, logged); simplify the statement or report it")
        return guarded
    return decorate


def _message_of(statement: GuardStatement) -> SubmittedSql:
    """The whole message: stacked statements and comments are properties of the message, not of one
    statement. A message that is this one statement reuses the gate's parse."""
    if statement.start == 0 and not statement.sql[statement.end:].strip(" \t\r\n\f;"):
        raw = ast.RawStmt(stmt=statement.node, stmt_location=0, stmt_len=statement.end)
        return SubmittedSql(statement.sql, (raw,))
    return _parsed(statement.sql)


@lru_cache(maxsize=64)
def _parsed(sql: str) -> SubmittedSql:
    return SubmittedSql.parse(sql)


@_fail_closed("injection-rules")
def injection_rules(statement: GuardStatement, context: GuardContext) -> Refuse | None:
    """Screens the whole message at its first statement under the role's `injection:` mode.

    `enforce` refuses with the first rule that matched; `alert` lets the message through and
    records the rule names in `statement.findings` (audit and metrics read them from StatementInfo).
    """
    if context.role.injection == "off":
        return None
    submitted = _message_of(statement)
    if not submitted.statements or statement.start != (submitted.statements[0].stmt_location or 0):
        return None
    facts = DatabaseFacts(context.policy, context.catalog, context.search_path, context.user)
    screening = screen_injection(submitted, context.role, facts)
    if screening.findings or _depends_on_literals(submitted):
        statement.mark_literal_dependent()
    statement.findings.extend(screening.rule_names)
    if screening.refusal is None:
        return None
    return Refuse(screening.refusal.rule, screening.refusal.message)


_SIZED_BY_LITERALS = frozenset({"generate_series", "repeat", "lpad", "rpad", "array_fill"})


def _depends_on_literals(submitted: SubmittedSql) -> bool:
    """Could other literal values (or comments, which fingerprints ignore) change the screening?"""
    if any(token.name in ("SQL_COMMENT", "C_COMMENT") for token in submitted.tokens):
        return True
    for node in submitted.nodes:
        if isinstance(node, ast.A_Expr) and is_comparison(node) and is_row_independent(node.lexpr):
            return True  # `1=1` is the builder idiom, `2=2` a tautology (rule tautology)
        if isinstance(node, ast.FuncCall) and function_name(node) in _SIZED_BY_LITERALS:
            return True  # the size of the series or string decides (rule time-based-probe)
        if isinstance(node, ast.FuncCall) and function_name(node) == "current_setting":
            return True  # a custom setting ('app.tenant') is the application's, a built-in one a probe
        if isinstance(node, ast.BoolExpr) and node.boolop == BoolExprType.OR_EXPR:
            return True  # `id = 10 OR id > -1` widens, `OR x LIKE '%'` matches all (rule tautology)
        if (isinstance(node, ast.A_Expr) and operator_name(node) in ("*", "/")
                and isinstance(node.rexpr, ast.Node)
                and (constant_number(node.lexpr) is not None or constant_number(node.rexpr) is not None)):
            return True  # `id * 1 = id` holds for every row, `id * 2 = id` does not (rule tautology)
    return False


@_fail_closed("join-on-sensitive-key")
def join_on_sensitive_key(statement: GuardStatement, context: GuardContext) -> Refuse | None:
    """Refuses statements that correlate rows on a `joinable: false` column (every role)."""
    columns = SensitiveColumns(context.policy, context.catalog)
    if not columns.any_not_joinable:
        return None
    return _refusal(find_join_on_sensitive_key(_lineage(statement, context, columns), columns))


@_fail_closed("quasi-identifier-concentration")
def quasi_identifier_concentration(statement: GuardStatement, context: GuardContext) -> Refuse | None:
    """Refuses statements returning more `quasi_identifier` columns than the role's limit."""
    if context.role.max_quasi_identifiers is None:
        return None
    columns = SensitiveColumns(context.policy, context.catalog)
    if not columns.any_quasi_identifier:
        return None
    analysis = _lineage(statement, context, columns)
    return _refusal(find_quasi_identifier_concentration(analysis, columns, context.role))


_last_lineage: list[tuple[ast.Node, CatalogSnapshot, tuple[str, ...], str, LineageAnalysis]] = []


def _lineage(statement: GuardStatement, context: GuardContext, columns: SensitiveColumns) -> LineageAnalysis:
    """One lineage trace per statement, shared by the two rules that run one after the other."""
    for node, catalog, search_path, user, analysis in _last_lineage:
        if (node is statement.node and catalog is context.catalog and search_path == context.search_path
                and user == context.user):
            return analysis
    analysis = trace(statement.node, columns, context.search_path, context.user)
    _last_lineage[:] = [(statement.node, context.catalog, context.search_path, context.user, analysis)]
    return analysis


def _refusal(finding: Finding | None) -> Refuse | None:
    return Refuse(finding.rule, finding.message) if finding is not None else None
