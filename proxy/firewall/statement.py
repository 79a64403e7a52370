"""What the firewall rules look at: the SQL a client sent, parsed once by PostgreSQL's own grammar."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property

from pglast import ast, parse_sql
from pglast.parser import Token, scan
from pglast.stream import RawStream

from proxy.firewall.tree import walk

_QUOTED_LIMIT = 80


@dataclass(frozen=True, slots=True)
class Finding:
    """One rule matched: `rule` is its kebab-case name, `message` says what was seen and what to do."""

    rule: str
    message: str


@dataclass(frozen=True)
class SubmittedSql:
    """One Query or Parse message's SQL text with its pglast statements (raises pglast's ParseError)."""

    sql: str
    statements: tuple[ast.RawStmt, ...] = field(default=())

    @classmethod
    def parse(cls, sql: str) -> SubmittedSql:
        return cls(sql, tuple(parse_sql(sql)))

    @cached_property
    def tokens(self) -> tuple[Token, ...]:
        """Lexical tokens, comments included (`SQL_COMMENT` for `--`, `C_COMMENT` for `/* */`)."""
        return tuple(scan(self.sql))

    @cached_property
    def nodes(self) -> tuple[ast.Node, ...]:
        """Every node of every statement, depth first."""
        return tuple(node for raw in self.statements for node in walk(raw.stmt))

    @cached_property
    def _by_type(self) -> dict[type, list[ast.Node]]:
        found: dict[type, list[ast.Node]] = {}
        for node in self.nodes:
            found.setdefault(type(node), []).append(node)
        return found

    def nodes_of(self, kind: type[ast.Node]) -> Iterator[ast.Node]:
        """Nodes of one pglast class (they have no subclasses), depth first; indexed once per message."""
        return iter(self._by_type.get(kind, ()))


def quote(node: ast.Node) -> str:
    """Short SQL text of a node for a refusal message."""
    try:
        text = str(RawStream()(node))
    except Exception:  # deparsing is best effort: the message must never fail the verdict
        text = type(node).__name__
    return text if len(text) <= _QUOTED_LIMIT else text[: _QUOTED_LIMIT - 3] + "..."
