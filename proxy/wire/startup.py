"""Packets that open a connection: StartupMessage, SSLRequest, GSSENCRequest, CancelRequest."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from proxy.wire.codec import INT32, LENGTH, BodyReader, cstring
from proxy.wire.errors import ProtocolViolation

MAX_STARTUP_PACKET = 10_000
"""PostgreSQL's own limit on a startup packet (MAX_STARTUP_PACKET_LENGTH)."""

PROTOCOL_3_0 = (3 << 16) | 0
PROTOCOL_3_2 = (3 << 16) | 2
NEWEST_MINOR = 2
"""The newest minor version of protocol 3 that pgveil speaks."""

_CANCEL_CODE = (1234 << 16) | 5678
_SSL_CODE = (1234 << 16) | 5679
_GSSENC_CODE = (1234 << 16) | 5680


def _packet(body: bytes) -> bytes:
    return LENGTH.pack(len(body) + 4) + body


@dataclass(frozen=True, slots=True)
class StartupMessage:
    """Protocol version and the connection parameters (user, database, options, ...), in order."""

    protocol: int
    parameters: tuple[tuple[str, str], ...]

    @property
    def major(self) -> int:
        return self.protocol >> 16

    @property
    def minor(self) -> int:
        return self.protocol & 0xFFFF

    def get(self, name: str, default: str | None = None) -> str | None:
        for key, value in self.parameters:
            if key == name:
                return value
        return default

    def as_dict(self) -> dict[str, str]:
        return dict(self.parameters)

    def encode(self) -> bytes:
        pairs = b"".join(cstring(k) + cstring(v) for k, v in self.parameters)
        return _packet(LENGTH.pack(self.protocol) + pairs + b"\x00")


@dataclass(frozen=True, slots=True)
class SSLRequest:
    CODE: ClassVar[int] = _SSL_CODE

    def encode(self) -> bytes:
        return _packet(LENGTH.pack(self.CODE))


@dataclass(frozen=True, slots=True)
class GSSENCRequest:
    CODE: ClassVar[int] = _GSSENC_CODE

    def encode(self) -> bytes:
        return _packet(LENGTH.pack(self.CODE))


@dataclass(frozen=True, slots=True)
class CancelRequest:
    """Cancel the running query of `process_id`; the key is 4 bytes (3.0) or up to 256 (3.2)."""

    CODE: ClassVar[int] = _CANCEL_CODE
    process_id: int
    secret_key: bytes

    def encode(self) -> bytes:
        return _packet(LENGTH.pack(self.CODE) + INT32.pack(self.process_id) + self.secret_key)


StartupPacket = StartupMessage | SSLRequest | GSSENCRequest | CancelRequest


def decode_startup_packet(body: bytes) -> StartupPacket:
    """Decode the body of a startup packet (everything after its int32 length)."""
    reader = BodyReader(body, "startup")
    code = reader.uint32()
    if code == _SSL_CODE:
        reader.end()
        return SSLRequest()
    if code == _GSSENC_CODE:
        reader.end()
        return GSSENCRequest()
    if code == _CANCEL_CODE:
        pid = reader.int32()
        key = reader.rest()
        if not 4 <= len(key) <= 256:
            raise ProtocolViolation(f"cancel key of {len(key)} bytes (4 to 256 allowed)")
        return CancelRequest(pid, key)
    if code >> 16 != 3:
        raise ProtocolViolation(
            f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}: "
            f"server supports 3.0 to 3.{NEWEST_MINOR}",
            sqlstate="0A000",
        )
    parameters: list[tuple[str, str]] = []
    while True:
        name = reader.cstring()
        if not name:
            break
        parameters.append((name, reader.cstring()))
    reader.end()
    return StartupMessage(code, tuple(parameters))
