"""Red team: attacks on pgveil as a running proxy that change the session under the guard's feet
(startup options, settings changed through catalog views, state that outlives a policy reload)
or that reach raw data through code the guard does not look at (operators, casts, domain checks,
functions created after pgveil read its catalog).

Every test asserts the SAFE behaviour: no canary value in any byte a masked client received
(rows, error message, detail, hint, context). A failing test here is a hole; docs/redteam.md
lists them with the exact statements and where a fix belongs."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from tests import guard_setup
from tests.guard_setup import DATABASE, PASSWORD, POLICY, GuardWorld, leaked_canaries
from tests.guard_setup import GuardDatabase as _GuardDatabase
from tests.proxy_harness import RunningProxy, running_proxy

world = guard_setup.world  # the shared guard database with canary values

# Objects an administrator created directly in PostgreSQL (not through pgveil). They read gv.people
# (masked for the analyst) the way a reporting helper would.
REDTEAM_OBJECTS = """
DROP SCHEMA IF EXISTS redteam CASCADE;
CREATE SCHEMA redteam;
GRANT USAGE ON SCHEMA redteam TO gv_analyst, gv_writer, gv_public;
CREATE FUNCTION redteam.peek(i integer, j integer) RETURNS text LANGUAGE sql STABLE
    AS 'SELECT ssn FROM gv.people WHERE id = i';
CREATE OPERATOR redteam.##> (LEFTARG = integer, RIGHTARG = integer, FUNCTION = redteam.peek);
CREATE FUNCTION redteam.ssn_is_positive(i integer) RETURNS boolean LANGUAGE sql STABLE
    AS 'SELECT (SELECT ssn FROM gv.people WHERE id = i)::integer > 0';
CREATE DOMAIN redteam.checked AS integer CHECK (redteam.ssn_is_positive(VALUE));
CREATE TYPE redteam.person_ref AS (id integer);
CREATE FUNCTION redteam.person_ssn(r redteam.person_ref) RETURNS text LANGUAGE sql STABLE
    AS 'SELECT ssn FROM gv.people WHERE id = r.id';
CREATE CAST (redteam.person_ref AS text) WITH FUNCTION redteam.person_ssn(redteam.person_ref);
-- a harmless view and function, replaced by an administrator while pgveil runs (see below)
CREATE OR REPLACE VIEW gv.redteam_order_count AS
    SELECT person_id, count(*) AS orders FROM gv.orders GROUP BY 1;
GRANT SELECT ON gv.redteam_order_count TO gv_analyst;
CREATE OR REPLACE VIEW gv.redteam_order_count2 AS
    SELECT person_id, count(*) AS orders FROM gv.orders GROUP BY 1;
GRANT SELECT ON gv.redteam_order_count2 TO gv_analyst;
CREATE FUNCTION redteam.order_count(i integer) RETURNS text LANGUAGE sql STABLE
    AS 'SELECT count(*)::text FROM gv.orders WHERE person_id = i';
-- bodies pgveil's text search for relation names does not understand
CREATE FUNCTION redteam.escaped_peek(i integer) RETURNS text LANGUAGE sql STABLE
    AS $$SELECT ssn FROM gv.U&"p\\0065ople" WHERE id = i$$;
CREATE FUNCTION redteam.view_peek(i integer) RETURNS text LANGUAGE sql STABLE
    AS $$SELECT ssn FROM gv.people_names WHERE id = i$$;
