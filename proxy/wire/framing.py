"""Framing: cut a byte stream into startup packets and typed messages, within size limits."""

from __future__ import annotations

from typing import Any

from proxy.native import IMPLEMENTATIONS, compiled
from proxy.wire import scanner as _scanner
from proxy.wire.codec import HEADER, LENGTH
from proxy.wire.errors import ProtocolViolation
from proxy.wire.scanner import Span
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


PureMessageScanner = _scanner.MessageScanner
"""The scanner as plain Python (proxy/wire/scanner.py), whatever MessageScanner is."""

MessageScanner: Any = compiled(_scanner).MessageScanner
"""The scanner the relay uses: the compiled one when it is current (proxy/native.py)."""
SCANNER_IMPLEMENTATION = IMPLEMENTATIONS[_scanner.__name__]
"""Which one: "mypyc" or "python (why)"."""

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "POSTGRES_MAX_MESSAGE_SIZE",
    "SCANNER_IMPLEMENTATION",
    "MessageScanner",
    "PureMessageScanner",
    "ReceiveBuffer",
    "Span",
]
