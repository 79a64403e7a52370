"""Review of the compiled hot path: sessions without a policy behave as before the mypyc change.

Framing attacks, Terminate inside a pipeline, COPY FROM STDIN in the extended protocol, client
disconnects and upstream FATALs, drain of `pgveil serve`, TLS on the client leg, byte counts,
and a stale compiled copy of only one of the two compiled modules."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest

from proxy import native
from proxy.connection_policy import PassThrough
from proxy.metrics import Metrics
from proxy.wire.backend import CommandComplete, CopyInResponse, DataRow, ErrorResponse, ReadyForQuery
from proxy.wire.frontend import (
    Bind,
    CopyData,
    CopyDone,
    CopyFail,
    Execute,
    Flush,
    Parse,
    Query,
    Sync,
    Terminate,
)
from tests.proxy_harness import RawClient, running_proxy, spawn_serve, wait_until

TABLE = "review_hp_rows"


@pytest.fixture(scope="module")
def proxy(upstream: Any) -> Any:
    upstream.execute(f"drop table if exists {TABLE}; create table {TABLE} (n int, t text)")
    with running_proxy(upstream) as running:
        yield running
    upstream.execute(f"drop table if exists {TABLE}")


def _rows(upstream: Any, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(upstream.dsn(), autocommit=True) as conn:
        return conn.execute(sql).fetchall()


def _backends(upstream: Any, app: str) -> list[tuple[Any, ...]]:
    return _rows(upstream, f"select pid, state from pg_stat_activity where application_name = '{app}'")


def _idle_relays(proxy: Any) -> list[bool]:
    async def look() -> list[bool]:
        return [s.relay._idle() for s in proxy.server.sessions
                if s.relay is not None and not s.relay.finished]
    result: list[bool] = proxy.run(look())
    return result


def _errors(messages: list[Any]) -> list[ErrorResponse]:
    return [m for m in messages if isinstance(m, ErrorResponse)]


# ---- framing -------------------------------------------------------------------------------------


def test_a_pipeline_sent_one_byte_at_a_time_is_relayed_intact(proxy: Any) -> None:
    pipeline = b"".join(m.encode() for m in (
        Query("select 'a' || 'b'"),
        Parse("", "select $1::int * 2"), Bind("", "", (), (b"21",)), Execute(""), Sync(),
        Query("select repeat('z', 70000)"),
    ))
    with RawClient.connect(proxy.host, proxy.port) as client:
        client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(len(pipeline)):
            client.sock.sendall(pipeline[i : i + 1])
        first, second, third = client.until_ready(), client.until_ready(), client.until_ready()
        client.send(Terminate())
    assert [m.values for m in first if isinstance(m, DataRow)] == [(b"ab",)]
    assert [m.values for m in second if isinstance(m, DataRow)] == [(b"42",)]
    assert [m.values for m in third if isinstance(m, DataRow)] == [(b"z" * 70000,)]


@pytest.mark.parametrize("bad", [
    b"Q" + struct.pack("!I", 0x7FFFFFFF),  # absurd length
    b"Q" + struct.pack("!I", 3),  # shorter than the length field
    b"\x00" + struct.pack("!I", 4),  # no such message type
    b"p" + struct.pack("!I", 8) + b"abcd",  # a password message after authentication
], ids=["absurd-length", "length-3", "unknown-type", "password-after-auth"])
def test_bad_framing_ends_the_session_with_a_protocol_fatal_and_frees_the_backend(
        proxy: Any, upstream: Any, bad: bytes) -> None:
    app = f"review_hp_{uuid.uuid4().hex[:8]}"
    with RawClient.connect(proxy.host, proxy.port, application_name=app) as client:
        assert len(_backends(upstream, app)) == 1
        client.send(Query("select 1"))
        assert [m.values for m in client.until_ready() if isinstance(m, DataRow)] == [(b"1",)]
        client.send(bad)
        messages = client.read_to_end()
    fatal = _errors(messages)[-1]
    assert (fatal.get("S"), fatal.get("C")) == ("FATAL", "08P01")
    assert fatal.get("M", ).startswith("pgveil: protocol: ")  # type: ignore[union-attr]
    wait_until(lambda: not _backends(upstream, app), "the backend to go away")


def test_a_truncated_message_then_disconnect_frees_the_backend(proxy: Any, upstream: Any) -> None:
    app = f"review_hp_{uuid.uuid4().hex[:8]}"
    client = RawClient.connect(proxy.host, proxy.port, application_name=app)
    client.send(Query("select 1").encode()[:7])
    client.close()
    wait_until(lambda: not _backends(upstream, app), "the backend to go away")


# ---- COPY FROM STDIN, extended protocol ------------------------------------------------------------


def _extended_copy_in(client: RawClient) -> None:
    client.send(Parse("", f"copy {TABLE} from stdin"), Bind("", ""), Execute(""), Sync())
    messages: list[Any] = []
    while not messages or not isinstance(messages[-1], (CopyInResponse, ErrorResponse)):
        messages.append(client.receive())
    assert isinstance(messages[-1], CopyInResponse), messages


def test_extended_copy_in_with_a_sync_before_copy_in_response_leaves_the_session_idle(
        proxy: Any, upstream: Any) -> None:
    marker = uuid.uuid4().hex
    with RawClient.connect(proxy.host, proxy.port) as client:
        _extended_copy_in(client)
        client.send(CopyData(f"7\t{marker}\n".encode()), CopyDone(), Sync())
        done = client.until_ready()
        assert any(isinstance(m, CommandComplete) for m in done)
        assert not _errors(done)
        client.send(Query("select 1"))
        assert [m.values for m in client.until_ready() if isinstance(m, DataRow)] == [(b"1",)]
        assert _idle_relays(proxy) == [True]
        # the extended CopyFail path: an error, one ReadyForQuery after the next Sync
        _extended_copy_in(client)
        client.send(CopyData(b"8\tnever\n"), CopyFail("review says no"), Sync())
        failed = client.until_ready()
        assert [e.get("C") for e in _errors(failed)] == ["57014"]
        client.send(Query("select 2"))
        assert [m.values for m in client.until_ready() if isinstance(m, DataRow)] == [(b"2",)]
        assert _idle_relays(proxy) == [True]
        client.send(Terminate())
    assert _rows(upstream, f"select n from {TABLE} where t = '{marker}'") == [(7,)]
    assert _rows(upstream, f"select count(*) from {TABLE} where t = 'never'") == [(0,)]


# ---- the client goes away, PostgreSQL ends the session -------------------------------------------


def test_a_client_disconnecting_mid_statement_gets_its_backend_cancelled(proxy: Any, upstream: Any) -> None:
    app = f"review_hp_{uuid.uuid4().hex[:8]}"
    client = RawClient.connect(proxy.host, proxy.port, application_name=app)
    client.send(Query("select pg_sleep(600)"))
    wait_until(lambda: [s for _, s in _backends(upstream, app)] == ["active"], "the statement to run")
    client.close()
    wait_until(lambda: not _backends(upstream, app), "the backend to be cancelled and released")


@pytest.mark.parametrize("with_policy", [False, True], ids=["plain", "policy"])
def test_a_client_disconnecting_after_execute_and_flush_without_sync_gets_its_backend_cancelled(
        proxy: Any, upstream: Any, with_policy: bool) -> None:
    """Bind/Execute/Flush with no Sync runs the statement: the relay must count it as running."""
    app = f"review_hp_{uuid.uuid4().hex[:8]}"
    serving = running_proxy(upstream, policy_factory=lambda c: _Watched()) if with_policy else _same(proxy)
    with serving as used:
        client = RawClient.connect(used.host, used.port, application_name=app)
        client.send(Parse("s1", "select pg_sleep(600)"), Sync())
        client.until_ready()
        client.send(Bind("", "s1"), Execute(""), Flush())
        wait_until(lambda: [s for _, s in _backends(upstream, app)] == ["active"], "the statement to run")
        client.close()
        wait_until(lambda: not _backends(upstream, app), "the backend to be cancelled and released")


@contextmanager
def _same(proxy: Any) -> Iterator[Any]:
    yield proxy


def test_postgresql_fatal_reaches_the_client_as_is(proxy: Any, upstream: Any) -> None:
    app = f"review_hp_{uuid.uuid4().hex[:8]}"
    with RawClient.connect(proxy.host, proxy.port, application_name=app) as client:
        ((pid, _),) = _backends(upstream, app)
        upstream.execute(f"select pg_terminate_backend({pid})")
        messages = client.read_to_end()
    errors = _errors(messages)
    assert [(e.get("S"), e.get("C")) for e in errors] == [("FATAL", "57P01")]
    assert not errors[0].get("M", ).startswith("pgveil")  # type: ignore[union-attr]
    wait_until(lambda: proxy.counters.closed == proxy.counters.opened, "the session to close")
    assert "PostgreSQL ended the session" in proxy.counters.close_reasons


def test_closed_sessions_relays_are_freed(proxy: Any) -> None:
    """The relay, its legs and the compiled bound methods set as data_received form cycles: the
    garbage collector must still free them (mypyc traverses the native attributes). A compiled
    Relay takes no weak reference, so its legs (Endpoint, plain Python) stand for it: the relay
    holds both, and each holds the relay's bound methods."""
    import gc
    import weakref

    async def relays() -> list[Any]:
        return [ref for s in proxy.server.sessions if s.relay is not None
                for ref in (weakref.ref(s.client), weakref.ref(s.upstream))]

    refs: list[Any] = []
    for _ in range(3):
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            conn.execute("select 1")
            refs += proxy.run(relays())
    wait_until(lambda: proxy.open_sessions() == 0, "the sessions to close")

    async def collected() -> list[bool]:
        gc.collect()
        return [ref() is None for ref in refs]

    assert refs and all(proxy.run(collected()))


