"""Operations wiring for `pgveil serve`: audit sink and elevation from settings, the decorated
connection-policy factory, policy reload accounting, readiness, and the metrics endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from proxy.audit import (
    DEFAULT_FSYNC_INTERVAL,
    FSYNC_MODES,
    AuditError,
    AuditSink,
    FsyncMode,
    JsonLinesFileSink,
    MappingWrites,
    StdoutSink,
    Unsealed,
    fsync_interval_of,
)
from proxy.audit.connection import AuditedConnection, AuditEventSource, OnAuditFailure
from proxy.config import Settings, parse_listen
from proxy.connection_policy import ClientInfo, ConnectionPolicy
from proxy.elevation import GRANT_KEY_ENV, GrantBook
from proxy.metrics import MeteredConnection, Metrics, MetricsServer
from proxy.metrics_workers import worker_socket
from proxy.policy.model import Policy
from proxy.policy.model import Settings as PolicySettings

if TYPE_CHECKING:
    from proxy.server import ServeHooks
    from proxy.state.elevations import ElevationWorkflow

log = logging.getLogger("pgveil.operations")

ConnectionPolicyFactory = Callable[[ClientInfo], ConnectionPolicy]


class OperationsSettingsError(ValueError):
    """An `audit:` or `elevation:` setting that cannot be used; one line saying what to fix."""


def _key_from_env(name: str | None, what: str) -> bytes | None:
    if not name:
        return None
    value = os.environ.get(name)
    if not value:
        raise OperationsSettingsError(f"{what}: environment variable {name} is not set")
    return value.encode()


@dataclass(frozen=True, slots=True)
class AuditSettings:
    """Where and how audit records are written (`--audit-log` plus the `audit:` config section)."""

    log: str | None = None  # file path; "-" means standard output
    # seconds within which a written record is fsynced; 0 strict (group commit, waited for); None never
    fsync_interval: float | None = DEFAULT_FSYNC_INTERVAL
    max_bytes: int | None = 100 * 1024 * 1024
    key_env: str | None = None
    postgres_dsn: str | None = None
    postgres_table: str = "pgveil_audit"
    on_failure: OnAuditFailure = "refuse"
    include_literals: bool = False

    @property
    def enabled(self) -> bool:
        return bool(self.log or self.postgres_dsn)

    @classmethod
    def from_settings(cls, audit_log: str | None, extra: Mapping[str, Any]) -> AuditSettings:
        section = extra.get("audit") or {}
        if not isinstance(section, Mapping):
            raise OperationsSettingsError("audit: must be a mapping of setting: value")
        known = {"fsync_interval_ms", "fsync", "max_bytes", "key_env", "postgres_dsn", "postgres_table",
                 "on_failure", "include_literals", "log"}
        unknown = sorted(set(section) - known)
        if unknown:
            raise OperationsSettingsError(
                f"audit.{unknown[0]}: unknown setting (known: {', '.join(sorted(known))})")
        fsync_interval = _fsync_interval(section)
        on_failure = section.get("on_failure", "refuse")
        if on_failure not in ("refuse", "allow"):
            raise OperationsSettingsError(f"audit.on_failure must be refuse or allow, not {on_failure!r}")
        max_bytes = section.get("max_bytes", 100 * 1024 * 1024)
        if not isinstance(max_bytes, int) or max_bytes < 0:
            raise OperationsSettingsError("audit.max_bytes must be a byte count (0: never rotate)")
        return cls(
            log=audit_log or section.get("log"),
            fsync_interval=fsync_interval,
            max_bytes=max_bytes or None,
            key_env=section.get("key_env"),
            postgres_dsn=section.get("postgres_dsn") or os.environ.get("PGVEIL_AUDIT_POSTGRES_DSN"),
            postgres_table=str(section.get("postgres_table", "pgveil_audit")),
            on_failure=cast(OnAuditFailure, on_failure),
            include_literals=bool(section.get("include_literals", False)),
        )


def _fsync_interval(section: Mapping[str, Any]) -> float | None:
    """`audit.fsync_interval_ms` in seconds (0: strict), or what the older `audit.fsync` means."""
    if "fsync" in section and "fsync_interval_ms" in section:
        raise OperationsSettingsError("audit: give fsync_interval_ms or its older form fsync "
                                      "(always | batch | never), not both")
    if "fsync" in section:
        fsync = section["fsync"]
        if fsync not in FSYNC_MODES:
            raise OperationsSettingsError(
                f"audit.fsync must be one of {', '.join(FSYNC_MODES)}, not {fsync!r} "
                "(or use fsync_interval_ms)")
        return fsync_interval_of(cast(FsyncMode, fsync))
    milliseconds = section.get("fsync_interval_ms", round(DEFAULT_FSYNC_INTERVAL * 1000))
    if isinstance(milliseconds, bool) or not isinstance(milliseconds, int) or milliseconds < 0:
        raise OperationsSettingsError(
            "audit.fsync_interval_ms must be a whole number of milliseconds (0: strict, every "
            f"statement waits for its fsync), not {milliseconds!r}")
    return milliseconds / 1000


class FanOutSink(MappingWrites):
    """Writes each record to every sink; the record counts as written only when all have it."""

    def __init__(self, sinks: list[AuditSink]) -> None:
        self.sinks = sinks

    def append(self, record: Unsealed) -> Awaitable[None] | None:
        waiters: list[Awaitable[None]] = []
        failure: AuditError | None = None
        for sink in self.sinks:
            try:
                waiter = sink.append(record)
            except AuditError as exc:
                failure = failure or exc
                continue
            if waiter is not None:
                waiters.append(waiter)
        if failure is not None:
            if waiters:  # nobody waits for them now: collect their outcome so none goes unretrieved
                asyncio.gather(*waiters, return_exceptions=True)
            raise failure
        return self._all(waiters) if waiters else None

    @staticmethod
    async def _all(waiters: list[Awaitable[None]]) -> None:
        results = await asyncio.gather(*waiters, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result if isinstance(result, AuditError) else AuditError(str(result))

    def append_behind(self, record: Unsealed) -> None:
        for sink in self.sinks:
            sink.append_behind(record)

    async def flush(self) -> None:
        await asyncio.gather(*(sink.flush() for sink in self.sinks))

    async def close(self) -> None:
        await asyncio.gather(*(sink.close() for sink in self.sinks))


def audit_log_for_worker(path: str, worker_index: int, workers: int) -> str:
    """With --workers N each worker process keeps its own log and chain: audit.jsonl becomes
    audit-w0.jsonl, audit-w1.jsonl, ... (one process's chain cannot interleave with another's)."""
    if workers <= 1 or path == "-":
        return path
    file = Path(path)
    return str(file.with_name(f"{file.stem}-w{worker_index}{file.suffix}"))


def open_audit_sink(audit: AuditSettings) -> AuditSink | None:
    """The sink `audit` describes, opened (a file that cannot be opened fails here), or None."""
    key = _key_from_env(audit.key_env, "audit.key_env")
    sinks: list[AuditSink] = []
    if audit.log == "-":
        sinks.append(StdoutSink(key=key))
    elif audit.log:
        try:
            sinks.append(JsonLinesFileSink(audit.log, fsync_interval=audit.fsync_interval,
                                           max_bytes=audit.max_bytes, key=key))
        except AuditError as exc:
            raise OperationsSettingsError(str(exc)) from exc
    if audit.postgres_dsn:
        from proxy.audit.postgres import PostgresSink

        sinks.append(PostgresSink(audit.postgres_dsn, table=audit.postgres_table, key=key))
    if not sinks:
        return None
    return sinks[0] if len(sinks) == 1 else FanOutSink(sinks)


@dataclass(frozen=True, slots=True)
class ElevationSettings:
    """The `elevation:` config section: which grants file the proxy watches, and its key."""

    grants_file: str | None = None
    key_env: str = GRANT_KEY_ENV
    request_timeout: int = 3600  # seconds a workflow request waits for a decision (state store)

    @classmethod
    def from_settings(cls, extra: Mapping[str, Any]) -> ElevationSettings:
        section = extra.get("elevation") or {}
        if not isinstance(section, Mapping):
            raise OperationsSettingsError("elevation: must be a mapping of setting: value")
        unknown = sorted(set(section) - {"grants_file", "key_env", "request_timeout"})
        if unknown:
            raise OperationsSettingsError(
                f"elevation.{unknown[0]}: unknown setting (known: grants_file, key_env, request_timeout)")
        grants_file = section.get("grants_file") or os.environ.get("PGVEIL_GRANTS_FILE")
        timeout = 3600
        if "request_timeout" in section:
            from proxy.elevation import GrantError, parse_duration

            try:
                timeout = parse_duration(str(section["request_timeout"]))
            except GrantError as exc:
                raise OperationsSettingsError(f"elevation.request_timeout: {exc}") from None
        return cls(grants_file=str(grants_file) if grants_file else None,
                   key_env=str(section.get("key_env", GRANT_KEY_ENV)), request_timeout=timeout)


def open_grant_book(elevation: ElevationSettings, policy: Callable[[], Policy | None],
                    metrics: Metrics | None = None) -> GrantBook | None:
    """The GrantBook to hand the guard (its `active_role`) and the audit (its events), or None."""
    if not elevation.grants_file:
        return None
    key = os.environ.get(elevation.key_env)
    if not key:
        log.warning("elevation.grants_file is set but %s is not: every grant will be rejected",
                    elevation.key_env)
    on_event = (lambda event: metrics.elevations.labels(event).inc()) if metrics else None
    return GrantBook(elevation.grants_file, policy, key.encode() if key else None, on_event)


def active_role_of(grants: GrantBook | None,
                   workflow: ElevationWorkflow | None = None) -> Callable[[str], str | None] | None:
    """What the guard's `active_role` parameter takes: login -> elevated role now, or None (a grant
    of the state store's workflow first, then one of the grants file)."""
    if workflow is None:
        if grants is None:
            return None
        return lambda login: grants.active_role(login, time.time())

    if grants is None:
        return workflow.active_role

    def active(login: str) -> str | None:
        role = workflow.active_role(login)
        return role if role is not None else grants.active_role(login, time.time())

    return active


