"""The elevation workflow on the state store: request, approve, deny, revoke, list; grants in force.

Every party is a PostgreSQL login proven by PostgreSQL (the login of the session that sent the
PGVEIL statement through pgveil, or of the CLI's connection to the store); the policy's
`elevations:` decide who may ask for which role, for how long, and who may approve (never the
requester). A request is pending until approved, denied, revoked, or until its request timeout.
An approval makes a grant from the store's now() for the requested duration.

Each serving process keeps the grants in force in memory (`active_role` is a dict look-up per
statement), re-read whenever the store's `elevations` topic changes (LISTEN/NOTIFY, or the polling
fallback). A grant is honoured only once read; its expiry is honoured from this process's own
clock; while the store cannot be reached the grants last read stay (each until its expiry) and
every workflow statement is refused (nothing can be decided without fresh state).
"""

from __future__ import annotations

import fnmatch
import logging
import os
import socket
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily

from proxy.elevation import GrantError, parse_duration
from proxy.elevation_statements import (
    ColumnType,
    ElevationCommand,
    StatementSyntaxError,
    Value,
    is_pgveil_statement,
    parse_statement,
    result_sql,
)
from proxy.guard.verdict import Refuse, Rewrite, StatementInfo, Verdict
from proxy.metrics import Metrics
from proxy.policy.model import Elevation, Policy
from proxy.state.store import StateStore, StateUnavailable, in_task, register_migration, unreachable

log = logging.getLogger("pgveil.elevation")

TOPIC = "elevations"
DEFAULT_REQUEST_TIMEOUT = 3600
"""Seconds a request waits for a decision before it times out (elevation.request_timeout)."""

register_migration(100, "elevation requests, grants and their history", """
CREATE TABLE IF NOT EXISTS {schema}.elevation_requests (
    id bigserial PRIMARY KEY,
    login text NOT NULL,
    role text NOT NULL,
    seconds integer NOT NULL CHECK (seconds > 0),
    reason text NOT NULL,
    state text NOT NULL DEFAULT 'pending'
        CHECK (state IN ('pending', 'approved', 'denied', 'revoked', 'timed_out')),
    requested_at timestamptz NOT NULL DEFAULT now(),
    decide_by timestamptz NOT NULL,
    decided_by text,
    decided_at timestamptz,
    decision_reason text,
    granted_at timestamptz,
    expires_at timestamptz,
    revoked_by text,
    revoked_at timestamptz,
    revoke_reason text
);
CREATE INDEX IF NOT EXISTS elevation_requests_in_force
    ON {schema}.elevation_requests (expires_at) WHERE state = 'approved';
CREATE INDEX IF NOT EXISTS elevation_requests_pending
    ON {schema}.elevation_requests (decide_by) WHERE state = 'pending';
CREATE TABLE IF NOT EXISTS {schema}.elevation_events (
    id bigserial PRIMARY KEY,
    request_id bigint NOT NULL REFERENCES {schema}.elevation_requests (id),
    event text NOT NULL CHECK (event IN ('requested', 'approved', 'denied', 'revoked', 'timed_out')),
    actor text NOT NULL,
    reason text,
    at timestamptz NOT NULL DEFAULT now()
);
""")

LIST_COLUMNS: list[tuple[str, ColumnType]] = [
    ("id", "bigint"), ("login", "text"), ("role", "text"), ("state", "text"), ("duration", "text"),
    ("reason", "text"), ("requested_at", "timestamptz"), ("decide_by", "timestamptz"),
    ("decided_by", "text"), ("granted_at", "timestamptz"), ("expires_at", "timestamptz"),
]
_SELECT = ("SELECT id, login, role, state, seconds, reason, requested_at, decide_by, decided_by, granted_at, "
           "expires_at FROM {schema}.elevation_requests")


class WorkflowRefused(ValueError):
    """What the policy or the request's state does not allow; the message says why."""


@dataclass(frozen=True, slots=True)
class StoredGrant:
    """An approved request in force: `login` may act as `role` until `expires_at` (Unix seconds)."""

    id: int
    login: str
    role: str
    reason: str
    approver: str | None
    seconds: int
    granted_at: float
    expires_at: float

    def audit_fields(self) -> dict[str, Any]:
        return {"request_id": self.id, "grant_id": str(self.id), "login": self.login,
                "elevated_role": self.role, "reason": self.reason,
                "approver": self.approver, "granted_at": _iso(self.granted_at),
                "expires_at": _iso(self.expires_at)}


