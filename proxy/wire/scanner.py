"""The relay's message scanner: frames a stream in flight, reporting only the message types asked for.

This module is written so that mypyc can compile it (`pip install` does, into
proxy.wire._scanner_native, when a C compiler is there; proxy.wire.framing picks that copy only if
it was built from this exact file). Plain Python runs it the same way: the compiled copy is speed,
not behaviour, and tests/test_native.py checks that the two agree. One difference: compiled,
`feed` takes `bytes` only (what every transport hands to data_received), not a bytearray or
memoryview.
"""

from __future__ import annotations

from typing import Final

from proxy.wire.errors import ProtocolViolation

_PASS: Final = 1
_WATCH: Final = 2
_HOLD: Final = 3
_COUNT: Final = 4
_COUNT_HELD: Final = 5


def _kinds(watched: bytes, allowed: bytes, held: bytes = b"", counted: bytes = b"") -> bytes:
    """One lookup per type byte: 0 not allowed, 1 relayed unread, 2 watched, 3 held whole but
    not reported, 4 counted (relayed unread while the quota lasts, then held and reported), 5
    counted and held (held whole but not reported while the quota lasts, then reported)."""
    table = bytearray(256)
    for tag in allowed:
        table[tag] = _PASS
    for tag in held:
        if table[tag]:
            table[tag] = _HOLD
    for tag in counted:
        if table[tag]:
            # a counted type that is also held stays whole: honeytokens are searched in every row
            table[tag] = _COUNT_HELD if table[tag] == _HOLD else _COUNT
    for tag in watched:
        table[tag] = _WATCH
    return bytes(table)


Span = tuple[int, int, int]
"""(type byte, start of the message, end of the message) inside the bytes `feed` returns."""


class MessageScanner:
    """Frames a relayed stream: unwatched messages pass through as raw bytes, even in pieces;
    watched ones are held until complete and reported as spans for the caller to inspect.

    Only the 5-byte header of an unwatched message is ever looked at, so large DataRows and
    CopyData flow through without being buffered or decoded.
    """

    __slots__ = ("_counting", "_have", "_kinds", "_limit", "_parts", "_pending", "_skip", "_want",
                 "counted", "marks", "quota")

    def __init__(self, watched: bytes, allowed: bytes, max_message_size: int, held: bytes = b"",
                 counted: bytes = b"") -> None:
        """`held`: allowed types that are relayed unread but only whole (never a partial message),
        so the caller can search the bytes `feed` returns knowing no such message is cut.

        `counted` (row budgets): types counted and relayed unread while `quota` (rows) lasts (-1:
        without end); once it is spent each one is held whole and reported as a span. A watched
        message spends it (a result may end there: the caller gives the next one its own). `counted` is the
        running count of those not reported; `marks` (cleared by each `feed`) holds, for each span
        reported, the running count when it was reached."""
        self._kinds = _kinds(watched, allowed, held, counted)
        self._counting = bool(counted)
        self.counted = 0
        self.quota = 0
        self.marks: list[int] = []
        self._limit = max_message_size + 4  # the length field counts itself
        self._pending = b""  # an incomplete header
        self._skip = 0  # bytes of an unwatched message body still to pass through
        # an incomplete watched or held message: its pieces, their length, its whole length (so a
        # large one arriving in many reads is joined once, not copied again on every read)
        self._parts: list[bytes] = []
        self._have = 0
        self._want = 0

    @property
    def mid_message(self) -> bool:
        """True while the bytes relayed so far end inside a message."""
        return bool(self._pending) or self._skip > 0 or self._want > 0

    def feed(self, data: bytes) -> tuple[bytes, list[Span]]:
        """Returns (bytes to relay now, spans of the watched messages inside them)."""
        if self._want:
            self._parts.append(data)
            self._have += len(data)
            if self._have < self._want:
                return b"", []
            data = b"".join(self._parts)
            self._parts = []
            self._have = 0
            self._want = 0
        elif self._pending:
            data = self._pending + data
            self._pending = b""
        n = len(data)
        pos = 0
        if self._skip:
            if self._skip >= n:
                self._skip -= n
                return data, []
            pos = self._skip
            self._skip = 0
        spans: list[Span] = []
        counting = self._counting
        if counting:
            self.marks = []
        kinds = self._kinds
        limit = self._limit
        while True:
            if n - pos < 5:
                if pos < n:
                    self._pending = data[pos:]
                    data = data[:pos]
                return data, spans
            tag = data[pos]  # the header, read byte by byte: what compiled code does fastest
            length = (data[pos + 1] << 24) | (data[pos + 2] << 16) | (data[pos + 3] << 8) | data[pos + 4]
            kind = kinds[tag]
            if not kind:
                raise ProtocolViolation(f"unexpected message type {chr(tag)!r}")
            if not 4 <= length <= limit:
                raise ProtocolViolation(f"invalid message length {length} for message type {chr(tag)!r}")
            end = pos + 1 + length
            if kind == _COUNT or kind == _COUNT_HELD:  # noqa: SIM109 (compiled: two int compares)
                quota = self.quota
                if quota != 0:  # within the quota: counted, relayed unread (even in pieces unless held)
                    if kind == _COUNT_HELD and end > n:  # counted once whole (its header is read again)
                        self._parts = [data[pos:]]
                        self._have = n - pos
                        self._want = end - pos
                        return data[:pos], spans
                    if quota > 0:
                        self.quota = quota - 1
                    self.counted += 1
                    kind = _PASS if kind == _COUNT else _HOLD
                else:
                    kind = _COUNT
            if kind == _PASS:
                if end > n:
                    self._skip = end - n
                    return data, spans
            else:
                if end > n:
                    self._parts = [data[pos:]]
                    self._have = n - pos
                    self._want = end - pos
                    return data[:pos], spans
                if kind == _WATCH or kind == _COUNT:  # noqa: SIM109 (compiled: two int compares)
                    spans.append((tag, pos, end))
                    if counting:
                        self.marks.append(self.counted)
                        if kind == _WATCH:  # a result may end here: the next one's rows wait for a new quota
                            self.quota = 0
            pos = end
