"""Messages a client sends after startup (protocol 3.0 and 3.2), as immutable values."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from proxy.wire.codec import (
    INT16,
    INT32,
    LENGTH,
    BodyReader,
    cstring,
    frame,
    int16s,
    int32s,
    sized_values,
    text,
)
from proxy.wire.errors import ProtocolViolation


@dataclass(frozen=True, slots=True)
class Query:
    """Simple-protocol query: one string that may hold several statements."""

    TAG: ClassVar[bytes] = b"Q"
    sql: str

    def encode(self) -> bytes:
        return frame(self.TAG, cstring(self.sql))

    @classmethod
    def decode(cls, body: bytes) -> Query:
        if body and body.find(b"\x00") == len(body) - 1:  # the usual case, without a BodyReader
            return cls(text(body[:-1]))
        reader = BodyReader(body, "Query")
        sql = reader.cstring()
        reader.end()
        return cls(sql)


@dataclass(frozen=True, slots=True)
class Parse:
    TAG: ClassVar[bytes] = b"P"
    statement: str
    sql: str
    param_types: tuple[int, ...] = ()

    def encode(self) -> bytes:
        body = cstring(self.statement) + cstring(self.sql) + int32s(self.param_types, signed=False)
        return frame(self.TAG, body)

    @classmethod
    def decode(cls, body: bytes) -> Parse:
        reader = BodyReader(body, "Parse")
        statement = reader.cstring()
        sql = reader.cstring()
        types = tuple(reader.uint32() for _ in range(reader.count(4)))
        reader.end()
        return cls(statement, sql, types)


@dataclass(frozen=True, slots=True)
class Bind:
    TAG: ClassVar[bytes] = b"B"
    portal: str
    statement: str
    param_formats: tuple[int, ...] = ()
    params: tuple[bytes | None, ...] = ()
    result_formats: tuple[int, ...] = ()

    def encode(self) -> bytes:
        body = (
            cstring(self.portal)
            + cstring(self.statement)
            + int16s(self.param_formats)
            + sized_values(self.params)
            + int16s(self.result_formats)
        )
        return frame(self.TAG, body)

    @classmethod
    def decode(cls, body: bytes) -> Bind:
        reader = BodyReader(body, "Bind")
        portal = reader.cstring()
        statement = reader.cstring()
        param_formats = tuple(reader.int16() for _ in range(reader.count(2)))
        params = tuple(reader.sized_value() for _ in range(reader.count(4)))
        result_formats = tuple(reader.int16() for _ in range(reader.count(2)))
        reader.end()
        return cls(portal, statement, param_formats, params, result_formats)


def _target_kind(reader: BodyReader, what: str) -> str:
    kind = chr(reader.int8())
    if kind not in ("S", "P"):
        raise ProtocolViolation(f"invalid {what} target {kind!r} (expected 'S' or 'P')")
    return kind


@dataclass(frozen=True, slots=True)
class Describe:
    """Describe a prepared statement (kind 'S') or a portal (kind 'P')."""

    TAG: ClassVar[bytes] = b"D"
    kind: str
    name: str

    def encode(self) -> bytes:
        return frame(self.TAG, self.kind.encode() + cstring(self.name))

    @classmethod
    def decode(cls, body: bytes) -> Describe:
        reader = BodyReader(body, "Describe")
        kind = _target_kind(reader, "Describe")
        name = reader.cstring()
        reader.end()
        return cls(kind, name)


@dataclass(frozen=True, slots=True)
class Execute:
    TAG: ClassVar[bytes] = b"E"
    portal: str
    max_rows: int = 0

    def encode(self) -> bytes:
        return frame(self.TAG, cstring(self.portal) + INT32.pack(self.max_rows))

    @classmethod
    def decode(cls, body: bytes) -> Execute:
        reader = BodyReader(body, "Execute")
        portal = reader.cstring()
        max_rows = reader.int32()
        reader.end()
        return cls(portal, max_rows)


@dataclass(frozen=True, slots=True)
class Close:
    """Close a prepared statement (kind 'S') or a portal (kind 'P')."""

    TAG: ClassVar[bytes] = b"C"
    kind: str
    name: str

    def encode(self) -> bytes:
        return frame(self.TAG, self.kind.encode() + cstring(self.name))

    @classmethod
    def decode(cls, body: bytes) -> Close:
        reader = BodyReader(body, "Close")
        kind = _target_kind(reader, "Close")
        name = reader.cstring()
        reader.end()
        return cls(kind, name)


@dataclass(frozen=True, slots=True)
class Sync:
    TAG: ClassVar[bytes] = b"S"

    def encode(self) -> bytes:
        return frame(self.TAG, b"")

    @classmethod
    def decode(cls, body: bytes) -> Sync:
        BodyReader(body, "Sync").end()
        return cls()


@dataclass(frozen=True, slots=True)
class Flush:
    TAG: ClassVar[bytes] = b"H"

    def encode(self) -> bytes:
        return frame(self.TAG, b"")

    @classmethod
    def decode(cls, body: bytes) -> Flush:
        BodyReader(body, "Flush").end()
        return cls()


@dataclass(frozen=True, slots=True)
class FunctionCall:
    """Fast-path call of a function by OID."""

    TAG: ClassVar[bytes] = b"F"
    function_oid: int
    arg_formats: tuple[int, ...] = ()
    args: tuple[bytes | None, ...] = ()
    result_format: int = 0

    def encode(self) -> bytes:
        body = (
            LENGTH.pack(self.function_oid)
            + int16s(self.arg_formats)
            + sized_values(self.args)
            + INT16.pack(self.result_format)
        )
        return frame(self.TAG, body)

    @classmethod
    def decode(cls, body: bytes) -> FunctionCall:
        reader = BodyReader(body, "FunctionCall")
        oid = reader.uint32()
        arg_formats = tuple(reader.int16() for _ in range(reader.count(2)))
        args = tuple(reader.sized_value() for _ in range(reader.count(4)))
        result_format = reader.int16()
        reader.end()
        return cls(oid, arg_formats, args, result_format)


@dataclass(frozen=True, slots=True)
class CopyData:
    """A chunk of COPY data (the same message in both directions)."""

    TAG: ClassVar[bytes] = b"d"
    data: bytes

    def encode(self) -> bytes:
        return frame(self.TAG, self.data)

    @classmethod
    def decode(cls, body: bytes) -> CopyData:
        return cls(bytes(body))


@dataclass(frozen=True, slots=True)
class CopyDone:
    TAG: ClassVar[bytes] = b"c"

    def encode(self) -> bytes:
        return frame(self.TAG, b"")

    @classmethod
    def decode(cls, body: bytes) -> CopyDone:
        BodyReader(body, "CopyDone").end()
        return cls()


@dataclass(frozen=True, slots=True)
class CopyFail:
    TAG: ClassVar[bytes] = b"f"
    message: str

    def encode(self) -> bytes:
        return frame(self.TAG, cstring(self.message))

    @classmethod
    def decode(cls, body: bytes) -> CopyFail:
        reader = BodyReader(body, "CopyFail")
        message = reader.cstring()
        reader.end()
        return cls(message)


@dataclass(frozen=True, slots=True)
class Terminate:
    TAG: ClassVar[bytes] = b"X"

    def encode(self) -> bytes:
        return frame(self.TAG, b"")

    @classmethod
    def decode(cls, body: bytes) -> Terminate:
        BodyReader(body, "Terminate").end()
        return cls()


# The 'p' message carries whichever authentication response the server asked for; only the
# authentication state knows which, so each has its own decoder and decode_frontend() returns
# the opaque PasswordMessage form.


@dataclass(frozen=True, slots=True)
class PasswordMessage:
    """Cleartext or MD5 password response (a C string)."""

    TAG: ClassVar[bytes] = b"p"
    password: str

    def encode(self) -> bytes:
        return frame(self.TAG, cstring(self.password))

    @classmethod
    def decode(cls, body: bytes) -> PasswordMessage:
        reader = BodyReader(body, "PasswordMessage")
        password = reader.cstring()
        reader.end()
        return cls(password)


@dataclass(frozen=True, slots=True)
class SASLInitialResponse:
    TAG: ClassVar[bytes] = b"p"
    mechanism: str
    data: bytes | None

    def encode(self) -> bytes:
        tail = INT32.pack(-1) if self.data is None else INT32.pack(len(self.data)) + self.data
        return frame(self.TAG, cstring(self.mechanism) + tail)

    @classmethod
    def decode(cls, body: bytes) -> SASLInitialResponse:
        reader = BodyReader(body, "SASLInitialResponse")
        mechanism = reader.cstring()
        data = reader.sized_value()
        reader.end()
        return cls(mechanism, data)


@dataclass(frozen=True, slots=True)
class SASLResponse:
    TAG: ClassVar[bytes] = b"p"
    data: bytes

    def encode(self) -> bytes:
        return frame(self.TAG, self.data)

    @classmethod
    def decode(cls, body: bytes) -> SASLResponse:
        return cls(bytes(body))


@dataclass(frozen=True, slots=True)
class GSSResponse:
    TAG: ClassVar[bytes] = b"p"
    data: bytes

    def encode(self) -> bytes:
        return frame(self.TAG, self.data)

    @classmethod
    def decode(cls, body: bytes) -> GSSResponse:
        return cls(bytes(body))


FrontendMessage = (
    Query | Parse | Bind | Describe | Execute | Close | Sync | Flush | FunctionCall
    | CopyData | CopyDone | CopyFail | Terminate
    | PasswordMessage | SASLInitialResponse | SASLResponse | GSSResponse
)

_DECODERS: dict[int, Callable[[bytes], FrontendMessage]] = {
    cls.TAG[0]: cls.decode
    for cls in (Query, Parse, Bind, Describe, Execute, Close, Sync, Flush, FunctionCall,
                CopyData, CopyDone, CopyFail, Terminate, PasswordMessage)
}

FRONTEND_TAGS = bytes(sorted(_DECODERS))
"""Every message type byte a client may send after the startup packet."""


def decode_frontend(tag: int, body: bytes) -> FrontendMessage:
    """Decode one framed client message ('p' decodes as PasswordMessage; see above)."""
    decoder = _DECODERS.get(tag)
    if decoder is None:
        raise ProtocolViolation(f"unknown frontend message type {chr(tag)!r}")
    return decoder(body)
