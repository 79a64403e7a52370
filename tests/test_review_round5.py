"""Review of round 5's mechanisms as an attacker with a masked login through a real pgveil: the
one-call cache-hit path, masked statements prepared on the upstream connection, errors given as
PostgreSQL's own, and diagnostics hiding. Every byte pgveil sends the client passes a TCP tap and is
searched for the raw values of the guard world (tests/guard_setup.py)."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from proxy.guard.upstream_prepare import NAME_PREFIX
from tests.guard_setup import PASSWORD, POLICY, GuardWorld, leaked_canaries, world  # noqa: F401 (the fixture)
from tests.guard_setup import GuardDatabase as _GuardDatabase
from tests.proxy_harness import RunningProxy, running_proxy
from tests.test_redteam5_diagnostics import Tap

LOGIN = "gv_public"

# gv_public reads two schemas: gv.people has masked columns, gv_other.people (id, full_name) has
# none the role may not see (internal is revealed). The same unqualified name resolves to either
# one by search_path.
REVIEW_POLICY = POLICY.replace(
    """  public_only:
    members: [gv_public]
    statements: [select]
    tables: ["gv.*"]
    reveal: [public]""",
    """  public_only:
    members: [gv_public]
    statements: [select, copy_out]
    tables: ["gv.*", "gv_other.*"]
    reveal: [public, internal]""")
REVIEW_POLICY = REVIEW_POLICY.replace("""  admin:
    members: [gv_admin]""", """  bounded:
    members: [gv_nobody]
    statements: [select]
    tables: ["gv.*"]
    reveal: [public, internal, confidential, restricted]
  admin:
    members: [gv_admin]""")
assert REVIEW_POLICY != POLICY and "bounded" in REVIEW_POLICY


@pytest.fixture(scope="module")
def gv_world(request: pytest.FixtureRequest) -> GuardWorld:
    return request.getfixturevalue("world")  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def proxy(gv_world: GuardWorld) -> Iterator[RunningProxy]:
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "policy.yaml")
        with open(path, "w") as handle:
            handle.write(REVIEW_POLICY)
        with running_proxy(_GuardDatabase(gv_world), path) as running:
            yield running


@pytest.fixture
def tap(proxy: RunningProxy) -> Iterator[Tap]:
    tapped = Tap(proxy.port)
    try:
        yield tapped
    finally:
        tapped.close()


def _connect(tap: Tap, login: str = LOGIN) -> psycopg.Connection[Any]:
    return psycopg.connect(f"postgresql://{login}:{PASSWORD}@127.0.0.1:{tap.port}/guard_test?sslmode=disable",
                           autocommit=True)


def _rows(conn: psycopg.Connection[Any], sql: str) -> list[tuple[Any, ...]]:
    with psycopg.ClientCursor(conn) as cur:
        cur.execute(sql.encode())  # type: ignore[arg-type]
        return cur.fetchall() if cur.description else []


def _outcome(conn: psycopg.Connection[Any], sql: str) -> str:
    try:
        return repr(_rows(conn, sql))
    except psycopg.Error as exc:
        return f"{exc.diag.sqlstate} {exc.diag.message_primary}"


def _ours(conn: psycopg.Connection[Any]) -> list[str]:
    rows = _rows(conn, "SELECT name FROM pg_catalog.pg_prepared_statements ORDER BY name")
    return [name for (name,) in rows if name.startswith(NAME_PREFIX)]


def _describe(conn: psycopg.Connection[Any], name: str) -> Any:
    """libpq's Describe of a statement, without its blocking call (it keeps the GIL, and pgveil runs
    on a thread of this process)."""
    pgconn = conn.pgconn
    pgconn.send_describe_prepared(name.encode())
    deadline = time.monotonic() + 20
    while pgconn.is_busy() and time.monotonic() < deadline:
        time.sleep(0.01)
        pgconn.consume_input()
    result = pgconn.get_result()
    while pgconn.get_result() is not None:
        pass
    return result


def _no_canary(tap: Tap) -> None:
    received = tap.received_so_far().decode("latin-1")
    assert not leaked_canaries(received), leaked_canaries(received)


# ---- 2. masked statements prepared on the upstream connection ------------------------------------------

# Policy B shows full_name raw to gv_public (ssn and the rest stay masked: still a masked role).
POLICY_B = POLICY.replace(
    "full_name:     {sensitivity: confidential, protection: {partial: {keep_first: 1}}}",
    "full_name:     {sensitivity: public}")
assert POLICY_B != POLICY


@pytest.mark.parametrize("dropper", [b"DEALLOCATE ALL", b"DISCARD ALL"])
def test_a_deallocate_re_executed_by_bind_cannot_hand_pgveils_name_to_the_client(
        gv_world: GuardWorld, tmp_path: Any, dropper: bytes) -> None:
    """A DEALLOCATE ALL Parsed once and re-executed by Bind drops pgveil's statement behind its back.
    The client PREPAREs its own statement under pgveil's name while a policy shows full_name (its
    PREPARE is judged then: nothing to mask), and the policy is rolled back: the verdict-cache key
    (policy hash, role, search_path, catalog digest) is the one pgveil's statement was made under,
    so pgveil's next EXECUTE of the name would run the client's statement, raw."""
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    with running_proxy(_GuardDatabase(gv_world), str(path)) as proxy:
        tap = Tap(proxy.port)
        try:
            with _connect(tap) as conn:
                conn.pgconn.prepare(b"drop_all", dropper)
                sql = "SELECT id, full_name FROM gv.people WHERE id = {}"
                assert _rows(conn, sql.format(2)) == [(2, "A********")]
                assert _rows(conn, sql.format(3)) == [(3, "B********")]
                (name,) = _ours(conn)
                result = conn.pgconn.exec_prepared(b"drop_all", [])  # Bind/Execute: it runs again
                assert result.error_message == b"", result.error_message
                path.write_text(POLICY_B)
                proxy.run(proxy.hooks.reload())
                outcomes = [_outcome(conn, f"PREPARE {name}(integer) AS "
                                           "SELECT id, full_name FROM gv.people WHERE id = $1")]
                path.write_text(POLICY)
                proxy.run(proxy.hooks.reload())
                for _ in range(3):
                    outcomes.append(_outcome(conn, sql.format(1)))
                assert "Quokkafeld" not in repr(outcomes), outcomes
                assert outcomes[-1] == repr([(1, "Z*************")]), outcomes
            _no_canary(tap)
        finally:
            tap.close()


# gv_public may be elevated to `support`: full_name shown, ssn and the rest still masked (a masked role,
# so pgveil keeps its upstream statements through the elevation).
POLICY_ELEVATION = POLICY.replace("""  admin:
    members: [gv_admin]""", """  support:
    members: []
    statements: [select]
    tables: ["gv.*"]
    reveal: [public, internal]
  admin:
    members: [gv_admin]""").replace("full_name:     {sensitivity: confidential,",
                                    "full_name:     {sensitivity: internal,") + """elevations:
  - role: support
    users: [gv_public]
    max_duration: 30m
    approver_required: false