def open_workflow(settings: Settings, elevation: ElevationSettings, policy: Callable[[], Policy | None],
                  metrics: Metrics | None = None) -> ElevationWorkflow | None:
    """The elevation workflow on the state store of --state-dsn (not yet opened), or None."""
    if not settings.state_dsn:
        return None
    from proxy.state import StateError, StateStore
    from proxy.state.elevations import ElevationWorkflow, workflow_metrics

    section = settings.extra.get("state") or {}
    if not isinstance(section, Mapping):
        raise OperationsSettingsError("state: must be a mapping of setting: value")
    unknown = sorted(set(section) - {"schema", "poll_interval_ms", "fingerprints"})
    if unknown:
        raise OperationsSettingsError(
            f"state.{unknown[0]}: unknown setting (known: fingerprints, poll_interval_ms, schema)")
    if not isinstance(section.get("fingerprints", False), bool):
        raise OperationsSettingsError("state.fingerprints must be true or false")
    poll = section.get("poll_interval_ms", 500)
    if isinstance(poll, bool) or not isinstance(poll, int) or not 10 <= poll <= 60_000:
        raise OperationsSettingsError(
            f"state.poll_interval_ms must be 10 to 60000 milliseconds, not {poll!r}")
    dsn = settings.upstream if settings.state_dsn == "upstream" else settings.state_dsn
    try:
        store = StateStore(dsn, str(section.get("schema", "pgveil_state")), poll_interval=poll / 1000)
    except StateError as exc:
        raise OperationsSettingsError(str(exc)) from None
    workflow = ElevationWorkflow(store, policy, elevation.request_timeout)
    if metrics is not None:
        workflow.on_event = workflow_metrics(metrics, workflow)
    workflow.start()
    return workflow


