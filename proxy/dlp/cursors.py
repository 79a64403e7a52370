"""Which cursor each statement of a message declares or fetches from, read as PostgreSQL parses it."""

from __future__ import annotations

from pglast import ast, parse_sql
from pglast.parser import ParseError

CursorUse = tuple[str | None, str | None]
"""(the cursor a statement declares, the cursor it fetches rows from); None where it does neither."""


def cursor_uses(sql: str) -> list[CursorUse] | None:
    """One entry per statement of `sql`, in order (comments, quoting and case read as PostgreSQL
    reads them: `/* x */ FETCH 5 FROM "C" -- y` fetches from cursor C); None when PostgreSQL would
    not parse the message (then no statement of it runs). MOVE fetches no rows."""
    try:
        statements = parse_sql(sql)
    except ParseError:
        return None
    uses: list[CursorUse] = []
    for raw in statements:
        statement = raw.stmt
        if isinstance(statement, ast.DeclareCursorStmt):
            uses.append((statement.portalname, None))
        elif isinstance(statement, ast.FetchStmt) and not statement.ismove:
            uses.append((None, statement.portalname))
        else:
            uses.append((None, None))
    return uses
