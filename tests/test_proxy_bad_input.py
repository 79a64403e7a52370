"""Bad input ends only the affected connection, with a reason; pgveil and other sessions carry on."""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import threading
import time

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.connection_policy import PassThrough
from proxy.embedded import free_port
from proxy.wire.backend import ErrorResponse
from proxy.wire.frontend import Parse, PasswordMessage, Query, Sync
from proxy.wire.startup import StartupMessage
from tests.proxy_harness import RawClient, _LoopThread, running_proxy


class AllowEverything(PassThrough):
    """A policy that allows all, but is not PassThrough: the session decodes what a guard would see."""


@pytest.fixture(scope="module")
def proxy(upstream):
    with running_proxy(upstream, policy_factory=AllowEverything, startup_timeout=0.5,
                       max_message_size=64 * 1024) as running:
        yield running


@pytest.fixture(scope="module")
def bystander(proxy):
    """A session that is open through every bad thing the other tests do, and must survive it."""
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        yield conn
    # checked once more at module teardown


@pytest.fixture(autouse=True)
def others_carry_on(proxy, bystander):
    yield
    assert bystander.execute("select 'still here'").fetchone() == ("still here",)
    with psycopg.connect(proxy.dsn()) as fresh:
        assert fresh.execute("select 1").fetchone() == (1,)


def fatal_of(messages: list[object]) -> ErrorResponse:
    errors = [m for m in messages if isinstance(m, ErrorResponse)]
    assert errors, f"no ErrorResponse in {messages}"
    assert errors[-1].get("S") == "FATAL"
    return errors[-1]


def raw_socket(proxy) -> socket.socket:
    return socket.create_connection((proxy.host, proxy.port), timeout=10)


def read_to_end(sock: socket.socket) -> list[object]:
    client = RawClient(sock)
    return client.read_to_end()


def backend_gone(upstream_dsn: str, application_name: str, deadline_s: float = 15) -> bool:
    deadline = time.monotonic() + deadline_s
    with psycopg.connect(upstream_dsn, autocommit=True) as watcher:
        while time.monotonic() < deadline:
            count = watcher.execute(
                "select count(*) from pg_stat_activity where application_name = %s", [application_name]
            ).fetchone()[0]
            if count == 0:
                return True
            time.sleep(0.02)
    return False


def wait_until_active(upstream_dsn: str, application_name: str, deadline_s: float = 15) -> int:
    deadline = time.monotonic() + deadline_s
    with psycopg.connect(upstream_dsn, autocommit=True) as watcher:
        while time.monotonic() < deadline:
            row = watcher.execute(
                "select pid from pg_stat_activity where application_name = %s"
                " and state = 'active' and wait_event = 'PgSleep'", [application_name]).fetchone()
            if row:
                return int(row[0])
            time.sleep(0.01)
    raise AssertionError(f"{application_name} never became active")


@pytest.mark.parametrize("packet", [
    struct.pack("!I", 5) + b"\x00" * 4,              # shorter than any startup packet
    struct.pack("!I", 1_000_000) + b"\x00" * 8,      # absurd length
    b"Q\x00\x00\x00\x0dselect 1\x00",                # a query before any startup packet
    struct.pack("!II", 12, 2 << 16) + b"\x00\x00\x00\x00",  # protocol 2.0
])
def test_malformed_startup_packets_are_refused(proxy, packet):
    with raw_socket(proxy) as sock:
        sock.sendall(packet)
        fatal = fatal_of(read_to_end(sock))
    assert fatal.get("C") in ("08P01", "0A000") and fatal.get("M").startswith("pgveil: protocol:")


def test_startup_without_a_user_is_refused_like_postgres(proxy):
    with raw_socket(proxy) as sock:
        sock.sendall(StartupMessage(3 << 16, (("database", "postgres"),)).encode())
        fatal = fatal_of(read_to_end(sock))
    assert fatal.get("C") == "28000" and "no PostgreSQL user name specified" in fatal.get("M")


def test_a_client_that_stalls_during_startup_is_timed_out(proxy):
    with raw_socket(proxy) as sock:
        sock.sendall(struct.pack("!I", 40))  # promises a startup packet, never sends it
        fatal = fatal_of(read_to_end(sock))
    assert "timed out" in fatal.get("M")