# ---- drain of the real command --------------------------------------------------------------------


def test_sigterm_drains_idle_busy_and_copying_sessions_of_pgveil_serve(upstream: Any) -> None:
    lock = 0x5EE1
    serve = ("--upstream", upstream.dsn(), "--listen", "127.0.0.1:0", "--log-level", "info")
    with psycopg.connect(upstream.dsn(), autocommit=True) as holder, spawn_serve(*serve) as served:
        line = served.wait_for_line("hot path: ")
        holder.execute("select pg_advisory_lock(%s)", (lock,))
        idle = RawClient.connect(served.host, served.port)
        busy = RawClient.connect(served.host, served.port, application_name="review_hp_busy")
        copying = RawClient.connect(served.host, served.port)
        busy.send(Query(f"select pg_advisory_lock({lock}), 'got it'"))
        wait_until(lambda: [s for _, s in _backends(upstream, "review_hp_busy")] == ["active"],
                   "the lock wait")
        copying.send(Query(f"copy {TABLE} from stdin"))
        assert isinstance(copying.receive(), CopyInResponse)
        served.process.send_signal(signal.SIGTERM)
        served.wait_for_line("draining")
        idle_end = idle.read_to_end()
        assert [(e.get("S"), e.get("C")) for e in _errors(idle_end)] == [("FATAL", "57P01")]
        copying.send(CopyData(b"9\tdrained copy\n"), CopyDone())
        copy_end = copying.read_to_end()
        assert [type(m) for m in copy_end[:2]] == [CommandComplete, ReadyForQuery]
        assert [e.get("C") for e in _errors(copy_end)] == ["57P01"]
        holder.execute("select pg_advisory_unlock(%s)", (lock,))
        busy_end = busy.read_to_end()
        assert [m.values[1] for m in busy_end if isinstance(m, DataRow)] == [b"got it"]
        assert [e.get("C") for e in _errors(busy_end)] == ["57P01"]
        assert served.wait() == 0
        for client in (idle, busy, copying):
            client.close()
    assert native.describe() in line  # what runs here runs there (compiled when built)
    assert _rows(upstream, f"select n from {TABLE} where t = 'drained copy'") == [(9,)]


