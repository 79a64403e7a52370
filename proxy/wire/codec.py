"""Low-level field readers and writers shared by every message: ints, C strings, byte arrays."""

from __future__ import annotations

import struct

from proxy.wire.errors import ProtocolViolation

INT16 = struct.Struct("!h")
UINT16 = struct.Struct("!H")
INT32 = struct.Struct("!i")
HEADER = struct.Struct("!BI")  # type byte, length (including itself)
LENGTH = struct.Struct("!I")

ENCODING = "utf-8"
ERRORS = "surrogateescape"  # arbitrary client bytes survive a decode/encode round trip


def text(raw: bytes) -> str:
    return raw.decode(ENCODING, ERRORS)


def cstring(value: str) -> bytes:
    raw = value.encode(ENCODING, ERRORS)
    if b"\x00" in raw:
        raise ValueError("a protocol string cannot contain a NUL byte")
    return raw + b"\x00"


class BodyReader:
    """Reads fields from one message body; running past its end is a protocol violation."""

    __slots__ = ("_body", "_pos", "_what")

    def __init__(self, body: bytes, what: str) -> None:
        self._body = body
        self._pos = 0
        self._what = what

    def _need(self, n: int) -> None:
        if n < 0 or self._pos + n > len(self._body):
            raise ProtocolViolation(f"truncated {self._what} message")

    def int8(self) -> int:
        self._need(1)
        value = self._body[self._pos]
        self._pos += 1
        return value

    def int16(self) -> int:
        self._need(2)
        (value,) = INT16.unpack_from(self._body, self._pos)
        self._pos += 2
        return int(value)

    def uint16(self) -> int:
        self._need(2)
        (value,) = UINT16.unpack_from(self._body, self._pos)
        self._pos += 2
        return int(value)

    def int32(self) -> int:
        self._need(4)
        (value,) = INT32.unpack_from(self._body, self._pos)
        self._pos += 4
        return int(value)

    def uint32(self) -> int:
        self._need(4)
        (value,) = LENGTH.unpack_from(self._body, self._pos)
        self._pos += 4
        return int(value)

    def raw(self, n: int) -> bytes:
        self._need(n)
        value = self._body[self._pos : self._pos + n]
        self._pos += n
        return value

    def rest(self) -> bytes:
        value = self._body[self._pos :]
        self._pos = len(self._body)
        return value

    def cstring(self) -> str:
        end = self._body.find(b"\x00", self._pos)
        if end < 0:
            raise ProtocolViolation(f"unterminated string in {self._what} message")
        value = self._body[self._pos : end]
        self._pos = end + 1
        return text(value)

    def count(self, item_size: int) -> int:
        """An int16 element count, checked against the bytes that are left."""
        n = self.uint16()
        self._need(n * item_size)
        return n

    def sized_value(self) -> bytes | None:
        """An int32 length (-1 is NULL) followed by that many bytes."""
        n = self.int32()
        if n == -1:
            return None
        if n < 0:
            raise ProtocolViolation(f"negative value length in {self._what} message")
        return self.raw(n)

    def at_end(self) -> bool:
        return self._pos == len(self._body)

    def end(self) -> None:
        if self._pos != len(self._body):
            raise ProtocolViolation(f"{self._what} message has {len(self._body) - self._pos} extra bytes")


def frame(tag: bytes, body: bytes) -> bytes:
    return tag + LENGTH.pack(len(body) + 4) + body


def int16s(values: tuple[int, ...]) -> bytes:
    return UINT16.pack(len(values)) + b"".join(INT16.pack(v) for v in values)


def int32s(values: tuple[int, ...], signed: bool = True) -> bytes:
    packer = INT32 if signed else LENGTH
    return UINT16.pack(len(values)) + b"".join(packer.pack(v) for v in values)


def sized_values(values: tuple[bytes | None, ...]) -> bytes:
    parts = [UINT16.pack(len(values))]
    for value in values:
        if value is None:
            parts.append(INT32.pack(-1))
        else:
            parts.append(INT32.pack(len(value)))
            parts.append(value)
    return b"".join(parts)
