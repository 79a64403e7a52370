"""Agreement pass: sqlglot must find the same relations pglast found, or the statement is refused.

pglast (PostgreSQL's grammar) is the truth the rewrite works on; sqlglot is the second reader.
A statement the two read differently (`U&"\\0075sers"`, exotic quoting, grammar sqlglot lacks)
is refused for roles with masked data rather than trusted to one reading."""

from __future__ import annotations

import logging

import sqlglot
from pglast import ast, parser
from sqlglot import exp

from proxy.guard.statement import GuardStatement
from proxy.guard.verdict import Refuse

_DATA_POSITIONS = frozenset({"from", "target", "copy", "sample"})
_QUERY_STARTS = frozenset(
    {"SELECT", "WITH", "VALUES", "TABLE", "INSERT", "UPDATE", "DELETE", "MERGE", "ASCII_40"}
)

logging.getLogger("sqlglot").setLevel(logging.ERROR)


def parsers_agree(statement: GuardStatement) -> Refuse | None:
    expected = {ref.parts[-1] for ref in statement.relations if ref.position in _DATA_POSITIONS}
    if not expected:
        return None
    text = _analysable_text(statement)
    try:
        trees = sqlglot.parse(text, read="postgres")
    except Exception:
        return _disagreement("sqlglot cannot parse it")
    found: set[str] = set()
    for tree in trees:
        if tree is None or isinstance(tree, exp.Command):
            return _disagreement("sqlglot cannot analyse this kind of statement")
        for table in tree.find_all(exp.Table):
            identifier = table.this
            if not isinstance(identifier, exp.Identifier) or table.find_ancestor(exp.Lock) is not None:
                continue  # FOR UPDATE OF x names a FROM item, not a relation
            found.add(identifier.name if identifier.quoted else identifier.name.lower())
    if found != expected:
        return _disagreement(
            f"PostgreSQL's grammar reads relations {sorted(expected)}, sqlglot reads {sorted(found)}"
        )
    return None


def _disagreement(why: str) -> Refuse:
    return Refuse("parser-disagreement", f"pgveil's two SQL parsers read this statement differently ({why}); "
                  "write it in plain SQL without exotic quoting or escapes")


def _analysable_text(statement: GuardStatement) -> str:
    """The statement, or for DECLARE/PREPARE/EXPLAIN (which sqlglot cannot read) the query they wrap."""
    node = statement.node
    if not isinstance(node, ast.DeclareCursorStmt | ast.PrepareStmt | ast.ExplainStmt):
        return statement.text
    text = statement.text
    tokens = [token for token in parser.scan(text) if token.name not in ("C_COMMENT", "SQL_COMMENT")]
    marker = {ast.DeclareCursorStmt: "FOR", ast.PrepareStmt: "AS"}.get(type(node))
    index = 1
    if marker is not None:
        index = next((i + 1 for i, token in enumerate(tokens) if token.name == marker), len(tokens))
    elif len(tokens) > 1 and tokens[1].name == "ASCII_40":  # EXPLAIN (options) query
        depth = 0
        for i, token in enumerate(tokens[1:], start=1):
            depth += {"ASCII_40": 1, "ASCII_41": -1}.get(token.name, 0)
            if depth == 0:
                index = i + 1
                break
    depth = 0
    for token in tokens[index:]:
        if depth == 0 and token.name in _QUERY_STARTS:
            return text[token.start :]
        depth += {"ASCII_40": 1, "ASCII_41": -1}.get(token.name, 0)
    return text
