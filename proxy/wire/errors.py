"""The one error the codec raises: the peer broke the PostgreSQL wire protocol."""

from __future__ import annotations


class ProtocolViolation(Exception):
    """Bytes that cannot be a valid PostgreSQL protocol message here (SQLSTATE 08P01 by default)."""

    def __init__(self, reason: str, sqlstate: str = "08P01") -> None:
        super().__init__(reason)
        self.reason = reason
        self.sqlstate = sqlstate
