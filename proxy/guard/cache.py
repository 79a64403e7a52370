"""Verdict cache: reuse a statement's verdict for every statement of the same shape.

Apps send a different literal in almost every statement, so the key is the statement's *shape*:
its text with string and number literals cut out, plus everything else the verdict depends on
(policy version, role, login, search_path, tracked settings, catalog generation). A hit re-inserts
the new literals into the cached rewrite, which is safe because the rewrite never touches a
literal and the literals are cut at exactly the tokens PostgreSQL's scanner sees.

The shape lexer is deliberately narrow: any text it could read differently from PostgreSQL
(backslashes, comments, dollar quotes, E''/U&''/B''/X'' prefixes) is never cached by shape, and
a new shape is stored only after pglast's scanner agreed with the lexer on every literal.
Verdicts that depend on a literal's value (`mark_literal_dependent`) are keyed on the exact text.
"""

from __future__ import annotations

import re
from collections.abc import Hashable
from dataclasses import dataclass, replace

from pglast import parser

from proxy.guard.mask import Edit
from proxy.guard.pipeline import Analysis
from proxy.guard.verdict import Allow, Refuse, Rewrite, Verdict

_UNSHAPEABLE = re.compile(r"""\\|--|/\*|\$(?!\d)|[A-Za-z0-9_]'|&\s*["']""")
# One alternation, three captures: double-quoted identifier (kept), string literal, number literal.
_PIECES = re.compile(
    r"""("(?:[^"]|"")*")"""
    r"""|('(?:[^']|'')*')"""
    r"""|(?<![\w$.])((?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)(?![\w$.'"])"""
)
_LITERAL_TOKENS = frozenset({"SCONST", "ICONST", "FCONST"})


def shape(sql: str) -> tuple[str, list[str], list[tuple[int, int]]] | None:
    """(shape key, literal texts, literal spans) of `sql`, or None when it must not be shaped."""
    if _UNSHAPEABLE.search(sql):
        return None
    skeleton: list[str] = []
    literals: list[str] = []
    spans: list[tuple[int, int]] = []
    cursor = 0
    for match in _PIECES.finditer(sql):
        if match.group(1) is not None:
            continue
        start, end = match.span()
        skeleton.append(sql[cursor:start])
        literals.append(match.group())
        spans.append((start, end))
        cursor = end
    skeleton.append(sql[cursor:])
    return "\x00".join(skeleton), literals, spans


def _scanner_agrees(sql: str, spans: list[tuple[int, int]]) -> bool:
    try:
        tokens = parser.scan(sql)
    except parser.ParseError:
        return False
    literal_spans = [(t.start, t.end + 1) for t in tokens if t.name in _LITERAL_TOKENS]
    return literal_spans == spans


@dataclass(frozen=True, slots=True)
class _Entry:
    verdict: Verdict
    template: tuple[str, ...] | None  # rewritten text around the literals (None: Allow / Refuse)
    effects: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class CacheHit:
    verdict: Verdict
    effects: tuple[tuple[str, str], ...]


class VerdictCache:
    """Bounded map from (context key, statement shape) to verdict templates."""

    def __init__(self, max_entries: int = 20000) -> None:
        self.max_entries = max_entries
        self._entries: dict[tuple[Hashable, str, str], _Entry] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def lookup(self, sql: str, context_key: Hashable) -> CacheHit | None:
        entry = self._entries.get((context_key, "exact", sql))
        if entry is not None:
            self.hits += 1
            return CacheHit(entry.verdict, entry.effects)
        shaped = shape(sql)
        if shaped is None:
            self.misses += 1
            return None
        key, literals, _ = shaped
        entry = self._entries.get((context_key, "shape", key))
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        verdict = entry.verdict
        if entry.template is not None:
            pieces = entry.template
            text = pieces[0] + "".join(
                literal + piece for literal, piece in zip(literals, pieces[1:], strict=True)
            )
            verdict = Rewrite(text, verdict.info)
        elif isinstance(verdict, Allow):
            verdict = Allow(sql, verdict.info)
        return CacheHit(verdict, entry.effects)

    def store(self, sql: str, context_key: Hashable, analysis: Analysis,
              effects: tuple[tuple[str, str], ...] = ()) -> None:
        if len(self._entries) >= self.max_entries:
            self._entries.clear()  # crude but bounded; a full cache refills from the hot shapes
        verdict = analysis.verdict
        if analysis.literal_dependent:
            self._entries[(context_key, "exact", sql)] = _Entry(verdict, None, effects)
            return
        shaped = shape(sql)
        if shaped is None or not _scanner_agrees(sql, shaped[2]):
            return
        key, _, spans = shaped
        template: tuple[str, ...] | None = None
        if isinstance(verdict, Rewrite):
            template = _template(sql, spans, analysis.edits)
            if template is None:
                return
        elif isinstance(verdict, Refuse):
            verdict = replace(verdict)
        self._entries[(context_key, "shape", key)] = _Entry(verdict, template, effects)


def _template(sql: str, spans: list[tuple[int, int]], edits: tuple[Edit, ...]) -> tuple[str, ...] | None:
    """The rewritten text cut at the literals' new positions; None when an edit touches a literal."""
    pieces: list[str] = []
    events = sorted([(start, end, None) for start, end in spans] + [(e.start, e.end, e) for e in edits],
                    key=lambda item: item[0])
    current: list[str] = []
    cursor = 0
    for start, end, edit in events:
        if start < cursor:
            return None
        current.append(sql[cursor:start])
        if edit is None:
            pieces.append("".join(current))
            current = []
        else:
            current.append(edit.text)
        cursor = end
    current.append(sql[cursor:])
    pieces.append("".join(current))
    return tuple(pieces)
