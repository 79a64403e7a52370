"""Rule `catalog-probe`: an application's query that reads who and where it runs, or the catalogs.

Injected SQL fingerprints the server (`version()`, `current_user`, `current_database()`) and lists
users, tables and columns (`pg_user`, `pg_shadow`, `pg_authid`, `pg_tables`,
`information_schema.columns`) from inside an application's query.
Caught (application roles): relations that hold accounts, settings or sessions (`pg_user`,
`pg_shadow`, `pg_authid`, `pg_roles`, `pg_database`, `pg_settings`, `pg_stat_activity`, ...)
anywhere; any other catalog relation or system-information function (`version()`, `current_user`,
`current_database()`, `current_setting()`, `inet_server_addr()`, ...) in a statement that also
reads user tables, in a condition, in a set operation, or in a subquery.
Caught for every role (people too), where injected input lands in a statement over user tables (a
condition, a sort key, LIMIT/OFFSET): a subquery reading logins, settings or sessions
(`ORDER BY id, (SELECT usename FROM pg_user LIMIT 1)`), a server value computed into the value
(`name = 'x' || (SELECT version()) || ''`, `LIMIT (SELECT length(current_user))`).
Let through: the metadata statements drivers and ORMs send on their own — `SELECT version()`,
`SELECT current_schema()`, type introspection over `pg_type`/`pg_namespace`/`pg_range` — when
they read nothing but catalogs and system functions; from roles that are not applications,
statements over catalogs only (psql's `\\d`, BI tools), server values in the select list, a column
compared with one (`owner = current_user`, `owner = (SELECT current_user)`,
`tenant_id IN (SELECT id FROM tenants WHERE name = current_user)`), per-row checks
(`pg_has_role(owner, 'member')`), the user's name in a condition (`path = '/home/' || current_user`)
and custom settings (`current_setting('app.tenant')`).
"""

from __future__ import annotations

from pglast import ast
from pglast.enums import SQLValueFunctionOp

from proxy.firewall.facts import DatabaseFacts
from proxy.firewall.positions import PlacedStatement, placed_statements, reads_user_relation
from proxy.firewall.statement import Finding, SubmittedSql, quote
from proxy.firewall.tree import (
    function_name,
    is_catalog_relation,
    is_comparison,
    is_row_independent,
    operator_name,
    walk,
)
from proxy.policy.model import Role

RULE = "catalog-probe"

ACCOUNT_CATALOGS = frozenset({
    "pg_user", "pg_shadow", "pg_authid", "pg_roles", "pg_group", "pg_auth_members", "pg_user_mapping",
    "pg_user_mappings", "pg_database", "pg_settings", "pg_file_settings", "pg_hba_file_rules",
    "pg_ident_file_mappings", "pg_stat_activity", "pg_stat_ssl", "pg_stat_gssapi", "pg_largeobject",
    "pg_largeobject_metadata", "pg_config", "pg_stat_statements", "pg_tables", "pg_db_role_setting",
    "pg_available_extensions", "pg_extension", "pg_stat_replication", "pg_replication_slots",
})
SYSTEM_INFORMATION_FUNCTIONS = frozenset({
    "version", "current_database", "current_catalog", "current_schema", "current_schemas",
    "current_user", "session_user", "current_role", "current_setting", "inet_server_addr",
    "inet_server_port", "inet_client_addr", "inet_client_port", "pg_backend_pid",
    "pg_postmaster_start_time", "pg_conf_load_time", "has_database_privilege", "has_table_privilege",
    "has_schema_privilege", "has_column_privilege", "has_function_privilege", "pg_has_role",
    "pg_is_in_recovery", "pg_current_logfile", "pg_get_userbyid", "pg_table_is_visible",
    "pg_tablespace_location", "txid_current", "pg_current_xact_id", "user",
})
SYSTEM_INFORMATION_VALUES = frozenset({
    SQLValueFunctionOp.SVFOP_CURRENT_ROLE, SQLValueFunctionOp.SVFOP_CURRENT_USER,
    SQLValueFunctionOp.SVFOP_USER, SQLValueFunctionOp.SVFOP_SESSION_USER,
    SQLValueFunctionOp.SVFOP_CURRENT_CATALOG, SQLValueFunctionOp.SVFOP_CURRENT_SCHEMA,
})