@dataclass(frozen=True, slots=True)
class Answer:
    """What a workflow step gives back: a result table (columns, rows) and a one-line summary."""

    columns: list[tuple[str, ColumnType]]
    rows: list[tuple[Value, ...]]
    summary: str


def elevation_rule(policy: Policy, login: str, role: str) -> Elevation | None:
    """The first `elevations:` entry that lets `login` ask for `role`."""
    for elevation in policy.elevations:
        if elevation.role == role and any(fnmatch.fnmatchcase(login, user) for user in elevation.users):
            return elevation
    return None


def may_decide(policy: Policy, actor: str, login: str, role: str) -> str | None:
    """Why `actor` may not approve or deny `login`'s request for `role` (None: they may)."""
    if actor == login:
        return "a login cannot approve or deny its own request"
    rule = elevation_rule(policy, login, role)
    if rule is None:
        return f"the policy no longer lets '{login}' assume role '{role}'"
    if rule.approvers and not any(fnmatch.fnmatchcase(actor, pattern) for pattern in rule.approvers):
        return f"'{actor}' may not approve elevation to '{role}' (approvers: {', '.join(rule.approvers)})"
    return None


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch).astimezone().isoformat(timespec="seconds")


def _duration_text(seconds: int) -> str:
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return "".join(f"{n}{unit}" for n, unit in ((hours, "h"), (minutes, "m"), (secs, "s")) if n) or "0s"


def _row(record: asyncpg.Record) -> tuple[Value, ...]:
    return (record["id"], record["login"], record["role"], record["state"], _duration_text(record["seconds"]),
            record["reason"], record["requested_at"], record["decide_by"], record["decided_by"],
            record["granted_at"], record["expires_at"])


_REPLICA = f"{socket.gethostname()}:{os.getpid()}"