CREATE FUNCTION redteam.dynamic_peek(i integer) RETURNS text LANGUAGE sql STABLE
    AS $$SELECT string_agg(word, ',') FROM ts_stat('SELECT to_tsvector(''simple'', replace(ssn, ''-'', ''''))'
                                                   || ' FROM gv.peo' || 'ple')$$;
-- a timestamptz column generalized to the month
CREATE TABLE gv.redteam_visits (id integer, seen_at timestamptz, joined date);
INSERT INTO gv.redteam_visits VALUES (1, '2024-03-29 17:42:13+00', '1987-06-23');
GRANT SELECT ON gv.redteam_visits TO gv_analyst;
-- helpers on the analyst's search path that take a row (callable in functional notation)
DROP FUNCTION IF EXISTS public.redteam_ssn_of(gv.people);
CREATE FUNCTION public.redteam_ssn_of(p gv.people) RETURNS text LANGUAGE sql STABLE
    AS 'SELECT ssn FROM gv.people WHERE id = p.id';
DROP FUNCTION IF EXISTS public.redteam_ref_ssn(redteam.person_ref);
CREATE FUNCTION public.redteam_ref_ssn(r redteam.person_ref) RETURNS text LANGUAGE sql STABLE
    AS 'SELECT ssn FROM gv.people WHERE id = r.id';
"""

# U+4E01 is E4 B8 81 in UTF-8. Read as GBK, E4 B8 is one character and 81 5C another: the backslash
# that escapes the quote for a UTF-8 reader is swallowed, and the string ends one byte earlier.
GBK_SWALLOWS_BACKSLASH = (
    "select E'\u4e01\\' , (select ssn from gv.people where id = 1) as x -- ', 1".encode()
)


REDTEAM_POLICY = POLICY + """  gv.redteam_visits:
    columns:
      id:      {sensitivity: public}
      seen_at: {sensitivity: confidential, protection: {generalize: month}}
      joined:  {sensitivity: confidential, protection: {partial: {keep_first: 4}}}
"""


@pytest.fixture(scope="module")
def redteam_objects(world: GuardWorld) -> Iterator[None]:
    world.upstream.execute(REDTEAM_OBJECTS, dbname=DATABASE)
    try:
        yield
    finally:
        world.upstream.execute("DROP SCHEMA IF EXISTS redteam CASCADE; "
                               "DROP VIEW IF EXISTS gv.redteam_order_count, gv.redteam_order_count2; "
                               "DROP TABLE IF EXISTS gv.redteam_visits; "
                               "DROP FUNCTION IF EXISTS public.redteam_ssn_of(gv.people)", dbname=DATABASE)


@pytest.fixture(scope="module")
def proxy(world: GuardWorld, redteam_objects: None) -> Iterator[RunningProxy]:
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "policy.yaml")
        with open(path, "w") as handle:
            handle.write(REDTEAM_POLICY)
        with running_proxy(_GuardDatabase(world), path) as running:
            yield running


def connect(proxy: RunningProxy, login: str = "gv_analyst", **kwargs: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(proxy.dsn(login, PASSWORD, DATABASE), autocommit=True, **kwargs)


def received(conn: psycopg.Connection[Any], *statements: str | bytes) -> str:
    """Everything the client got back for each statement (sent as raw bytes, simple protocol):
    rows, and the whole error (message, detail, hint, context) when there was one."""
    seen: list[str] = []
    for statement in statements:
        sql = statement.encode() if isinstance(statement, str) else statement
        result = conn.pgconn.exec_(sql)
        seen.append((result.error_message or b"").decode(errors="replace"))
        for row in range(result.ntuples):
            for column in range(result.nfields):
                value = result.get_value(row, column)
                seen.append("" if value is None else value.decode(errors="replace"))
    return "\n".join(seen)


# ---- startup options split the way PostgreSQL splits them, not the way pgveil does ----------------


def test_startup_option_split_by_vertical_tab_cannot_put_a_function_schema_on_the_search_path(
    proxy: RunningProxy,
) -> None:
    # PostgreSQL splits `options` at every isspace() byte (\v and \f included); pgveil's shlex does
    # not, reads one word "-c\vsearch_path=gv" and checks a setting named "\vsearch_path".
    # With gv on the search path, unqualified leak_ssn() is gv.leak_ssn(), which pgveil resolves
    # against the default search path, does not find and so does not refuse.
    try:
        conn = connect(proxy, options="-c\vsearch_path=gv")
    except psycopg.OperationalError as exc:
        assert "pgveil: session-setting" in str(exc)
        return
    with conn:
        assert leaked_canaries(received(conn, "select leak_ssn(1)")) == []


def test_startup_option_split_by_form_feed_cannot_set_a_multibyte_client_encoding(
    proxy: RunningProxy,
) -> None:
    # GBK client encoding: PostgreSQL reads E'<E4 B8><81 5C>' and then real SQL that pgveil read as
    # the inside of the string literal.
    try:
        conn = connect(proxy, options="-c\fclient_encoding=GBK")
    except psycopg.OperationalError as exc:
        assert "pgveil: session-setting" in str(exc)
        return
    with conn:
        assert leaked_canaries(received(conn, GBK_SWALLOWS_BACKSLASH)) == []


def test_startup_option_split_by_tab_is_read_as_pgveil_reads_it(proxy: RunningProxy) -> None:
    for options in ("-c\tsearch_path=gv", "-csearch_path=gv", "--search-path=gv", "-c 'search_path=gv'",
                    "-c\tclient_encoding=GBK", "-c Client_Encoding=SJIS"):
        with pytest.raises(psycopg.OperationalError, match="pgveil: session-setting"):
            connect(proxy, options=options)


# ---- settings changed through the pg_settings view (its update rule calls set_config) -------------


def test_update_of_pg_settings_cannot_put_a_function_schema_on_the_search_path(proxy: RunningProxy) -> None:
    with connect(proxy, "gv_writer") as conn:
        text = received(conn, "update pg_catalog.pg_settings set setting = 'gv' where name = 'search_path'",
                        "select leak_ssn(1)")
    assert leaked_canaries(text) == []


def test_update_of_pg_settings_cannot_set_a_multibyte_client_encoding(proxy: RunningProxy) -> None:
    with connect(proxy, "gv_writer") as conn:
        text = received(conn, "update pg_settings set setting = 'GBK' where name = 'client_encoding'",
                        GBK_SWALLOWS_BACKSLASH)
    assert leaked_canaries(text) == []


def test_sql_standard_set_forms_of_search_path_and_encoding_are_refused(proxy: RunningProxy) -> None:
    with connect(proxy) as conn:
        for statement in ("set schema 'gv'", "set names 'GBK'", "set local search_path = gv",
                          "select guard_test.pg_catalog.set_config('search_path', 'gv', false)",
                          "select set_config(setting_name => 'client_encoding', new_value => 'SJIS', "
                          "is_local => false)",
                          "update pg_settings set setting = 'gv' where name = 'search_path'"):
            assert "pgveil:" in received(conn, statement), statement
        assert received(conn, "show search_path").strip() == '"$user", public'
        assert received(conn, "show client_encoding").strip() == "UTF8"


# ---- code the guard does not look at: operators, domain checks, casts ------------------------------


def test_user_operator_whose_function_reads_a_masked_table_does_not_return_raw_values(
    proxy: RunningProxy,
) -> None:
    with connect(proxy) as conn:
        assert "unlisted-function" in received(conn, "select redteam.peek(1, 0)")  # the function itself
        assert leaked_canaries(received(conn, "select 1 operator(redteam.##>) 0")) == []


def test_domain_check_function_cannot_carry_a_raw_value_out_in_its_error(proxy: RunningProxy) -> None:
    with connect(proxy) as conn:
        assert leaked_canaries(received(conn, "select 1::redteam.checked")) == []


def test_user_cast_whose_function_reads_a_masked_table_does_not_return_raw_values(
    proxy: RunningProxy,
) -> None:
    with connect(proxy) as conn:
        assert leaked_canaries(received(conn, "select row(1)::redteam.person_ref::text")) == []


def test_function_in_functional_notation_on_a_parenthesised_row_is_checked(proxy: RunningProxy) -> None:
    # `p.f` (a ColumnRef) is checked; `(p).f` (an A_Indirection) is the same call and is not.
    with connect(proxy) as conn:
        assert "unlisted-function" in received(conn, "select p.redteam_ssn_of from gv.people p")
        assert leaked_canaries(received(conn, "select (p).redteam_ssn_of from gv.people p")) == []


def test_function_in_functional_notation_on_a_composite_value_is_checked(proxy: RunningProxy) -> None:
    with connect(proxy) as conn:
        assert "unlisted-function" in received(
            conn, "select x.redteam_ref_ssn from (select row(1)::redteam.person_ref as x) s")
        assert leaked_canaries(received(
            conn, "select (s.x).redteam_ref_ssn from (select row(1)::redteam.person_ref as x) s")) == []
        assert leaked_canaries(received(conn, "select (row(1)::redteam.person_ref).redteam_ref_ssn")) == []


@pytest.mark.parametrize("function", ["escaped_peek", "view_peek", "dynamic_peek"])
def test_function_body_that_reads_protected_data_is_refused_however_it_names_it(
    proxy: RunningProxy, function: str
) -> None:
    # escaped_peek names gv.people as gv.U&"p\0065ople"; view_peek reads the unlisted view
    # gv.people_names; dynamic_peek gives ts_stat() SQL built by concatenation: pgveil's search of
    # the body text finds none of that.
    with connect(proxy) as conn:
        text = received(conn, f"select redteam.{function}(1)")
    assert leaked_canaries(text) == [], text


def test_search_path_set_for_the_role_after_pgveil_read_its_catalog_is_followed(
    proxy: RunningProxy, world: GuardWorld
) -> None:
    # ALTER ROLE ... SET search_path run directly on PostgreSQL while pgveil runs: new sessions get
    # it, pgveil's catalog snapshot still says "$user", public, so leak_ssn() resolves to nothing.
    world.upstream.execute("ALTER ROLE gv_public IN DATABASE guard_test SET search_path = gv")
    try:
        with connect(proxy, "gv_public") as conn:
            text = received(conn, "select leak_ssn(1)")
    finally:
        world.upstream.execute("ALTER ROLE gv_public IN DATABASE guard_test RESET search_path")
    assert leaked_canaries(text) == []


def test_function_created_after_pgveil_read_its_catalog_is_still_checked(
    proxy: RunningProxy, world: GuardWorld
) -> None:
    # An administrator adds a helper directly in PostgreSQL while pgveil runs. pgveil refreshes its
    # catalog for unknown relations, not for unknown functions: the new function is unchecked.
    world.upstream.execute(
        "CREATE OR REPLACE FUNCTION redteam.late_peek(i integer) RETURNS text LANGUAGE sql STABLE "
        "AS 'SELECT ssn FROM gv.people WHERE id = i'; "
        "GRANT EXECUTE ON FUNCTION redteam.late_peek(integer) TO gv_analyst", dbname=DATABASE)
    with connect(proxy) as conn:
        assert leaked_canaries(received(conn, "select redteam.late_peek(1)")) == []


def test_view_replaced_after_pgveil_read_its_catalog_is_checked_against_its_new_definition(
    proxy: RunningProxy, world: GuardWorld
) -> None:
    with connect(proxy) as conn:
        assert "914" not in received(conn, "select * from gv.redteam_order_count")
        world.upstream.execute(
            "CREATE OR REPLACE VIEW gv.redteam_order_count AS SELECT o.person_id, count(*) AS orders, "
            "max(p.ssn) AS ssn FROM gv.orders o JOIN gv.people p ON p.id = o.person_id GROUP BY 1",
            dbname=DATABASE)
        assert leaked_canaries(received(conn, "select * from gv.redteam_order_count")) == []


def test_statement_prepared_over_a_view_is_not_replanned_over_a_new_definition_unchecked(
    proxy: RunningProxy, world: GuardWorld
) -> None:
    # Even a perfectly fresh catalog would not help here: PostgreSQL replans a prepared statement
    # when the view under it changes (same column types), and Bind/Execute are not judged again.
    query = "select * from gv.redteam_order_count2 order by person_id"
    with connect(proxy) as conn:
        before = conn.execute(query, prepare=True).fetchall()
        world.upstream.execute(
            "CREATE OR REPLACE VIEW gv.redteam_order_count2 AS SELECT p.id AS person_id, "
            "pg_catalog.replace(p.ssn, '-', '')::bigint AS orders FROM gv.people p", dbname=DATABASE)
        try:
            after = repr(conn.execute(query, prepare=True).fetchall())
        except psycopg.Error as exc:  # refused: what the client received is the error
            after = str(exc)
    assert before and leaked_canaries(after) == []


def test_function_replaced_after_pgveil_read_its_catalog_is_checked_against_its_new_body(
    proxy: RunningProxy, world: GuardWorld
) -> None:
    with connect(proxy) as conn:
        assert received(conn, "select redteam.order_count(1)").strip() == "2"
        world.upstream.execute(
            "CREATE OR REPLACE FUNCTION redteam.order_count(i integer) RETURNS text LANGUAGE sql STABLE "
            "AS 'SELECT ssn FROM gv.people WHERE id = i'", dbname=DATABASE)
        assert leaked_canaries(received(conn, "select redteam.order_count(1)")) == []


# ---- generalize on timestamptz truncates in the session's time zone -----------------------------


def test_generalized_timestamptz_does_not_depend_on_the_session_time_zone(proxy: RunningProxy) -> None:
    # date_trunc('month', seen_at) truncates in the session TimeZone, which any role may SET (up to
    # 167 hours east or west). Bisecting the offset at which the masked month flips recovers the
    # raw instant to the minute for every value within 7 days of a month boundary.
    with connect(proxy) as conn:
        def month_start(east_minutes: int) -> str:
            hours, minutes = divmod(east_minutes, 60)
            conn.execute(f"set timezone = 'XXX-{hours:02d}:{minutes:02d}'")
            value = conn.execute("select seen_at::text from gv.redteam_visits where id = 1").fetchone()
            assert value is not None
            return str(value[0])[:7]  # the month as the session's time zone writes it

        low, high = 0, 167 * 60
        recovered = None
        if month_start(low) != month_start(high):
            while high - low > 1:
                middle = (low + high) // 2
                if month_start(middle) == month_start(0):
                    low = middle
                else:
                    high = middle
            recovered = datetime(2024, 4, 1, tzinfo=UTC) - timedelta(minutes=high)
        conn.execute("reset timezone")
    assert recovered != datetime(2024, 3, 29, 17, 42, tzinfo=UTC), recovered  # the raw minute


def test_partial_mask_on_a_date_does_not_depend_on_the_session_datestyle(proxy: RunningProxy) -> None:
    # partial keep_first 4 on a date is meant to show the year ("1987******"). The mask works on
    # joined::text, which DateStyle writes day or month first.
    shown: dict[str, str] = {}
    with connect(proxy) as conn:
        for style in ("ISO, YMD", "SQL, DMY", "SQL, MDY"):
            conn.execute(f"set datestyle = '{style}'")
            row = conn.execute("select joined from gv.redteam_visits where id = 1").fetchone()
            assert row is not None
            shown[style] = row[0]
        conn.execute("reset datestyle")
    recovered = f"{shown['ISO, YMD'][:4]}-{shown['SQL, MDY'][:2]}-{shown['SQL, DMY'][:2]}"
    assert recovered != "1987-06-23", shown


# ---- state that outlives a policy reload ---------------------------------------------------------


@pytest.fixture
def demoted(world: GuardWorld, redteam_objects: None) -> Iterator[tuple[RunningProxy, str]]:
    """A proxy whose policy first gives gv_public the admin role (sees everything); `reload` with
    POLICY written back makes gv_public a masked login again."""
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


def test_reload_then_new_statements_are_masked(demoted: tuple[RunningProxy, str]) -> None:
    proxy, path = demoted
    with connect(proxy, "gv_public") as conn:
        assert "914-27-6380" in received(conn, "select ssn from gv.people where id = 1")
        _demote(proxy, path)
        assert leaked_canaries(received(conn, "select ssn from gv.people where id = 1")) == []


def test_protocol_prepared_statement_from_before_a_reload_does_not_return_raw_values_after(
    demoted: tuple[RunningProxy, str],
) -> None:
    proxy, path = demoted
    query = "select ssn from gv.people where id = %s"
    with connect(proxy, "gv_public") as conn:
        assert conn.execute(query, (1,), prepare=True).fetchall() == [("914-27-6380",)]
        _demote(proxy, path)
        try:  # Bind/Execute of the earlier Parse: refused as stale, or answered masked
            answer = repr(conn.execute(query, (1,), prepare=True).fetchall())
        except psycopg.errors.InsufficientPrivilege as refusal:
            answer = f"{refusal.diag.message_primary} {refusal.diag.message_detail} {refusal.diag.context}"
            assert "prepared-statement-stale" in answer
    assert leaked_canaries(answer) == []


def test_sql_prepare_from_before_a_reload_does_not_execute_raw_after(
    demoted: tuple[RunningProxy, str],
) -> None:
    proxy, path = demoted
    with connect(proxy, "gv_public") as conn:
        received(conn, "prepare redteam_before as select ssn from gv.people where id = 1")
        _demote(proxy, path)
        assert leaked_canaries(received(conn, "execute redteam_before")) == []


def test_cursor_with_hold_from_before_a_reload_does_not_fetch_raw_after(
    demoted: tuple[RunningProxy, str],
) -> None:
    proxy, path = demoted
    with connect(proxy, "gv_public") as conn:
        received(conn, "declare redteam_held cursor with hold for select ssn from gv.people order by id")
        _demote(proxy, path)
        assert leaked_canaries(received(conn, "fetch all from redteam_held")) == []


def test_search_path_set_with_set_config_before_a_reload_is_known_after(
    demoted: tuple[RunningProxy, str],
) -> None:
    # pgveil follows `SET search_path` of logins that see everything, not set_config(); after the
    # demotion it resolves leak_ssn() with the default path while PostgreSQL uses gv.
    proxy, path = demoted
    with connect(proxy, "gv_public") as conn:
        received(conn, "select set_config('search_path', 'gv', false)")
        _demote(proxy, path)
        assert leaked_canaries(received(conn, "select leak_ssn(1)")) == []


def test_client_encoding_set_before_a_reload_is_known_after(demoted: tuple[RunningProxy, str]) -> None:
    proxy, path = demoted
    with connect(proxy, "gv_public") as conn:
        received(conn, "set client_encoding = 'GBK'")
        _demote(proxy, path)
        assert leaked_canaries(received(conn, GBK_SWALLOWS_BACKSLASH)) == []
