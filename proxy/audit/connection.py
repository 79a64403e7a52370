"""AuditedConnection: writes the access record before a verdict is acted on; refuses if it cannot."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

from proxy.audit.chain import serialise
from proxy.audit.identity import policy_version_of, policy_version_reader, role_name_of, role_reader
from proxy.audit.sink import AuditError, AuditRecord, AuditSink, Unsealed, json_string, unsealed
from proxy.connection_policy import INTERNAL_ERROR, ClientInfo, ConnectionPolicy, Outcome, fast_path_of
from proxy.guard.verdict import Allow, Refuse, Rewrite, StatementInfo, Verdict

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


_FRAGMENTS: dict[int, tuple[StatementInfo, str, str | None, str]] = {}
_FRAGMENTS_KEPT = 8192


def statement_fragment(verdict: Verdict) -> str:
    """The members of an access record that only the verdict decides, as JSON text without braces:
    `"statement_kind":…,"fingerprint":…,"normalized_sql":…,"relations":…,"columns":…,"masks":…,
    "decision":…,"rule":…,"findings":…`.

    Built once per verdict and kept by the identity of its StatementInfo, which a verdict-cache
    hit shares with the cached verdict: on a hit this is one dict lookup. (At most
    `_FRAGMENTS_KEPT` are kept; the memo starts over when full.)"""
    info = verdict.info
    decision = verdict.decision
    rule = verdict.rule if isinstance(verdict, Refuse) else None
    known = _FRAGMENTS.get(id(info))
    if known is not None and known[0] is info and known[1] == decision and known[2] == rule:
        return known[3]
    text = serialise({
        "statement_kind": info.kind,
        "fingerprint": info.fingerprint,
        "normalized_sql": info.normalized_sql,
        "relations": list(info.relations),
        "columns": list(info.columns),
        "masks": list(info.masks),
        "decision": decision,
        "rule": rule,
        "findings": list(info.findings),  # firewall rules in `alert` mode that matched
    })[1:-1]
    if len(_FRAGMENTS) >= _FRAGMENTS_KEPT:
        _FRAGMENTS.clear()
    _FRAGMENTS[id(info)] = (info, decision, rule, text)
    return text


_VERDICTS = (Allow, Rewrite, Refuse)
_DLP_WRITES: set[asyncio.Future[None]] = set()  # DLP records being made durable (kept referenced)


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
        self._unwritten: set[int] = set()  # requests whose access record could not be written
        self._client_known: tuple[ClientInfo | None, dict[str, Any]] | None = None
        self._role_now = role_reader(inner)
        self._version_now = policy_version_reader(inner)
        # (role, policy version, client) and the JSON members from connection_id to policy_version
        self._who_known: tuple[str | None, str | None, ClientInfo | None, str] | None = None
        self._fast = fast_path_of(inner)

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

    def _who_members(self, role: str | None, version: str | None) -> str:
        """`"connection_id":…,…,"role":…,"policy_version":…` as JSON text, worked out once per
        client, role and policy version."""
        known = self._who_known
        if known is None or known[0] != role or known[1] != version or known[2] is not self.client:
            members = serialise({**self._client_fields(), "role": role, "policy_version": version})[1:-1]
            known = self._who_known = (role, version, self.client, members)
        return known[3]

    async def _write(self, record: AuditRecord) -> None:
        record_type = str(record.get("type"))
        started = time.perf_counter()
        try:
            waiter = self.sink.append(unsealed(record))
            if waiter is not None:
                await waiter
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

    def record_access(self, verdict: Verdict, protocol: str, *, statement_name: str | None = None,
                      sql: str | None = None, function_oid: int | None = None,
                      fragment: str | None = None) -> Verdict | Coroutine[Any, Any, Verdict]:
        """Write the access record of `verdict` now; answer the verdict to act on.

        Synchronous: with the default durability the record is written (handed to the operating
        system) before this returns, and the answer is a verdict: `verdict` itself, or a refusal
        `audit-unavailable` when the record could not be written. When the sink must make the
        record durable first (strict mode, a PostgreSQL table), the answer is a coroutine that
        gives that verdict once it is: await it before acting. `protocol` is `query`, `parse`,
        `bind` or `function_call`; `sql` is recorded only with `include_literals`. `fragment` is
        `statement_fragment(verdict)` when the caller keeps it (it is looked up otherwise).
        Per statement only the time, the request number and these arguments are formatted (the
        clock's text and `protocol` are plain ASCII words and go in as they are)."""
        self.requests += 1
        request = self.requests
        role, version = self._role_now(), self._version_now()
        self._unfinished.append((request, role, version))
        extra = ""
        if statement_name is not None:
            extra = f',"statement_name":{json_string(statement_name)}'
        if sql is not None and self.include_literals:
            extra += f',"sql":{json_string(sql)}'
        if function_oid is not None:
            extra += f',"function_oid":{int(function_oid)}'
        now = self.clock()
        record = Unsealed("access", now, (
            f'"type":"access","time":"{now}",{self._who_members(role, version)},'
            f'"request":{request},"protocol":"{protocol}",'
            f'{fragment if fragment is not None else statement_fragment(verdict)}{extra}'))
        events = self.events.take_events() if self.events is not None else None
        if events:
            return self._after_events(events, record, verdict)
        timer = self.timer
        started = time.perf_counter() if timer else 0.0
        try:
            waiter = self.sink.append(record)
        except AuditError as exc:
            return self._unaudited(verdict, exc)
        if waiter is not None:
            return self._durable(waiter, verdict, started)
        if timer:
            timer.audit_written("access", time.perf_counter() - started)
        return verdict

    async def _durable(self, waiter: Awaitable[None], verdict: Verdict, started: float) -> Verdict:
        try:
            await waiter
        except AuditError as exc:
            return self._unaudited(verdict, exc)
        if self.timer:
            self.timer.audit_written("access", time.perf_counter() - started)
        return verdict

    async def _after_events(self, events: list[dict[str, Any]], record: Unsealed,
                            verdict: Verdict) -> Verdict:
        """Elevation events first (each waited for), then the access record."""
        for index, event in enumerate(events):
            try:
                await self._write({"time": self.clock(), **event})
            except AuditError as exc:
                assert self.events is not None
                self.events.return_events(events[index:])
                return self._unaudited(verdict, exc, counted=True)
        started = time.perf_counter()
        try:
            waiter = self.sink.append(record)
        except AuditError as exc:
            return self._unaudited(verdict, exc)
        return await self._durable(waiter, verdict, started) if waiter is not None else verdict

    def _unaudited(self, verdict: Verdict, exc: AuditError, counted: bool = False) -> Verdict:
        """What to act on when the access record of `verdict` could not be written (it gets no
        completion record either: policy calls run one at a time, so its number is the last)."""
        self._unwritten.add(self.requests)
        if self.timer and not counted:
            self.timer.audit_failed("access")
        if self.on_audit_failure == "allow":
            log.error("audit write failed, statement served UNAUDITED (on_audit_failure: allow): %s", exc)
            return verdict
        log.error("audit write failed, statement refused: %s", exc)
        if isinstance(verdict, Refuse):
            return verdict
        return Refuse(AUDIT_UNAVAILABLE, "the audit log cannot be written, so the statement was not "
                      "run; retry later or ask the operator to fix the audit sink", info=verdict.info)

    async def _audited(self, verdict: Verdict, protocol: str, statement_name: str | None = None,
                       sql: str | None = None, function_oid: int | None = None) -> Verdict:
        answer = self.record_access(verdict, protocol, statement_name=statement_name, sql=sql,
                                    function_oid=function_oid)
        return answer if isinstance(answer, _VERDICTS) else await answer

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

    async def _decided(self, pending: Awaitable[Any], bind: bool = False) -> Any:
        """The inner policy's answer; one it could not give (it raised, or answered something that
        is not a verdict) is refused as internal-error, and audited as every refusal is: the
        relay counts every statement it asked about, so each must have its access record."""
        try:
            verdict = await pending
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            log.error("the policy was cancelled; refusing")
            return INTERNAL_ERROR
        except Exception:
            log.exception("the policy raised; refusing")
            return INTERNAL_ERROR
        if isinstance(verdict, _VERDICTS) or (bind and verdict is None):
            return verdict
        log.error("the policy answered %r, which is not a verdict; refusing", verdict)
        return INTERNAL_ERROR

    async def on_query(self, sql: str) -> Verdict:
        verdict = await self._decided(self.inner.on_query(sql))
        return await self._audited(verdict, "query", sql=sql)

    async def on_parse(self, statement_name: str, sql: str, param_types: tuple[int, ...]) -> Verdict:
        verdict = await self._decided(self.inner.on_parse(statement_name, sql, param_types))
        return await self._audited(verdict, "parse", statement_name, sql)

    async def on_bind(self, statement_name: str) -> Verdict | None:
        verdict = await self._decided(self.inner.on_bind(statement_name), bind=True)
        if verdict is None:
            return None
        return await self._audited(verdict, "bind", statement_name)

    async def on_close_statement(self, statement_name: str) -> None:
        await self.inner.on_close_statement(statement_name)

    def on_parameter_status(self, name: str, value: str) -> None:
        forward = getattr(self.inner, "on_parameter_status", None)
        if forward is not None:
            forward(name, value)

    def shows_diagnostics(self) -> bool:
        ask = getattr(self.inner, "shows_diagnostics", None)
        return ask is not None and ask() is True

    def data_guard(self) -> Any:
        """The inner policy's DataGuard (proxy/dlp/guard.py), its breaches and honeytoken hits
        written as audit records of type `budget` and `honeytoken`."""
        ask = getattr(self.inner, "data_guard", None)
        guard = ask() if ask is not None else None
        if guard is not None:
            guard.listeners.append(self._dlp_record)
        return guard

    def _dlp_record(self, event: dict[str, Any]) -> None:
        """A DLP event as an audit record, written without holding up the relay (it has happened:
        the rows were withheld or the session ended either way); a failure is logged."""
        role = event.get("role") or self.role_name
        record = {"type": event["type"], **self._who(role, self.policy_version),
                  **{key: value for key, value in event.items() if key not in ("type", "role")}}
        try:
            waiter = self.sink.append(unsealed(record))
        except AuditError as exc:
            log.error("audit write failed for a %s record: %s", event["type"], exc)
            if self.timer:
                self.timer.audit_failed(str(event["type"]))
            return
        if waiter is not None:
            task = asyncio.ensure_future(self._dlp_durable(waiter, str(event["type"])))
            _DLP_WRITES.add(task)
            task.add_done_callback(_DLP_WRITES.discard)

    async def _dlp_durable(self, waiter: Awaitable[None], record_type: str) -> None:
        try:
            await waiter
        except AuditError as exc:
            log.error("audit write failed for a %s record: %s", record_type, exc)
            if self.timer:
                self.timer.audit_failed(record_type)

    async def on_function_call(self, function_oid: int) -> Verdict:
        verdict = await self._decided(self.inner.on_function_call(function_oid))
        return await self._audited(verdict, "function_call", function_oid=function_oid)

    async def on_complete(self, outcome: Outcome) -> None:
        # The record first: what the inner policy does next (a catalog refresh after DDL) may take
        # a while or never finish (the process stops), and the statement has run either way.
        self._completed(outcome)
        await self.inner.on_complete(outcome)

    # FastPath: the inner policy's synchronous verdicts, audited by record_access (a coroutine only
    # when the record must be durable before the statement runs).

    def fast_query(self, sql: str) -> Verdict | Coroutine[Any, Any, Verdict] | None:
        fast = self._fast
        return None if fast is None else self._fast_audited(fast.fast_query, (sql,), "query", None, sql)

    def fast_parse(self, statement_name: str, sql: str,
                   param_types: tuple[int, ...]) -> Verdict | Coroutine[Any, Any, Verdict] | None:
        fast = self._fast
        return None if fast is None else self._fast_audited(
            fast.fast_parse, (statement_name, sql, param_types), "parse", statement_name, sql)

    def fast_bind(self, statement_name: str) -> Verdict | Coroutine[Any, Any, Verdict] | None:
        fast = self._fast
        return None if fast is None else self._fast_audited(
            fast.fast_bind, (statement_name,), "bind", statement_name, None)

    def _fast_audited(self, decide: Callable[..., Any], args: tuple[Any, ...], protocol: str,
                      statement_name: str | None,
                      sql: str | None) -> Verdict | Coroutine[Any, Any, Verdict] | None:
        """The inner policy's synchronous answer, audited: None (ask the async hook), a verdict whose
        access record is written, or a coroutine (the record must be durable first, or the inner
        answer is itself still to come). A raising inner policy is refused and audited, as the
        async hooks do."""
        try:
            verdict = decide(*args)
        except Exception:
            log.exception("the policy raised; refusing")
            verdict = INTERNAL_ERROR
        if verdict is None:
            return None
        if not isinstance(verdict, _VERDICTS):
            return self._audited_later(verdict, protocol, statement_name, sql)
        return self.record_access(verdict, protocol, statement_name=statement_name, sql=sql)

    async def _audited_later(self, decided: Coroutine[Any, Any, Verdict], protocol: str,
                             statement_name: str | None, sql: str | None) -> Verdict:
        return await self._audited(await decided, protocol, statement_name, sql)

    def fast_complete(self, outcome: Outcome) -> bool:
        fast = self._fast
        if fast is None or not fast.fast_complete(outcome):
            return False
        self._completed(outcome)
        return True

    def _completed(self, outcome: Outcome) -> None:
        """The completion record of a request the inner policy has been told of."""
        if outcome.verdicts == 0:  # only Close messages: nothing was audited, nothing completes
            return
        # Requests finish in the order they were decided (pipelining included); one request of the
        # extended protocol can cover several Parse and Bind verdicts.
        unfinished = self._unfinished
        if outcome.verdicts == 1 and unfinished:  # the usual request: one statement
            covered = [unfinished.popleft()]
        else:
            covered = [unfinished.popleft() for _ in range(outcome.verdicts) if unfinished]
        if len(covered) < outcome.verdicts:  # never a number that is not this request's own
            log.error("a completion of %d statements with %d access records open",
                      outcome.verdicts, len(covered))
            if not covered:
                return
        if self._unwritten:  # no completion of an access record that is not in the log
            kept = [entry for entry in covered if entry[0] not in self._unwritten]
            self._unwritten.difference_update(number for number, _, _ in covered)
            covered = kept
            if not covered:
                return
        request, role, version = covered[0]
        now = self.clock()
        sqlstate = outcome.sqlstate
        body = (f'"type":"completion","time":"{now}",{self._who_members(role, version)},'
                f'"request":{request},"rows":{outcome.rows:d},'
                f'"upstream_seconds":{round(outcome.upstream_seconds, 6)!r},'
                f'"sqlstate":{"null" if sqlstate is None else json_string(sqlstate)}')
        if len(covered) > 1:
            body += f',"requests":[{",".join(str(number) for number, _, _ in covered)}]'
        if not outcome.forwarded:
            body += ',"forwarded":false'  # the session ended before it was sent: nothing ran
        elif not outcome.answered:
            body += ',"answered":false'  # the session ended before PostgreSQL's answer came
        # The statement has run: its completion need not hold up the connection. It is queued
        # behind the access record: written with the next record, or within milliseconds.
        self.sink.append_behind(Unsealed("completion", now, body))
