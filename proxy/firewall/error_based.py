"""Rule `error-based-extraction`: casts built to fail with the data in the error message.

Error-based injection makes PostgreSQL report a value in an error:
`CAST('qvkjq'||(SELECT usename FROM pg_user LIMIT 1)::text||'qzvxq' AS NUMERIC)` fails with
`invalid input syntax for type numeric: "qvkjqpostgresqzvxq"`.
Caught: a cast to a non-text type (numeric, int, regclass, ...) of a concatenation that contains a
subquery or a system function, of a scalar subquery whose result is not an aggregate or arithmetic
(`CAST((SELECT password FROM users LIMIT 1) AS int)`, `(SELECT relname FROM pg_class)::regclass`),
or of a concatenation cast to a `reg*` type; a server value cast to a number or date
(`current_user::int`, `version()::numeric`, `current_setting('data_directory')::int`).
Let through: casts of columns, literals and parameters (`oid::regclass`, `'42'::int`, `$1::int`),
casts of aggregates (`(SELECT count(*) FROM t)::numeric`), casts to text.
"""

from __future__ import annotations

from pglast import ast
from pglast.enums import SubLinkType

from proxy.firewall.catalog_probe import SYSTEM_INFORMATION_VALUES
from proxy.firewall.facts import DatabaseFacts
from proxy.firewall.statement import Finding, SubmittedSql, quote
from proxy.firewall.tree import AGGREGATES, function_name, is_concatenation, type_name, walk
from proxy.policy.model import Role

RULE = "error-based-extraction"

TEXT_TYPES = frozenset({"text", "varchar", "bpchar", "char", "character", "name", "bytea", "json",
                        "jsonb", "xml", "unknown", "citext"})
OBJECT_NAME_TYPES = frozenset({"regclass", "regproc", "regprocedure", "regtype", "regnamespace",
                               "regrole", "regoper", "regoperator", "regconfig", "regdictionary",
                               "regcollation"})
# System functions whose value is worth leaking through an error.
SYSTEM_VALUE_FUNCTIONS = frozenset({"version", "current_database", "current_setting", "current_schema",
                                    "current_schemas", "inet_server_addr", "pg_read_file", "user"})
# System functions whose text a failed cast to a number prints (besides the ones above).
SERVER_TEXT_FUNCTIONS = frozenset({"current_catalog", "session_user", "current_user", "current_role",
                                   "inet_client_addr", "pg_current_logfile", "pg_postmaster_start_time"})


def find_error_based_extraction(submitted: SubmittedSql, role: Role, facts: DatabaseFacts) -> Finding | None:
    for node in submitted.nodes_of(ast.TypeCast):
        assert isinstance(node, ast.TypeCast)
        target = type_name(node)
        if target in TEXT_TYPES or node.arg is None:
            continue
        if _is_extraction_argument(node.arg, target):
            return Finding(
                RULE,
                f"`{quote(node)}` casts a computed value to {target}, which makes PostgreSQL print the "
                "value in the error (error-based extraction); cast columns or parameters, not subqueries",
            )
    return None


def _is_extraction_argument(argument: ast.Node, target: str) -> bool:
    if is_concatenation(argument):
        return target in OBJECT_NAME_TYPES or any(
            isinstance(inner, ast.SubLink)
            or (isinstance(inner, ast.FuncCall) and function_name(inner) in SYSTEM_VALUE_FUNCTIONS)
            or isinstance(inner, ast.SQLValueFunction)
            for inner in walk(argument)
        )
    if isinstance(argument, ast.SubLink) and argument.subLinkType == SubLinkType.EXPR_SUBLINK:
        return not _yields_number(argument.subselect)
    return target not in OBJECT_NAME_TYPES and _is_server_text(argument)


def _is_server_text(argument: ast.Node) -> bool:
    """A server value whose text the failed cast prints: `version()::int`, `current_user::int`,
    `current_setting('data_directory')::int` (through casts to text types: `inet_server_addr()::text`);
    custom settings (`current_setting('app.tenant')::int`) and `*_num` settings are numbers the
    application set or reads."""
    while isinstance(argument, ast.TypeCast) and type_name(argument) in TEXT_TYPES:
        if argument.arg is None:
            return False
        argument = argument.arg
    if isinstance(argument, ast.SQLValueFunction):
        return argument.op in SYSTEM_INFORMATION_VALUES
    if not isinstance(argument, ast.FuncCall):
        return False
    name = function_name(argument)
    if name == "current_setting" and argument.args:
        setting = argument.args[0]
        return not (isinstance(setting, ast.A_Const) and isinstance(setting.val, ast.String)
                    and ("." in str(setting.val.sval) or str(setting.val.sval).endswith("_num")))
    return name in SYSTEM_VALUE_FUNCTIONS or name in SERVER_TEXT_FUNCTIONS


def _yields_number(select: ast.Node | None) -> bool:
    """A scalar subquery whose single column is an aggregate, arithmetic or a numeric literal."""
    if not isinstance(select, ast.SelectStmt) or not select.targetList:
        return False
    value = select.targetList[0].val
    while isinstance(value, ast.TypeCast):
        if type_name(value) in TEXT_TYPES:
            return False
        value = value.arg
    if isinstance(value, ast.FuncCall):
        return function_name(value) in AGGREGATES
    if isinstance(value, ast.A_Const):
        return isinstance(value.val, ast.Integer | ast.Float)
    if isinstance(value, ast.A_Expr):
        return value.name is not None and str(value.name[-1].sval) in {"+", "-", "*", "/", "%"}
    return False