# Logins, settings and sessions: read in a subquery where injected input lands, a probe for every role.
SERVER_CATALOGS = ACCOUNT_CATALOGS - {"pg_tables", "pg_extension", "pg_available_extensions"}
# System values that name the user or schema: people use them in conditions (`owner = current_user`).
USER_VALUES = frozenset({"current_user", "session_user", "current_role", "user", "current_schema",
                         "current_schemas"})
_USER_VALUE_OPS = frozenset({
    SQLValueFunctionOp.SVFOP_CURRENT_ROLE, SQLValueFunctionOp.SVFOP_CURRENT_USER,
    SQLValueFunctionOp.SVFOP_USER, SQLValueFunctionOp.SVFOP_SESSION_USER,
    SQLValueFunctionOp.SVFOP_CURRENT_SCHEMA,
})
_COMPARED_THROUGH = (ast.TypeCast, ast.CoalesceExpr)
_SERVER_NODE_TYPES = (ast.RangeVar, ast.FuncCall, ast.SQLValueFunction)
# Containment and network tests a column can make with a server value (`allowed_net >>= inet_client_addr()`).
_CONTAINMENT = frozenset({"@>", "<@", "&&", "<<", "<<=", ">>", ">>=", "^@"})


def find_catalog_probe(submitted: SubmittedSql, role: Role, facts: DatabaseFacts) -> Finding | None:
    if not role.application:
        if not any(_is_server_catalog(node) or is_server_value(node)
                   for kind in _SERVER_NODE_TYPES for node in submitted.nodes_of(kind)):
            return None  # the common case: nothing to place, no second walk
        if not reads_user_relation(submitted):
            return None  # psql's and drivers' metadata queries
        return next((found for statement in placed_statements(submitted)
                     if (found := _server_probe(statement)) is not None), None)
    for raw in submitted.statements:
        nodes = submitted.nodes if len(submitted.statements) == 1 else tuple(walk(raw.stmt))
        finding = _probe_in(raw.stmt, nodes)
        if finding is not None:
            return finding
    return None


def _probe_in(statement: ast.Node | None, nodes: tuple[ast.Node, ...]) -> Finding | None:
    first_probe: ast.Node | None = None
    reads_user_relation = False
    cte_names = {str(node.ctename) for node in nodes if isinstance(node, ast.CommonTableExpr)}
    for node in nodes:
        if isinstance(node, ast.RangeVar):
            if not is_catalog_relation(node):
                reads_user_relation = reads_user_relation or not (
                    node.schemaname is None and str(node.relname) in cte_names)
                continue
            if str(node.relname).lower() in ACCOUNT_CATALOGS:
                return Finding(RULE, f"the application read {node.relname}, which lists accounts, "
                                     "settings or sessions; applications have no business there")
            first_probe = first_probe or node
        elif first_probe is None and is_system_information(node):
            first_probe = node
    # Drivers' and ORMs' introspection: a SELECT that reads only catalogs, its own CTEs or nothing.
    if first_probe is None or (isinstance(statement, ast.SelectStmt) and not reads_user_relation):
        return None
    probe = str(first_probe.relname) if isinstance(first_probe, ast.RangeVar) else quote(first_probe)
    return Finding(RULE, f"the application's query reads `{probe}` together with its own data, the shape "
                         "of injected catalog or server probing; read metadata in a statement of its own")


