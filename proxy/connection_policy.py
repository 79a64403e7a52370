"""The contract between a client session and whatever decides about its statements."""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

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
    verdicts: int = 1  # how many verdicts (Query/Parse/Bind/FunctionCall) this request covered
    closes: int = 0  # how many Close messages of prepared statements it carried (on_close_statement)
    # The session ended before PostgreSQL's answer (its ReadyForQuery) to the request came: the
    # statements may have run in part (rows and sqlstate say what was seen) ...
    answered: bool = True
    # ... or before the request was sent at all (decided, never forwarded: nothing ran).
    forwarded: bool = True


INTERNAL_ERROR = Refuse(
    "internal-error", "pgveil could not decide about this statement; the pgveil log says why"
)
"""What a statement gets when the policy raised or answered something that is not a verdict."""


REPORTED_SETTINGS = frozenset({
    "search_path", "client_encoding", "standard_conforming_strings", "session_authorization",
    "is_superuser", "DateStyle", "TimeZone", "IntervalStyle",
})
"""The ParameterStatus names handed to `ConnectionPolicy.on_parameter_status` (PostgreSQL 18
reports search_path too; older servers do not)."""


class ConnectionPolicy(Protocol):
    """Asked by the session before anything reaches PostgreSQL; one instance per connection."""

    async def on_startup(self, params: Mapping[str, str], client: ClientInfo) -> Refuse | None:
        """Refuse the connection (FATAL) or accept it; called before authentication is relayed."""

    async def on_query(self, sql: str) -> Verdict:
        """A simple-protocol Query message (may hold several statements)."""

    async def on_parse(self, statement_name: str, sql: str, param_types: tuple[int, ...]) -> Verdict:
        """An extended-protocol Parse message."""

    async def on_bind(self, statement_name: str) -> Verdict | None:
        """A Bind of a statement not Parsed earlier in the same request (a re-execution); sql in
        the verdict is ignored, a Refuse refuses the Bind. None: nothing to decide (not counted)."""

    async def on_close_statement(self, statement_name: str) -> None:
        """A Close message of a prepared statement (counted in `Outcome.closes`)."""

    async def on_function_call(self, function_oid: int) -> Verdict:
        """A FunctionCall message (fast-path); sql in the verdict is ignored."""

    async def on_complete(self, outcome: Outcome) -> None:
        """A request has finished: the oldest `verdicts` verdicts and `closes` Close messages not
        yet reported (a request with no verdict but Close messages reports verdicts=0)."""

    def on_parameter_status(self, name: str, value: str) -> None:
        """PostgreSQL reported a session setting (ParameterStatus) named in REPORTED_SETTINGS: at
        startup and whenever it changes (SET, set_config(), UPDATE pg_settings, a transaction's
        end). Synchronous and cheap: called as the message passes, before the client gets it.
        Optional: the relay calls it only on policies that define it."""

    def shows_diagnostics(self) -> bool:
        """Whether PostgreSQL's notices below NOTICE severity (LOG, DEBUG1-5: plan, parse and
        rewrite dumps can hold raw values) may reach the client now. Synchronous; asked as each
        such notice passes. Optional: a policy without it never gets them."""


class FastPath(Protocol):
    """Optional synchronous answers of a ConnectionPolicy for the common case (a statement whose
    verdict is cached, a request that changed nothing), so the relay makes one plain call for it
    instead of awaiting a coroutine per layer. Each answers None (or False) to decline before
    changing anything; the relay then calls the async hook, which decides as if asked first.
    A verdict answer may also be a coroutine giving the verdict: decided, but something must be
    waited for before acting on it (an audit record that must be durable first)."""

    def fast_query(self, sql: str) -> Verdict | Coroutine[Any, Any, Verdict] | None:
        """on_query's answer, or None."""

    def fast_parse(self, statement_name: str, sql: str,
                   param_types: tuple[int, ...]) -> Verdict | Coroutine[Any, Any, Verdict] | None:
        """on_parse's answer, or None."""

    def fast_bind(self, statement_name: str) -> Verdict | Coroutine[Any, Any, Verdict] | None:
        """on_bind's verdict for a re-execution, or None (never for 'nothing to decide')."""

    def fast_complete(self, outcome: Outcome) -> bool:
        """Did what on_complete would do (True), or nothing (False)."""


def fast_path_of(policy: object) -> FastPath | None:
    """What the relay calls for `policy`'s synchronous answers: for the guard stacked under the
    audit and metrics layers as `pgveil serve` stacks them, one object doing the three layers'
    common case in one compiled step (proxy/hitpath.py); else `layered_fast_path_of(policy)`."""
    if type(policy).__name__ in _COMBINED_LAYERS:
        if not _COMBINED:
            from proxy import hitpath  # (it imports the layers: not at module level)
            from proxy.native import compiled

            _COMBINED.append(compiled(hitpath).combined_fast_path)
        combined = _COMBINED[0](policy)
        if combined is not None:
            return combined  # type: ignore[no-any-return]
    return layered_fast_path_of(policy)


_COMBINED_LAYERS = frozenset({"MeteredConnection", "AuditedConnection", "GuardedConnection"})
_COMBINED: list[Callable[[object], Any]] = []  # proxy.hitpath.combined_fast_path, compiled when built


def layered_fast_path_of(policy: object) -> FastPath | None:
    """`policy` if it has the whole FastPath, else None."""
    if all(callable(getattr(policy, name, None))
           for name in ("fast_query", "fast_parse", "fast_bind", "fast_complete")):
        return policy  # type: ignore[return-value]
    return None


class PassThrough:
    """No policy: every statement is relayed unchanged (used when --policy is omitted)."""

    async def on_startup(self, params: Mapping[str, str], client: ClientInfo) -> Refuse | None:
        return None

    async def on_query(self, sql: str) -> Verdict:
        return Allow(sql)

    async def on_parse(self, statement_name: str, sql: str, param_types: tuple[int, ...]) -> Verdict:
        return Allow(sql)

    async def on_bind(self, statement_name: str) -> Verdict | None:
        return None

    async def on_close_statement(self, statement_name: str) -> None:
        return None

    async def on_function_call(self, function_oid: int) -> Verdict:
        return Allow("")

    async def on_complete(self, outcome: Outcome) -> None:
        return None

    def on_parameter_status(self, name: str, value: str) -> None:
        return None

    def shows_diagnostics(self) -> bool:
        return True