def build_connection_policy_factory(
    inner: ConnectionPolicyFactory,
    sink: AuditSink | None,
    metrics: Metrics | None,
    audit: AuditSettings = AuditSettings(),
    grants: AuditEventSource | None = None,
) -> ConnectionPolicyFactory:
    """Wrap the guard's per-connection policy: MeteredConnection(AuditedConnection(inner(client))).

    Without a sink nothing is audited; without metrics nothing is counted. Elevation events are
    written to the audit log ahead of the access record of the statement that triggered them.
    """

    def factory(client: ClientInfo) -> ConnectionPolicy:
        policy = inner(client)
        if sink is not None:
            policy = AuditedConnection(policy, sink, client, on_audit_failure=audit.on_failure,
                                       include_literals=audit.include_literals, events=grants, timer=metrics)
        if metrics is not None:
            policy = MeteredConnection(policy, metrics)
        return policy

    return factory


async def reload_policy(reload: Callable[[], Awaitable[Policy]], metrics: Metrics | None) -> Policy | None:
    """Run one reload (SIGHUP): count it, log it; an invalid policy leaves the old one in force.

    `reload` loads and validates the file and swaps it in atomically, raising when invalid.
    """
    try:
        policy = await reload()
    except Exception as exc:
        log.error("policy reload refused, the previous policy stays in force: %s", exc)
        if metrics:
            metrics.policy_reloaded(ok=False)
        return None
    log.info("policy reloaded: version %s from %s", policy.version, policy.source)
    if metrics:
        metrics.policy_reloaded(ok=True)
        metrics.policy_loaded_now(policy.version, policy.source)
    return policy


