"""AuditedConnection: writes the access record before a verdict is acted on; refuses if it cannot."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

from proxy.audit.identity import policy_version_of, role_name_of
from proxy.audit.sink import AuditError, AuditRecord, AuditSink
from proxy.connection_policy import ClientInfo, ConnectionPolicy, Outcome
from proxy.guard.verdict import Refuse, Verdict

log = logging.getLogger("pgveil.audit")

OnAuditFailure = Literal["refuse", "allow"]

AUDIT_UNAVAILABLE = "audit-unavailable"


class AuditEventSource(Protocol):
    """Something with audit records of its own to write (elevation grants, uses, expiries)."""

    def take_events(self) -> list[dict[str, Any]]: ...

    def return_events(self, events: list[dict[str, Any]]) -> None: ...


class AuditTimer(Protocol):
    """Where audit write latency and failures are counted (proxy.metrics.Metrics fits)."""

    def audit_written(self, record_type: str, seconds: float) -> None: ...

    def audit_failed(self, record_type: str) -> None: ...


_second: list[tuple[int, str]] = [(-1, "")]  # the last whole second formatted, and its text


def now_iso() -> str:
    """UTC now as `datetime.isoformat(timespec="microseconds")` writes it; the date and time of
    day are formatted once per second (a record is written for almost every statement)."""
    now = time.time_ns() // 1000
    second, micro = divmod(now, 1_000_000)
    last = _second[0]
    if last[0] != second:
        last = _second[0] = (second, datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S"))
    return f"{last[1]}.{micro:06d}+00:00"


class AuditedConnection:
    """Decorates a ConnectionPolicy: every verdict is audited before the session may act on it.

    The access record is durable (as the sink's fsync setting defines) before `on_query`,
    `on_parse`, `on_bind` (a re-execution of a prepared statement) or `on_function_call` returns,
    so nothing reaches PostgreSQL unaudited. If the sink fails, the statement is refused with rule
    `audit-unavailable` (unless `on_audit_failure` is 'allow', which serves it and only logs).
    Refused statements are audited too.
    """

    def __init__(self, inner: ConnectionPolicy, sink: AuditSink, client: ClientInfo | None = None, *,
                 on_audit_failure: OnAuditFailure = "refuse", include_literals: bool = False,
                 events: AuditEventSource | None = None, timer: AuditTimer | None = None,
                 clock: Callable[[], str] = now_iso) -> None:
        self.inner = inner
        self.sink = sink
        self.client = client
        self.on_audit_failure = on_audit_failure
        self.include_literals = include_literals
        self.events = events
        self.timer = timer
        self.clock = clock
        self.requests = 0
        # (request, role, policy version) of access records whose completion is still to come
        self._unfinished: deque[tuple[int, str | None, str | None]] = deque()
        self._client_known: tuple[ClientInfo | None, dict[str, Any]] | None = None

    @property
    def role_name(self) -> str | None:
        """The role of the statement decided last (what its access record says), else of now."""
        if self._unfinished:
            return self._unfinished[-1][1]
        return role_name_of(self.inner)

    @property
    def policy_version(self) -> str | None:
        return policy_version_of(self.inner)

    def _who(self, role: str | None, policy_version: str | None) -> dict[str, Any]:
        return {"time": self.clock(), **self._client_fields(), "role": role, "policy_version": policy_version}

    def _client_fields(self) -> dict[str, Any]:
        """The client's part of every record, worked out once per client."""
        client = self.client
        known = self._client_known
        if known is None or known[0] is not client:
            known = self._client_known = (client, {
                "connection_id": client.connection_id if client else None,
                "client_address": client.address if client else None,
                "login": client.user if client else None,
                "database": client.database if client else None,
                "application_name": client.application_name if client else None,
            })
        return known[1]

    async def _write(self, record: AuditRecord) -> None:
        record_type = str(record.get("type"))
        started = time.perf_counter()
        try:
            await self.sink.write(record)
        except AuditError:
            if self.timer:
                self.timer.audit_failed(record_type)
            raise
        if self.timer:
            self.timer.audit_written(record_type, time.perf_counter() - started)

    async def _write_pending_events(self) -> None:
        if self.events is None:
            return
        events = self.events.take_events()
        for index, event in enumerate(events):
            try:
                await self._write({"time": self.clock(), **event})
            except AuditError:
                self.events.return_events(events[index:])
                raise

    async def _audited(self, verdict: Verdict, protocol: str, extra: dict[str, Any]) -> Verdict:
        self.requests += 1
        role, version = role_name_of(self.inner), self.policy_version
        self._unfinished.append((self.requests, role, version))
        info = verdict.info
        record = {
            "type": "access",
            "time": self.clock(),
            **self._client_fields(),
            "role": role,
            "policy_version": version,
            "request": self.requests,
            "protocol": protocol,
            "statement_kind": info.kind,
            "fingerprint": info.fingerprint,
            "normalized_sql": info.normalized_sql,
            "relations": list(info.relations),
            "columns": list(info.columns),
            "masks": list(info.masks),
            "decision": verdict.decision,
            "rule": verdict.rule if isinstance(verdict, Refuse) else None,
            "findings": list(info.findings),  # firewall rules in `alert` mode that matched
            **extra,
        }
        try:
            await self._write_pending_events()
            await self._write(record)
        except AuditError as exc:
            if self.on_audit_failure == "allow":
                log.error("audit write failed, statement served UNAUDITED (on_audit_failure: allow): %s", exc)
                return verdict
            log.error("audit write failed, statement refused: %s", exc)
            if isinstance(verdict, Refuse):
                return verdict
            return Refuse(AUDIT_UNAVAILABLE, "the audit log cannot be written, so the statement was not "
                          "run; retry later or ask the operator to fix the audit sink", info=info)
        return verdict

    async def on_startup(self, params: Mapping[str, str], client: ClientInfo) -> Refuse | None:
        self.client = client
        refusal = await self.inner.on_startup(params, client)
        record = {"type": "connect", **self._who(self.role_name, self.policy_version),
                  "decision": "refuse" if refusal else "allow",
                  "rule": refusal.rule if refusal else None}
        try:
            await self._write_pending_events()
            await self._write(record)
        except AuditError as exc:
            if self.on_audit_failure == "allow" or refusal is not None:
                return refusal
            log.error("audit write failed, connection refused: %s", exc)
            return Refuse(AUDIT_UNAVAILABLE, "the audit log cannot be written, so no connection is "
                          "accepted; retry later or ask the operator to fix the audit sink")
        return refusal

    async def on_query(self, sql: str) -> Verdict:
        verdict = await self.inner.on_query(sql)
        return await self._audited(verdict, "query", {"sql": sql} if self.include_literals else {})

    async def on_parse(self, statement_name: str, sql: str, param_types: tuple[int, ...]) -> Verdict:
        verdict = await self.inner.on_parse(statement_name, sql, param_types)
        extra: dict[str, Any] = {"statement_name": statement_name}
        if self.include_literals:
            extra["sql"] = sql
        return await self._audited(verdict, "parse", extra)

    async def on_bind(self, statement_name: str) -> Verdict | None:
        verdict = await self.inner.on_bind(statement_name)
        if verdict is None:
            return None
        return await self._audited(verdict, "bind", {"statement_name": statement_name})

    async def on_close_statement(self, statement_name: str) -> None:
        await self.inner.on_close_statement(statement_name)

    def on_parameter_status(self, name: str, value: str) -> None:
        forward = getattr(self.inner, "on_parameter_status", None)
        if forward is not None:
            forward(name, value)

    async def on_function_call(self, function_oid: int) -> Verdict:
        verdict = await self.inner.on_function_call(function_oid)
        return await self._audited(verdict, "function_call", {"function_oid": function_oid})

    async def on_complete(self, outcome: Outcome) -> None:
        await self.inner.on_complete(outcome)
        if outcome.verdicts == 0:  # only Close messages: nothing was audited, nothing completes
            return
        # Requests finish in the order they were decided (pipelining included); one request of the
        # extended protocol can cover several Parse and Bind verdicts.
        covered = [self._unfinished.popleft() for _ in range(outcome.verdicts) if self._unfinished]
        first = covered[0] if covered else (self.requests, self.role_name, self.policy_version)
        request, role, version = first
        record: dict[str, Any] = {
            "type": "completion", **self._who(role, version), "request": request, "rows": outcome.rows,
            "upstream_seconds": round(outcome.upstream_seconds, 6), "sqlstate": outcome.sqlstate}
        if len(covered) > 1:
            record["requests"] = [number for number, _, _ in covered]
        # The statement has run: its completion need not hold up the connection. It is queued
        # behind the access record and is durable once the next record anyone waits for is.
        self.sink.write_behind(record)
