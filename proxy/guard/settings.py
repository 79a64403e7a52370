"""Settings rule: SET, RESET and set_config() of settings that change how SQL is read or who runs it.

pgveil resolves relations with the session's search_path and reads SQL with
standard_conforming_strings on and in a client encoding it reads exactly as PostgreSQL does
(proxy.guard.encodings): a masked role may not change any of that, nor its identity. Everything
else is a harmless SET and always allowed."""

from __future__ import annotations

from collections.abc import Iterable

from pglast import ast
from pglast.enums import VariableSetKind

from proxy.guard.encodings import READABLE_NAMES
from proxy.guard.statement import GuardContext, GuardStatement
from proxy.guard.verdict import Refuse

_RESETS = (VariableSetKind.VAR_RESET, VariableSetKind.VAR_RESET_ALL, VariableSetKind.VAR_SET_DEFAULT)
IDENTITY_SETTINGS = frozenset({"role", "session_authorization"})
READING_SETTINGS = frozenset(
    {"search_path", "standard_conforming_strings", "client_encoding", "backslash_quote"}
)
SAFE_VALUES = {
    "standard_conforming_strings": frozenset({"on", "true", "yes", "1"}),
    "client_encoding": READABLE_NAMES,  # the encodings pgveil reads as PostgreSQL does
    "backslash_quote": frozenset({"safeencoding", "off", "false", "no", "0"}),
}
QUIET_MESSAGE_LEVELS = frozenset({"notice", "warning", "error"})
"""client_min_messages values that keep PostgreSQL's messages below NOTICE from the session."""
DIAGNOSTIC_SWITCHES = frozenset({
    "debug_print_raw_parse", "debug_print_parse", "debug_print_rewritten", "debug_print_plan",
    "log_parser_stats", "log_planner_stats", "log_executor_stats", "log_statement_stats",
    "log_btree_build_stats", "wal_debug", "plpgsql.print_strict_params",
})
"""Settings (with every trace_*) that make PostgreSQL write its internals as LOG/DEBUG messages,
which reach the session under a low client_min_messages: the plan dumps hold values as constants.
(plpgsql.print_strict_params puts a function's query parameters into its errors instead.)"""
_OFF = frozenset({"off", "false", "no", "0"})


def diagnostic_refusal(name: str, values: Iterable[str], why: str, todo: str | None = None) -> Refuse | None:
    """The refusal for setting `name` to `values` when that makes PostgreSQL send diagnostics that
    can hold raw values (messages below NOTICE, plan/parse/rewrite dumps, auto_explain's plans);
    `why` says whom it would harm, `todo` what to do instead. None for any other setting or a quiet
    value."""
    name = name.lower()
    if name == "client_min_messages":
        if all(_plain(value) in QUIET_MESSAGE_LEVELS for value in values):
            return None
        todo = todo or "keep client_min_messages at notice, warning or error"
    elif name in DIAGNOSTIC_SWITCHES or name.startswith("trace_"):
        if all(_plain(value) in _OFF for value in values):
            return None
        todo = todo or f"leave {name} off"
    elif name.startswith("auto_explain."):
        todo = todo or "configure auto_explain on the server only for logins that see everything"
    else:
        return None
    return Refuse("session-setting", f"{name} = {', '.join(values)} makes PostgreSQL send diagnostics (plan "
                  f"trees and the like) that can hold raw values, and {why}; {todo}")


def setting_refusal(name: str, values: Iterable[str], role_name: str) -> Refuse | None:
    """The refusal for setting `name` to `values` by a masked role, or None when it is harmless."""
    name = name.lower()
    if name.startswith("pgveil."):
        return Refuse("session-setting",
                      f"settings under pgveil.* belong to pgveil and cannot be changed by role {role_name}")
    diagnostic = diagnostic_refusal(name, values, f"role {role_name} has masked data")
    if diagnostic is not None:
        return diagnostic
    if name in IDENTITY_SETTINGS:
        return Refuse(
            "session-setting",
            f"changing {name} would change who runs the statements and role {role_name} has masked data; "
            "connect as the login you need",
        )
    if name in READING_SETTINGS:
        allowed = SAFE_VALUES.get(name)
        if allowed is not None and all(_plain(value) in allowed for value in values):
            return None
        if name == "client_encoding":
            return Refuse("session-setting", f"pgveil cannot read SQL in client_encoding {', '.join(values)} "
                          f"exactly as PostgreSQL does and role {role_name} has masked data; use UTF8 or an "
                          "encoding whose bytes below 0x80 are always ASCII (LATIN1, WIN1252, EUC_JP, ...)")
        return Refuse(
            "session-setting",
            f"changing {name} changes how pgveil must read SQL and role {role_name} has masked data; "
            "use schema-qualified names instead" if name == "search_path" else
            f"changing {name} changes how pgveil must read SQL and role {role_name} has masked data",
        )
    return None


