"""Where metrics hook into the relay: plain callbacks with no dependency on any metrics library."""

from __future__ import annotations

from typing import Protocol


class Traffic:
    """Bytes relayed, as two plain counters the relay adds to on every chunk (an attribute add, no
    call, no lock: the event loop is one thread); metrics read them when scraped."""

    __slots__ = ("to_client", "to_upstream")

    def __init__(self) -> None:
        self.to_upstream = 0
        self.to_client = 0


class RelayObserver(Protocol):
    """Told about connections and upstream failures; must be cheap and must not raise.

    Bytes are not told: the relay adds them to `traffic` itself."""

    traffic: Traffic

    def connection_opened(self, connection_id: int) -> None: ...

    def connection_closed(self, connection_id: int, reason: str) -> None: ...

    def upstream_error(self, kind: str) -> None:
        """kind: 'connect' (cannot reach PostgreSQL), 'lost' (dropped mid-session), 'tls'."""


class NullObserver:
    """The observer when nobody is watching."""

    def __init__(self) -> None:
        self.traffic = Traffic()

    def connection_opened(self, connection_id: int) -> None:
        return None

    def connection_closed(self, connection_id: int, reason: str) -> None:
        return None

    def upstream_error(self, kind: str) -> None:
        return None


class RelayCounters:
    """An observer that just counts (handy in tests and for a quick look)."""

    def __init__(self) -> None:
        self.traffic = Traffic()
        self.opened = 0
        self.closed = 0
        self.upstream_errors: dict[str, int] = {}
        self.close_reasons: list[str] = []

    def connection_opened(self, connection_id: int) -> None:
        self.opened += 1

    def connection_closed(self, connection_id: int, reason: str) -> None:
        self.closed += 1
        self.close_reasons.append(reason)

    @property
    def bytes_to_upstream(self) -> int:
        return self.traffic.to_upstream

    @property
    def bytes_to_client(self) -> int:
        return self.traffic.to_client

    def upstream_error(self, kind: str) -> None:
        self.upstream_errors[kind] = self.upstream_errors.get(kind, 0) + 1