class ElevationWorkflow:
    """The workflow for one process: its steps (each an audit event and a counted metric), and the
    grants in force as this process last read them."""

    def __init__(self, store: StateStore, policy: Callable[[], Policy | None],
                 request_timeout: int = DEFAULT_REQUEST_TIMEOUT,
                 on_event: Callable[[str, str], None] | None = None) -> None:
        self.store = store
        self.policy = policy
        self.request_timeout = request_timeout
        self.on_event = on_event  # (kind, event): ("step", "approve:done"), ("grant", "used") ...
        self._by_login: dict[str, tuple[StoredGrant, ...]] = {}
        self._known: dict[int, StoredGrant] = {}
        self._used: set[int] = set()
        self._ended: set[int] = set()
        self._events: list[dict[str, Any]] = []
        self.record_events = True  # False without an audit sink: nothing would take them

    def start(self) -> None:
        """Follow the store's changes (before `store.open()`, or at once after it)."""
        self.store.subscribe(TOPIC, self.reload)

    # -- grants in force -------------------------------------------------------------------------
    async def reload(self) -> None:
        """Re-read the grants in force (a listener of the store's `elevations` topic)."""
        rows = await self.store.fetch(
            "SELECT id, login, role, reason, decided_by, seconds, extract(epoch FROM granted_at), "
            "extract(epoch FROM expires_at) FROM {schema}.elevation_requests "
            "WHERE state = 'approved' AND expires_at > now()")
        grants = {int(row[0]): StoredGrant(int(row[0]), row[1], row[2], row[3], row[4], int(row[5]),
                                           float(row[6]), float(row[7])) for row in rows}
        now = time.time()
        for grant in grants.values():
            if grant.id not in self._known and grant.id not in self._ended:
                self._grant_event("granted", grant)
        for grant in self._known.values():
            if grant.id not in grants and grant.id not in self._ended:
                self._ended.add(grant.id)
                self._grant_event("expired" if now >= grant.expires_at else "revoked", grant)
        self._known = {key: grant for key, grant in grants.items() if key not in self._ended}
        by_login: dict[str, list[StoredGrant]] = {}
        for grant in self._known.values():
            by_login.setdefault(grant.login, []).append(grant)
        self._by_login = {login: tuple(entries) for login, entries in by_login.items()}

    def active_role(self, login: str, now: float | None = None) -> str | None:
        """The role `login` is elevated to at `now` (default: this process's clock) by a grant read
        from the store, or None. One dict look-up for a login without grants."""
        grants = self._by_login.get(login)
        if not grants:
            return None
        if now is None:
            now = time.time()
        policy = self.policy()
        chosen: StoredGrant | None = None
        for grant in grants:
            if grant.id in self._ended:
                continue
            if now >= grant.expires_at:
                self._end(grant, "expired")
                continue
            problem = "no policy loaded" if policy is None else self._grant_problem(policy, grant)
            if problem:
                self._end(grant, "rejected", problem=f"the current policy: {problem}")
                continue
            if chosen is None or grant.expires_at > chosen.expires_at:
                chosen = grant
        if chosen is None:
            return None
        if chosen.id not in self._used:
            self._used.add(chosen.id)
            self._grant_event("used", chosen)
        return chosen.role

    @staticmethod
    def _grant_problem(policy: Policy, grant: StoredGrant) -> str | None:
        if grant.role not in policy.roles:
            return f"the policy has no role named '{grant.role}'"
        rule = elevation_rule(policy, grant.login, grant.role)
        if rule is None:
            return f"no entry under elevations: lets '{grant.login}' assume role '{grant.role}'"
        if grant.seconds > rule.max_duration_seconds:
            return f"{grant.seconds}s is longer than the {rule.max_duration_seconds}s the policy allows"
        if rule.approver_required:
            if not grant.approver or grant.approver == grant.login:
                return f"elevation to '{grant.role}' now needs an approver"
            if rule.approvers and not any(fnmatch.fnmatchcase(grant.approver, a) for a in rule.approvers):
                return f"'{grant.approver}' may no longer approve elevation to '{grant.role}'"
        return None

    def _end(self, grant: StoredGrant, event: str, **extra: Any) -> None:
        self._ended.add(grant.id)
        self._grant_event(event, grant, **extra)
        self._by_login = {login: tuple(g for g in entries if g.id != grant.id)
                          for login, entries in self._by_login.items()}

    def active_count(self, now: float | None = None) -> int:
        """Grants in force as this process sees them (pgveil_elevations_active)."""
        moment = time.time() if now is None else now
        return sum(1 for grant in self._known.values()
                   if grant.id not in self._ended and grant.expires_at > moment)

    # -- audit events ----------------------------------------------------------------------------
    def _grant_event(self, event: str, grant: StoredGrant, **extra: Any) -> None:
        if self.record_events:
            self._events.append({"type": "elevation", "event": event, "store": "state",
                                 **grant.audit_fields(), "replica": _REPLICA, **extra})
        if self.on_event:
            self.on_event("grant", event)

    def _step_event(self, step: str, actor: str, via: str, *, result: str,
                    request: dict[str, Any] | None = None, problem: str | None = None,
                    reason: str | None = None, request_id: int | None = None,
                    **extra: Any) -> None:
        record: dict[str, Any] = {"type": "elevation", "event": step, "result": result, "actor": actor,
                                  "via": via, "replica": _REPLICA, "request_id": request_id,
                                  "grant_id": None if request_id is None else str(request_id)}
        if request is not None:
            record.update(request)
        if reason is not None:
            record["decision_reason" if step != "request" else "reason"] = reason
        if problem is not None:
            record["problem"] = problem
        record.update(extra)
        if self.record_events:
            self._events.append(record)
        if self.on_event:
            self.on_event("step", f"{step}:{result}")

    def take_events(self) -> list[dict[str, Any]]:
        events, self._events = self._events, []
        return events

    def return_events(self, events: list[dict[str, Any]]) -> None:
        self._events[:0] = events

    # -- the steps -------------------------------------------------------------------------------
    async def run(self, actor: str, command: ElevationCommand, via: str = "sql") -> Answer:
        """Carry out one step as `actor`; WorkflowRefused or StateUnavailable (audited either way)."""
        request_id = command.request_id
        try:
            if command.action == "request":
                assert command.role is not None and command.duration is not None
                return await self.request(actor, command.role, command.duration, command.reason or "", via)
            if command.action == "list":
                return await self.list(actor)
            assert request_id is not None
            return await self.decide(actor, command.action, request_id, command.reason, via)
        except StateUnavailable as exc:
            if command.action != "list":
                self._step_event(command.action, actor, via, result="refused", request_id=request_id,
                                 problem=f"state store unreachable: {exc}")
            raise
        except Exception as exc:
            if not unreachable(exc):
                raise
            self.store.available = False
            if command.action != "list":
                self._step_event(command.action, actor, via, result="refused", request_id=request_id,
                                 problem=f"state store unreachable: {exc}")
            raise StateUnavailable(f"state store {self.store.where()} unreachable: {exc}") from None

    def _policy_now(self) -> Policy:
        policy = self.policy()
        if policy is None:
            raise WorkflowRefused("no policy is loaded")
        return policy

    async def request(self, actor: str, role: str, duration: str, reason: str, via: str = "sql") -> Answer:
        fields: dict[str, Any] = {"login": actor, "elevated_role": role, "reason": reason}
        try:
            policy = self._policy_now()
            try:
                seconds = parse_duration(duration)
            except GrantError as exc:
                raise WorkflowRefused(str(exc)) from None
            fields["duration_seconds"] = seconds
            if role not in policy.roles:
                raise WorkflowRefused(f"the policy has no role named '{role}'")
            rule = elevation_rule(policy, actor, role)
            if rule is None:
                raise WorkflowRefused(f"no entry under elevations: lets '{actor}' assume role '{role}'")
            if seconds > rule.max_duration_seconds:
                raise WorkflowRefused(f"{_duration_text(seconds)} is longer than the "
                                      f"{_duration_text(rule.max_duration_seconds)} the policy allows for "
                                      f"role '{role}'")
            if not reason.strip():
                raise WorkflowRefused("a reason is required: ... REASON 'why'")
        except WorkflowRefused as exc:
            self._step_event("request", actor, via, result="refused", request=fields, problem=str(exc))
            raise
        async with self.store.transaction() as connection:
            await self._time_out_overdue(connection, actor, via)
            record = await connection.fetchrow(self.store.sql(
                "INSERT INTO {schema}.elevation_requests (login, role, seconds, reason, decide_by) "
                "VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5)) RETURNING id"),
                actor, role, seconds, reason, float(self.request_timeout))
            assert record is not None
            request_id = int(record[0])
            await self._history(connection, request_id, "requested", actor, reason)
            if not rule.approver_required:  # self-service: in force at once, still recorded
                await self._grant(connection, request_id, actor, "approver_required: false")
            await self.store.changed(connection, TOPIC)
            row = await connection.fetchrow(self.store.sql(_SELECT + " WHERE id = $1"), request_id)
        assert row is not None
        self._step_event("request", actor, via, result="done", request=fields, request_id=request_id,
                         state=row["state"])
        if not rule.approver_required:
            self._step_event("approve", actor, via, result="done", request=fields, request_id=request_id,
                             approver=None, note="the policy requires no approver for this role")
        outcome = "granted (no approver required)" if row["state"] == "approved" else "waiting for approval"
        summary = f"request {request_id}: {actor} asks for {role} for {_duration_text(seconds)}; {outcome}"
        return Answer(LIST_COLUMNS, [_row(row)], summary)

    async def decide(self, actor: str, action: str, request_id: int, reason: str | None,
                     via: str = "sql") -> Answer:
        """approve, deny or revoke request `request_id` as `actor`."""
        async with self.store.transaction() as connection:
            await self._time_out_overdue(connection, actor, via)
            row = await connection.fetchrow(self.store.sql(_SELECT + " WHERE id = $1 FOR UPDATE"), request_id)
            fields: dict[str, Any] = {}
            try:
                if row is None:
                    raise WorkflowRefused(f"there is no elevation request {request_id}")
                fields = {"login": row["login"], "elevated_role": row["role"], "reason": row["reason"],
                          "duration_seconds": row["seconds"]}
                self._check_decision(actor, action, row)
            except WorkflowRefused as exc:
                self._step_event(action, actor, via, result="refused", request=fields, request_id=request_id,
                                 problem=str(exc), reason=reason)
                raise
            if action == "approve":
                await self._grant(connection, request_id, actor, reason)
            elif action == "deny":
                await connection.execute(self.store.sql(
                    "UPDATE {schema}.elevation_requests SET state = 'denied', decided_by = $2, "
                    "decided_at = now(), decision_reason = $3 WHERE id = $1"), request_id, actor, reason)
                await self._history(connection, request_id, "denied", actor, reason)
            else:
                await connection.execute(self.store.sql(
                    "UPDATE {schema}.elevation_requests SET state = 'revoked', revoked_by = $2, "
                    "revoked_at = now(), revoke_reason = $3 WHERE id = $1"), request_id, actor, reason)
                await self._history(connection, request_id, "revoked", actor, reason)
            await self.store.changed(connection, TOPIC)
            after = await connection.fetchrow(self.store.sql(_SELECT + " WHERE id = $1"), request_id)
        assert after is not None
        extra: dict[str, Any] = {}
        if action == "approve":
            extra = {"approver": actor, "granted_at": after["granted_at"].isoformat(),
                     "expires_at": after["expires_at"].isoformat()}
        self._step_event(action, actor, via, result="done", request=fields, request_id=request_id,
                         reason=reason, **extra)
        words = {"approve": "approved: in force until " + str(after["expires_at"]), "deny": "denied",
                 "revoke": "revoked"}
        return Answer(LIST_COLUMNS, [_row(after)], f"request {request_id} {words[action]}")

    def _check_decision(self, actor: str, action: str, row: asyncpg.Record) -> None:
        policy = self._policy_now()
        login, role, state = row["login"], row["role"], row["state"]
        if action in ("approve", "deny"):
            if state != "pending":
                raise WorkflowRefused(f"request {row['id']} is {state.replace('_', ' ')}, not pending")
            problem = may_decide(policy, actor, login, role)
            if problem:
                raise WorkflowRefused(problem)
            if action == "approve":
                rule = elevation_rule(policy, login, role)
                assert rule is not None
                if row["seconds"] > rule.max_duration_seconds:
                    allowed = _duration_text(rule.max_duration_seconds)
                    raise WorkflowRefused(f"{_duration_text(row['seconds'])} is longer than the {allowed} "
                                          "the policy now allows")
            return
        # revoke: a pending request or a grant in force, by its requester or one who may approve it
        if state not in ("pending", "approved") or (state == "approved" and row["expires_at"] is not None
                                                     and row["expires_at"].timestamp() <= time.time()):
            shown = "expired" if state == "approved" else state.replace("_", " ")
            raise WorkflowRefused(f"request {row['id']} is {shown}; only a pending request or a grant in "
                                  "force can be revoked")
        if actor != login:
            problem = may_decide(policy, actor, login, role)
            if problem:
                raise WorkflowRefused(f"only {login} or an approver may revoke it: {problem}")

    async def _grant(self, connection: asyncpg.Connection, request_id: int, approver: str,
                     reason: str | None) -> None:
        await connection.execute(self.store.sql(
            "UPDATE {schema}.elevation_requests SET state = 'approved', decided_by = $2, decided_at = now(), "
            "decision_reason = $3, granted_at = now(), expires_at = now() + make_interval(secs => seconds) "
            "WHERE id = $1"), request_id, approver, reason)
        await self._history(connection, request_id, "approved", approver, reason)

    async def _history(self, connection: asyncpg.Connection, request_id: int, event: str, actor: str,
                       reason: str | None) -> None:
        await connection.execute(self.store.sql(
            "INSERT INTO {schema}.elevation_events (request_id, event, actor, reason) "
            "VALUES ($1, $2, $3, $4)"),
            request_id, event, actor, reason)

    async def _time_out_overdue(self, connection: asyncpg.Connection, actor: str, via: str) -> None:
        """Pending requests past their decide_by time out (recorded and audited once)."""
        rows = await connection.fetch(self.store.sql(
            "UPDATE {schema}.elevation_requests SET state = 'timed_out' WHERE state = 'pending' "
            "AND decide_by <= now() RETURNING id, login, role, reason, seconds"))
        for row in rows:
            await self._history(connection, row["id"], "timed_out", "pgveil", None)
            self._step_event("timeout", "pgveil", via, result="done", request_id=row["id"],
                             request={"login": row["login"], "elevated_role": row["role"],
                                      "reason": row["reason"], "duration_seconds": row["seconds"]},
                             noticed_by=actor)
        if rows:
            await self.store.changed(connection, TOPIC)

    async def list(self, actor: str) -> Answer:
        """The requests `actor` made or may decide: pending ones, grants in force, and the last day's."""
        policy = self._policy_now()
        async with self.store.transaction() as connection:
            await self._time_out_overdue(connection, actor, "sql")
            rows = await connection.fetch(self.store.sql(
                _SELECT + " WHERE state = 'pending' OR (state = 'approved' AND expires_at > now()) "
                "OR requested_at > now() - interval '1 day' ORDER BY id"))
        visible = [row for row in rows
                   if row["login"] == actor or may_decide(policy, actor, row["login"], row["role"]) is None]
        return Answer(LIST_COLUMNS, [_row(row) for row in visible], f"{len(visible)} elevation requests")


