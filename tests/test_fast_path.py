"""The synchronous cache-hit path answers exactly what the async hooks would, and declines (leaving
the session as it was) whenever the async path has more to do."""

from __future__ import annotations

import json
import os
import tempfile
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy.connection_policy import ClientInfo, Outcome
from proxy.embedded import free_port
from proxy.enforcement import Enforcement, GuardedConnection
from proxy.guard.upstream_prepare import NAME_PREFIX
from proxy.guard.verdict import Refuse, Rewrite
from proxy.wire import ErrorResponse
from proxy.wire.frontend import Bind, Execute, Parse, Query, Sync, Terminate
from tests.audit_consistency import audit_problems
from tests.conftest import Upstream
from tests.guard_setup import DATABASE, POLICY, GuardWorld, world  # noqa: F401 (fixture)
from tests.proxy_harness import RawClient, running_proxy

PEOPLE = "select full_name, email from gv.people where id = {}"


@pytest.fixture
async def enforcement(world: GuardWorld) -> AsyncIterator[Enforcement]:  # noqa: F811
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "policy.yaml")
        with open(path, "w") as handle:
            handle.write(POLICY.replace("    members: [gv_admin]\n",
                                        "    members: [gv_admin]\n    fingerprints: learn\n"))
        enforcement = await Enforcement.create(path, world.dsn())
        try:
            yield enforcement
        finally:
            await enforcement.close()


async def connected(enforcement: Enforcement, login: str = "gv_analyst") -> GuardedConnection:
    connection = enforcement.connection_policy()
    client = ClientInfo(1, "test", login, DATABASE, "", False)
    assert await connection.on_startup({"user": login, "database": DATABASE}, client) is None
    return connection


async def test_a_cache_hit_gets_the_verdict_on_query_gives_for_the_same_statement(
        enforcement: Enforcement) -> None:
    first = await connected(enforcement)
    assert first.fast_query(PEOPLE.format(1)) is None  # never seen: declined
    assert isinstance(await first.on_query(PEOPLE.format(1)), Rewrite)
    fast = first.fast_query(PEOPLE.format(2))
    slow = await (await connected(enforcement)).on_query(PEOPLE.format(2))
    assert isinstance(fast, Rewrite) and fast == slow and "'2'" not in fast.sql and " 2" in fast.sql
    assert "mask_" in fast.sql or "left(" in fast.sql


async def test_a_declined_statement_leaves_the_cache_counts_as_the_async_path_makes_them(
        enforcement: Enforcement) -> None:
    connection = await connected(enforcement)
    hits, misses = enforcement.cache.hits, enforcement.cache.misses
    assert connection.fast_query(PEOPLE.format(7)) is None
    await connection.on_query(PEOPLE.format(7))
    assert (enforcement.cache.hits, enforcement.cache.misses) == (hits, misses + 1)
    assert connection.fast_query(PEOPLE.format(8)) is not None
    assert (enforcement.cache.hits, enforcement.cache.misses) == (hits + 1, misses + 1)


@pytest.mark.parametrize("sql", [
    "drop table gv.scratch",  # refused: the role may not run DDL
    "begin",  # a session effect pgveil follows at completion (the transaction's end)
    "prepare q as select id from gv.people",  # a prepared statement to track
    "select id from gv.people where note = 'execute'",  # may be: declined, parsed by on_query
])
async def test_what_the_async_path_has_more_to_do_for_is_declined(enforcement: Enforcement, sql: str) -> None:
    connection = await connected(enforcement, "gv_writer")
    await connection.on_query(sql)
    await connection.on_complete(Outcome(rows=0, sqlstate="42601", upstream_seconds=0.0))
    assert connection.fast_query(sql) is None


async def test_a_refusal_is_never_answered_at_once(enforcement: Enforcement) -> None:
    connection = await connected(enforcement)
    refused = await connection.on_query("delete from gv.orders where id = 1")
    assert isinstance(refused, Refuse)
    assert connection.fast_query("delete from gv.orders where id = 2") is None


async def test_a_role_with_a_fingerprint_allow_list_always_takes_the_async_path(
        enforcement: Enforcement) -> None:
    connection = await connected(enforcement, "gv_admin")
    await connection.on_query("select id from gv.orders where id = 1")
    assert connection.fast_query("select id from gv.orders where id = 2") is None


async def test_a_session_setting_pgveil_cannot_read_under_refuses_cached_statements_too(
        enforcement: Enforcement) -> None:
    connection = await connected(enforcement)
    await connection.on_query(PEOPLE.format(1))
    connection.on_parameter_status("standard_conforming_strings", "off")
    assert connection.fast_query(PEOPLE.format(2)) is None
    refused = await connection.on_query(PEOPLE.format(2))
    assert isinstance(refused, Refuse) and refused.rule == "session-setting"


async def test_a_masked_role_goes_to_the_async_path_when_the_catalog_check_is_due(
        enforcement: Enforcement) -> None:
    connection = await connected(enforcement)
    await connection.on_query(PEOPLE.format(1))
    assert connection.fast_query(PEOPLE.format(2)) is not None
    enforcement._last_catalog_check = 0.0  # a second has passed since PostgreSQL was last asked
    assert connection.fast_query(PEOPLE.format(3)) is None
    assert isinstance(await connection.on_query(PEOPLE.format(3)), Rewrite)
    assert connection.fast_query(PEOPLE.format(4)) is not None  # the async path checked


