"""Classify pass: the statement class (PRODUCT.md) of one statement, and of what it nests."""

from __future__ import annotations

from pglast import ast

from proxy.guard.statement import GuardStatement

ALWAYS_ALLOWED = frozenset({"transaction", "show", "set", "session"})
"""Classes every role may run (SET is vetted setting by setting by the settings rule)."""

_SIMPLE: dict[str, str] = {
    "InsertStmt": "insert",
    "UpdateStmt": "update",
    "DeleteStmt": "delete",
    "MergeStmt": "update",
    "DeclareCursorStmt": "select",
    "FetchStmt": "select",
    "ClosePortalStmt": "select",
    "ExecuteStmt": "select",
    "TransactionStmt": "transaction",
    "ConstraintsSetStmt": "transaction",
    "VariableShowStmt": "show",
    "VariableSetStmt": "set",
    "ListenStmt": "session",
    "UnlistenStmt": "session",
    "NotifyStmt": "session",
    "DiscardStmt": "session",
    "DeallocateStmt": "session",
    "DoStmt": "procedural",
    "CallStmt": "procedural",
    "TruncateStmt": "ddl",
    "GrantStmt": "ddl",
    "GrantRoleStmt": "ddl",
    "CommentStmt": "ddl",
    "RenameStmt": "ddl",
    "IndexStmt": "ddl",
    "ViewStmt": "ddl",
    "RuleStmt": "ddl",
    "DefineStmt": "ddl",
    "CompositeTypeStmt": "ddl",
    "SecLabelStmt": "ddl",
    "ReassignOwnedStmt": "ddl",
    "AlterSystemStmt": "admin",
    "VacuumStmt": "admin",
    "ClusterStmt": "admin",
    "ReindexStmt": "admin",
    "CheckPointStmt": "admin",
    "LoadStmt": "admin",
    "LockStmt": "admin",
}


def statement_class(node: ast.Node) -> str:
    """The class a role must be allowed to run this statement node (unknown kinds are `admin`)."""
    name = type(node).__name__
    if isinstance(node, ast.SelectStmt):
        return "ddl" if node.intoClause is not None else "select"
    if isinstance(node, ast.CopyStmt):
        if node.filename is not None or node.is_program:
            return "admin"
        return "copy_in" if node.is_from else "copy_out"
    if isinstance(node, ast.ExplainStmt | ast.PrepareStmt):
        return statement_class(node.query) if node.query is not None else "admin"
    if isinstance(node, ast.CreateTableAsStmt):
        return "ddl"
    if name in _SIMPLE:
        return _SIMPLE[name]
    if name.startswith(("Create", "Alter", "Drop")):
        return "ddl"
    return "admin"


def classify(statement: GuardStatement) -> None:
    statement.statement_class = statement_class(statement.node)


def required_classes(statement: GuardStatement) -> frozenset[str]:
    """Every class the statement exercises: its own plus data-modifying statements nested in it
    (`WITH d AS (DELETE ... RETURNING *) SELECT ...`, `EXPLAIN ANALYZE UPDATE ...`)."""
    classes = {statement.statement_class}
    for node in statement.modifications:
        classes.add(statement_class(node))
    if isinstance(statement.node, ast.MergeStmt):
        for clause in statement.node.mergeWhenClauses or ():
            kind = getattr(clause, "commandType", None)
            command = int(kind) if kind is not None else 0
            classes.add({2: "update", 3: "insert", 4: "delete"}.get(command, "update"))
    return frozenset(classes)
