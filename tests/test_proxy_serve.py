"""`pgveil serve` as users run it: settings, the listening line, failures in one line, drain, workers."""

from __future__ import annotations

import signal
import socket
import threading
import time

import psycopg
import pytest

from proxy.config import Settings, SettingsError, load_settings, parse_dsn
from proxy.wire.frontend import Query
from tests.proxy_harness import RawClient, running_proxy, spawn_serve, start_serve

# ---- settings ------------------------------------------------------------------------------------


def test_flags_override_environment_which_overrides_the_config_file(tmp_path):
    config = tmp_path / "pgveil.yaml"
    config.write_text("upstream: postgresql://file:1/db\nlisten: 127.0.0.1:7000\nworkers: 3\n"
                      "startup_timeout: 4\naudit_fsync: batch\n")
    settings = load_settings(
        {"config": str(config), "listen": "127.0.0.1:9000", "upstream": None},
        environ={"PGVEIL_UPSTREAM": "postgresql://env:2/db", "PGVEIL_LISTEN": "127.0.0.1:8000"},
    )
    assert settings.upstream == "postgresql://env:2/db"
    assert settings.listen == "127.0.0.1:9000"
    assert settings.workers == 3 and settings.startup_timeout == 4.0
    assert settings.extra == {"audit_fsync": "batch"}  # keys for other parts of pgveil


def test_defaults_follow_the_command_line_contract():
    settings = load_settings({"upstream": "postgresql://db:5432/app"}, environ={})
    assert settings.listen == "127.0.0.1:6432" and settings.metrics is None and settings.workers == 1


@pytest.mark.parametrize(("dsn", "host", "port", "dbname", "sslmode"), [
    ("postgresql://u:p@db.internal:6543/app?sslmode=require", "db.internal", 6543, "app", "require"),
    ("postgres://db", "db", 5432, None, "prefer"),
    ("host=10.0.0.5 port=5544 dbname='my db' sslmode=disable", "10.0.0.5", 5544, "my db", "disable"),
    ("host=/var/run/postgresql", "/var/run/postgresql", 5432, None, "prefer"),
])
def test_upstream_dsn_forms(dsn, host, port, dbname, sslmode):
    target = parse_dsn(dsn)
    assert (target.host, target.port, target.dbname, target.sslmode) == (host, port, dbname, sslmode)


@pytest.mark.parametrize(("dsn", "reason"), [
    ("nonsense", "is malformed"),
    ("postgresql://db:notaport/x", "malformed"),
    ("postgresql://db:99999/x", "malformed"),
    ("host=db sslmode=sometimes", "invalid sslmode"),
    ("host=db colour=blue", "unknown parameter 'colour'"),
    ("host=a,b", "several hosts"),
    ("", "empty"),
])
def test_malformed_dsns_are_refused_with_a_reason(dsn, reason):
    with pytest.raises(SettingsError, match=reason):
        parse_dsn(dsn)


def test_settings_validation_names_what_to_fix(tmp_path):
    with pytest.raises(SettingsError, match="needs both --tls-cert and --tls-key"):
        Settings(upstream="postgresql://db", tls_cert="x").validate()
    with pytest.raises(SettingsError, match="no upstream"):
        Settings().validate()
    with pytest.raises(SettingsError, match="listen address 'nowhere' is malformed"):
        Settings(upstream="postgresql://db", listen="nowhere").validate()


# ---- the process ---------------------------------------------------------------------------------


def test_malformed_upstream_dsn_exits_non_zero_with_one_line(tmp_path):
    served = start_serve("--upstream", "nonsense", "--listen", "127.0.0.1:0")
    with served:
        code = served.wait()
    assert code != 0
    lines = served.stderr.strip().splitlines()
    assert len(lines) == 1 and "upstream DSN 'nonsense' is malformed" in lines[0]