# ---- TLS on the client leg --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_proxy(upstream: Any, tmp_path_factory: Any) -> Any:
    directory = tmp_path_factory.mktemp("review-hp-tls")
    cert, key = directory / "server.crt", directory / "server.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
         "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    key.chmod(0o600)
    with running_proxy(upstream, tls_cert=str(cert), tls_key=str(key)) as running:
        yield running


def test_tls_client_without_a_policy_gets_large_results_and_copy_intact(
        tls_proxy: Any, upstream: Any) -> None:
    sql = "select g, repeat(md5(g::text), 32) from generate_series(1, 5000) g"  # about 5 MB
    with psycopg.connect(tls_proxy.dsn() + "?sslmode=require", autocommit=True) as conn:
        assert conn.info.pgconn.ssl_in_use
        rows = conn.execute(sql).fetchall()
        payload = "".join(f"{n}\t{'y' * (n % 3000)}\n" for n in range(2000)).encode()  # about 3 MB
        with conn.cursor().copy(f"copy {TABLE} from stdin") as copy:
            for start in range(0, len(payload), 40000):
                copy.write(payload[start : start + 40000])
        copied = conn.execute(f"select count(*), sum(length(t)) from {TABLE} where t like 'y%'").fetchone()
        conn.execute(f"delete from {TABLE} where t like 'y%'")
    assert rows == _rows(upstream, sql)
    assert copied == (1999, sum(n % 3000 for n in range(2000)))
    assert _idle_relays(tls_proxy) == []  # the session closed


# ---- byte counts --------------------------------------------------------------------------------------


class _Watched(PassThrough):
    """A policy that allows everything: the relay takes its policy path, not the plain one."""


