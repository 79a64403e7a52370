"""Metrics: statements are counted as they are decided, and the HTTP endpoint answers per the contract."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request

from proxy.connection_policy import ClientInfo, Outcome, PassThrough
from proxy.guard.verdict import Allow, Refuse, StatementInfo, Verdict
from proxy.metrics import MeteredConnection, Metrics, MetricsServer

CLIENT = ClientInfo(connection_id=1, address="127.0.0.1:5", user="bob", database="db",
                    application_name="", tls=False)


class GuardStandIn(PassThrough):
    role_name = "analyst"

    async def on_query(self, sql: str) -> Verdict:
        if "ssn" in sql:
            return Refuse("join-on-sensitive-key", "do not join on ssn", info=StatementInfo(kind="select"))
        return Allow(sql, info=StatementInfo(kind="select"))


def sample(metrics: Metrics, name: str, labels: dict[str, str] | None = None) -> float:
    return metrics.registry.get_sample_value(name, labels or {}) or 0.0


async def test_statements_refusals_and_latencies_are_counted() -> None:
    metrics = Metrics()
    metered = MeteredConnection(GuardStandIn(), metrics)
    await metered.on_startup({}, CLIENT)
    await metered.on_query("SELECT 1")
    await metered.on_complete(Outcome(rows=1, sqlstate=None, upstream_seconds=0.003))
    await metered.on_query("SELECT a.ssn FROM a JOIN b USING (ssn)")
    await metered.on_complete(Outcome(rows=0, sqlstate="42501", upstream_seconds=0.0))
    await metered.on_query("SELECT 1/0")
    await metered.on_complete(Outcome(rows=0, sqlstate="22012", upstream_seconds=0.001))
    allowed = {"role": "analyst", "kind": "select", "decision": "allow"}
    assert sample(metrics, "pgveil_statements_total", allowed) == 2
    assert sample(metrics, "pgveil_statements_total", {**allowed, "decision": "refuse"}) == 1
    assert sample(metrics, "pgveil_refusals_total", {"rule": "join-on-sensitive-key"}) == 1
    assert sample(metrics, "pgveil_statement_pgveil_seconds_count") == 3
    assert sample(metrics, "pgveil_statement_upstream_seconds_count") == 2  # refusals never went upstream
    assert sample(metrics, "pgveil_statement_errors_total", {"sqlstate_class": "22"}) == 1
    assert sample(metrics, "pgveil_connections_total", {"result": "accepted"}) == 1


def fetch(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


async def test_http_endpoint_serves_metrics_health_and_readiness() -> None:
    metrics = Metrics()
    ready = asyncio.Event()

    async def readiness() -> bool:
        return ready.is_set()

    server = MetricsServer(metrics, readiness)
    host, port = await server.start("127.0.0.1", 0)
    base = f"http://{host}:{port}"
    try:
        metrics.policy_loaded_now("v1abc", "policies/reviews.yaml")
        metrics.policy_reloaded(ok=False)
        status, body = await asyncio.to_thread(fetch, base + "/metrics")
        assert status == 200
        assert 'pgveil_policy_info{source="policies/reviews.yaml",version="v1abc"} 1.0' in body
        assert 'pgveil_policy_reloads_total{result="invalid"} 1.0' in body
        assert await asyncio.to_thread(fetch, base + "/healthz") == (200, "ok\n")
        assert await asyncio.to_thread(fetch, base + "/readyz") == (503, "not ready\n")
        ready.set()
        assert await asyncio.to_thread(fetch, base + "/readyz") == (200, "ready\n")
        assert (await asyncio.to_thread(fetch, base + "/nothing"))[0] == 404
    finally:
        await server.close()


def test_every_metric_is_documented_in_operations_guide() -> None:
    from pathlib import Path

    guide = (Path(__file__).parent.parent / "docs" / "operations.md").read_text()
    names = {metric.name for metric in Metrics().registry.collect()}
    missing = sorted(name for name in names if name not in guide)
    assert missing == []


def test_metrics_observe_the_relay_connections_bytes_and_upstream_errors() -> None:
    metrics = Metrics()
    metrics.connection_opened(1)
    metrics.connection_opened(2)
    metrics.connection_closed(1, "client closed")
    metrics.traffic.to_upstream += 100  # what the relay does for each chunk
    metrics.traffic.to_client += 2500
    metrics.upstream_error("connect")
    assert sample(metrics, "pgveil_connections_open") == 1
    assert sample(metrics, "pgveil_bytes_relayed_total", {"direction": "client_to_server"}) == 100
    assert sample(metrics, "pgveil_bytes_relayed_total", {"direction": "server_to_client"}) == 2500
    assert sample(metrics, "pgveil_upstream_errors_total", {"kind": "connect"}) == 1
