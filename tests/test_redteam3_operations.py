"""Red team round 3, operations against enforcement: a login that connected while its role was not
masked (an elevation grant, or a policy since reloaded) must be held to the masked role's startup
rules once the grant ends or the reload demotes it."""

from __future__ import annotations

import asyncio
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from proxy.elevation import append_grant, create_grant
from proxy.enforcement import Enforcement
from proxy.policy.loader import parse_policy
from tests import guard_setup
from tests.guard_setup import DATABASE, PASSWORD, POLICY, GuardWorld, leaked_canaries
from tests.guard_setup import GuardDatabase as _GuardDatabase
from tests.proxy_harness import RunningProxy, running_proxy, spawn_serve, wait_until

world = guard_setup.world  # the shared guard database with canary values

ELSEWHERE = "rt3_elsewhere"  # a database of the same cluster that pgveil does not guard


@pytest.fixture(scope="module")
def elsewhere(world: GuardWorld) -> Iterator[str]:
    """A copy of guarded data in another database: gv.orders there holds a raw SSN."""
    world.upstream.execute(f"DROP DATABASE IF EXISTS {ELSEWHERE} WITH (FORCE)")
    world.upstream.execute(f"CREATE DATABASE {ELSEWHERE}")
    world.upstream.execute(
        "CREATE SCHEMA gv; CREATE TABLE gv.orders (id integer, person_id integer, amount text, placed date);"
        "INSERT INTO gv.orders VALUES (10, 1, '914-27-6380', '2024-03-05');"
        "GRANT USAGE ON SCHEMA gv TO gv_public; GRANT SELECT ON gv.orders TO gv_public;",
        dbname=ELSEWHERE)
    try:
        yield ELSEWHERE
    finally:
        world.upstream.execute(f"DROP DATABASE IF EXISTS {ELSEWHERE} WITH (FORCE)")


@pytest.fixture
def demoted(world: GuardWorld) -> Iterator[tuple[RunningProxy, str]]:
    """gv_public starts as admin (nothing masked); writing POLICY back and reloading masks it."""
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "policy.yaml")
        with open(path, "w") as handle:
            handle.write(POLICY.replace("members: [gv_admin]", "members: [gv_admin, gv_public]")
                         .replace("members: [gv_public]", "members: [gv_nobody]"))
        with running_proxy(_GuardDatabase(world), path) as running:
            yield running, path


def _demote(proxy: RunningProxy, path: str) -> None:
    with open(path, "w") as handle:
        handle.write(POLICY)
    proxy.run(proxy.server.reload())


def _received(conn: psycopg.Connection[Any], sql: str) -> str:
    result = conn.pgconn.exec_(sql.encode())
    seen = [(result.error_message or b"").decode(errors="replace")]
    seen += [(result.get_value(row, column) or b"").decode()
             for row in range(result.ntuples) for column in range(result.nfields)]
    return "\n".join(seen)


def test_masked_login_cannot_connect_to_a_database_pgveil_does_not_guard(
    demoted: tuple[RunningProxy, str], elsewhere: str,
) -> None:
    proxy, path = demoted
    _demote(proxy, path)
    with pytest.raises(psycopg.OperationalError, match="wrong-database"):
        psycopg.connect(proxy.dsn("gv_public", PASSWORD, elsewhere), autocommit=True)


def test_login_demoted_while_connected_to_another_database_reads_nothing_there(
    demoted: tuple[RunningProxy, str], elsewhere: str,
) -> None:
    proxy, path = demoted
    with psycopg.connect(proxy.dsn("gv_public", PASSWORD, elsewhere), autocommit=True) as conn:
        assert "914-27-6380" in _received(conn, "select amount from gv.orders")  # unmasked: allowed
        _demote(proxy, path)
        answer = _received(conn, "select amount from gv.orders")
        assert leaked_canaries(answer) == []
        assert "wrong-database" in answer