async def upstream_answers(host: str, port: int, timeout: float = 2.0) -> bool:
    """True when a PostgreSQL server answers an SSLRequest at host:port (no credentials needed)."""
    try:
        if host.startswith("/"):
            opened = asyncio.open_unix_connection(os.path.join(host, f".s.PGSQL.{port}"))
        else:
            opened = asyncio.open_connection(host, port)
        reader, writer = await asyncio.wait_for(opened, timeout)
    except (OSError, TimeoutError):
        return False
    try:
        writer.write(struct.pack("!II", 8, 80877103))
        await writer.drain()
        answer = await asyncio.wait_for(reader.readexactly(1), timeout)
        return answer in (b"S", b"N")
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        return False
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def readiness(policy: Callable[[], Policy | None], host: str, port: int) -> Callable[[], Awaitable[bool]]:
    """The /readyz check: a policy is loaded and the upstream answers."""

    async def ready() -> bool:
        return policy() is not None and await upstream_answers(host, port)

    return ready


WORKER_METRICS = "unix:"
"""`settings.metrics` of a worker of --workers N: `unix:DIR`, serve on DIR/worker-I.sock for the parent."""


async def start_metrics_server(metrics: Metrics, listen: str,
                               ready: Callable[[], Awaitable[bool]], worker_index: int = 0) -> MetricsServer:
    """Serve /metrics, /healthz, /readyz on HOST:PORT, or (a worker of --workers N, `unix:DIR`) on
    a private unix socket that the parent's one endpoint scrapes (proxy/metrics_workers.py)."""
    server = MetricsServer(metrics, ready)
    if listen.startswith(WORKER_METRICS):
        path = await server.start_unix(worker_socket(listen[len(WORKER_METRICS):], worker_index))
        log.debug("worker %d metrics on %s", worker_index, path)
        return server
    bound = await server.start(*parse_listen(listen))
    log.info("metrics on http://%s:%d/metrics", *bound)
    return server