def _plain(value: str) -> str:
    """A setting value as PostgreSQL compares it: case, quotes, spaces, '-' and '_' do not matter."""
    return value.strip().strip("'\"").strip().lower().replace("-", "").replace("_", "")


SETTINGS_VIEW = "pg_catalog.pg_settings"


def session_settings(statement: GuardStatement, context: GuardContext) -> Refuse | None:
    node = statement.node
    if context.masked:
        written = _settings_view_written(statement, context)
        if written is not None:
            return Refuse("session-setting", f"writing to {written} changes session settings (its update "
                          f"rule calls set_config()) and role {context.role.name} has masked data; "
                          "use SET for harmless settings")
    if isinstance(node, ast.VariableSetStmt):
        statement.mark_literal_dependent()
        if not context.masked or node.kind in _RESETS:
            return None
        if node.name is None or node.kind == VariableSetKind.VAR_SET_MULTI:
            return None  # SET TRANSACTION / SESSION CHARACTERISTICS
        values = [_constant_text(arg) for arg in node.args or ()]
        if node.kind != VariableSetKind.VAR_SET_VALUE:
            values = ["<default>"]
        shown = [v if v is not None else "<expression>" for v in values]
        return setting_refusal(node.name, shown, context.role.name)
    if isinstance(node, ast.AlterRoleSetStmt | ast.AlterDatabaseSetStmt | ast.AlterSystemStmt):
        statement.mark_literal_dependent()
        return _diagnostic_default(node.setstmt, "logins with masked data would get it as a default")
    if isinstance(node, ast.CreateFunctionStmt | ast.AlterFunctionStmt):
        clauses = node.options if isinstance(node, ast.CreateFunctionStmt) else node.actions
        for clause in clauses or ():
            if isinstance(clause, ast.DefElem) and clause.defname == "set":
                statement.mark_literal_dependent()
                refusal = _diagnostic_default(clause.arg, "logins with masked data calling it would get it")
                if refusal is not None:
                    return refusal
    for function in statement.functions:
        if function.name != "set_config" or function.schema not in (None, "pg_catalog"):
            continue
        statement.mark_literal_dependent()
        if not context.masked:
            continue
        call = function.node
        args = list(getattr(call, "args", None) or ())
        name = _constant_text(args[0]) if args else None
        value = _constant_text(args[1]) if len(args) > 1 else None
        if name is None:
            return Refuse("session-setting", "set_config() with a computed setting name cannot be "
                          "checked; name the setting as a constant")
        if value is None:
            if setting_refusal(name, ["<any>"], context.role.name) is None:
                continue  # a harmless setting: any value will do
            return Refuse("session-setting", f"set_config('{name}', ...) with a computed value cannot be "
                          "checked; pass a constant")
        refusal = setting_refusal(name, [value], context.role.name)
        if refusal is not None:
            return refusal
    return None


def _diagnostic_default(setting: object, why: str) -> Refuse | None:
    """ALTER ROLE/DATABASE/SYSTEM ... SET, or a function's SET clause, of a diagnostic setting,
    refused for every role: the setting would reach logins with masked data from the server, where
    no SET is seen."""
    if not isinstance(setting, ast.VariableSetStmt) or setting.name is None or setting.kind in _RESETS:
        return None
    if setting.kind == VariableSetKind.VAR_SET_VALUE:
        values = [_constant_text(arg) or "<expression>" for arg in setting.args or ()]
    else:
        values = ["<current>"]  # FROM CURRENT
    return diagnostic_refusal(setting.name, values, why,
                              "set it on PostgreSQL directly for logins that see everything")


def _constant_text(node: object) -> str | None:
    if isinstance(node, ast.A_Const) and not node.isnull:
        value = node.val
        if isinstance(value, ast.String):
            return value.sval
        if isinstance(value, ast.Integer):
            return str(value.ival)
        if isinstance(value, ast.Float):
            return value.fval
        if isinstance(value, ast.Boolean):
            return "on" if value.boolval else "off"
    if isinstance(node, ast.TypeCast):
        return _constant_text(node.arg)
    return None


def _settings_view_written(statement: GuardStatement, context: GuardContext) -> str | None:
    """The relation written (INSERT/UPDATE/DELETE/MERGE target, COPY FROM, also nested in WITH or
    EXPLAIN ANALYZE) that is pg_catalog.pg_settings or a view reading it, if any."""
    copies_in = isinstance(statement.node, ast.CopyStmt) and statement.node.is_from
    for ref in statement.relations:
        if not (ref.position == "target" or (ref.position == "copy" and copies_in)):
            continue
        relation = ref.relation
        if relation is None:
            if ref.parts[-1] == "pg_settings" and not ref.cte:
                return ".".join(ref.parts)
            continue
        if relation.qualified_name == SETTINGS_VIEW:
            return SETTINGS_VIEW
        if relation.depends_on and SETTINGS_VIEW in context.catalog.base_relations(relation):
            return relation.qualified_name
    return None
