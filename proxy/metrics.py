"""Every Prometheus metric of pgveil, the per-statement metering decorator, and the HTTP endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.utils import floatToGoString

from proxy.audit.identity import policy_version_of, role_name_of
from proxy.connection_policy import ClientInfo, ConnectionPolicy, Outcome, fast_path_of
from proxy.guard.verdict import Allow, Refuse, Rewrite, Verdict
from proxy.session.observer import Traffic

_PGVEIL_SECONDS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
_UPSTREAM_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0)
_AUDIT_SECONDS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 1.0)


class _TrafficCollector:
    """pgveil_bytes_relayed_total read from the relay's plain counters at scrape time."""

    def __init__(self, traffic: Traffic) -> None:
        self.traffic = traffic

    def describe(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily("pgveil_bytes_relayed", _BYTES_HELP, labels=["direction"])

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily("pgveil_bytes_relayed", _BYTES_HELP, labels=["direction"])
        family.add_metric(["client_to_server"], self.traffic.to_upstream)
        family.add_metric(["server_to_client"], self.traffic.to_client)
        yield family


_BYTES_HELP = "Bytes relayed, by direction (client_to_server, server_to_client)"


class _UnclassifiedCollector:
    """pgveil_unclassified_sensitive_columns, read from names-only discovery at scrape time."""

    NAME = "pgveil_unclassified_sensitive_columns"
    HELP = ("Columns whose names look confidential or restricted (pgveil discover's detectors, names "
            "only) and that the policy leaves unclassified or under-classified; updated on catalog reads")

    def __init__(self) -> None:
        self.count: Callable[[], int] = lambda: 0

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(self.NAME, self.HELP)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(self.NAME, self.HELP, value=self.count())


class _VerdictCacheCollector:
    """pgveil_verdict_cache_total read from the guard's own counters at scrape time."""

    def __init__(self) -> None:
        self.counts: Callable[[], tuple[int, int]] = lambda: (0, 0)

    def describe(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily("pgveil_verdict_cache", "Verdict cache lookups by result (hit, miss)",
                                  labels=["result"])

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily("pgveil_verdict_cache", "Verdict cache lookups by result (hit, miss)",
                                     labels=["result"])
        hits, misses = self.counts()
        family.add_metric(["hit"], hits)
        family.add_metric(["miss"], misses)
        yield family


class Counts(dict[tuple[str, ...], int]):
    """One counter's values by label values, in plain integers (no lock: counted on the event loop)
    and read when Prometheus scrapes; `counts[labels] += 1` also notes when a series began."""

    def __init__(self) -> None:
        super().__init__()
        self.created: dict[tuple[str, ...], float] = {}

    def __missing__(self, labels: tuple[str, ...]) -> int:
        self.created[labels] = time.time()
        return 0


class Buckets:
    """One histogram series as a plain list of bucket counts (no lock: observed on the event loop)."""

    __slots__ = ("bounds", "counts", "created", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.total = 0.0
        self.created = time.time()

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # le is inclusive, as prometheus-client
        self.total += value


class LabelledBuckets(dict[tuple[str, ...], Buckets]):
    """A labelled histogram: one Buckets per label values, made on first use."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        super().__init__()
        self.bounds = bounds

    def __missing__(self, labels: tuple[str, ...]) -> Buckets:
        series = self[labels] = Buckets(self.bounds)
        return series


class _ScrapeTime:
    """A counter or histogram kept in plain Python numbers, exported as prometheus-client would
    export its own Counter or Histogram of the same name and labels (`_created` series included)."""

    def __init__(self, name: str, documentation: str, labels: tuple[str, ...],
                 values: Counts | LabelledBuckets) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = labels
        self.values = values

    def describe(self) -> Iterator[Metric]:
        yield self._family()

    def _family(self) -> CounterMetricFamily | HistogramMetricFamily:
        if isinstance(self.values, Counts):
            return CounterMetricFamily(self.name, self.documentation, labels=self.labels)
        return HistogramMetricFamily(self.name, self.documentation, labels=self.labels)

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        values = self.values
        if isinstance(values, Counts):
            assert isinstance(family, CounterMetricFamily)
            for labels, count in list(values.items()):
                family.add_metric(labels, count, created=values.created.get(labels))
        else:
            assert isinstance(family, HistogramMetricFamily)
            bounds = [floatToGoString(b) for b in values.bounds] + ["+Inf"]  # type: ignore[no-untyped-call]
            for labels, series in list(values.items()):
                running = 0
                buckets: list[tuple[str, float]] = []
                for bound, count in zip(bounds, list(series.counts), strict=True):
                    running += count
                    buckets.append((bound, running))
                family.add_metric(labels, buckets, series.total)
                family.add_sample(self.name + "_created", dict(zip(self.labels, labels, strict=True)),
                                  series.created)
        yield family


class Metrics:
    """All metrics, registered in their own registry (so tests and workers never share state).

    What changes per statement (statements, refusals, findings, errors, pgveil's and PostgreSQL's
    time, audit write time) is kept in plain integers and lists and read at scrape time; the rest
    (per connection, per reload) are prometheus-client's own metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.statements = Counts()  # (role, kind, decision)
        self.refusals = Counts()  # (rule,)
        self.findings = Counts()  # (rule,)
        self.pgveil_seconds = Buckets(_PGVEIL_SECONDS)
        self.upstream_seconds = Buckets(_UPSTREAM_SECONDS)
        self.statement_errors = Counts()  # (sqlstate_class,)
        self.audit_write_seconds = LabelledBuckets(_AUDIT_SECONDS)  # (type,)
        self.audit_failures = Counts()  # (type,)
        unlabelled_pgveil = LabelledBuckets(_PGVEIL_SECONDS)
        unlabelled_pgveil[()] = self.pgveil_seconds
        unlabelled_upstream = LabelledBuckets(_UPSTREAM_SECONDS)
        unlabelled_upstream[()] = self.upstream_seconds
        for collector in (
            _ScrapeTime("pgveil_statements", "Statements decided, by role, statement kind and decision",
                        ("role", "kind", "decision"), self.statements),
            _ScrapeTime("pgveil_refusals", "Statements refused, by the rule that refused them", ("rule",),
                        self.refusals),
            _ScrapeTime("pgveil_findings", "Firewall findings of rules in alert mode (statement let "
                        "through), by rule", ("rule",), self.findings),
            _ScrapeTime("pgveil_statement_pgveil_seconds",
                        "pgveil's own time per statement: decision, rewrite and audit write", (),
                        unlabelled_pgveil),
            _ScrapeTime("pgveil_statement_upstream_seconds",
                        "Time from forwarding a statement to PostgreSQL's ReadyForQuery", (),
                        unlabelled_upstream),
            _ScrapeTime("pgveil_statement_errors", "Forwarded statements that PostgreSQL answered with an "
                        "error, by SQLSTATE class (first two characters)", ("sqlstate_class",),
                        self.statement_errors),
        ):
            r.register(collector)
        self.verdict_cache = _VerdictCacheCollector()
        r.register(self.verdict_cache)
        self.unclassified = _UnclassifiedCollector()
        r.register(self.unclassified)
        self.connections_open = Gauge(
            "pgveil_connections_open", "Client connections currently open", registry=r)
        self.connections = Counter(
            "pgveil_connections", "Client connections accepted, by outcome of the startup decision",
            ["result"], registry=r)
        self.traffic = Traffic()  # the relay adds to it; read when scraped
        r.register(_TrafficCollector(self.traffic))
        r.register(_ScrapeTime("pgveil_audit_write_seconds", "Time to make one audit record durable",
                               ("type",), self.audit_write_seconds))
        r.register(_ScrapeTime("pgveil_audit_failures", "Audit records the sink could not write", ("type",),
                               self.audit_failures))
        self.reloads = Counter(
            "pgveil_policy_reloads", "Policy reloads by result (ok, invalid)", ["result"], registry=r)
        self.policy = Info("pgveil_policy", "The loaded policy: version (content hash) and file",
                           registry=r)
        self.policy_loaded = Gauge(
            "pgveil_policy_loaded_timestamp_seconds", "Unix time the current policy was loaded",
            registry=r)
        self.upstream_errors = Counter(
            "pgveil_upstream_errors",
            "Failures talking to PostgreSQL (connect, lost, tls, protocol), not SQL errors",
            ["kind"], registry=r)
        self.elevations = Counter(
            "pgveil_elevation_events", "Elevation grant events (granted, used, expired, revoked, rejected)",
            ["event"], registry=r)
        self.row_budget_breaches = Counter(
            "pgveil_row_budget_breaches", "Statements cancelled for passing a row budget, by role and "
            "limit (max_rows_per_statement, max_rows_per_hour)", ["role", "limit"], registry=r)
        self.honeytoken_hits = Counter(
            "pgveil_honeytoken_hits", "Honeytoken values seen in PostgreSQL's answers, by honeytoken and "
            "action (alert, terminate)", ["token", "action"], registry=r)

    def dlp_event(self, event: dict[str, Any]) -> None:
        """A DataGuard event (proxy/dlp/guard.py): a row-budget breach or a honeytoken hit."""
        if event.get("type") == "budget":
            self.row_budget_breaches.labels(str(event.get("role")), str(event.get("limit"))).inc()
        elif event.get("type") == "honeytoken":
            self.honeytoken_hits.labels(str(event.get("token")), str(event.get("action"))).inc()

    # The session's RelayObserver (proxy/session/observer.py): connections, bytes, upstream failures.

    def connection_opened(self, connection_id: int) -> None:
        self.connections_open.inc()

    def connection_closed(self, connection_id: int, reason: str) -> None:
        self.connections_open.dec()

    def connection_limited(self) -> None:
        """A client refused because --max-connections were open (no PostgreSQL connection made)."""
        self.connections.labels("limit").inc()

    def upstream_error(self, kind: str) -> None:
        self.upstream_errors.labels(kind).inc()

    # Policy loading and the guard's verdict cache.

    def policy_reloaded(self, ok: bool) -> None:
        self.reloads.labels("ok" if ok else "invalid").inc()

    def policy_loaded_now(self, version: str, source: str) -> None:
        self.policy.info({"version": version, "source": source})
        self.policy_loaded.set(time.time())

    def audit_written(self, record_type: str, seconds: float) -> None:
        self.audit_write_seconds[(record_type,)].observe(seconds)

    def audit_failed(self, record_type: str) -> None:
        self.audit_failures[(record_type,)] += 1

    def count_verdict_cache(self, counts: Callable[[], tuple[int, int]]) -> None:
        """Report the guard's verdict cache: `counts()` gives (hits, misses) so far, read at scrape."""
        self.verdict_cache.counts = counts

    def count_unclassified(self, count: Callable[[], int]) -> None:
        """Report names-only discovery: `count()` gives the unclassified sensitive columns, read at scrape."""
        self.unclassified.count = count

    def statement_counted(self, role: str, kind: str, decision: str) -> None:
        self.statements[(role, kind, decision)] += 1

    def decided(self, role: str, verdict: Verdict, seconds: float) -> None:
        """One statement decided: its count, refusal rule, alert-mode findings and pgveil's time."""
        self.pgveil_seconds.observe(seconds)
        self.statements[(role, verdict.info.kind, verdict.decision)] += 1
        if isinstance(verdict, Refuse):
            self.refusals[(verdict.rule,)] += 1
        for finding in verdict.info.findings:
            self.findings[(finding,)] += 1

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def role_of(policy: object) -> str:
    """The role a connection policy acts as right now, or 'unknown'."""
    return role_name_of(policy) or "unknown"


class MeteredConnection:
    """Counts each statement (role, kind, decision, refusal rule) and times pgveil and upstream."""

    def __init__(self, inner: ConnectionPolicy, metrics: Metrics) -> None:
        self.inner = inner
        self.metrics = metrics
        self._last_refused = False
        self._fast = fast_path_of(inner)

    @property
    def role_name(self) -> str | None:
        return role_name_of(self.inner)

    @property
    def policy_version(self) -> str | None:
        return policy_version_of(self.inner)

    def _count(self, verdict: Verdict, started: float) -> Verdict:
        self.metrics.decided(role_of(self.inner), verdict, time.perf_counter() - started)
        self._last_refused = isinstance(verdict, Refuse)
        return verdict

    async def on_startup(self, params: Mapping[str, str], client: ClientInfo) -> Refuse | None:
        refusal = await self.inner.on_startup(params, client)
        self.metrics.connections.labels("refused" if refusal else "accepted").inc()
        if refusal is not None:
            self.metrics.refusals[(refusal.rule,)] += 1
        return refusal

    async def on_query(self, sql: str) -> Verdict:
        started = time.perf_counter()
        return self._count(await self.inner.on_query(sql), started)

    async def on_parse(self, statement_name: str, sql: str, param_types: tuple[int, ...]) -> Verdict:
        started = time.perf_counter()
        return self._count(await self.inner.on_parse(statement_name, sql, param_types), started)

    async def on_bind(self, statement_name: str) -> Verdict | None:
        started = time.perf_counter()
        verdict = await self.inner.on_bind(statement_name)
        return None if verdict is None else self._count(verdict, started)

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
        """The inner policy's DataGuard, its events counted (pgveil_row_budget_breaches_total,
        pgveil_honeytoken_hits_total)."""
        ask = getattr(self.inner, "data_guard", None)
        guard = ask() if ask is not None else None
        if guard is not None:
            guard.listeners.append(self.metrics.dlp_event)
        return guard

    async def on_function_call(self, function_oid: int) -> Verdict:
        started = time.perf_counter()
        return self._count(await self.inner.on_function_call(function_oid), started)

    async def on_complete(self, outcome: Outcome) -> None:
        if outcome.verdicts == 0:  # only Close messages
            await self.inner.on_complete(outcome)
            return
        if not self._last_refused and outcome.answered:  # a session that ended first timed nothing
            self.metrics.upstream_seconds.observe(outcome.upstream_seconds)
            if outcome.sqlstate:
                self.metrics.statement_errors[(outcome.sqlstate[:2],)] += 1
        await self.inner.on_complete(outcome)

    # FastPath: the inner policy's synchronous answers, counted alike.

    def fast_query(self, sql: str) -> Verdict | Coroutine[Any, Any, Verdict] | None:
        fast = self._fast
        if fast is None:
            return None
        started = time.perf_counter()
        return self._fast_count(fast.fast_query(sql), started)

    def fast_parse(self, statement_name: str, sql: str,
                   param_types: tuple[int, ...]) -> Verdict | Coroutine[Any, Any, Verdict] | None:
        fast = self._fast
        if fast is None:
            return None
        started = time.perf_counter()
        return self._fast_count(fast.fast_parse(statement_name, sql, param_types), started)

    def fast_bind(self, statement_name: str) -> Verdict | Coroutine[Any, Any, Verdict] | None:
        fast = self._fast
        if fast is None:
            return None
        started = time.perf_counter()
        return self._fast_count(fast.fast_bind(statement_name), started)

    def _fast_count(self, answer: Verdict | Coroutine[Any, Any, Verdict] | None,
                    started: float) -> Verdict | Coroutine[Any, Any, Verdict] | None:
        if answer is None:
            return None
        if isinstance(answer, (Allow, Rewrite, Refuse)):
            return self._count(answer, started)
        return self._count_later(answer, started)

    async def _count_later(self, answer: Coroutine[Any, Any, Verdict], started: float) -> Verdict:
        return self._count(await answer, started)

    def fast_complete(self, outcome: Outcome) -> bool:
        fast = self._fast
        if fast is None or not fast.fast_complete(outcome):
            return False
        if outcome.verdicts and not self._last_refused and outcome.answered:
            self.metrics.upstream_seconds.observe(outcome.upstream_seconds)
            if outcome.sqlstate:
                self.metrics.statement_errors[(outcome.sqlstate[:2],)] += 1
        return True


Readiness = Callable[[], Awaitable[bool]]


class MetricsServer:
    """`/metrics`, `/healthz` and `/readyz` over plain HTTP/1.1 on the event loop (no thread)."""

    def __init__(self, metrics: Metrics, ready: Readiness) -> None:
        self.metrics = metrics
        self.ready = ready
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._serve, host, port)
        bound = self._server.sockets[0].getsockname()
        return str(bound[0]), int(bound[1])

    async def start_unix(self, path: str) -> str:
        """Serve on a unix socket instead (a worker of --workers N, scraped by its parent)."""
        self._server = await asyncio.start_unix_server(self._serve, path)
        return path

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _respond(self, path: str) -> tuple[int, str, bytes]:
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, self.metrics.exposition()
        if path == "/healthz":
            return 200, "text/plain", b"ok\n"
        if path == "/readyz":
            try:
                ready = await asyncio.wait_for(self.ready(), timeout=5.0)
            except Exception:
                ready = False
            return (200, "text/plain", b"ready\n") if ready else (503, "text/plain", b"not ready\n")
        return 404, "text/plain", b"not found: try /metrics, /healthz or /readyz\n"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await asyncio.wait_for(reader.readline(), timeout=10.0)
            while (await asyncio.wait_for(reader.readline(), timeout=10.0)) not in (b"\r\n", b"\n", b""):
                pass  # headers are not needed
            parts = request_line.decode("latin-1").split()
            if len(parts) < 2 or parts[0] not in ("GET", "HEAD"):
                status, content_type, body = 405, "text/plain", b"only GET\n"
            else:
                status, content_type, body = await self._respond(parts[1].split("?", 1)[0])
            reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}
            head = (f"HTTP/1.1 {status} {reason[status]}\r\nContent-Type: {content_type}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
            writer.write(head.encode() + (body if parts and parts[0] == "GET" else b""))
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