def test_login_demoted_after_connecting_with_startup_options_is_refused_until_it_reconnects(
    demoted: tuple[RunningProxy, str],
) -> None:
    proxy, path = demoted
    dsn = proxy.dsn("gv_public", PASSWORD, DATABASE)
    with psycopg.connect(dsn, autocommit=True, options="-c search_path=gv_other") as conn:
        _demote(proxy, path)
        answer = _received(conn, "select full_name from people")
        assert "session-setting" in answer
    with psycopg.connect(dsn, autocommit=True) as conn:  # a fresh connection as the masked role works
        assert "Quokkafeld" not in _received(conn, "select full_name from gv.people where id = 1")


ELEVATION_POLICY = POLICY + """
elevations:
  - role: admin
    users: [gv_public]
    max_duration: 30m
    approver_required: true
    approvers: [rt3_approver]
"""
GRANT_KEY = "rt3-grant-key-0123456789abcdef"


def test_login_elevated_when_it_connected_to_another_database_reads_nothing_there_once_revoked(
    world: GuardWorld, elsewhere: str, tmp_path: Path,
) -> None:
    """Through `pgveil serve`: an unmasked elevation lets the login connect to an unguarded
    database; revoking the grant (its line removed) must not leave it reading raw values there."""
    policy, grants = tmp_path / "policy.yaml", tmp_path / "grants.jsonl"
    policy.write_text(ELEVATION_POLICY)
    elevations = parse_policy(ELEVATION_POLICY, require_hash_key=False)
    grant = create_grant(elevations, "gv_public", "admin", 600, "RT3-1", "rt3_approver")
    append_grant(grants, grant, GRANT_KEY.encode())
    env = {"PGVEIL_GRANTS_FILE": str(grants), "PGVEIL_GRANT_KEY": GRANT_KEY,
           "PGVEIL_HASH_KEY": guard_setup.HASH_KEY}
    with spawn_serve("--upstream", _GuardDatabase(world).dsn(), "--policy", str(policy),
                     "--listen", "127.0.0.1:0", env=env) as served, \
            psycopg.connect(served.dsn("gv_public", PASSWORD, elsewhere), autocommit=True) as conn:
        assert "914-27-6380" in _received(conn, "select amount from gv.orders")  # elevated
        grants.write_text("")  # revoked
        answer = _received(conn, "select amount from gv.orders")
    assert leaked_canaries(answer) == []
    assert "wrong-database" in answer


def test_statement_judged_while_a_reload_demotes_its_login_is_judged_under_the_new_policy(
    world: GuardWorld,
) -> None:
    """A long statement waits for an analysis thread; meanwhile SIGHUP's reload makes its login a
    masked one. Judged under the role it had when it arrived, it would be forwarded unmasked."""
    database = _GuardDatabase(world)
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "policy.yaml")
        with open(path, "w") as handle:
            handle.write(POLICY.replace("members: [gv_admin]", "members: [gv_admin, gv_public]")
                         .replace("members: [gv_public]", "members: [gv_nobody]"))
        held: list[Enforcement] = []
        with running_proxy(database, policy_factory=lambda client=None: held[0].connection_policy(client)) \
                as proxy:
            enforcement = proxy.run(Enforcement.create(path, database.dsn()))
            held.append(enforcement)
            pool = enforcement.analysis
            release = threading.Event()
            try:
                busy = [asyncio.run_coroutine_threadsafe(enforcement.off_loop(lambda: release.wait(30)),
                                                         proxy.loop) for _ in range(pool.workers)]
                wait_until(lambda: len(pool._running) == pool.workers)  # every analysis thread is busy
                answers: list[str] = []
                values = ", ".join(str(n) for n in range(1, 400))
                statement = f"select ssn from gv.people where id = 1 and id in ({values})"
                with psycopg.connect(proxy.dsn("gv_public", PASSWORD, DATABASE), autocommit=True) as conn:
                    client = threading.Thread(target=lambda: answers.append(_received(conn, statement)))
                    client.start()
                    wait_until(lambda: pool._jobs.qsize() > 0)  # the statement waits for a thread
                    with open(path, "w") as handle:
                        handle.write(POLICY)
                    proxy.run(enforcement.reload())
                    release.set()
                    client.join(30)
                for job in busy:
                    job.result(30)
            finally:
                release.set()
                proxy.run(enforcement.close())
    assert len(answers) == 1
    assert leaked_canaries(answers[0]) == []
