"""Settings rule: SET, RESET and set_config() of settings that change how SQL is read or who runs it.

pgveil resolves relations with the session's search_path and reads SQL with
standard_conforming_strings on and UTF8: a masked role may not change any of that, nor its
identity. Everything else is a harmless SET and always allowed."""

from __future__ import annotations

from collections.abc import Iterable

from pglast import ast
from pglast.enums import VariableSetKind

from proxy.guard.statement import GuardContext, GuardStatement
from proxy.guard.verdict import Refuse

_RESETS = (VariableSetKind.VAR_RESET, VariableSetKind.VAR_RESET_ALL, VariableSetKind.VAR_SET_DEFAULT)
IDENTITY_SETTINGS = frozenset({"role", "session_authorization"})
READING_SETTINGS = frozenset(
    {"search_path", "standard_conforming_strings", "client_encoding", "backslash_quote"}
)
SAFE_VALUES = {
    "standard_conforming_strings": frozenset({"on", "true", "yes", "1"}),
    "client_encoding": frozenset({"utf8", "unicode"}),
    "backslash_quote": frozenset({"safeencoding", "off", "false", "no", "0"}),
}


def setting_refusal(name: str, values: Iterable[str], role_name: str) -> Refuse | None:
    """The refusal for setting `name` to `values` by a masked role, or None when it is harmless."""
    name = name.lower()
    if name.startswith("pgveil."):
        return Refuse("session-setting",
                      f"settings under pgveil.* belong to pgveil and cannot be changed by role {role_name}")
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
