"""Where metrics hook into the relay: plain callbacks with no dependency on any metrics library."""

from __future__ import annotations

from typing import Protocol


class RelayObserver(Protocol):
    """Told about connections, bytes and upstream failures; must be cheap and must not raise."""

    def connection_opened(self, connection_id: int) -> None: ...

    def connection_closed(self, connection_id: int, reason: str) -> None: ...

    def bytes_relayed(self, to_upstream: int, to_client: int) -> None: ...

    def upstream_error(self, kind: str) -> None:
        """kind: 'connect' (cannot reach PostgreSQL), 'lost' (dropped mid-session), 'tls'."""


class NullObserver:
    """The observer when nobody is watching."""

    def connection_opened(self, connection_id: int) -> None:
        return None

    def connection_closed(self, connection_id: int, reason: str) -> None:
        return None

    def bytes_relayed(self, to_upstream: int, to_client: int) -> None:
        return None

    def upstream_error(self, kind: str) -> None:
        return None


class RelayCounters:
    """An observer that just counts (handy in tests and for a quick look)."""

    def __init__(self) -> None:
        self.opened = 0
        self.closed = 0
        self.bytes_to_upstream = 0
        self.bytes_to_client = 0
        self.upstream_errors: dict[str, int] = {}
        self.close_reasons: list[str] = []

    def connection_opened(self, connection_id: int) -> None:
        self.opened += 1

    def connection_closed(self, connection_id: int, reason: str) -> None:
        self.closed += 1
        self.close_reasons.append(reason)

    def bytes_relayed(self, to_upstream: int, to_client: int) -> None:
        self.bytes_to_upstream += to_upstream
        self.bytes_to_client += to_client

    def upstream_error(self, kind: str) -> None:
        self.upstream_errors[kind] = self.upstream_errors.get(kind, 0) + 1