"""
GRANT_KEY = "review-round5-grant-key-0123456789"


@pytest.mark.parametrize("dropper", [b"DEALLOCATE ALL", b"DISCARD ALL"])
def test_a_statement_prepared_while_elevated_to_a_masked_role_is_not_executed_by_pgveil_after(
        gv_world: GuardWorld, tmp_path: Any, monkeypatch: pytest.MonkeyPatch, dropper: bytes) -> None:
    """A DEALLOCATE ALL (or DISCARD ALL) Parsed once and re-executed by Bind drops pgveil's statement
    behind its back. Elevated to `support` (full_name shown) the client PREPAREs its own statement
    under pgveil's name; when the grant ends, pgveil's next EXECUTE of that name must not run the
    client's statement (raw full_name) in place of its masked one."""
    from proxy.elevation import append_grant, create_grant
    from proxy.policy.loader import parse_policy

    monkeypatch.setenv("PGVEIL_GRANT_KEY", GRANT_KEY)
    path, grants = tmp_path / "policy.yaml", tmp_path / "grants.jsonl"
    path.write_text(POLICY_ELEVATION)
    grants.write_text("")
    policy = parse_policy(POLICY_ELEVATION, str(path))
    with running_proxy(_GuardDatabase(gv_world), str(path),
                       extra={"elevation": {"grants_file": str(grants)}}) as proxy:
        tap = Tap(proxy.port)
        try:
            with _connect(tap) as conn:
                conn.pgconn.prepare(b"drop_all", dropper)
                sql = "SELECT id, full_name FROM gv.people WHERE id = {}"
                assert _rows(conn, sql.format(2)) == [(2, "A********")]
                assert _rows(conn, sql.format(3)) == [(3, "B********")]
                (name,) = _ours(conn)
                result = conn.pgconn.exec_prepared(b"drop_all", [])  # Bind/Execute: it runs again
                assert result.error_message == b"", result.error_message
                grant = create_grant(policy, LOGIN, "support", 600, "INC-R5", None)
                append_grant(grants, grant, GRANT_KEY.encode())
                assert _rows(conn, sql.format(1)) == [(1, "Zed Quokkafeld")]  # elevated: shown
                outcomes = [_outcome(conn, f"PREPARE {name}(integer) AS "
                                           "SELECT id, full_name FROM gv.people WHERE id = $1")]
                grants.write_text("")  # the grant is withdrawn
                assert _rows(conn, "SELECT full_name FROM gv.people WHERE id = 1 AND region = 'north'") == [
                    ("Z*************",)]
                for _ in range(3):
                    outcomes.append(_outcome(conn, sql.format(1)))
                assert "Quokkafeld" not in repr(outcomes), outcomes
                assert outcomes[-1] == repr([(1, "Z*************")]), outcomes
        finally:
            tap.close()


