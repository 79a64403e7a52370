"""Error positions: a place PostgreSQL reports in pgveil's rewrite, given back in the client's text.

The mask rewrite splices the client's text (it replaces relation names with qualified names or
masked derived tables and leaves every other character where it was), so each character of the
rewrite outside a splice is a character of the client's text, at a known shift.
"""

from __future__ import annotations

from collections.abc import Sequence

Span = tuple[int, int, int]
"""One splice: (start, end) of the client's text it replaced (0-based characters) and the length
of what replaced it."""


class Splices:
    """Where a rewrite replaced the client's text, in text order.

    Built from the spans themselves, or (for a verdict-cache hit, which re-inserts other
    literals into a cached rewrite) from the spans as they stand in the text without its literals
    and the new literals, worked out only when an error position is translated."""

    __slots__ = ("_layout", "_literals", "_spans")

    def __init__(self, spans: Sequence[Span] = (), layout: Sequence[tuple[int, int, int, int]] = (),
                 literals: Sequence[str] = ()) -> None:
        self._spans: tuple[Span, ...] | None = tuple(spans) if not layout else None
        self._layout = tuple(layout)  # (literals before, start without literals, end without, length)
        self._literals = tuple(literals)

    @property
    def literals(self) -> tuple[str, ...] | None:
        """The statement's literals, in text order, when these splices come from a verdict-cache hit
        (None: built from the spans of a fresh analysis)."""
        return self._literals if self._layout else None

    @property
    def spans(self) -> tuple[Span, ...]:
        if self._spans is None:
            before = [0]
            for literal in self._literals:
                before.append(before[-1] + len(literal))
            self._spans = tuple((start + before[count], end + before[count], length)
                                for count, start, end, length in self._layout)
        return self._spans

    def client_position(self, position: int) -> int:
        """PostgreSQL's 1-based character `position` in the rewrite -> the same place in the
        client's text; a place inside a splice is the start of what the splice replaced."""
        index = position - 1
        shift = 0
        for start, end, length in self.spans:
            if index < start + shift:
                break
            if index < start + shift + length:
                return start + 1
            shift += length - (end - start)
        return max(1, index - shift + 1)

    def __repr__(self) -> str:
        return f"Splices({self.spans!r})"
