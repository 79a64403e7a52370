"""--max-connections: past the limit a client is refused (53300) before any PostgreSQL connection."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from proxy.config import SettingsError, load_settings
from proxy.metrics import Metrics
from tests.proxy_harness import RawClient, RunningProxy, running_proxy, wait_until

HELD = "connlimit_held"
REFUSED = "connlimit_refused"


def backends(upstream: Any, application_name: str) -> int:
    with psycopg.connect(upstream.dsn(), autocommit=True) as conn:
        row = conn.execute("select count(*) from pg_stat_activity where application_name = %s",
                           (application_name,)).fetchone()
    assert row is not None
    return int(row[0])


@pytest.fixture(scope="module")
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture(scope="module")
def proxy(upstream: Any, metrics: Metrics) -> Iterator[RunningProxy]:
    with running_proxy(upstream, observer=metrics, max_connections=2) as running:
        yield running


def limit_refusals(metrics: Metrics) -> float:
    return metrics.connections.labels("limit")._value.get()


def test_third_client_is_refused_with_53300_and_no_upstream_connection(
    proxy: RunningProxy, upstream: Any, metrics: Metrics, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="pgveil.session")
    before = limit_refusals(metrics)
    first = psycopg.connect(proxy.dsn(), application_name=HELD)
    second = psycopg.connect(proxy.dsn(), application_name=HELD)
    try:
        assert first.execute("select 1").fetchone() == (1,)
        assert second.execute("select 2").fetchone() == (2,)
        with pytest.raises(psycopg.OperationalError) as refused:  # sslmode=prefer: SSLRequest first
            psycopg.connect(proxy.dsn(), application_name=REFUSED)
        assert "pgveil: too-many-connections:" in str(refused.value)
        assert "(raise --max-connections or use a pooler in front)" in str(refused.value)
        with RawClient.connect(proxy.host, proxy.port, application_name=REFUSED) as raw:
            fatal = raw.startup_messages[-1]
            assert fatal.get("S") == "FATAL" and fatal.get("C") == "53300"
            assert backends(upstream, REFUSED) == 0
        assert "refused: too many connections (2 open, --max-connections 2)" in caplog.text
        assert limit_refusals(metrics) == before + 2
        assert first.execute("select 3").fetchone() == (3,)  # the open ones are unaffected
    finally:
        first.close()
        second.close()


def test_closing_a_connection_lets_a_new_one_in(proxy: RunningProxy) -> None:
    wait_until(lambda: proxy.server.context.admitted == 0)
    first = psycopg.connect(proxy.dsn(), application_name=HELD)
    second = psycopg.connect(proxy.dsn(), application_name=HELD)
    try:
        with pytest.raises(psycopg.OperationalError, match="too-many-connections"):
            psycopg.connect(proxy.dsn())
        first.close()
        wait_until(lambda: proxy.server.context.admitted == 1)
        with psycopg.connect(proxy.dsn()) as third:
            assert third.execute("select 4").fetchone() == (4,)
    finally:
        first.close()
        second.close()


def test_cancel_request_at_the_limit_is_forwarded(proxy: RunningProxy, upstream: Any) -> None:
    wait_until(lambda: proxy.server.context.admitted == 0)
    sleeper = psycopg.connect(proxy.dsn(), application_name="connlimit_sleeper", autocommit=True)
    other = psycopg.connect(proxy.dsn(), application_name=HELD)
    outcome: list[BaseException | None] = []

    def sleep() -> None:
        try:
            sleeper.execute("select pg_sleep(60)")
            outcome.append(None)
        except BaseException as exc:  # handed to the test thread
            outcome.append(exc)

    thread = threading.Thread(target=sleep)
    try:
        thread.start()

        def sleeping() -> bool:
            with psycopg.connect(upstream.dsn(), autocommit=True) as conn:
                row = conn.execute("select count(*) from pg_stat_activity where application_name = "
                                   "'connlimit_sleeper' and query like '%pg_sleep%' and state = 'active'"
                                   ).fetchone()
            return row is not None and row[0] == 1

        wait_until(sleeping)
        sleeper.cancel_safe()
        thread.join(30)
        assert len(outcome) == 1 and isinstance(outcome[0], psycopg.errors.QueryCanceled)
    finally:
        thread.join(30)
        sleeper.close()
        other.close()


def test_max_connections_from_flag_environment_and_file(tmp_path: Any) -> None:
    assert load_settings({}, {}).max_connections == 500
    config = tmp_path / "pgveil.yaml"
    config.write_text("max_connections: 40\n")
    assert load_settings({"config": str(config)}, {}).max_connections == 40
    assert load_settings({"config": str(config)}, {"PGVEIL_MAX_CONNECTIONS": "30"}).max_connections == 30
    assert load_settings({"max_connections": 20}, {"PGVEIL_MAX_CONNECTIONS": "30"}).max_connections == 20
    with pytest.raises(SettingsError, match="max_connections must be at least 1"):
        load_settings({"upstream": "postgresql://127.0.0.1/x", "max_connections": 0}, {}).validate()
