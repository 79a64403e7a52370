"""The contract between a client session and whatever decides about its statements."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from proxy.guard.verdict import Allow, Refuse, Verdict


@dataclass(frozen=True, slots=True)
class ClientInfo:
    """Who is on the other end of one client connection."""

    connection_id: int
    address: str  # "host:port" or "unix"
    user: str
    database: str
    application_name: str
    tls: bool


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one forwarded request ended (at its ReadyForQuery)."""

    rows: int
    sqlstate: str | None  # None on success
    upstream_seconds: float
    verdicts: int = 1  # how many verdicts (Query/Parse/FunctionCall) this request covered


class ConnectionPolicy(Protocol):
    """Asked by the session before anything reaches PostgreSQL; one instance per connection."""

    async def on_startup(self, params: Mapping[str, str], client: ClientInfo) -> Refuse | None:
        """Refuse the connection (FATAL) or accept it; called before authentication is relayed."""

    async def on_query(self, sql: str) -> Verdict:
        """A simple-protocol Query message (may hold several statements)."""

    async def on_parse(self, statement_name: str, sql: str, param_types: tuple[int, ...]) -> Verdict:
        """An extended-protocol Parse message."""

    async def on_function_call(self, function_oid: int) -> Verdict:
        """A FunctionCall message (fast-path); sql in the verdict is ignored."""

    async def on_complete(self, outcome: Outcome) -> None:
        """The request whose verdict was last returned has finished."""


class PassThrough:
    """No policy: every statement is relayed unchanged (used when --policy is omitted)."""

    async def on_startup(self, params: Mapping[str, str], client: ClientInfo) -> Refuse | None:
        return None

    async def on_query(self, sql: str) -> Verdict:
        return Allow(sql)

    async def on_parse(self, statement_name: str, sql: str, param_types: tuple[int, ...]) -> Verdict:
        return Allow(sql)

    async def on_function_call(self, function_oid: int) -> Verdict:
        return Allow("")

    async def on_complete(self, outcome: Outcome) -> None:
        return None
