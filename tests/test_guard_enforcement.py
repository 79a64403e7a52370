"""The guard as the proxy runs it: verdict cache equivalence, role selection at startup, startup
settings, and the bypass attempts again through pgveil with a real driver (simple and extended)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from proxy.guard.cache import VerdictCache, shape
from proxy.guard.pipeline import analyse
from proxy.guard.verdict import Refuse
from tests.guard_setup import PASSWORD, POLICY, GuardWorld, leaked_canaries, world  # noqa: F401
from tests.guard_setup import GuardDatabase as _GuardDatabase
from tests.proxy_harness import RunningProxy, running_proxy
from tests.test_bypass_guard import ATTEMPTS
from tests.test_firewall_corpus import benign_entries

REPORTING = [
    "select region, count(*) from gv.people group by region order by region",
    "select date_trunc('month', placed) m, sum(amount) from gv.orders where amount > 5 group by 1",
    "select p.region, sum(o.amount) from gv.orders o join gv.people p on p.id = o.person_id "
    "where o.placed >= '2024-01-01' group by 1 order by 2 desc limit 10",
    "select ssn, count(*) from gv.people where id in (1, 2, 3) group by ssn",
    "select extract(year from birth_date) y, count(*) from gv.people group by 1",
    "select * from gv.orders where id = 12",
    "select id from gv.people where full_name like 'A%' and salary > 1000.5",
    "select id, $1::int from gv.orders where amount > $2",
]


CORPUS = [sql for path in sorted((Path(__file__).parent / "corpus" / "benign").glob("*.sql"))
          for _, sql in benign_entries(path)]


def _variant(sql: str) -> str | None:
    """The same statement with every literal changed (numbers +7, strings prefixed)."""
    shaped = shape(sql)
    if shaped is None or not shaped[1]:
        return None
    key, literals, _ = shaped
    changed = [f"'zz{lit[1:]}" if lit.startswith("'") else str(float(lit) + 7 if "." in lit or "e" in lit.lower()
               else int(lit) + 7) for lit in literals]
    pieces = key.split("\x00")
    return pieces[0] + "".join(lit + piece for lit, piece in zip(changed, pieces[1:], strict=True))


@pytest.mark.parametrize("login", ["gv_analyst", "gv_writer", "gv_admin"])
def test_a_cached_verdict_equals_a_fresh_one_for_other_literals(world: GuardWorld, login: str) -> None:
    context = world.context(login)
    cache = VerdictCache()
    compared = 0
    for sql in [s for _, s in ATTEMPTS] + REPORTING + (CORPUS if login == "gv_analyst" else []):
        variant = _variant(sql)
        if variant is None:
            continue
        cache.store(sql, "k", analyse(sql, context))
        hit = cache.lookup(variant, "k")
        if hit is None:
            continue
        fresh = analyse(variant, context).verdict
        assert (hit.verdict.decision, getattr(hit.verdict, "sql", None), getattr(hit.verdict, "rule", None)) == (
            fresh.decision, getattr(fresh, "sql", None), getattr(fresh, "rule", None)), variant
        compared += 1
    assert compared >= (100 if login == "gv_analyst" else 25)


def test_literal_dependent_verdicts_are_keyed_on_the_exact_text(world: GuardWorld) -> None:
    context = world.context("gv_analyst")
    cache = VerdictCache()
    cache.store("select set_config('application_name', 'x', false)", "k",
                analyse("select set_config('application_name', 'x', false)", context))
    assert cache.lookup("select set_config('role', 'x', false)", "k") is None
    assert isinstance(analyse("select set_config('role', 'x', false)", context).verdict, Refuse)


def test_text_the_shape_lexer_could_misread_is_not_shaped() -> None:
    for sql in ["select 'a\\' , ssn from t", "select e'x' from t", "select $$a$$", "select 1 -- c",
                "select /* c */ 1", "select U&'\\0061'", "select x'1f'"]:
        assert shape(sql) is None, sql


@pytest.fixture(scope="module")
def proxy(world: GuardWorld) -> Iterator[RunningProxy]:
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "policy.yaml")
        with open(path, "w") as handle:
            handle.write(POLICY)
        with running_proxy(_GuardDatabase(world), path) as running:
            yield running


def _through(proxy: RunningProxy, login: str, **kwargs: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(proxy.dsn(login, PASSWORD, "guard_test"), autocommit=True, **kwargs)


def _collect(conn: psycopg.Connection[Any], sql: str, simple: bool) -> str:
    seen: list[str] = []
    conn.add_notice_handler(lambda d: seen.append(f"{d.message_primary} {d.message_detail} {d.context}"))
    conn.add_notify_handler(lambda n: seen.append(n.payload))
    try:
        if simple and sql.lstrip().lower().startswith("copy"):
            with conn.cursor() as cur, cur.copy(sql.encode()) as copy:  # type: ignore[arg-type]
                seen.extend(bytes(block).decode(errors="replace") for block in copy)
        elif simple:
            with psycopg.ClientCursor(conn) as cur:
                cur.execute(sql.encode())  # type: ignore[arg-type]
                while True:
                    if cur.description is not None:
                        seen.append(repr(cur.fetchall()))
                    if not cur.nextset():
                        break
        else:
            result = conn.pgconn.exec_params(sql.encode(), [])
            seen.append(repr(result.error_message))
            seen.append(repr([[result.get_value(r, c) for c in range(result.nfields)]
                              for r in range(result.ntuples)]))
    except psycopg.Error as exc:
        d = exc.diag
        seen.append(f"{d.message_primary} {d.message_detail} {d.message_hint} {d.context}")
    seen.extend(f"{k}={v}" for k, v in conn.info.parameter_status.__class__.__dict__.items()
                if False)  # ParameterStatus values are checked below
    return "\n".join(seen)


@pytest.mark.parametrize("simple", [True, False], ids=["simple", "extended"])
def test_no_canary_reaches_a_masked_client_through_the_proxy(proxy: RunningProxy, simple: bool) -> None:
    leaks: list[tuple[str, list[str]]] = []
    connections: dict[str, psycopg.Connection[Any]] = {}
    try:
        for login, sql in ATTEMPTS:
            if not simple and ";" in sql.replace("';'", "").replace("$$;$$", ""):
                continue  # the extended protocol carries one statement per Parse
            conn = connections.get(login)
            if conn is None or conn.closed or conn.broken:
                conn = connections[login] = _through(proxy, login)
            text = _collect(conn, sql, simple)
            for name in ("application_name", "search_path", "client_encoding", "session_authorization"):
                text += f"\n{conn.info.parameter_status(name)!r}"
            found = [c for c in leaked_canaries(text) if c not in sql]
            if found:
                leaks.append((sql, found))
    finally:
        for conn in connections.values():
            conn.close()
    assert leaks == []


def test_masked_values_and_row_filter_through_the_proxy(proxy: RunningProxy) -> None:
    with _through(proxy, "gv_analyst") as conn:
        rows = conn.execute("select id, email, birth_date::text, card from gv.people order by id").fetchall()
        assert rows[0] == (1, "q***@leak.example", "1987-01-01", "***************1098")
        assert [row[0] for row in rows] == [1, 2, 3]
        again = conn.execute("select email from gv.people where id = %s", (2,)).fetchone()
        assert again == ("a***@example.com",)


def test_a_login_matching_no_role_is_refused_at_startup(proxy: RunningProxy) -> None:
    with pytest.raises(psycopg.OperationalError, match="pgveil: no-role: no role for user gv_nobody"):
        _through(proxy, "gv_nobody")


@pytest.mark.parametrize("options", ["-c search_path=gv_other", "--role=gv_admin",
                                     "-c standard_conforming_strings=off", "-c client_encoding=SJIS"])
def test_startup_options_that_change_reading_or_identity_are_refused(proxy: RunningProxy, options: str) -> None:
    with pytest.raises(psycopg.OperationalError, match="pgveil: session-setting"):
        _through(proxy, "gv_analyst", options=options)


def test_harmless_startup_options_are_accepted(proxy: RunningProxy) -> None:
    with _through(proxy, "gv_analyst", options="-c statement_timeout=5000 -c work_mem=8MB") as conn:
        assert conn.execute("select count(*) from gv.orders").fetchone() == (5,)


def test_an_unmasked_role_reads_raw_values_through_the_proxy(proxy: RunningProxy) -> None:
    with _through(proxy, "gv_admin") as conn:
        assert conn.execute("select ssn from gv.people where id = 1").fetchone() == ("914-27-6380",)


def test_a_refusal_is_an_ordinary_error_and_the_connection_stays_usable(proxy: RunningProxy) -> None:
    with _through(proxy, "gv_analyst") as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="pgveil: side-door-function"):
            conn.execute("select query_to_xml('select 1', true, true, '')")
        assert conn.execute("select 1").fetchone() == (1,)


async def test_asyncpg_prepared_statements_and_copy_see_masked_values(proxy: RunningProxy) -> None:
    import asyncpg

    conn = await asyncpg.connect(host=proxy.host, port=proxy.port, user="gv_analyst", password=PASSWORD,
                                 database="guard_test")
    try:
        statement = await conn.prepare("select id, ssn, birth_date from gv.people where id = $1")
        row = await statement.fetchrow(1)
        assert row is not None and len(row["ssn"]) == 64 and row["birth_date"].month == 1
        assert await conn.fetchval("select count(*) from gv.people where ssn = $1", "914-27-6380") == 0
        import io

        buffer = io.BytesIO()
        await conn.copy_from_query("select * from gv.people", output=buffer)
        assert leaked_canaries(buffer.getvalue().decode()) == []
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="side-door-function"):
            await conn.fetch("select table_to_xml('gv.people', true, true, '')")
    finally:
        await conn.close()
