"""Cancel keys: the key pgveil gives a client maps, without any table, to PostgreSQL's own key."""

from __future__ import annotations

import hashlib
import struct


class CancelKeys:
    """Client key = upstream key XOR a keystream derived from a secret and the process id.

    Stateless on purpose: a CancelRequest arrives on a new connection, possibly at another
    worker process (SO_REUSEPORT), and every worker shares the secret, so any of them can map it.
    The process id is PostgreSQL's own, unchanged, because clients compare it with
    pg_backend_pid() and with the pid in NotificationResponse to recognise their own NOTIFYs.
    The upstream key is never shown to the client, so a client cannot cancel by talking to
    PostgreSQL directly, and a forged key maps to a wrong upstream key that PostgreSQL ignores.
    """

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("cancel key secret must be at least 16 bytes")
        self._secret = secret

    def _keystream(self, process_id: int, length: int) -> bytes:
        seed = self._secret + struct.pack("!iH", process_id, length)
        return hashlib.shake_256(seed).digest(length)

    def client_key(self, process_id: int, upstream_key: bytes) -> bytes:
        stream = self._keystream(process_id, len(upstream_key))
        return bytes(a ^ b for a, b in zip(upstream_key, stream, strict=True))

    def upstream_key(self, process_id: int, client_key: bytes) -> bytes:
        return self.client_key(process_id, client_key)  # XOR is its own inverse