async def test_a_prepared_statement_is_re_executed_at_once_until_a_reload_changes_its_basis(
        enforcement: Enforcement) -> None:
    connection = await connected(enforcement)
    assert connection.fast_bind("s1") is None  # not prepared
    parsed = await connection.on_parse("s1", "select email from gv.people where id = $1", ())
    await connection.on_complete(Outcome(rows=0, sqlstate=None, upstream_seconds=0.0))
    fast = connection.fast_bind("s1")
    assert fast is not None and fast == parsed
    assert connection.fast_complete(Outcome(rows=1, sqlstate=None, upstream_seconds=0.0))
    await enforcement.reload()
    assert connection.fast_bind("s1") is None
    assert await connection.on_bind("s1") is not None  # decided again by the async path


async def test_a_parse_of_a_cached_statement_is_answered_at_once_and_prepared_as_on_parse_does(
        enforcement: Enforcement) -> None:
    connection = await connected(enforcement)
    assert connection.fast_parse("", PEOPLE.format(1), ()) is None  # never seen
    await connection.on_parse("", PEOPLE.format(1), ())
    await connection.on_complete(Outcome(rows=0, sqlstate=None, upstream_seconds=0.0))
    fast = connection.fast_parse("s2", PEOPLE.format(2), ())
    slow = await (await connected(enforcement)).on_parse("s2", PEOPLE.format(2), ())
    assert isinstance(fast, Rewrite) and fast == slow
    assert connection.fast_complete(Outcome(rows=0, sqlstate=None, upstream_seconds=0.0))
    assert connection.fast_bind("s2") == fast  # prepared under that verdict
    assert connection.fast_parse(NAME_PREFIX + "1", PEOPLE.format(3), ()) is None  # a name of pgveil's own


async def test_an_elevation_changes_the_role_of_the_next_cached_statement(world: GuardWorld) -> None:  # noqa: F811
    elevated: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "policy.yaml")
        with open(path, "w") as handle:
            handle.write(POLICY)
        enforcement = await Enforcement.create(path, world.dsn(), active_role=elevated.get)
    try:
        connection = await connected(enforcement)
        masked = await connection.on_query("select ssn from gv.people where id = 1")
        elevated["gv_analyst"] = "admin"
        raw = connection.fast_query("select ssn from gv.people where id = 1")
        assert raw is None or "mask_hash" not in raw.sql
        raw = raw or await connection.on_query("select ssn from gv.people where id = 1")
        del elevated["gv_analyst"]
        again = connection.fast_query("select ssn from gv.people where id = 2")
        assert isinstance(masked, Rewrite) and "mask_hash" in masked.sql and "mask_hash" not in raw.sql
        assert isinstance(again, Rewrite) and "mask_hash" in again.sql
    finally:
        await enforcement.close()



DEPLOYED_POLICY = """
version: 1
settings: {{default_role: deny}}
roles:
  everything:
    members: ["{login}"]
    statements: [select]
    tables: ["*"]
    reveal: [public, internal, confidential, restricted]
"""


def test_as_deployed_cached_statements_are_audited_and_counted_like_the_first(
        upstream: Upstream, tmp_path: Path) -> None:
    """Policy + audit log + metrics through `serve`'s runtime: repeated statements (cache hits)
    and re-executed prepared statements get the access and completion records, request numbers
    and metric counts the first execution got."""
    upstream.execute("CREATE TABLE IF NOT EXISTS fast_path_t (n int, tag text)")
    policy, log = tmp_path / "policy.yaml", tmp_path / "audit.jsonl"
    policy.write_text(DEPLOYED_POLICY.format(login=upstream.superuser))
    metrics_port = free_port()
    with running_proxy(upstream, str(policy), audit_log=str(log),
                       metrics=f"127.0.0.1:{metrics_port}") as proxy, \
            RawClient.connect(proxy.host, proxy.port) as client:
        for n in range(6):
            client.send(Query(f"SELECT n, tag FROM fast_path_t WHERE n = {n}"))
            assert not [m for m in client.until_ready() if isinstance(m, ErrorResponse)]
        client.send(Parse("s1", "SELECT n FROM fast_path_t WHERE n = $1"), Bind("", "s1", (0,), (b"1",), ()),
                    Execute(""), Sync())
        client.until_ready()
        for _ in range(2):
            client.send(Bind("", "s1", (0,), (b"2",), ()), Execute(""), Sync())
            assert not [m for m in client.until_ready() if isinstance(m, ErrorResponse)]
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
            exposition = response.read().decode()
        client.send(Terminate())
        client.read_to_end()
    assert audit_problems(log, wait=True) == []
    records = [json.loads(line) for line in log.read_text().splitlines()]
    accesses = [r for r in records if r["type"] == "access"]
    assert [(r["request"], r["protocol"], r["rule"]) for r in accesses] == [
        *((number, "query", None) for number in range(1, 7)), (7, "parse", None), (8, "bind", None),
        (9, "bind", None)]
    static = {"statement_kind", "fingerprint", "normalized_sql", "relations", "columns", "masks", "decision"}
    assert all({k: r[k] for k in static} == {k: accesses[0][k] for k in static} for r in accesses[1:6])
    assert [r["request"] for r in records if r["type"] == "completion"] == list(range(1, 10))
    counted = sum(float(line.rsplit(" ", 1)[1]) for line in exposition.splitlines()
                  if line.startswith("pgveil_statements_total{"))
    hits = [line for line in exposition.splitlines()
            if line.startswith('pgveil_verdict_cache_total{result="hit"}')]
    assert counted == 9
    assert float(hits[0].rsplit(" ", 1)[1]) >= 5
