"""Framing: cut a byte stream into startup packets and typed messages, within size limits."""

from __future__ import annotations

from proxy.wire.codec import HEADER, LENGTH
from proxy.wire.errors import ProtocolViolation
from proxy.wire.startup import MAX_STARTUP_PACKET

DEFAULT_MAX_MESSAGE_SIZE = 64 * 1024 * 1024
POSTGRES_MAX_MESSAGE_SIZE = 1024 * 1024 * 1024  # PostgreSQL's own cap (MaxAllocSize)


class ReceiveBuffer:
    """Bytes received and not yet framed; hands out whole startup packets or messages."""

    __slots__ = ("_data", "max_message_size")

    def __init__(self, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        self._data = bytearray()
        self.max_message_size = max_message_size

    def feed(self, data: bytes) -> None:
        self._data += data

    def __len__(self) -> int:
        return len(self._data)

    def next_startup_packet(self) -> bytes | None:
        """The body of the next startup packet (after its length), or None until it is complete."""
        if len(self._data) < 4:
            return None
        (length,) = LENGTH.unpack_from(self._data, 0)
        if length < 8 or length > MAX_STARTUP_PACKET:
            raise ProtocolViolation(f"invalid startup packet length {length}")
        if len(self._data) < length:
            return None
        body = bytes(self._data[4:length])
        del self._data[:length]
        return body

    def next_message(self) -> tuple[int, bytes] | None:
        """(type byte, body) of the next message, or None until it is complete."""
        if len(self._data) < 5:
            return None
        tag, length = HEADER.unpack_from(self._data, 0)
        if length < 4 or length - 4 > self.max_message_size:
            raise ProtocolViolation(f"invalid message length {length} for message type {chr(tag)!r}")
        end = length + 1
        if len(self._data) < end:
            return None
        body = bytes(self._data[5:end])
        del self._data[:end]
        return tag, body

    def take_byte(self) -> int:
        """One raw byte (the answer to an SSLRequest)."""
        value = self._data[0]
        del self._data[:1]
        return value

    def take(self) -> bytes:
        """Everything still buffered (used when the stream switches to relaying)."""
        data = bytes(self._data)
        self._data.clear()
        return data


_PASS, _WATCH = 1, 2


def _kinds(watched: bytes, allowed: bytes) -> bytes:
    """One lookup per type byte: 0 not allowed, 1 relayed unread, 2 watched."""
    table = bytearray(256)
    for tag in allowed:
        table[tag] = _PASS
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

    __slots__ = ("_kinds", "_limit", "_pending", "_skip")

    def __init__(self, watched: bytes, allowed: bytes, max_message_size: int) -> None:
        self._kinds = _kinds(watched, allowed)
        self._limit = max_message_size + 4  # the length field counts itself
        self._pending = b""  # an incomplete header, or an incomplete watched message
        self._skip = 0  # bytes of an unwatched message body still to pass through

    @property
    def mid_message(self) -> bool:
        """True while the bytes relayed so far end inside a message."""
        return bool(self._pending) or self._skip > 0

    def feed(self, data: bytes) -> tuple[bytes, list[Span]]:
        """Returns (bytes to relay now, spans of the watched messages inside them)."""
        if self._pending:
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
        kinds = self._kinds
        limit = self._limit
        unpack = HEADER.unpack_from
        while True:
            if n - pos < 5:
                if pos < n:
                    self._pending = data[pos:]
                    data = data[:pos]
                return data, spans
            tag, length = unpack(data, pos)
            kind = kinds[tag]
            if not kind:
                raise ProtocolViolation(f"unexpected message type {chr(tag)!r}")
            if not 4 <= length <= limit:
                raise ProtocolViolation(f"invalid message length {length} for message type {chr(tag)!r}")
            end = pos + 1 + length
            if kind == _WATCH:
                if end > n:
                    self._pending = data[pos:]
                    return data[:pos], spans
                spans.append((tag, pos, end))
            elif end > n:
                self._skip = end - n
                return data, spans
            pos = end