class EventSources:
    """Several AuditEventSources (file grants and the workflow) as one, for the audit layer."""

    def __init__(self, *sources: Any) -> None:
        self.sources = [source for source in sources if source is not None]

    def take_events(self) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        for source in self.sources:
            events.extend(source.take_events())
        return events

    def return_events(self, events: list[dict[str, Any]]) -> None:
        if self.sources:
            self.sources[0].return_events(events)


RULE = "elevation"


class ElevationStatements:
    """The guard's statement hook: answers PGVEIL ELEVATE statements before the firewall sees them
    (`intercept` is None for every other statement, after one anchored regular-expression match)."""

    def __init__(self, workflow: ElevationWorkflow) -> None:
        self.workflow = workflow

    def intercept(self, login: str, sql: str) -> Coroutine[Any, Any, Verdict] | None:
        if not is_pgveil_statement(sql):
            return None
        return self._answer(login, sql)

    async def _answer(self, login: str, sql: str) -> Verdict:
        try:
            command = parse_statement(sql)
        except StatementSyntaxError as exc:
            return Refuse(RULE, str(exc), info=StatementInfo(kind="elevation"), sqlstate="42601")
        info = StatementInfo(kind="elevation", normalized_sql=command.normalized)
        try:
            answer = await in_task(self.workflow.run(login, command))
        except WorkflowRefused as exc:
            return Refuse(RULE, f"{exc}", info=info)
        except StateUnavailable as exc:
            log.warning("elevation %s by %s refused: %s", command.action, login, exc)
            return Refuse(RULE, "the state store cannot be reached, so nothing was read or changed; retry "
                          "in a moment or ask the operator to check the state store", info=info)
        except Exception:
            log.exception("elevation %s by %s failed", command.action, login)
            return Refuse(RULE, "the elevation step failed; the pgveil log says why", info=info)
        return Rewrite(result_sql(answer.columns, answer.rows), info=info)