async def serve_hooks(settings: Settings, worker_index: int) -> ServeHooks:
    """Everything `pgveil serve` plugs into one serving process, built inside that process.

    The guard's Enforcement (with --policy; elevation grants feed its `active_role`), wrapped per
    connection as MeteredConnection(AuditedConnection(GuardedConnection)); the metrics as the
    relay observer; SIGHUP reload with accounting; the metrics endpoint (a worker's on a unix socket)
    started with the server; the audit sink flushed and closed after the drain.
    Raises OperationsSettingsError or EnforcementError with a one-line reason.
    """
    from proxy.connection_policy import PassThrough
    from proxy.server import ServeHooks

    audit = AuditSettings.from_settings(settings.audit_log, settings.extra)
    if audit.log:
        audit = replace(audit, log=audit_log_for_worker(audit.log, worker_index, settings.workers))
    elevation = ElevationSettings.from_settings(settings.extra)
    metrics = Metrics() if settings.metrics else None
    loaded: list[Policy] = []  # the policy in force, once there is one
    grants = open_grant_book(elevation, lambda: loaded[0] if loaded else None, metrics)
    workflow = open_workflow(settings, elevation, lambda: loaded[0] if loaded else None, metrics)
    inner: ConnectionPolicyFactory = lambda client: PassThrough()  # noqa: E731
    reload: Callable[[], Awaitable[None]] | None = None
    closing: list[Callable[[], Awaitable[None]]] = []
    if settings.policy is not None:
        from proxy.enforcement import Enforcement

        enforcement = await Enforcement.create(settings.policy, settings.upstream,
                                               active_role=active_role_of(grants, workflow),
                                               max_statement_size=settings.max_statement_size)
        inner = enforcement.connection_policy
        if workflow is not None:
            from proxy.state.elevations import ElevationStatements

            enforcement.intercept = ElevationStatements(workflow).intercept
            if (settings.extra.get("state") or {}).get("fingerprints"):  # the allow-lists there too
                from proxy.state.fingerprints import keeper_on_state

                refresh = float(os.environ.get("PGVEIL_FINGERPRINTS_REFRESH_SECONDS", "10"))
                enforcement.fingerprints = keeper_on_state(workflow.store, refresh)
        closing.append(enforcement.close)
        if workflow is not None:  # hourly row budgets and lockouts across replicas (docs/dlp.md)
            from proxy.dlp.shared_ledger import StateLedger
            from proxy.dlp.shared_lockouts import StateLockouts

            ledger = StateLedger(workflow.store)
            enforcement.dlp.ledger = ledger
            enforcement.dlp.lockouts = StateLockouts(workflow.store)
            ledger.start()
            closing.append(ledger.close)
        loaded.append(enforcement.policy)
        if metrics is not None:
            metrics.policy_loaded_now(enforcement.policy.version, enforcement.policy.source)
            metrics.count_verdict_cache(lambda: (enforcement.cache.hits, enforcement.cache.misses))
            metrics.count_unclassified(lambda: enforcement.unclassified.sensitive)

        async def reload_now() -> None:
            policy = await reload_policy(enforcement.reload, metrics)
            if policy is not None:
                loaded[:] = [policy]

        reload = reload_now
    elif workflow is not None:
        log.warning("--state-dsn without --policy: the elevation workflow needs a policy; not used")
    if workflow is not None:
        closing.append(workflow.store.close)
        await workflow.store.start()  # an unreachable store is retried in the background
    sink = open_audit_sink(audit)
    events: AuditEventSource | None = grants
    if workflow is not None:
        workflow.record_events = sink is not None
        from proxy.state.elevations import EventSources

        events = EventSources(workflow, grants)
    factory = build_connection_policy_factory(inner, sink, metrics, audit, events)
    servers: list[MetricsServer] = []

    async def on_started(server: object) -> None:
        if metrics is not None and settings.metrics is not None:
            target = settings.upstream_target
            policy_given = settings.policy is not None
            ready = readiness(lambda: (loaded[0] if loaded else None) if policy_given else _NO_POLICY,
                              target.host, target.port)
            servers.append(await start_metrics_server(metrics, settings.metrics, ready, worker_index))

    async def on_stopped() -> None:
        for metrics_server in servers:
            await metrics_server.close()
        for close in closing:
            await close()
        if sink is not None:
            await sink.close()

    return ServeHooks(policy_factory=factory, observer=metrics, reload=reload, on_started=on_started,
                      on_stopped=on_stopped)


_NO_POLICY = Policy(version="none", settings=PolicySettings(), roles={}, datasets={})
"""Stands in for 'loaded' in the readiness check when pgveil relays without a policy."""
