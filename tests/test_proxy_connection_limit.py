"""--max-connections and --max-logins-per-address: past --max-connections a client is refused
(53300) before any PostgreSQL connection is opened; logins from one address past
--max-logins-per-address wait in line (holding no PostgreSQL connection) and only past
--max-queued-logins-per-address are refused."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import asyncpg
import psycopg
import pytest

from proxy.config import SettingsError, load_settings
from proxy.embedded import EmbeddedPostgres
from proxy.metrics import Metrics
from proxy.session.session import RateLimitedWarning
from proxy.wire import StartupMessage
from tests.conftest import Upstream
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


def held_for(upstream: Any, user: str) -> int:
    """PostgreSQL connections of `user`, counting those still authenticating (no user name yet)."""
    with psycopg.connect(upstream.dsn(), autocommit=True) as conn:
        row = conn.execute("select count(*) from pg_stat_activity where backend_type = 'client backend' "
                           "and pid <> pg_backend_pid() and (usename = %s or usename is null)",
                           (user,)).fetchone()
    assert row is not None
    return int(row[0])


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
    with running_proxy(upstream, observer=metrics, max_logins_per_address=2,
                       max_queued_logins_per_address=0) as proxy:
        logged_in = [psycopg.connect(proxy.dsn(SLOW, SLOW_PASSWORD)) for _ in range(3)]  # done: not counted
        stalled = [_stalled_login(proxy), _stalled_login(proxy)]
        try:
            assert proxy.server.context.logins.logging_in == {"127.0.0.1": 2}
            before = limit_refusals(metrics)
            with pytest.raises(psycopg.OperationalError) as refused:
                psycopg.connect(proxy.dsn(SLOW, SLOW_PASSWORD), application_name=REFUSED, sslmode="disable")
            assert "pgveil: too-many-logins: 2 connections from 127.0.0.1 are still logging in" in str(
                refused.value)
            assert backends(upstream, REFUSED) == 0  # refused before any PostgreSQL connection
            assert limit_refusals(metrics) == before + 1
            assert "refused: too many logins from one address (2 from 127.0.0.1 still logging in, " \
                   "--max-logins-per-address 2 and --max-queued-logins-per-address 0)" in caplog.text
            assert all(conn.execute("select 1").fetchone() == (1,) for conn in logged_in)
            stalled.pop().close()
            wait_until(lambda: proxy.server.context.logins.logging_in == {"127.0.0.1": 1},
                       "the login to be let go")
            with psycopg.connect(proxy.dsn(SLOW, SLOW_PASSWORD)) as late:
                assert late.execute("select 2").fetchone() == (2,)
        finally:
            for sock in stalled:
                sock.close()
            for conn in logged_in:
                conn.close()
        wait_until(lambda: proxy.server.context.logins.logging_in == {}, "every login to be let go")
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
    assert load_settings({}, {}).max_queued_logins_per_address == 1000
    queued = load_settings({"max_queued_logins_per_address": None},
                           {"PGVEIL_MAX_QUEUED_LOGINS_PER_ADDRESS": "5"})
    assert queued.max_queued_logins_per_address == 5
    with pytest.raises(SettingsError, match="max_queued_logins_per_address must be 0"):
        load_settings({"upstream": "postgresql://127.0.0.1/x", "max_queued_logins_per_address": -1},
                      {}).validate()


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


# ---- bursts of logins wait in line; floods of stalled ones do not starve other addresses ----------

BURST = "connlimit_burst"
BURST_PASSWORD = "burst-login-pw-7"
OTHER_ADDRESS = "127.0.0.2"


@contextmanager
def forwarded_from(source: str, host: str, port: int) -> Iterator[int]:
    """A local port whose connections reach host:port from the client address `source`: a plain
    byte pipe, so a real driver (which cannot pick its source address) logs in from `source`."""
    listener = socket.create_server(("127.0.0.1", 0))
    pipes: list[socket.socket] = []

    def pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = listener.accept()
                server = socket.create_connection((host, port), source_address=(source, 0))
                pipes.extend((client, server))
                threading.Thread(target=pump, args=(client, server), daemon=True).start()
                threading.Thread(target=pump, args=(server, client), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()
        for sock in pipes:
            sock.close()


def _silent(proxy: RunningProxy) -> socket.socket:
    """A client that connects and never sends its startup packet."""
    return socket.create_connection((proxy.host, proxy.port), timeout=10)


def _startup_only(proxy: RunningProxy) -> socket.socket:
    """A client that sends its startup packet and then never reads or answers anything."""
    sock = socket.create_connection((proxy.host, proxy.port), timeout=10)
    sock.sendall(StartupMessage(3 << 16, (("user", SLOW), ("database", "postgres"),
                                          ("application_name", SLOW))).encode())
    return sock


@pytest.fixture(scope="module")
def roomy_upstream() -> Iterator[Upstream]:
    """A PostgreSQL of its own with room for 300 clients held open at once plus pgveil's own
    connections (the session-wide server allows 300 in all)."""
    server = EmbeddedPostgres.start(settings={"max_connections": "400"})
    try:
        roomy = Upstream(server.host, server.port, server.superuser, None, server)
        roomy.execute(f"CREATE ROLE {BURST} LOGIN PASSWORD '{BURST_PASSWORD}'")
        yield roomy
    finally:
        server.stop()


def test_a_pool_of_300_opening_at_once_from_one_address_all_log_in(roomy_upstream: Upstream) -> None:
    async def pool(dsn: str) -> list[int]:
        connections = await asyncio.gather(*(asyncpg.connect(dsn, timeout=60) for _ in range(300)))
        try:
            return [await conn.fetchval("select $1::int", n) for n, conn in enumerate(connections)]
        finally:
            await asyncio.gather(*(conn.close() for conn in connections))

    with running_proxy(roomy_upstream, startup_timeout=60) as proxy:  # the default 32 per address
        assert proxy.server.settings.max_logins_per_address == 32
        assert asyncio.run(pool(proxy.dsn(BURST, BURST_PASSWORD))) == list(range(300))
        wait_until(lambda: proxy.server.context.logins.logging_in == {}, "every login to be let go")
        assert proxy.server.context.logins.waiting == {}


def test_a_psycopg_burst_beyond_the_limit_waits_instead_of_being_refused(upstream: Any) -> None:
    upstream.execute(f"DROP ROLE IF EXISTS {BURST}")
    upstream.execute(f"CREATE ROLE {BURST} LOGIN PASSWORD '{BURST_PASSWORD}'")
    with running_proxy(upstream, max_logins_per_address=2) as proxy:
        start = threading.Barrier(40)

        def connect_and_ask(n: int) -> int:
            start.wait(30)
            with psycopg.connect(proxy.dsn(BURST, BURST_PASSWORD), sslmode="disable") as conn:
                row = conn.execute("select %s::int", (n,)).fetchone()
            assert row is not None
            return int(row[0])

        with ThreadPoolExecutor(40) as pool:
            assert sorted(pool.map(connect_and_ask, range(40))) == list(range(40))


def test_a_login_in_line_goes_on_when_one_before_it_finishes(upstream: Any) -> None:
    upstream.execute(f"DROP ROLE IF EXISTS {SLOW}")
    upstream.execute(f"CREATE ROLE {SLOW} LOGIN PASSWORD '{SLOW_PASSWORD}'")
    with running_proxy(upstream, max_logins_per_address=1) as proxy:
        logins = proxy.server.context.logins
        stalled = _stalled_login(proxy)
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(psycopg.connect, proxy.dsn(SLOW, SLOW_PASSWORD), sslmode="disable")
            wait_until(lambda: len(logins.waiting.get("127.0.0.1", ())) == 1, "the login to wait in line")
            assert held_for(upstream, SLOW) == 1  # the one in line holds no PostgreSQL connection
            assert not waiting.done()
            stalled.close()
            with waiting.result(30) as conn:
                assert conn.execute("select 1").fetchone() == (1,)
        wait_until(lambda: logins.logging_in == {} and logins.waiting == {}, "every login to be let go")


def test_past_the_line_logins_are_refused_and_a_client_leaving_the_line_frees_its_place(
    upstream: Any, metrics: Metrics,
) -> None:
    upstream.execute(f"DROP ROLE IF EXISTS {SLOW}")
    upstream.execute(f"CREATE ROLE {SLOW} LOGIN PASSWORD '{SLOW_PASSWORD}'")
    with running_proxy(upstream, observer=metrics, max_logins_per_address=1,
                       max_queued_logins_per_address=2) as proxy:
        logins = proxy.server.context.logins
        holding = _stalled_login(proxy)
        in_line = [_startup_only(proxy), _startup_only(proxy)]
        try:
            wait_until(lambda: logins.pending("127.0.0.1") == 3, "two logins to wait in line")
            before = limit_refusals(metrics)
            with pytest.raises(psycopg.OperationalError) as refused:
                psycopg.connect(proxy.dsn(SLOW, SLOW_PASSWORD), application_name=REFUSED, sslmode="disable")
            assert "pgveil: too-many-logins: 3 connections from 127.0.0.1 are still logging in; try again " \
                   "later (raise --max-queued-logins-per-address)" in str(refused.value)
            assert limit_refusals(metrics) == before + 1
            in_line.pop().close()
            wait_until(lambda: logins.pending("127.0.0.1") == 2, "the client that left to leave the line")
            late = _startup_only(proxy)
            in_line.append(late)
            wait_until(lambda: logins.pending("127.0.0.1") == 3, "the new login to wait in line")
            assert held_for(upstream, SLOW) == 1
        finally:
            holding.close()
            for sock in in_line:
                sock.close()
        wait_until(lambda: logins.logging_in == {} and logins.waiting == {}, "every login to be let go")


def test_the_startup_timeout_ends_a_wait_in_line_with_53300(upstream: Any) -> None:
    upstream.execute(f"DROP ROLE IF EXISTS {SLOW}")
    upstream.execute(f"CREATE ROLE {SLOW} LOGIN PASSWORD '{SLOW_PASSWORD}'")
    with running_proxy(upstream, max_logins_per_address=1, startup_timeout=3) as proxy:
        late = _silent(proxy)  # connected first, so its startup deadline comes first
        wait_until(lambda: len(proxy.server.sessions) == 1, "the first connection to be accepted")
        holding = _stalled_login(proxy)  # takes the one place, until its own, later, deadline
        try:
            late.sendall(StartupMessage(3 << 16, (("user", SLOW), ("database", "postgres"))).encode())
            raw = RawClient(late)
            fatal = raw.until_ready()[-1]
            assert fatal.get("S") == "FATAL" and fatal.get("C") == "53300"
            assert fatal.get("M").startswith("pgveil: too-many-logins: 1 connections from 127.0.0.1 are "
                                             "still logging in; waited 3s for one to finish")
        finally:
            late.close()
            holding.close()
        wait_until(lambda: proxy.server.context.logins.logging_in == {}, "every login to be let go")


@pytest.mark.parametrize("flood", [_startup_only, _silent], ids=["startup-then-silent", "silent"])
def test_1000_stalled_logins_from_one_address_do_not_stop_another_address(
    upstream: Any, flood: Callable[[RunningProxy], socket.socket],
) -> None:
    upstream.execute(f"DROP ROLE IF EXISTS {SLOW}")
    upstream.execute(f"CREATE ROLE {SLOW} LOGIN PASSWORD '{SLOW_PASSWORD}'")
    upstream.execute(f"DROP ROLE IF EXISTS {BURST}")
    upstream.execute(f"CREATE ROLE {BURST} LOGIN PASSWORD '{BURST_PASSWORD}'")
    with running_proxy(upstream, startup_timeout=120) as proxy:  # the flood outlives the test
        logins = proxy.server.context.logins
        stalled = [flood(proxy) for _ in range(1000)]
        try:
            if flood is _startup_only:
                wait_until(lambda: logins.pending("127.0.0.1") == 1000, "the flood to be in line", timeout=60)
                assert logins.logging_in == {"127.0.0.1": 32}
            else:
                wait_until(lambda: len(proxy.server.sessions) == 1000, "the flood to be accepted", timeout=60)
            with forwarded_from(OTHER_ADDRESS, proxy.host, proxy.port) as port:
                dsn = f"postgresql://{BURST}:{BURST_PASSWORD}@127.0.0.1:{port}/postgres"
                with psycopg.connect(dsn, sslmode="disable", connect_timeout=30) as conn:
                    row = conn.execute("select inet_client_addr() is not null, 1").fetchone()
                    assert row == (True, 1)
                    assert proxy.server.context.logins.pending(OTHER_ADDRESS) == 0  # logged in
            if flood is _startup_only:
                assert logins.pending("127.0.0.1") == 1000  # the flood was still held
                assert held_for(upstream, SLOW) == 32  # and held only its own 32 PostgreSQL connections
            else:
                assert len(proxy.server.sessions) >= 1000
                with psycopg.connect(proxy.dsn(BURST, BURST_PASSWORD), sslmode="disable") as conn:
                    assert conn.execute("select 2").fetchone() == (2,)  # silent ones take no login place
        finally:
            for sock in stalled:
                sock.close()
        wait_until(lambda: logins.logging_in == {} and logins.waiting == {}, "every login to be let go")
