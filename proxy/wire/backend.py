"""Messages PostgreSQL sends (protocol 3.0 and 3.2), as immutable values."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from proxy.wire.codec import (
    INT16,
    INT32,
    LENGTH,
    UINT16,
    BodyReader,
    cstring,
    frame,
    int16s,
    int32s,
    sized_values,
)
from proxy.wire.errors import ProtocolViolation
from proxy.wire.frontend import CopyData, CopyDone

# ---- authentication ('R', told apart by an int32 code) ----------------------------------


@dataclass(frozen=True, slots=True)
class AuthenticationOk:
    TAG: ClassVar[bytes] = b"R"
    CODE: ClassVar[int] = 0

    def encode(self) -> bytes:
        return frame(self.TAG, INT32.pack(self.CODE))


@dataclass(frozen=True, slots=True)
class AuthenticationKerberosV5:
    TAG: ClassVar[bytes] = b"R"
    CODE: ClassVar[int] = 2

    def encode(self) -> bytes:
        return frame(self.TAG, INT32.pack(self.CODE))


@dataclass(frozen=True, slots=True)
class AuthenticationCleartextPassword:
    TAG: ClassVar[bytes] = b"R"
    CODE: ClassVar[int] = 3

    def encode(self) -> bytes:
        return frame(self.TAG, INT32.pack(self.CODE))


@dataclass(frozen=True, slots=True)
class AuthenticationMD5Password:
    TAG: ClassVar[bytes] = b"R"
    CODE: ClassVar[int] = 5
    salt: bytes

    def encode(self) -> bytes:
        return frame(self.TAG, INT32.pack(self.CODE) + self.salt)


@dataclass(frozen=True, slots=True)
class AuthenticationGSS:
    TAG: ClassVar[bytes] = b"R"
    CODE: ClassVar[int] = 7

    def encode(self) -> bytes:
        return frame(self.TAG, INT32.pack(self.CODE))


@dataclass(frozen=True, slots=True)
class AuthenticationGSSContinue:
    TAG: ClassVar[bytes] = b"R"
    CODE: ClassVar[int] = 8
    data: bytes

    def encode(self) -> bytes:
        return frame(self.TAG, INT32.pack(self.CODE) + self.data)


@dataclass(frozen=True, slots=True)
class AuthenticationSSPI:
    TAG: ClassVar[bytes] = b"R"
    CODE: ClassVar[int] = 9

    def encode(self) -> bytes:
        return frame(self.TAG, INT32.pack(self.CODE))


@dataclass(frozen=True, slots=True)
class AuthenticationSASL:
    TAG: ClassVar[bytes] = b"R"
    CODE: ClassVar[int] = 10
    mechanisms: tuple[str, ...]

    def encode(self) -> bytes:
        names = b"".join(cstring(m) for m in self.mechanisms)
        return frame(self.TAG, INT32.pack(self.CODE) + names + b"\x00")


@dataclass(frozen=True, slots=True)
class AuthenticationSASLContinue:
    TAG: ClassVar[bytes] = b"R"
    CODE: ClassVar[int] = 11
    data: bytes

    def encode(self) -> bytes:
        return frame(self.TAG, INT32.pack(self.CODE) + self.data)


@dataclass(frozen=True, slots=True)
class AuthenticationSASLFinal:
    TAG: ClassVar[bytes] = b"R"
    CODE: ClassVar[int] = 12
    data: bytes

    def encode(self) -> bytes:
        return frame(self.TAG, INT32.pack(self.CODE) + self.data)


Authentication = (
    AuthenticationOk | AuthenticationKerberosV5 | AuthenticationCleartextPassword
    | AuthenticationMD5Password | AuthenticationGSS | AuthenticationGSSContinue
    | AuthenticationSSPI | AuthenticationSASL | AuthenticationSASLContinue | AuthenticationSASLFinal
)


def decode_authentication(body: bytes) -> Authentication:
    reader = BodyReader(body, "Authentication")
    code = reader.int32()
    result: Authentication
    if code == 0:
        result = AuthenticationOk()
    elif code == 2:
        result = AuthenticationKerberosV5()
    elif code == 3:
        result = AuthenticationCleartextPassword()
    elif code == 5:
        result = AuthenticationMD5Password(reader.raw(4))
    elif code == 7:
        result = AuthenticationGSS()
    elif code == 8:
        result = AuthenticationGSSContinue(reader.rest())
    elif code == 9:
        result = AuthenticationSSPI()
    elif code == 10:
        mechanisms = []
        while True:
            name = reader.cstring()
            if not name:
                break
            mechanisms.append(name)
        result = AuthenticationSASL(tuple(mechanisms))
    elif code == 11:
        result = AuthenticationSASLContinue(reader.rest())
    elif code == 12:
        result = AuthenticationSASLFinal(reader.rest())
    else:
        raise ProtocolViolation(f"unknown authentication request code {code}")
    reader.end()
    return result


# ---- session set-up -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BackendKeyData:
    """Cancellation key: 4 bytes in protocol 3.0, up to 256 bytes in 3.2."""

    TAG: ClassVar[bytes] = b"K"
    process_id: int
    secret_key: bytes

    def encode(self) -> bytes:
        return frame(self.TAG, INT32.pack(self.process_id) + self.secret_key)

    @classmethod
    def decode(cls, body: bytes) -> BackendKeyData:
        reader = BodyReader(body, "BackendKeyData")
        pid = reader.int32()
        key = reader.rest()
        if not 4 <= len(key) <= 256:
            raise ProtocolViolation(f"cancel key of {len(key)} bytes (4 to 256 allowed)")
        return cls(pid, key)


@dataclass(frozen=True, slots=True)
class NegotiateProtocolVersion:
    """`newest_version` is a full protocol version code, e.g. 196610 for 3.2 (what PostgreSQL
    and libpq put there, although the documentation speaks of a minor version)."""

    TAG: ClassVar[bytes] = b"v"
    newest_version: int
    unrecognized_options: tuple[str, ...] = ()

    def encode(self) -> bytes:
        options = b"".join(cstring(o) for o in self.unrecognized_options)
        body = INT32.pack(self.newest_version) + INT32.pack(len(self.unrecognized_options)) + options
        return frame(self.TAG, body)

    @classmethod
    def decode(cls, body: bytes) -> NegotiateProtocolVersion:
        reader = BodyReader(body, "NegotiateProtocolVersion")
        newest = reader.int32()
        count = reader.int32()
        if count < 0 or count > len(body):
            raise ProtocolViolation("invalid option count in NegotiateProtocolVersion")
        options = tuple(reader.cstring() for _ in range(count))
        reader.end()
        return cls(newest, options)


@dataclass(frozen=True, slots=True)
class ParameterStatus:
    TAG: ClassVar[bytes] = b"S"
    name: str
    value: str

    def encode(self) -> bytes:
        return frame(self.TAG, cstring(self.name) + cstring(self.value))

    @classmethod
    def decode(cls, body: bytes) -> ParameterStatus:
        reader = BodyReader(body, "ParameterStatus")
        name = reader.cstring()
        value = reader.cstring()
        reader.end()
        return cls(name, value)


@dataclass(frozen=True, slots=True)
class ReadyForQuery:
    """`status` is 'I' (idle), 'T' (in a transaction) or 'E' (in a failed transaction)."""

    TAG: ClassVar[bytes] = b"Z"
    status: str

    def encode(self) -> bytes:
        return frame(self.TAG, self.status.encode())

    @classmethod
    def decode(cls, body: bytes) -> ReadyForQuery:
        reader = BodyReader(body, "ReadyForQuery")
        status = chr(reader.int8())
        reader.end()
        if status not in ("I", "T", "E"):
            raise ProtocolViolation(f"invalid transaction status {status!r}")
        return cls(status)


# ---- errors and notices ---------------------------------------------------------------------


def _decode_fields(body: bytes, what: str) -> tuple[tuple[str, str], ...]:
    reader = BodyReader(body, what)
    fields = []
    while True:
        code = reader.int8()
        if code == 0:
            break
        fields.append((chr(code), reader.cstring()))
    reader.end()
    return tuple(fields)


def _encode_fields(fields: tuple[tuple[str, str], ...]) -> bytes:
    return b"".join(code.encode() + cstring(value) for code, value in fields) + b"\x00"


@dataclass(frozen=True, slots=True)
class ErrorResponse:
    """Fields as (code, value) pairs: S/V severity, C SQLSTATE, M message, D detail, H hint, ..."""

    TAG: ClassVar[bytes] = b"E"
    fields: tuple[tuple[str, str], ...]

    def encode(self) -> bytes:
        return frame(self.TAG, _encode_fields(self.fields))

    @classmethod
    def decode(cls, body: bytes) -> ErrorResponse:
        return cls(_decode_fields(body, "ErrorResponse"))

    def get(self, code: str) -> str | None:
        for key, value in self.fields:
            if key == code:
                return value
        return None

    @classmethod
    def build(cls, severity: str, sqlstate: str, message: str, detail: str | None = None,
              hint: str | None = None) -> ErrorResponse:
        fields = [("S", severity), ("V", severity), ("C", sqlstate), ("M", message)]
        if detail:
            fields.append(("D", detail))
        if hint:
            fields.append(("H", hint))
        return cls(tuple(fields))


@dataclass(frozen=True, slots=True)
class NoticeResponse:
    TAG: ClassVar[bytes] = b"N"
    fields: tuple[tuple[str, str], ...]

    def encode(self) -> bytes:
        return frame(self.TAG, _encode_fields(self.fields))

    @classmethod
    def decode(cls, body: bytes) -> NoticeResponse:
        return cls(_decode_fields(body, "NoticeResponse"))


@dataclass(frozen=True, slots=True)
class NotificationResponse:
    TAG: ClassVar[bytes] = b"A"
    process_id: int
    channel: str
    payload: str

    def encode(self) -> bytes:
        return frame(self.TAG, INT32.pack(self.process_id) + cstring(self.channel) + cstring(self.payload))

    @classmethod
    def decode(cls, body: bytes) -> NotificationResponse:
        reader = BodyReader(body, "NotificationResponse")
        pid = reader.int32()
        channel = reader.cstring()
        payload = reader.cstring()
        reader.end()
        return cls(pid, channel, payload)


# ---- query results ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CommandComplete:
    TAG: ClassVar[bytes] = b"C"
    tag: str

    def encode(self) -> bytes:
        return frame(self.TAG, cstring(self.tag))

    @classmethod
    def decode(cls, body: bytes) -> CommandComplete:
        reader = BodyReader(body, "CommandComplete")
        tag = reader.cstring()
        reader.end()
        return cls(tag)

    @property
    def rows(self) -> int:
        """The row count at the end of the tag ('SELECT 5', 'INSERT 0 5'); 0 when there is none."""
        return rows_in_command_tag(self.tag.encode())


def rows_in_command_tag(tag: bytes) -> int:
    last = tag.rstrip(b"\x00").rpartition(b" ")[2]
    return int(last) if last.isdigit() else 0


@dataclass(frozen=True, slots=True)
class FieldDescription:
    name: str
    table_oid: int = 0
    column_number: int = 0
    type_oid: int = 25
    type_size: int = -1
    type_modifier: int = -1
    format: int = 0


@dataclass(frozen=True, slots=True)
class RowDescription:
    TAG: ClassVar[bytes] = b"T"
    fields: tuple[FieldDescription, ...]

    def encode(self) -> bytes:
        parts = [UINT16.pack(len(self.fields))]
        for f in self.fields:
            parts.append(cstring(f.name))
            parts.append(LENGTH.pack(f.table_oid) + INT16.pack(f.column_number) + LENGTH.pack(f.type_oid)
                         + INT16.pack(f.type_size) + INT32.pack(f.type_modifier) + INT16.pack(f.format))
        return frame(self.TAG, b"".join(parts))

    @classmethod
    def decode(cls, body: bytes) -> RowDescription:
        reader = BodyReader(body, "RowDescription")
        fields = tuple(
            FieldDescription(reader.cstring(), reader.uint32(), reader.int16(), reader.uint32(),
                             reader.int16(), reader.int32(), reader.int16())
            for _ in range(reader.count(19))
        )
        reader.end()
        return cls(fields)


@dataclass(frozen=True, slots=True)
class DataRow:
    TAG: ClassVar[bytes] = b"D"
    values: tuple[bytes | None, ...]

    def encode(self) -> bytes:
        return frame(self.TAG, sized_values(self.values))

    @classmethod
    def decode(cls, body: bytes) -> DataRow:
        reader = BodyReader(body, "DataRow")
        values = tuple(reader.sized_value() for _ in range(reader.count(4)))
        reader.end()
        return cls(values)


@dataclass(frozen=True, slots=True)
class ParameterDescription:
    TAG: ClassVar[bytes] = b"t"
    type_oids: tuple[int, ...]

    def encode(self) -> bytes:
        return frame(self.TAG, int32s(self.type_oids, signed=False))

    @classmethod
    def decode(cls, body: bytes) -> ParameterDescription:
        reader = BodyReader(body, "ParameterDescription")
        oids = tuple(reader.uint32() for _ in range(reader.count(4)))
        reader.end()
        return cls(oids)


@dataclass(frozen=True, slots=True)
class FunctionCallResponse:
    TAG: ClassVar[bytes] = b"V"
    value: bytes | None

    def encode(self) -> bytes:
        if self.value is None:
            return frame(self.TAG, INT32.pack(-1))
        return frame(self.TAG, INT32.pack(len(self.value)) + self.value)

    @classmethod
    def decode(cls, body: bytes) -> FunctionCallResponse:
        reader = BodyReader(body, "FunctionCallResponse")
        value = reader.sized_value()
        reader.end()
        return cls(value)


@dataclass(frozen=True, slots=True)
class ParseComplete:
    TAG: ClassVar[bytes] = b"1"

    def encode(self) -> bytes:
        return frame(self.TAG, b"")

    @classmethod
    def decode(cls, body: bytes) -> ParseComplete:
        BodyReader(body, "ParseComplete").end()
        return cls()


@dataclass(frozen=True, slots=True)
class BindComplete:
    TAG: ClassVar[bytes] = b"2"

    def encode(self) -> bytes:
        return frame(self.TAG, b"")

    @classmethod
    def decode(cls, body: bytes) -> BindComplete:
        BodyReader(body, "BindComplete").end()
        return cls()


@dataclass(frozen=True, slots=True)
class CloseComplete:
    TAG: ClassVar[bytes] = b"3"

    def encode(self) -> bytes:
        return frame(self.TAG, b"")

    @classmethod
    def decode(cls, body: bytes) -> CloseComplete:
        BodyReader(body, "CloseComplete").end()
        return cls()


@dataclass(frozen=True, slots=True)
class NoData:
    TAG: ClassVar[bytes] = b"n"

    def encode(self) -> bytes:
        return frame(self.TAG, b"")

    @classmethod
    def decode(cls, body: bytes) -> NoData:
        BodyReader(body, "NoData").end()
        return cls()


@dataclass(frozen=True, slots=True)
class PortalSuspended:
    TAG: ClassVar[bytes] = b"s"

    def encode(self) -> bytes:
        return frame(self.TAG, b"")

    @classmethod
    def decode(cls, body: bytes) -> PortalSuspended:
        BodyReader(body, "PortalSuspended").end()
        return cls()


@dataclass(frozen=True, slots=True)
class EmptyQueryResponse:
    TAG: ClassVar[bytes] = b"I"

    def encode(self) -> bytes:
        return frame(self.TAG, b"")

    @classmethod
    def decode(cls, body: bytes) -> EmptyQueryResponse:
        BodyReader(body, "EmptyQueryResponse").end()
        return cls()


# ---- COPY --------------------------------------------------------------------------------------


def _copy_response_body(overall_format: int, column_formats: tuple[int, ...]) -> bytes:
    return bytes([overall_format]) + int16s(column_formats)


def _decode_copy_response(body: bytes, what: str) -> tuple[int, tuple[int, ...]]:
    reader = BodyReader(body, what)
    overall = reader.int8()
    formats = tuple(reader.int16() for _ in range(reader.count(2)))
    reader.end()
    return overall, formats


@dataclass(frozen=True, slots=True)
class CopyInResponse:
    TAG: ClassVar[bytes] = b"G"
    overall_format: int
    column_formats: tuple[int, ...]

    def encode(self) -> bytes:
        return frame(self.TAG, _copy_response_body(self.overall_format, self.column_formats))

    @classmethod
    def decode(cls, body: bytes) -> CopyInResponse:
        return cls(*_decode_copy_response(body, "CopyInResponse"))


@dataclass(frozen=True, slots=True)
class CopyOutResponse:
    TAG: ClassVar[bytes] = b"H"
    overall_format: int
    column_formats: tuple[int, ...]

    def encode(self) -> bytes:
        return frame(self.TAG, _copy_response_body(self.overall_format, self.column_formats))

    @classmethod
    def decode(cls, body: bytes) -> CopyOutResponse:
        return cls(*_decode_copy_response(body, "CopyOutResponse"))


@dataclass(frozen=True, slots=True)
class CopyBothResponse:
    TAG: ClassVar[bytes] = b"W"
    overall_format: int
    column_formats: tuple[int, ...]

    def encode(self) -> bytes:
        return frame(self.TAG, _copy_response_body(self.overall_format, self.column_formats))

    @classmethod
    def decode(cls, body: bytes) -> CopyBothResponse:
        return cls(*_decode_copy_response(body, "CopyBothResponse"))


BackendMessage = (
    Authentication | BackendKeyData | NegotiateProtocolVersion | ParameterStatus | ReadyForQuery
    | ErrorResponse | NoticeResponse | NotificationResponse | CommandComplete | RowDescription
    | DataRow | ParameterDescription | FunctionCallResponse | ParseComplete | BindComplete
    | CloseComplete | NoData | PortalSuspended | EmptyQueryResponse | CopyInResponse
    | CopyOutResponse | CopyBothResponse | CopyData | CopyDone
)

_DECODERS: dict[int, Callable[[bytes], BackendMessage]] = {
    cls.TAG[0]: cls.decode
    for cls in (BackendKeyData, NegotiateProtocolVersion, ParameterStatus, ReadyForQuery,
                ErrorResponse, NoticeResponse, NotificationResponse, CommandComplete, RowDescription,
                DataRow, ParameterDescription, FunctionCallResponse, ParseComplete, BindComplete,
                CloseComplete, NoData, PortalSuspended, EmptyQueryResponse, CopyInResponse,
                CopyOutResponse, CopyBothResponse, CopyData, CopyDone)
}

BACKEND_TAGS = bytes(sorted([*_DECODERS, ord("R")]))
"""Every message type byte PostgreSQL may send."""


def decode_backend(tag: int, body: bytes) -> BackendMessage:
    """Decode one framed server message."""
    if tag == 0x52:  # 'R'
        return decode_authentication(body)
    decoder = _DECODERS.get(tag)
    if decoder is None:
        raise ProtocolViolation(f"unknown backend message type {chr(tag)!r}")
    return decoder(body)