def is_system_information(node: ast.Node) -> bool:
    if isinstance(node, ast.FuncCall):
        return function_name(node) in SYSTEM_INFORMATION_FUNCTIONS
    return isinstance(node, ast.SQLValueFunction) and node.op in SYSTEM_INFORMATION_VALUES


def _server_probe(statement: PlacedStatement) -> Finding | None:
    """For roles whose SQL people write: a login catalog or a server value where injected input lands."""
    if not statement.reads_user_relation:
        return None
    for node, place in statement.placed:
        if isinstance(node, ast.RangeVar):
            if _is_server_catalog(node):
                return Finding(RULE, f"the {place} reads {node.relname}, which lists logins, settings or "
                                     "sessions, in a query over user data: the shape of injected catalog "
                                     "probing; query the catalog on its own")
            continue
        if not is_server_value(node) or _per_row(node):
            continue
        ancestors = statement.ancestors(node)
        if _compared_with_row(node, ancestors):
            continue
        in_subquery = any(isinstance(ancestor, ast.SubLink) for ancestor in ancestors)
        if place == "condition" and not in_subquery and _names_user(node):
            continue
        return Finding(RULE, f"the {place} computes with `{quote(node)}` (who or where the server runs) "
                             "in a query over user data: the shape of injected server probing; read it in "
                             "a statement of its own, or compare a column with it")
    return None


def _is_server_catalog(node: ast.Node) -> bool:
    return (isinstance(node, ast.RangeVar) and is_catalog_relation(node)
            and str(node.relname).lower() in SERVER_CATALOGS)


def is_server_value(node: ast.Node) -> bool:
    """A system-information value other than a custom setting (`current_setting('app.tenant')`)."""
    if not is_system_information(node):
        return False
    if isinstance(node, ast.FuncCall) and function_name(node) == "current_setting" and node.args:
        name = node.args[0]
        return not (isinstance(name, ast.A_Const) and isinstance(name.val, ast.String)
                    and "." in str(name.val.sval))
    return True


def _names_user(node: ast.Node) -> bool:
    if isinstance(node, ast.SQLValueFunction):
        return node.op in _USER_VALUE_OPS
    return isinstance(node, ast.FuncCall) and function_name(node) in USER_VALUES


def _per_row(node: ast.Node) -> bool:
    """A system function of the row's values (`pg_has_role(owner, 'member')`): not one server value."""
    return isinstance(node, ast.FuncCall) and bool(node.args) and not is_row_independent(node)


def _compared_with_row(node: ast.Node, ancestors: tuple[ast.Node, ...]) -> bool:
    """Is the value (through casts, coalesce, or for the user's name the `(SELECT current_user)` wrapper
    of row-security policies) one side of a comparison whose other side reads the row?"""
    value, index = node, len(ancestors) - 1
    while index >= 0:
        parent = ancestors[index]
        if isinstance(parent, _COMPARED_THROUGH):
            value, index = parent, index - 1
        elif (isinstance(parent, ast.ResTarget) and index >= 2 and _names_user(node)
              and isinstance(ancestors[index - 2], ast.SubLink) and _is_value_wrapper(ancestors[index - 1])):
            value, index = ancestors[index - 2], index - 3
        else:
            break
    if index < 0:
        return False
    comparison = ancestors[index]
    if not (isinstance(comparison, ast.A_Expr)
            and (is_comparison(comparison) or operator_name(comparison) in _CONTAINMENT)):
        return False
    rest = comparison.rexpr if isinstance(comparison.rexpr, tuple | list) else (comparison.rexpr,)
    others = [side for side in (comparison.lexpr, *rest) if isinstance(side, ast.Node) and side is not value]
    return any(not is_row_independent(side) for side in others)


def _is_value_wrapper(select: ast.Node) -> bool:
    """`SELECT value` with no FROM, WHERE or anything else: `(SELECT current_user)`."""
    return (isinstance(select, ast.SelectStmt) and not select.fromClause and select.whereClause is None
            and len(select.targetList or ()) == 1 and select.larg is None)