def test_a_client_may_not_prepare_under_pgveils_names(proxy: RunningProxy, tap: Tap) -> None:
    """pgveil's names are visible in pg_prepared_statements; a client statement under one of them
    (SQL PREPARE or a Parse) would be EXECUTEd by pgveil in place of its own masked one."""
    with _connect(tap) as conn:
        sql = "SELECT id, email FROM gv.people WHERE id = {}"
        _rows(conn, sql.format(2))
        _rows(conn, sql.format(3))
        (name,) = _ours(conn)
        number = int(name.rsplit("_", 1)[1])
        following = f"{NAME_PREFIX}{number + 1}"
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            _rows(conn, f"PREPARE {following}(integer) AS SELECT id, email FROM gv.people WHERE id = $1")
        result = conn.pgconn.prepare(following.encode(), b"SELECT 1")
        assert b"pgveil" in result.error_message
        assert _rows(conn, sql.format(1)) == [(1, "q***@leak.example")]
    _no_canary(tap)



def test_pgveils_statements_cannot_be_executed_described_or_bound_by_the_client(
        proxy: RunningProxy, tap: Tap) -> None:
    with _connect(tap) as conn:
        sql = "SELECT id, ssn FROM gv.people WHERE id = {}"
        _rows(conn, sql.format(2))
        _rows(conn, sql.format(3))
        (name,) = _ours(conn)
        with pytest.raises(psycopg.errors.InvalidSqlStatementName):
            _rows(conn, f"EXECUTE {name}(1)")
        with pytest.raises(psycopg.errors.InvalidSqlStatementName):
            _rows(conn, f"EXPLAIN EXECUTE {name}(1)")
        with pytest.raises(psycopg.Error):
            _rows(conn, f"CREATE TEMP TABLE stolen AS EXECUTE {name}(1)")
        bound = conn.pgconn.exec_prepared(name.encode(), [b"1"])  # Bind of pgveil's name
        assert bound.error_message and bound.ntuples == 0
        described = _describe(conn, name)  # Describe is relayed: parameter and column types only
        assert described.ntuples == 0
        assert _rows(conn, sql.format(1))[0][1] != "914-27-6380"
    _no_canary(tap)