def test_a_client_that_stalls_during_authentication_is_timed_out(upstream, proxy):
    upstream.execute("drop role if exists relay_bad_scram; create role relay_bad_scram login password 'x'")
    with raw_socket(proxy) as sock:
        sock.sendall(StartupMessage(3 << 16, (("user", "relay_bad_scram"),)).encode())
        messages = read_to_end(sock)  # the SASL request, then nothing from us, then FATAL
    assert "timed out" in fatal_of(messages).get("M")


@pytest.mark.parametrize(("message", "reason"), [
    (b"Q" + struct.pack("!I", 0xFFFFFFF0), "invalid message length"),
    (b"Q" + struct.pack("!I", 2), "invalid message length"),
    (b"Q" + struct.pack("!I", 200_000) + b"x" * 100, "invalid message length"),  # over max_message_size
    (b"Q" + struct.pack("!I", 12) + b"select 1", "unterminated string"),
    (PasswordMessage("late").encode(), "unexpected message type 'p'"),
    (b"z" + struct.pack("!I", 4), "unexpected message type 'z'"),
])
def test_malformed_or_out_of_place_messages_end_the_session(upstream, proxy, message, reason, caplog):
    caplog.set_level(logging.WARNING, logger="pgveil.session")
    client = RawClient.connect(proxy.host, proxy.port, application_name="relay_bad_message")
    with client:
        client.send(message)
        fatal = fatal_of(client.read_to_end())
    assert fatal.get("C") == "08P01" and reason in fatal.get("M")
    assert backend_gone(upstream.dsn(), "relay_bad_message")
    assert any(f"client broke the protocol: {reason}" in r.getMessage() for r in caplog.records)


def test_a_malformed_message_pgveil_does_not_inspect_is_judged_by_postgres(proxy):
    with RawClient.connect(proxy.host, proxy.port) as client:
        client.send(Parse("", "select 1"), b"B" + struct.pack("!I", 8) + b"\x00\x00\x00\x07", Sync())
        answer = client.until_ready()
        client.send(Query("select 'in step'"))
        after = client.until_ready()
    assert isinstance(answer[1], ErrorResponse) and answer[1].get("C") == "08P01"
    assert after[1].values == (b"in step",)


def test_without_a_policy_a_malformed_query_is_judged_by_postgres(upstream):
    with running_proxy(upstream) as proxy, RawClient.connect(proxy.host, proxy.port) as client:
        client.send(b"Q" + struct.pack("!I", 12) + b"select 1")
        answer = client.until_ready()
        client.send(Query("select 'in step'"))
        after = client.until_ready()
    assert isinstance(answer[0], ErrorResponse) and answer[0].get("C") == "08P01"
    assert after[1].values == (b"in step",)


def test_a_truncated_message_then_disconnect_releases_the_backend(upstream, proxy):
    client = RawClient.connect(proxy.host, proxy.port, application_name="relay_truncated")
    client.send(b"Q" + struct.pack("!I", 100) + b"select")
    client.close()
    assert backend_gone(upstream.dsn(), "relay_truncated")


def test_a_client_that_disconnects_mid_query_releases_the_backend(upstream, proxy):
    client = RawClient.connect(proxy.host, proxy.port, application_name="relay_walk_away")
    client.send(Query("select pg_sleep(60)"))
    wait_until_active(upstream.dsn(), "relay_walk_away")
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # reset, not FIN
    client.close()
    assert backend_gone(upstream.dsn(), "relay_walk_away")


def test_upstream_down_gives_the_client_a_fatal_08006(upstream):
    closed_port = free_port()

    class Nowhere:
        superuser, superpassword = "postgres", None

        def dsn(self, user=None, password=None, dbname="postgres"):
            return f"postgresql://postgres@127.0.0.1:{closed_port}/{dbname}?connect_timeout=5"

    with running_proxy(Nowhere()) as proxy:
        with pytest.raises(psycopg.OperationalError) as caught:
            psycopg.connect(proxy.dsn())
        assert "pgveil: upstream: cannot connect to PostgreSQL at 127.0.0.1:" in str(caught.value)
        assert proxy.counters.upstream_errors == {"connect": 1}