@pytest.mark.parametrize("with_policy", [False, True], ids=["plain", "policy"])
def test_bytes_relayed_count_exactly_what_went_each_way_and_nothing_after_terminate(
        upstream: Any, with_policy: bool) -> None:
    metrics = Metrics()
    factory = (lambda client: _Watched()) if with_policy else None
    first = Query("select repeat('q', 100000)").encode()
    last = Query("select 2").encode() + Terminate().encode()
    after = Query(f"insert into {TABLE} values (-1, 'after terminate')").encode()
    with running_proxy(upstream, observer=metrics, policy_factory=factory) as running:
        with RawClient.connect(running.host, running.port) as client:
            assert len(client.buffer) == 0  # nothing relayed yet
            client.send(first)
            received = bytearray()
            while not received.endswith(b"Z\x00\x00\x00\x05I"):
                chunk = client.sock.recv(65536)
                assert chunk
                received += chunk
            client.send(last + after)  # one buffer: what follows the Terminate is not for PostgreSQL
            while chunk := client.sock.recv(65536):
                received += chunk
        wait_until(lambda: running.open_sessions() == 0, "the session to close")
    sample = metrics.registry.get_sample_value
    assert sample("pgveil_bytes_relayed_total", {"direction": "client_to_server"}) == len(first) + len(last)
    assert sample("pgveil_bytes_relayed_total", {"direction": "server_to_client"}) == len(received)
    assert len(received) > 100000


# ---- only one compiled copy stale ---------------------------------------------------------------------


def _serve_copy(tmp: Path, stale: str, upstream: Any) -> tuple[str, list[tuple[Any, ...]]]:
    """`pgveil serve` from a copy of the package whose `stale` source was edited after the build."""
    package = Path(native.__file__).parent
    shutil.copytree(package, tmp / "proxy", ignore=shutil.ignore_patterns("__pycache__"))
    edited = tmp / "proxy" / stale
    edited.write_text(edited.read_text() + "\n# edited after the build\n")
    env = {"PYTHONPATH": str(tmp), "PYTHONSAFEPATH": "1"}  # the copy, not the checkout in the cwd
    with spawn_serve("--upstream", upstream.dsn(), "--listen", "127.0.0.1:0", "--log-level", "info",
                     env=env) as served:
        line = served.wait_for_line("hot path: ")
        with psycopg.connect(served.dsn(), autocommit=True) as conn:
            result = conn.execute("select %s::int, repeat('s', 70000)", (5,)).fetchall()
            with conn.cursor().copy("copy (select * from generate_series(1, 3)) to stdout") as copy:
                result.append((b"".join(bytes(c) for c in copy),))
        served.terminate()
        assert served.wait() == 0
    return line, result


def _expected(module: str, stale: bool) -> str:
    native.describe()  # resolves the compiled modules this process has not used yet (proxy.hitpath)
    how = native.IMPLEMENTATIONS[module]
    if stale and how == "mypyc":
        return "python (the compiled copy is stale"
    return how


@pytest.mark.parametrize("stale", ["session/relay.py", "wire/scanner.py"])
def test_one_stale_compiled_copy_runs_that_module_plain_and_the_other_as_built(
        upstream: Any, tmp_path: Path, stale: str) -> None:
    line, result = _serve_copy(tmp_path, stale, upstream)
    for module in native.COMPILED:
        short = module.rsplit(".", 1)[1]
        assert f"{short} {_expected(module, stale.endswith(f'/{short}.py'))}" in line, line
    assert result == [(5, "s" * 70000), (b"1\n2\n3\n",)]


def test_a_compiled_copy_is_used_exactly_when_stamped_with_the_source_beside_it() -> None:
    import importlib

    from proxy.session import relay, session
    from proxy.wire import scanner

    if os.environ.get("PGVEIL_PURE_PYTHON"):
        assert set(native.IMPLEMENTATIONS.values()) == {"python (PGVEIL_PURE_PYTHON is set)"}
        assert session.Relay is relay.Relay
        return
    for source in (relay, scanner):
        try:
            built = importlib.import_module(native.COMPILED[source.__name__])
        except ImportError:
            assert native.IMPLEMENTATIONS[source.__name__] == "python (not compiled)"
            continue
        assert not str(built.__file__).endswith(".py")
        current = hashlib.sha256(Path(str(source.__file__)).read_bytes()).hexdigest() == built.SOURCE_SHA256
        assert native.IMPLEMENTATIONS[source.__name__] == ("mypyc" if current else
                                                            "python (the compiled copy is stale: reinstall "
                                                            "pgveil to rebuild it)")
        if source is relay:
            assert (session.Relay is built.Relay) == current