def test_port_taken_exits_non_zero_with_one_line(upstream):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        served = start_serve("--upstream", upstream.dsn(), "--listen", f"127.0.0.1:{port}")
        with served:
            code = served.wait()
    assert code != 0
    errors = [line for line in served.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and f"cannot listen on 127.0.0.1:{port}: Address already in use" in errors[0]


def test_sigterm_drains_running_statements_then_exits_zero(upstream):
    with spawn_serve("--upstream", upstream.dsn(), "--listen", "127.0.0.1:0") as served, \
            psycopg.connect(upstream.dsn(), autocommit=True) as holder:
        holder.execute("select pg_advisory_lock(4242)")  # the busy statement waits for it
        results: dict[str, object] = {}
        busy = psycopg.connect(served.dsn(), autocommit=True, application_name="relay_drain")
        idle = psycopg.connect(served.dsn(), autocommit=True)

        def run_statement() -> None:
            results["busy"] = busy.execute("select 'finished' from pg_advisory_xact_lock(4242)").fetchone()[0]

        worker = threading.Thread(target=run_statement)
        worker.start()
        wait_until_waiting(upstream, "relay_drain", "advisory")
        served.process.send_signal(signal.SIGTERM)
        served.wait_for_line("SIGTERM: draining")
        with pytest.raises(psycopg.OperationalError):
            idle.execute("select 1")  # idle sessions are closed at once
        assert worker.is_alive() and served.process.poll() is None  # the busy one is still running
        holder.execute("select pg_advisory_unlock(4242)")
        worker.join(30)
        assert results["busy"] == "finished"  # the running statement was allowed to finish
        with pytest.raises(psycopg.OperationalError):
            busy.execute("select 1")  # ...and then its session was closed
        assert served.wait() == 0
        busy.close()
        idle.close()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(served.dsn(), connect_timeout=2)


def test_drain_lets_the_current_statement_finish_then_says_why_it_closes(upstream):
    with running_proxy(upstream) as proxy, \
            psycopg.connect(upstream.dsn(), autocommit=True) as holder, \
            RawClient.connect(proxy.host, proxy.port, application_name="relay_drain_raw") as client:
        holder.execute("select pg_advisory_lock(4243)")
        client.send(Query("select 'done' from pg_advisory_xact_lock(4243)"))
        wait_until_waiting(upstream, "relay_drain_raw", "advisory")
        drained = threading.Thread(target=proxy.drain)
        drained.start()
        wait_for(lambda: proxy.server.context.draining)
        holder.execute("select pg_advisory_unlock(4243)")
        messages = client.read_to_end()
        drained.join()
    assert [type(m).__name__ for m in messages] == [
        "RowDescription", "DataRow", "CommandComplete", "ReadyForQuery", "ErrorResponse"]
    assert messages[1].values[0] == b"done"
    assert messages[-1].get("C") == "57P01" and messages[-1].get("S") == "FATAL"
    assert messages[-1].get("M") == "pgveil: shutdown: pgveil is shutting down; reconnect"


def wait_for(condition, deadline_s: float = 15) -> None:
    deadline = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition never became true")
        time.sleep(0.005)


def wait_until_waiting(upstream, application_name: str, wait_event: str) -> None:
    with psycopg.connect(upstream.dsn(), autocommit=True) as watcher:
        wait_for(lambda: watcher.execute(
            "select 1 from pg_stat_activity where application_name = %s and wait_event = %s",
            [application_name, wait_event]).fetchone() is not None)


def wait_until_active(upstream, application_name: str) -> None:
    wait_until_waiting(upstream, application_name, "PgSleep")


def test_workers_share_the_port_and_cancel_works_across_them(upstream):
    with spawn_serve("--upstream", upstream.dsn(), "--listen", "127.0.0.1:0", "--workers", "2") as served:
        assert "(2 workers)" in served.stderr
        for attempt in range(4):  # cancel requests land on either worker; each must map the key
            with psycopg.connect(served.dsn(), application_name=f"relay_worker_{attempt}") as conn:
                canceller = threading.Thread(target=lambda a=attempt, c=conn: (
                    wait_until_active(upstream, f"relay_worker_{a}"), c.cancel_safe()))
                canceller.start()
                with pytest.raises(psycopg.errors.QueryCanceled):
                    conn.execute("select pg_sleep(60)")
                canceller.join()
        served.process.send_signal(signal.SIGTERM)
        assert served.wait() == 0


def test_sighup_reaches_the_reload_hook_and_serving_continues(upstream):
    with spawn_serve("--upstream", upstream.dsn(), "--listen", "127.0.0.1:0") as served:
        served.process.send_signal(signal.SIGHUP)
        served.wait_for_line("SIGHUP: nothing to reload")
        with psycopg.connect(served.dsn()) as conn:
            assert conn.execute("select 'after reload'").fetchone() == ("after reload",)
        served.terminate()
        assert served.wait() == 0


def test_environment_configures_serve(upstream):
    with spawn_serve(env={"PGVEIL_UPSTREAM": upstream.dsn(), "PGVEIL_LISTEN": "127.0.0.1:0"}) as served:
        with psycopg.connect(served.dsn()) as conn:
            assert conn.execute("select 'configured by env'").fetchone() == ("configured by env",)
        served.terminate()
        assert served.wait() == 0


def test_invalid_policy_exits_non_zero_with_one_line(upstream, tmp_path):
    policy = tmp_path / "bad.yaml"
    policy.write_text("version: 7\nroles: {}\n")
    served = start_serve("--upstream", upstream.dsn(), "--policy", str(policy), "--listen", "127.0.0.1:0")
    with served:
        code = served.wait()
    assert code != 0
    errors = [line for line in served.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "unsupported policy format version 7" in errors[0]