@pytest.mark.parametrize("sql", [
    "SELECT gv.dyn('DEALLOCATE ALL')",
    "SELECT gv.dyn('SELECT count(*) FROM gv.people WHERE ssn = ''914-27-6380''')",
    "SELECT set_config(n, v, false) FROM (VALUES ('client_min_messages', 'debug5')) AS t(n, v)",
    "SELECT set_config('client_min_messages', 'debug' || '5', false)",
    "SELECT set_config('client_encoding', 'SJ' || 'IS', false)",
    "SELECT set_config(lower('CLIENT_ENCODING'), 'SJIS', false)",
    "SET NAMES 'SJIS'",
    "SET client_encoding = 'BIG5'",
    "SELECT * FROM (SELECT set_config('debug_print_plan', 'on', false)) AS s",
    "WITH c AS (SELECT set_config('client_min_messages', 'log', true)) SELECT * FROM c",
])
def test_routes_to_raw_values_and_settings_around_the_rules_are_refused(
        proxy: RunningProxy, tap: Tap, sql: str) -> None:
    with _connect(tap) as conn:
        with pytest.raises(psycopg.Error) as caught:
            _rows(conn, sql)
        assert caught.value.diag.sqlstate == "42501", caught.value.diag.message_primary
        assert _rows(conn, "SHOW client_encoding") == [("UTF8",)]
        assert _rows(conn, "SHOW client_min_messages") == [("notice",)]
        assert _rows(conn, "SELECT ssn FROM gv.people WHERE id = 1")[0][0] != "914-27-6380"
    _no_canary(tap)


def test_two_sessions_never_share_a_statement_name(proxy: RunningProxy, tap: Tap) -> None:
    """With an upstream connection shared behind pgveil (a transaction pooler), a name used by two
    sessions would run one session's statement, made for its role's masks, for the other."""
    with _connect(tap) as first, _connect(tap) as second:
        for conn in (first, second):
            _rows(conn, "SELECT id, card FROM gv.people WHERE id = 2")
            _rows(conn, "SELECT id, card FROM gv.people WHERE id = 3")
        assert len(_ours(first)) == len(_ours(second)) == 1
        assert set(_ours(first)).isdisjoint(_ours(second))


# ---- 3. errors given as PostgreSQL's own ---------------------------------------------------------------

ERRORS_INSIDE_THE_REWRITE = [
    "SELECT ssn::int FROM gv.people WHERE id = 1",
    "SELECT full_name::date FROM gv.people WHERE id = 1",
    "SELECT card::numeric FROM gv.people WHERE id = 1",
    "SELECT email::json FROM gv.people WHERE id = 1",
    "SELECT 1 FROM gv.people WHERE full_name::int = 1",
    "SELECT 1 FROM gv.people p WHERE p.ssn::int > 0 ORDER BY p.email::int",
    "SELECT to_date(full_name, 'YYYY') FROM gv.people WHERE id = 1",
    "SELECT * FROM gv.people WHERE nosuch = 1",
    "SELECT people.ssn FROM gv.people p",
    "SELECT p.xmin, p.ctid FROM gv.people p",
    "SELECT 1/(id - 1) FROM gv.people WHERE id = 1",
    "SELECT (SELECT ssn FROM gv.people)",
    "SELECT id FROM gv.people WHERE id = (SELECT id FROM gv.people)",
    "SELECT ssn FROM gv.people GROUP BY id HAVING count(*) > 0 AND email = 'x'",
    "SELECT salary / 0 FROM gv.people WHERE id = 1",
    "SELECT birth_date + interval '1 day' * id::text::int / 0 FROM gv.people WHERE id = 1",
    "SELECT row_to_json(p)::text::int FROM gv.people p WHERE id = 1",
    "SELECT p::text::int FROM gv.people p WHERE id = 1",
    "SELECT array_agg(ssn)::int[] FROM gv.people",
    "SELECT jsonb_build_object('a', ssn)::text::int FROM gv.people WHERE id = 1",
    "SELECT id FROM gv.people WHERE id = 1 AND ssn LIKE '%' ESCAPE 'xx'",
    "SELECT regexp_match(full_name, '(') FROM gv.people WHERE id = 1",
    "SELECT ssn FROM gv.people WHERE id = 2147483648 * 2147483648",
]
INTERNALS = ("mask_", "hash_key", "offset 0", "pgveil.", "pgveil_")


