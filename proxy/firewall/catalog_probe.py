"""Rule `catalog-probe`: an application's query that reads who and where it runs, or the catalogs.

Injected SQL fingerprints the server (`version()`, `current_user`, `current_database()`) and lists
users, tables and columns (`pg_user`, `pg_shadow`, `pg_authid`, `pg_tables`,
`information_schema.columns`) from inside an application's query.
Caught (application roles): relations that hold accounts, settings or sessions (`pg_user`,
`pg_shadow`, `pg_authid`, `pg_roles`, `pg_database`, `pg_settings`, `pg_stat_activity`, ...)
anywhere; any other catalog relation or system-information function (`version()`, `current_user`,
`current_database()`, `current_setting()`, `inet_server_addr()`, ...) in a statement that also
reads user tables, in a condition, in a set operation, or in a subquery.
Let through: the metadata statements drivers and ORMs send on their own — `SELECT version()`,
`SELECT current_schema()`, type introspection over `pg_type`/`pg_namespace`/`pg_range` — when
they read nothing but catalogs and system functions; everything from roles that are not
applications (psql's `\\d`, BI tools).
"""

from __future__ import annotations

from pglast import ast
from pglast.enums import SQLValueFunctionOp

from proxy.firewall.facts import DatabaseFacts
from proxy.firewall.statement import Finding, SubmittedSql, quote
from proxy.firewall.tree import function_name, is_catalog_relation, walk
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


def find_catalog_probe(submitted: SubmittedSql, role: Role, facts: DatabaseFacts) -> Finding | None:
    if not role.application:
        return None
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
        elif first_probe is None and _is_system_information(node):
            first_probe = node
    # Drivers' and ORMs' introspection: a SELECT that reads only catalogs, its own CTEs or nothing.
    if first_probe is None or (isinstance(statement, ast.SelectStmt) and not reads_user_relation):
        return None
    probe = str(first_probe.relname) if isinstance(first_probe, ast.RangeVar) else quote(first_probe)
    return Finding(RULE, f"the application's query reads `{probe}` together with its own data, the shape "
                         "of injected catalog or server probing; read metadata in a statement of its own")


def _is_system_information(node: ast.Node) -> bool:
    if isinstance(node, ast.FuncCall):
        return function_name(node) in SYSTEM_INFORMATION_FUNCTIONS
    return isinstance(node, ast.SQLValueFunction) and node.op in SYSTEM_INFORMATION_VALUES
