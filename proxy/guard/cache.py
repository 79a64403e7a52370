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
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from types import MethodType
from typing import NamedTuple

from pglast import parser

from proxy.guard.mask import Edit
from proxy.guard.pipeline import Analysis
from proxy.guard.positions import Splices
from proxy.guard.verdict import Allow, Rewrite, Verdict

_UNSHAPEABLE = re.compile(r"""\\|--|/\*|\$(?!\d)""")
_PREFIX_CHARACTERS = frozenset("&$_0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
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
        start, end = match.span()
        if match.group(3) is None and start > 0 and (sql[start - 1] in _PREFIX_CHARACTERS
                                                       or not sql[start - 1].isascii()):
            return None  # E'', U&'', B'', X'', N'', U&"": read differently from a plain literal
        if match.group(1) is not None:
            continue
        skeleton.append(sql[cursor:start])
        literals.append(match.group())
        spans.append((start, end))
        cursor = end
    skeleton.append(sql[cursor:])
    return "\x00".join(skeleton), literals, spans


def _scanner_agrees(sql: str, spans: list[tuple[int, int]]) -> bool:
    try:
        tokens = parser.scan(sql)
    except (parser.ParseError, UnicodeEncodeError):  # UnicodeEncodeError: bytes that are not UTF8
        return False
    literal_spans = [(t.start, t.end + 1) for t in tokens if t.name in _LITERAL_TOKENS]
    return literal_spans == spans


_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_NUMBER_NEIGHBOURS = frozenset("0123456789.$_eE") | _PREFIX_CHARACTERS


def bucket(sql: str) -> bytes:
    """A cheap (C-speed) hash bucket for a statement's shape: string contents and digits dropped.
    Different shapes can share a bucket; `_Entry.extract` decides which, if any, matches."""
    return "'".join(sql.split("'")[::2]).encode("utf-8", "surrogatepass").translate(None, b"0123456789")


class CacheHit(NamedTuple):
    verdict: Verdict
    effects: tuple[tuple[str, str], ...]
    ddl: bool  # the statement kind includes ddl (the catalog is read again after it runs)


@dataclass(frozen=True, slots=True)
class _Entry:
    verdict: Verdict
    skeleton: tuple[str, ...]  # the statement's text around its literals
    kinds: str  # one letter per literal: s (string) or n (number)
    template: tuple[str, ...] | None  # rewritten text around the literals (None: Allow / Refuse)
    effects: tuple[tuple[str, str], ...]
    hit: CacheHit  # the answer when the verdict needs no new text (exact entries, refusals)
    layout: tuple[tuple[int, int, int, int], ...] = ()  # the rewrite's splices around the literals

    def extract(self, sql: str) -> list[str] | None:
        """The literals of `sql` when it is this entry's skeleton with other literals, else None.

        Equal skeleton text and well-formed literal tokens of the same kinds mean PostgreSQL's
        scanner reads `sql` exactly as it read the stored statement, literal for literal."""
        skeleton = self.skeleton
        if not sql.startswith(skeleton[0]):
            return None
        position = len(skeleton[0])
        literals: list[str] = []
        for kind, piece in zip(self.kinds, skeleton[1:], strict=True):
            if kind == "s":
                if sql[position : position + 1] != "'":
                    return None
                end = sql.find("'", position + 1)
                while end != -1 and sql[end + 1 : end + 2] == "'":
                    end = sql.find("'", end + 2)
                if end == -1:
                    return None
                end += 1
                literal = sql[position:end]
                if "\\" in literal:
                    return None
            else:
                match = _NUMBER.match(sql, position)
                if match is None:
                    return None
                end = match.end()
                literal = match.group()
            if not sql.startswith(piece, end):
                return None
            literals.append(literal)
            position = end + len(piece)
        return literals if position == len(sql) else None


def _compiled_lookup() -> Callable[..., CacheHit | None] | None:
    """proxy.hitpath.cache_lookup when its compiled copy runs (see proxy/native.py), else None."""
    if not _LOOKUP:
        from proxy import hitpath  # (it imports the layers, which import this module)
        from proxy.native import IMPLEMENTATIONS, compiled

        module = compiled(hitpath)
        _LOOKUP.append(module.cache_lookup if IMPLEMENTATIONS.get(hitpath.__name__) == "mypyc" else None)
    return _LOOKUP[0]


_LOOKUP: list[Callable[..., CacheHit | None] | None] = []


_BUCKET_SHAPES = 8
"""Shapes kept per bucket (the oldest goes first): every lookup of a bucket may scan them all."""


class VerdictCache:
    """Bounded map from (context key, statement shape) to verdict templates: at most `max_entries`
    entries and `max_chars` characters of stored statements (running totals; emptied when full)."""

    def __init__(self, max_entries: int = 20000, max_chars: int = 32 * 1024 * 1024) -> None:
        self.max_entries = max_entries
        self.max_chars = max_chars
        self._exact: dict[tuple[Hashable, str], _Entry] = {}
        self._shapes: dict[tuple[Hashable, bytes], list[_Entry]] = {}
        self._entries = 0  # entries stored since the last clear (an upper bound of len(self))
        self._chars = 0  # characters of the statements behind them
        self.hits = 0
        self.misses = 0
        compiled_lookup = _compiled_lookup()
        if compiled_lookup is not None:  # the same lookup, compiled (proxy/hitpath.py): no Python frame
            self.lookup = MethodType(compiled_lookup, self)  # type: ignore[method-assign]

    def __len__(self) -> int:
        return len(self._exact) + sum(len(entries) for entries in self._shapes.values())

    def clear(self) -> None:
        self._exact.clear()
        self._shapes.clear()
        self._entries = self._chars = 0

    def lookup(self, sql: str, context_key: Hashable) -> CacheHit | None:
        if self._exact:  # (empty for most applications: no key to build and hash then)
            entry = self._exact.get((context_key, sql))
            if entry is not None:
                self.hits += 1
                return entry.hit
        for entry in self._shapes.get((context_key, bucket(sql)), ()):
            literals = entry.extract(sql)
            if literals is None:
                continue
            self.hits += 1
            verdict = entry.verdict
            if entry.template is not None:
                pieces = entry.template
                if len(literals) == 1:
                    text = pieces[0] + literals[0] + pieces[1]
                else:
                    text = pieces[0] + "".join(
                        literal + piece for literal, piece in zip(literals, pieces[1:], strict=True)
                    )
                verdict = Rewrite(text, verdict.info, Splices(layout=entry.layout, literals=literals))
            elif isinstance(verdict, Allow):
                verdict = Allow(sql, verdict.info)
            else:
                return entry.hit
            return CacheHit(verdict, entry.effects, entry.hit.ddl)
        self.misses += 1
        return None

    def store(self, sql: str, context_key: Hashable, analysis: Analysis,
              effects: tuple[tuple[str, str], ...] = ()) -> None:
        if self._entries >= self.max_entries or self._chars + len(sql) > self.max_chars:
            self.clear()  # crude but bounded; a full cache refills from the hot shapes
        verdict = analysis.verdict
        hit = CacheHit(verdict, effects, "ddl" in verdict.info.kind.split(","))
        if analysis.literal_dependent:
            self._exact[(context_key, sql)] = _Entry(verdict, (sql,), "", None, effects, hit)
            self._entries += 1
            self._chars += len(sql)
            return
        shaped = shape(sql)
        if shaped is None or not _scanner_agrees(sql, shaped[2]):
            return
        key, literals, spans = shaped
        for (start, end), literal in zip(spans, literals, strict=True):
            if literal[0] != "'" and (sql[start - 1 : start] in _NUMBER_NEIGHBOURS
                                      or sql[end : end + 1] in _NUMBER_NEIGHBOURS):
                return  # a neighbour that could merge with another number: never reuse
        template: tuple[str, ...] | None = None
        layout: tuple[tuple[int, int, int, int], ...] = ()
        if isinstance(verdict, Rewrite):
            template = _template(sql, spans, analysis.edits)
            if template is None:
                return
            layout = _layout(spans, analysis.edits)
        kinds = "".join("s" if literal[0] == "'" else "n" for literal in literals)
        entry = _Entry(verdict, tuple(key.split("\x00")), kinds, template, effects, hit, layout)
        entries = self._shapes.setdefault((context_key, bucket(sql)), [])
        if all(existing.skeleton != entry.skeleton for existing in entries):
            if len(entries) >= _BUCKET_SHAPES:
                del entries[0]
            entries.append(entry)
            self._entries += 1
            self._chars += len(sql)


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


def _layout(spans: list[tuple[int, int]], edits: tuple[Edit, ...]) -> tuple[tuple[int, int, int, int], ...]:
    """Each edit as (literals before it, start and end in the text without its literals, length of
    its text): with another statement's literals, where the edit stands in that statement."""
    layout: list[tuple[int, int, int, int]] = []
    for edit in edits:
        before = [(start, end) for start, end in spans if end <= edit.start]
        removed = sum(end - start for start, end in before)
        layout.append((len(before), edit.start - removed, edit.end - removed, len(edit.text)))
    return tuple(layout)
