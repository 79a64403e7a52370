"""Rule `stacked-statements`: an application's query that carries more than one statement.

Caught (application roles): `SELECT * FROM items WHERE id = 1; SELECT pg_sleep(5)`,
`...WHERE name = 'x'; DROP TABLE users--`: two or more statements that are not session control.
Let through: one statement with or without a trailing `;`; one statement with session control
around it (asyncpg's pool reset `SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL;`,
Rails' `SET a; SET b; SET c`, `BEGIN; ...; COMMIT`); several statements from roles that are not
applications (people paste scripts).
"""

from __future__ import annotations

from pglast import ast

from proxy.firewall.facts import DatabaseFacts
from proxy.firewall.statement import Finding, SubmittedSql
from proxy.policy.model import Role

RULE = "stacked-statements"

# Statements that only manage the session; drivers batch them in one query.
SESSION_CONTROL = (ast.TransactionStmt, ast.VariableSetStmt, ast.VariableShowStmt, ast.DiscardStmt,
                   ast.ClosePortalStmt, ast.UnlistenStmt, ast.ListenStmt, ast.DeallocateStmt)


def find_stacked_statements(submitted: SubmittedSql, role: Role, facts: DatabaseFacts) -> Finding | None:
    if not role.application or len(submitted.statements) < 2:
        return None
    work = [raw.stmt for raw in submitted.statements if not isinstance(raw.stmt, SESSION_CONTROL)]
    if len(work) < 2:
        return None
    kinds = ", ".join(type(stmt).__name__.removesuffix("Stmt").upper() for stmt in work)
    return Finding(
        RULE,
        f"the query holds {len(work)} statements ({kinds}); an application sends one statement per "
        "query, so the extra ones look injected: send each statement on its own",
    )
