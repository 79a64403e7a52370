"""Lexical rule: plain string literals that PostgreSQL would read differently under another setting.

With standard_conforming_strings off (settable per role or database on the server, out of
pgveil's sight) a backslash in '...' escapes the next character, so `'\\' -- ', ssn FROM t` hides
code from a reader that assumes the setting is on. pgveil reads SQL with it on, so for roles with
masked data a backslash in a plain string literal is refused: E'...' strings and dollar quoting
mean the same under every setting and are the way to write one."""

from __future__ import annotations

from pglast import parser

from proxy.guard.statement import GuardContext, GuardStatement
from proxy.guard.verdict import Refuse


def backslash_in_plain_string(statement: GuardStatement, context: GuardContext) -> Refuse | None:
    if not context.masked or "\\" not in statement.text:
        return None
    text = statement.text
    for token in parser.scan(text):
        if token.name == "SCONST" and text[token.start] == "'" and "\\" in text[token.start : token.end + 1]:
            return Refuse(
                "backslash-in-plain-string",
                "a backslash in a '...' string means different things depending on "
                "standard_conforming_strings; write the string as E'...' or with dollar quoting",
            )
    return None