_STEP_COUNTERS = {
    "request": ("pgveil_elevation_requests",
                "Elevation requests handled by this process, by result (done, refused)"),
    "approve": ("pgveil_elevation_approvals", "Elevation approvals handled by this process, by result"),
    "deny": ("pgveil_elevation_denials", "Elevation denials handled by this process, by result"),
    "revoke": ("pgveil_elevation_revocations", "Elevation revocations handled by this process, by result"),
    "timeout": ("pgveil_elevation_request_timeouts", "Elevation requests this process found timed out"),
}


class _ActiveCollector:
    """pgveil_elevations_active: the state store's grants in force as this process sees them."""

    NAME = "pgveil_elevations_active"
    HELP = "Elevation grants of the state store in force, as this process last read them"

    def __init__(self, workflow: ElevationWorkflow) -> None:
        self.workflow = workflow

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(self.NAME, self.HELP)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(self.NAME, self.HELP, value=self.workflow.active_count())


def workflow_metrics(metrics: Metrics, workflow: ElevationWorkflow) -> Callable[[str, str], None]:
    """Register the workflow's metrics; returns the workflow's `on_event`."""
    counters = {step: Counter(name, text, ["result"], registry=metrics.registry)
                for step, (name, text) in _STEP_COUNTERS.items()}
    metrics.registry.register(_ActiveCollector(workflow))

    def on_event(kind: str, event: str) -> None:
        if kind == "grant":
            metrics.elevations.labels(event).inc()
            return
        step, _, result = event.partition(":")
        counter = counters.get(step)
        if counter is not None:
            counter.labels(result).inc()

    return on_event