@pytest.mark.parametrize("sql", ERRORS_INSIDE_THE_REWRITE)
def test_errors_from_inside_the_rewrite_show_no_raw_value_nor_the_rewrite(
        proxy: RunningProxy, tap: Tap, sql: str) -> None:
    with _connect(tap) as conn:
        for _ in range(3):  # inline, then (where eligible) prepared upstream and executed
            try:
                _rows(conn, sql)
            except psycopg.Error as exc:
                diag = exc.diag
                fields = [diag.message_primary, diag.message_detail, diag.message_hint, diag.context,
                          diag.internal_query, diag.internal_position, diag.statement_position]
                text = repr(fields)
                assert not leaked_canaries(text), fields
                assert not any(word in text.lower() for word in INTERNALS if word not in sql.lower()), fields
                if diag.statement_position is not None:
                    assert 1 <= int(diag.statement_position) <= len(sql) + 1, fields
    _no_canary(tap)


# ---- 4. diagnostics hiding ---------------------------------------------------------------------------

def test_server_wide_diagnostics_stay_hidden_on_the_fast_and_upstream_prepared_paths(
        proxy: RunningProxy, gv_world: GuardWorld) -> None:
    """debug_print_plan for everyone (ALTER SYSTEM, out of pgveil's sight): the masked login's cached
    statements (one-call path), pgveil's PREPARE/EXECUTE, a pipeline, COPY and the login itself get no
    notice below NOTICE and no raw value."""
    from tests.proxy_harness import wait_until
    from tests.test_redteam5_diagnostics import diagnostics_received

    def upstream_sql(sql: str) -> None:
        gv_world.upstream.execute(sql, dbname="guard_test")

    upstream_sql("ALTER SYSTEM SET client_min_messages = debug1")
    upstream_sql("ALTER SYSTEM SET debug_print_plan = on")
    tap = Tap(proxy.port)
    try:
        upstream_sql("SELECT pg_reload_conf()")

        def applied() -> bool:
            with psycopg.connect(gv_world.dsn()) as conn:
                return conn.execute("SHOW debug_print_plan").fetchone() == ("on",)

        wait_until(applied, "the server-wide settings to apply")
        with _connect(tap) as conn:
            for person in (1, 2, 3, 1, 2, 1):
                row = _rows(conn, f"SELECT id, ssn, full_name FROM gv.people WHERE id = {person}")
                assert row[0][1] != "914-27-6380"
            assert _ours(conn)  # pgveil's PREPARE/EXECUTE ran
            for _ in range(3):
                conn.execute("SELECT ssn, email FROM gv.people WHERE id = %s", (1,), prepare=True).fetchall()
            with conn.pipeline():
                cursors = [conn.execute("SELECT card FROM gv.people WHERE id = %s", (person,))
                           for person in (1, 2)]
            assert all(cur.fetchall() for cur in cursors)
            copy_sql = "COPY (SELECT * FROM gv.people WHERE id = 1) TO STDOUT"
            with conn.cursor() as cur, cur.copy(copy_sql) as copy:
                copied = b"".join(bytes(block) for block in copy)
            assert b"914-27-6380" not in copied
        received = tap.received_so_far()
        assert diagnostics_received(received) == []
        assert not leaked_canaries(received.decode("latin-1"))
        seer = Tap(proxy.port)  # the test can fail: the login that sees everything gets the plans
        try:
            with _connect(seer, "gv_admin") as conn:
                _rows(conn, "SELECT ssn FROM gv.people WHERE id = 1")
            assert "LOG" in diagnostics_received(seer.received_so_far())
        finally:
            seer.close()
    finally:
        tap.close()
        upstream_sql("ALTER SYSTEM RESET client_min_messages")
        upstream_sql("ALTER SYSTEM RESET debug_print_plan")
        upstream_sql("SELECT pg_reload_conf()")


# ---- 1. the one-call path and pipelines ----------------------------------------------------------------

def test_a_search_path_set_in_a_pipeline_never_lets_a_statement_read_another_relation(
        proxy: RunningProxy, tap: Tap) -> None:
    """A role limited to gv.* (nothing masked: it may SET search_path) pipelines SET search_path and
    a SELECT of an unqualified name, judged before the SET has run: PostgreSQL must read the relation
    pgveil judged (pgveil writes it schema-qualified), never gv_other.people (out of bounds)."""
    outcomes = []
    with _connect(tap, "gv_nobody") as conn:
        for _ in range(3):  # the second and third time the SELECT is a verdict-cache hit
            _rows(conn, "SET search_path = gv")
            try:
                with conn.pipeline():
                    conn.execute("SET search_path = gv_other")
                    cur = conn.execute("SELECT full_name FROM people")
                outcomes.append(repr(cur.fetchall()))
            except psycopg.Error as exc:
                outcomes.append(f"{exc.diag.sqlstate} {exc.diag.message_primary}")
    assert not any("other schema" in outcome for outcome in outcomes), outcomes


