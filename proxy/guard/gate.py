"""Gate pass: PostgreSQL's own parser (pglast) decides how many statements there are and what they are."""

from __future__ import annotations

from pglast import parse_sql, parser

from proxy.guard.statement import GuardStatement
from proxy.guard.verdict import Refuse


def gate(sql: str) -> list[GuardStatement] | Refuse:
    """Split and parse `sql` exactly as PostgreSQL would; unparseable text is refused."""
    if "\x00" in sql:
        return Refuse("unparseable", "the statement contains a NUL character; remove it")
    try:
        raw_statements = parse_sql(sql)
    except parser.ParseError as exc:
        # PostgreSQL's message quotes the text near the error, which can be a literal value: keep
        # only the position, so refusals and the audit log carry no data.
        location = exc.args[1] if len(exc.args) > 1 and isinstance(exc.args[1], int) else None
        where = f" at character {location + 1}" if location is not None else ""
        return Refuse("unparseable", f"PostgreSQL's grammar rejects this statement{where}; fix the SQL")
    except Exception as exc:  # libpg_query signals a few limits (nesting depth) with other errors
        return Refuse("unparseable", f"the statement cannot be analysed ({type(exc).__name__}); simplify it")
    statements: list[GuardStatement] = []
    for raw in raw_statements:
        if raw.stmt is None:
            continue
        start = raw.stmt_location or 0
        end = start + raw.stmt_len if raw.stmt_len else len(sql)
        statement = GuardStatement(sql=sql, start=start, end=end, node=raw.stmt)
        try:
            statement.fingerprint = parser.fingerprint(sql[start:end])
        except parser.ParseError:
            statement.fingerprint = ""
        statements.append(statement)
    return statements
