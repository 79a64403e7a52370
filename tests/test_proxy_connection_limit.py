"""--max-connections and --max-logins-per-address: past either limit a client is refused (53300)
before any PostgreSQL connection is opened."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from proxy.config import SettingsError, load_settings
from proxy.metrics import Metrics
from proxy.session.session import RateLimitedWarning
from proxy.wire import StartupMessage
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


# ---- --max-logins-per-address ------------------------------------------------------------------------

SLOW = "connlimit_slow_login"
SLOW_PASSWORD = "slow-login-pw-5"


def _stalled_login(proxy: RunningProxy) -> socket.socket:
    """A client that sends its startup packet and never answers PostgreSQL's password challenge."""
    sock = socket.create_connection((proxy.host, proxy.port), timeout=10)
    sock.sendall(StartupMessage(3 << 16, (("user", SLOW), ("database", "postgres"),
                                          ("application_name", SLOW))).encode())
    assert sock.recv(1) == b"R"  # AuthenticationSASL: pgveil has opened its PostgreSQL connection
    return sock


def test_logins_from_one_address_are_capped_until_they_authenticate(
    upstream: Any, metrics: Metrics, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="pgveil.session")
    upstream.execute(f"DROP ROLE IF EXISTS {SLOW}")
    upstream.execute(f"CREATE ROLE {SLOW} LOGIN PASSWORD '{SLOW_PASSWORD}'")
    with running_proxy(upstream, observer=metrics, max_logins_per_address=2) as proxy:
        logged_in = [psycopg.connect(proxy.dsn(SLOW, SLOW_PASSWORD)) for _ in range(3)]  # done: not counted
        stalled = [_stalled_login(proxy), _stalled_login(proxy)]
        try:
            assert proxy.server.context.logging_in == {"127.0.0.1": 2}
            before = limit_refusals(metrics)
            with pytest.raises(psycopg.OperationalError) as refused:
                psycopg.connect(proxy.dsn(SLOW, SLOW_PASSWORD), application_name=REFUSED, sslmode="disable")
            assert "pgveil: too-many-logins: 2 connections from 127.0.0.1 are still logging in" in str(
                refused.value)
            assert backends(upstream, REFUSED) == 0  # refused before any PostgreSQL connection
            assert limit_refusals(metrics) == before + 1
            assert "refused: too many logins from one address (2 from 127.0.0.1 still logging in, " \
                   "--max-logins-per-address 2)" in caplog.text
            assert all(conn.execute("select 1").fetchone() == (1,) for conn in logged_in)
            stalled.pop().close()
            wait_until(lambda: proxy.server.context.logging_in == {"127.0.0.1": 1}, "the login to be let go")
            with psycopg.connect(proxy.dsn(SLOW, SLOW_PASSWORD)) as late:
                assert late.execute("select 2").fetchone() == (2,)
        finally:
            for sock in stalled:
                sock.close()
            for conn in logged_in:
                conn.close()
        wait_until(lambda: proxy.server.context.logging_in == {}, "every login to be let go")
        assert backends(upstream, SLOW) == 0


def test_max_logins_per_address_from_flag_environment_and_file(tmp_path: Any) -> None:
    assert load_settings({}, {}).max_logins_per_address == 32
    config = tmp_path / "pgveil.yaml"
    config.write_text("max_logins_per_address: 8\n")
    assert load_settings({"config": str(config)}, {}).max_logins_per_address == 8
    from_environment = load_settings({"config": str(config)}, {"PGVEIL_MAX_LOGINS_PER_ADDRESS": "0"})
    assert from_environment.max_logins_per_address == 0
    load_settings({"upstream": "postgresql://127.0.0.1/x", "max_logins_per_address": 0}, {}).validate()
    with pytest.raises(SettingsError, match="max_logins_per_address must be 0"):
        load_settings({"upstream": "postgresql://127.0.0.1/x", "max_logins_per_address": -1}, {}).validate()


def test_refusals_over_a_limit_are_logged_at_most_once_a_second(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="pgveil.session")
    limited = RateLimitedWarning(interval=3600)
    for n in range(4):
        limited.warn("conn %d: refused: too many connections", n)
    assert [r.getMessage() for r in caplog.records] == ["conn 0: refused: too many connections"]
    limited._next_at = 0.0  # an interval later
    limited.warn("conn %d: refused: too many connections", 9)
    assert caplog.records[-1].getMessage() == (
        "conn 9: refused: too many connections (3 more refused since the last line)")