def test_as_deployed_every_statement_of_the_attacks_has_its_access_record_and_one_completion(
        gv_world: GuardWorld, tmp_path: Any) -> None:
    """With an audit log (checked for one access and one completion per statement when the proxy
    stops, tests/audit_consistency.py): cached statements on the one-call path, pgveil's hidden
    PREPARE, a Bind re-running DEALLOCATE ALL, refused reserved names; no record holds a raw value."""
    import json

    path, log = tmp_path / "policy.yaml", tmp_path / "audit.jsonl"
    path.write_text(REVIEW_POLICY)
    with running_proxy(_GuardDatabase(gv_world), str(path), audit_log=str(log),
                       metrics="127.0.0.1:0") as proxy:
        tap = Tap(proxy.port)
        try:
            with _connect(tap) as conn:
                conn.pgconn.prepare(b"drop_all", b"DEALLOCATE ALL")
                sql = "SELECT id, ssn FROM gv.people WHERE id = {}"
                for person in (1, 2, 3):
                    _rows(conn, sql.format(person))
                (name,) = _ours(conn)
                conn.pgconn.exec_prepared(b"drop_all", [])
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    _rows(conn, f"PREPARE {name}(integer) AS SELECT id, ssn FROM gv.people WHERE id = $1")
                for person in (1, 2, 3):
                    assert _rows(conn, sql.format(person))[0][1] != "914-27-6380"
            _no_canary(tap)
        finally:
            tap.close()
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    accesses = [record for record in records if record.get("type") == "access"]
    assert len([r for r in accesses if "WHERE id" in json.dumps(r)]) >= 7, accesses
    assert not leaked_canaries(log.read_text())


async def test_an_elevation_starting_while_a_statement_is_judged_makes_pgveil_forget_its_statements(
        gv_world: GuardWorld, tmp_path: Any) -> None:
    """A statement judged again for an unmasked role because an elevation began while it was judged
    (a DO that could deallocate pgveil's statement and prepare another under its name) must make
    pgveil forget its statements before it is forwarded, as when the elevation began before it."""
    import asyncio

    from proxy.connection_policy import ClientInfo
    from proxy.enforcement import LONG_STATEMENT, Enforcement
    from proxy.guard.verdict import Allow, Rewrite, UpstreamTicket

    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    elevated: set[str] = set()
    enforcement = await Enforcement.create(str(path), gv_world.dsn(),
                                           active_role=lambda user: "admin" if user in elevated else None)
    try:
        connection = enforcement.connection_policy()
        client = ClientInfo(1, "test", LOGIN, "guard_test", "", False)
        assert await connection.on_startup({"user": LOGIN, "database": "guard_test"}, client) is None
        sql = "SELECT id, ssn FROM gv.people WHERE id = {}"
        await connection.on_query(sql.format(1))
        prepared = await connection.on_query(sql.format(2))
        assert isinstance(prepared, Rewrite) and prepared.prepares is not None
        prepared.prepares.state = UpstreamTicket.READY  # as the relay does on PREPARE's CommandComplete
        assert (await connection.on_query(sql.format(3))).sql == f"EXECUTE {prepared.prepares.name}(3)"
        do = "DO $$ BEGIN PERFORM 1; END $$ /* " + "x" * LONG_STATEMENT + " */"
        judged = asyncio.ensure_future(connection.on_query(do))  # judged on an analysis thread ...
        await asyncio.sleep(0)
        elevated.add(LOGIN)  # ... while the grant begins
        assert isinstance(await judged, Allow)
        elevated.clear()  # and ends before the next statement
        again = await connection.on_query(sql.format(4))
        assert isinstance(again, Rewrite) and not again.sql.startswith("EXECUTE "), again.sql
    finally:
        await enforcement.close()


