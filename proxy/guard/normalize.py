"""The audited shape of a statement: its text with every literal value replaced by a `$n` placeholder.

`parser.normalize` (libpg_query) replaces the constants of queries and of some utility statements
(`ALTER ROLE ... PASSWORD`), but keeps them in others (`PREPARE`, `CREATE TABLE AS`, `CREATE VIEW`,
`COMMENT`, `CREATE FUNCTION` bodies, ...). So its output is scanned again with PostgreSQL's own
scanner and every constant token left (strings in any quoting, dollar-quoted bodies, bit and hex
strings, numbers) becomes the next `$n`: nothing literal reaches the audit log, whatever the
statement kind. What the scanner cannot read becomes "" (fail closed: no text rather than literals).
"""

from __future__ import annotations

import re

from pglast import parser

CONSTANT_TOKENS = frozenset({"SCONST", "USCONST", "ICONST", "FCONST", "BCONST", "XCONST"})
"""Scanner tokens that carry a literal value (dollar-quoted strings scan as SCONST)."""

# Could the text hold a constant at all? A quote (any string, E'', B'', U&''), a `$` not
# followed by a digit (dollar quoting), or a digit that does not continue a word or a `$n`.
_MAY_HOLD_CONSTANT = re.compile(r"'|\$(?!\d)|(?<![\w$])\d")


def normalized_sql(text: str) -> str:
    """`text` with literal values replaced by `$n`, for the audit record's `normalized_sql`."""
    try:
        normalized = parser.normalize(text)
    except parser.ParseError:
        normalized = text  # scrubbed below all the same
    return without_constants(normalized)


def without_constants(text: str) -> str:
    """Replace every constant token PostgreSQL's scanner finds in `text` by the next free `$n`."""
    if not _MAY_HOLD_CONSTANT.search(text):
        return text
    try:
        tokens = parser.scan(text)
    except parser.ParseError:
        return ""
    highest = 0
    for token in tokens:
        if token.name == "PARAM":
            digits = text[token.start + 1 : token.end + 1]
            if digits.isdigit():
                highest = max(highest, int(digits))
    pieces: list[str] = []
    cursor = 0
    previous = None
    for token in tokens:
        if token.name in CONSTANT_TOKENS:
            start = token.start
            if previous is not None and previous.name == "NCHAR" and previous.end + 1 == start:
                start = previous.start  # N'...' is one literal written with a prefix keyword
            highest += 1
            pieces.append(text[cursor:start])
            pieces.append(f"${highest}")
            cursor = token.end + 1
        previous = token
    if not pieces:
        return text
    pieces.append(text[cursor:])
    return "".join(pieces)