def test_postgres_terminating_the_backend_reaches_the_client(upstream, proxy):
    with psycopg.connect(proxy.dsn(), autocommit=True) as victim:
        pid = victim.info.backend_pid
        upstream.execute(f"select pg_terminate_backend({pid})")
        with pytest.raises(psycopg.OperationalError) as caught:
            victim.execute("select 1")
    assert "terminating connection due to administrator command" in str(caught.value)


class Cable:
    """A TCP forwarder between pgveil and PostgreSQL that a test can cut, like a network failure."""

    def __init__(self, target_port: int) -> None:
        self.loop = _LoopThread()
        self.target_port = target_port
        self.transports: list[asyncio.StreamWriter] = []
        self.server = self.loop.run(asyncio.start_server(self._pump, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.transports += [writer, up_writer]

        async def copy(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            while data := await source.read(65536):
                sink.write(data)
            sink.close()

        await asyncio.gather(copy(reader, up_writer), copy(up_reader, writer), return_exceptions=True)

    def cut(self) -> None:
        async def cut() -> None:
            for writer in self.transports:
                writer.transport.abort()

        self.loop.run(cut())

    def close(self) -> None:
        self.server.close()
        self.loop.stop()


def test_upstream_dropping_mid_query_gives_the_client_a_fatal_08006(upstream):
    cable = Cable(upstream.port)

    class ThroughCable:
        superuser, superpassword = upstream.superuser, upstream.superpassword

        def dsn(self, user=None, password=None, dbname="postgres"):
            return f"postgresql://{upstream.superuser}@127.0.0.1:{cable.port}/{dbname}?sslmode=disable"

    try:
        with running_proxy(ThroughCable()) as proxy, \
                psycopg.connect(proxy.dsn(), autocommit=True, application_name="relay_cut") as conn, \
                psycopg.connect(proxy.dsn(), autocommit=True) as other:
            cutter = threading.Thread(
                target=lambda: (wait_until_active(upstream.dsn(), "relay_cut"), cable.cut()))
            cutter.start()
            with pytest.raises(psycopg.OperationalError) as caught:
                conn.execute("select pg_sleep(60)")
            assert caught.value.sqlstate == "08006"
            assert "pgveil: upstream: the connection to PostgreSQL was lost" in str(caught.value)
            assert proxy.counters.upstream_errors.get("lost", 0) >= 1
            with psycopg.connect(proxy.dsn()) as fresh:
                assert fresh.execute("select 'new sessions work'").fetchone() == ("new sessions work",)
            with pytest.raises(psycopg.OperationalError):
                other.execute("select 1")  # its cable was cut too
    finally:
        cable.close()


frames = st.lists(
    st.one_of(
        st.binary(max_size=40),  # junk
        st.builds(lambda tag, body: bytes([tag]) + struct.pack("!I", len(body) + 4) + body,
                  st.sampled_from(b"QPBEDCSHFdcfpXzA\x00"), st.binary(max_size=30)),  # framed, any body
        st.builds(lambda tag, length: bytes([tag]) + struct.pack("!I", length),
                  st.sampled_from(b"QPBd"), st.integers(0, 2**32 - 1)),  # any length
    ),
    max_size=6,
).map(b"".join)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(garbage=frames)
def test_random_bytes_after_startup_end_only_that_session(upstream, proxy, garbage):
    with RawClient.connect(proxy.host, proxy.port, application_name="relay_fuzz") as client:
        client.send(garbage)
        client.sock.shutdown(socket.SHUT_WR)
        client.read_to_end()
    assert backend_gone(upstream.dsn(), "relay_fuzz")


startup_garbage = st.one_of(
    st.binary(max_size=64),
    st.builds(lambda code, body: struct.pack("!II", len(body) + 8, code) + body,
              st.sampled_from([80877103, 80877104, 80877102, 196608, 196610, 196617, 131072, 0]),
              st.binary(max_size=40)),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(garbage=startup_garbage)
def test_random_bytes_instead_of_a_startup_packet_end_only_that_connection(proxy, garbage):
    with raw_socket(proxy) as sock:
        sock.sendall(garbage)
        sock.shutdown(socket.SHUT_WR)
        read_to_end(sock)