def test_as_deployed_cached_statements_in_a_failed_transaction_and_a_pipeline_are_audited(
        gv_world: GuardWorld, tmp_path: Any) -> None:
    """Cached statements (one-call path, some prepared upstream) after an error in a transaction
    and in a pipeline each get one access record and one completion; the session stays usable."""
    path, log = tmp_path / "policy.yaml", tmp_path / "audit.jsonl"
    path.write_text(REVIEW_POLICY)
    sql = "SELECT id, email FROM gv.people WHERE id = {}"
    with running_proxy(_GuardDatabase(gv_world), str(path), audit_log=str(log)) as proxy:
        tap = Tap(proxy.port)
        try:
            with _connect(tap) as conn:
                for person in (1, 2, 3):
                    _rows(conn, sql.format(person))
                conn.autocommit = False
                with pytest.raises(psycopg.errors.DivisionByZero):
                    _rows(conn, "SELECT 1/0")
                for person in (1, 2):
                    with pytest.raises(psycopg.errors.InFailedSqlTransaction):
                        _rows(conn, sql.format(person))
                conn.rollback()
                conn.autocommit = True
                with conn.pipeline():
                    cursors = [conn.execute(sql.format(person).encode()) for person in (1, 2, 3, 1)]
                emails = [cur.fetchall()[0][1] for cur in cursors]
                assert emails[0] == emails[3] == "q***@leak.example"
                assert _rows(conn, sql.format(1)) == [(1, "q***@leak.example")]
            _no_canary(tap)
        finally:
            tap.close()


def test_a_long_masked_statement_is_not_prepared_upstream(proxy: RunningProxy, tap: Tap) -> None:
    """Working out the template of a cache hit scans and parses the whole statement on the event
    loop (about 0.5 s for a 70,000-item IN list, measured in-process): a masked login sending pairs
    of long statements of new shapes would stall every session of the process. Long statements
    (judged off the loop) stay inline."""
    items = ", ".join(str(number) for number in range(1, 70_001))
    with _connect(tap) as conn:
        for bound in range(3):
            rows = _rows(conn, f"SELECT id, ssn FROM gv.people WHERE id IN ({items}) AND id > {bound}")
            assert [row[0] for row in rows] == [1, 2, 3, 4][bound:]
        assert _ours(conn) == []
    _no_canary(tap)


@pytest.mark.parametrize("invalid", [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xe4\xb8\x27 OR 1=1 --"])
def test_invalid_utf8_in_a_cached_shape_is_refused_as_postgresql_does(
        proxy: RunningProxy, tap: Tap, invalid: bytes) -> None:
    """The one-call path answers a shape hit without the gate: a string literal with bytes that are
    not UTF8 (a truncated sequence swallowing the closing quote included) must still get 22021."""
    with _connect(tap) as conn:
        for name in (b"Ann", b"Bob", b"Zed"):  # the shape is cached
            _rows(conn, (b"SELECT id, ssn FROM gv.people WHERE full_name = '" + name + b"'").decode())
        with pytest.raises(psycopg.Error) as caught, psycopg.ClientCursor(conn) as cur:
            cur.execute(b"SELECT id, ssn FROM gv.people WHERE full_name = '" + invalid + b"'")  # type: ignore[arg-type]
        assert caught.value.diag.sqlstate == "22021", caught.value.diag.message_primary
        assert _rows(conn, "SELECT ssn FROM gv.people WHERE id = 1")[0][0] != "914-27-6380"
    _no_canary(tap)


@pytest.mark.parametrize("spelling", ["{name}", "{upper}", '"{name}"', 'U&"{escaped}"'])
def test_pgveils_names_are_reserved_however_they_are_spelled(
        proxy: RunningProxy, tap: Tap, spelling: str) -> None:
    name = f"{NAME_PREFIX}999999"
    written = spelling.format(name=name, upper=name.upper(), escaped=name.replace("_", "\\005f"))
    with _connect(tap) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as caught:
            _rows(conn, f"PREPARE {written}(integer) AS SELECT id FROM gv.people WHERE id = $1")
        assert "reserved-name" in caught.value.diag.message_primary
        assert _rows(conn, "SELECT count(*) FROM pg_catalog.pg_prepared_statements") == [(0,)]
