"""The catalog reads code as PostgreSQL runs it: function bodies parsed (SQL and PL/pgSQL), user
operators, casts and domain checks with the functions they run, and a change marker that moves
whenever a definition changes in PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from proxy.catalog import CatalogSnapshot, load_catalog
from proxy.catalog_watch import CatalogWatch
from proxy.guard.pipeline import guard
from proxy.guard.statement import GuardContext
from proxy.guard.verdict import Refuse
from proxy.policy.loader import parse_policy
from proxy.upstream_setup import install_catalog_watch
from tests.conftest import Upstream

DATABASE = "catcode_test"

SCHEMA = r"""
CREATE SCHEMA cc;
CREATE TABLE cc.people (id integer, ssn text);
CREATE TABLE cc.notes (id integer, body text);
CREATE VIEW cc.people_view AS SELECT id, ssn FROM cc.people;
CREATE FUNCTION cc.assigned(i integer) RETURNS text LANGUAGE plpgsql AS $$
DECLARE x text; BEGIN x := (SELECT ssn FROM cc.U&"p\0065ople" WHERE id = i); RETURN x; END $$;
CREATE FUNCTION cc.dynamic(i integer) RETURNS SETOF text LANGUAGE plpgsql AS $$
BEGIN RETURN QUERY EXECUTE 'SELECT body FROM cc.notes'; END $$;
CREATE FUNCTION cc.stats() RETURNS text LANGUAGE sql AS
    $$SELECT string_agg(word, ',') FROM ts_stat('SELECT to_tsvector(body) FROM cc.no' || 'tes')$$;
CREATE FUNCTION cc.harmless(i integer) RETURNS integer LANGUAGE sql IMMUTABLE AS 'SELECT i + 1';
CREATE FUNCTION cc.peek(i integer, j integer) RETURNS text LANGUAGE sql STABLE
    AS 'SELECT ssn FROM cc.people_view WHERE id = i';
CREATE OPERATOR cc.##> (LEFTARG = integer, RIGHTARG = integer, FUNCTION = cc.peek);
CREATE TYPE cc.ref AS (id integer);
CREATE FUNCTION cc.ref_ssn(r cc.ref) RETURNS text LANGUAGE sql STABLE
    AS 'SELECT ssn FROM cc.people WHERE id = r.id';
CREATE CAST (cc.ref AS text) WITH FUNCTION cc.ref_ssn(cc.ref);
CREATE FUNCTION cc.positive(i integer) RETURNS boolean LANGUAGE sql STABLE
    AS 'SELECT (SELECT ssn FROM cc.people WHERE id = i)::integer > 0';
CREATE DOMAIN cc.checked AS integer CHECK (cc.positive(VALUE));
CREATE DOMAIN cc.checked_again AS cc.checked;
-- an opaque `=` over a type of its own, as extensions (citext, ...) overload it with C functions
CREATE TYPE cc.tag AS (t text);
CREATE FUNCTION cc.tag_eq(a cc.tag, b cc.tag) RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE r boolean; BEGIN EXECUTE 'SELECT $1 = $2' INTO r USING a.t, b.t; RETURN r; END $$;
CREATE OPERATOR cc.= (LEFTARG = cc.tag, RIGHTARG = cc.tag, FUNCTION = cc.tag_eq);
-- a cast in C, as extension types have (never run here: the guard only judges it)
CREATE TYPE cc.label AS (t text);
CREATE FUNCTION cc.label_text(cc.label) RETURNS text LANGUAGE internal IMMUTABLE STRICT AS 'textin';
CREATE CAST (cc.label AS text) WITH FUNCTION cc.label_text(cc.label);
CREATE TABLE cc.labelled (id integer, l cc.label);
-- a table whose default and CHECK call a function that reads the masked table
CREATE TABLE cc.tickets (id integer CHECK (cc.positive(id)), who text DEFAULT cc.assigned(1));
"""

POLICY = """
version: 1
roles:
  reader:
    members: [cc_reader]
    statements: [select, insert]
    tables: ["cc.*"]
    reveal: [public]
datasets:
  cc.people:
    columns:
      id:  {sensitivity: public}
      ssn: {sensitivity: restricted, protection: redact}
"""


@pytest.fixture(scope="module")
def catcode_db(upstream: Upstream) -> Iterator[str]:
    upstream.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
    upstream.execute(f"CREATE DATABASE {DATABASE}")
    upstream.execute(SCHEMA, dbname=DATABASE)
    yield upstream.dsn(dbname=DATABASE)
    upstream.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")


@pytest.fixture(scope="module")
def catalog(catcode_db: str) -> CatalogSnapshot:
    return asyncio.run(load_catalog(catcode_db))


def judged(catalog: CatalogSnapshot, sql: str) -> str:
    """The rule that refuses `sql` for the masked role, or 'allowed'."""
    policy = parse_policy(POLICY)
    context = GuardContext(policy=policy, role=policy.roles["reader"], catalog=catalog, user="cc_reader",
                           search_path=("cc_reader", "public"))
    verdict = guard(sql, context)
    return verdict.rule if isinstance(verdict, Refuse) else "allowed"


def test_plpgsql_assignment_reads_a_unicode_escaped_relation_name(catalog: CatalogSnapshot) -> None:
    function = catalog.functions["cc.assigned"]
    assert "cc.people" in function.reads and not function.opaque_body


def test_return_query_execute_and_side_door_calls_make_a_body_opaque(catalog: CatalogSnapshot) -> None:
    assert catalog.functions["cc.dynamic"].opaque_body
    assert catalog.functions["cc.stats"].opaque_body
    assert not catalog.functions["cc.harmless"].opaque_body and not catalog.functions["cc.harmless"].reads


def test_operators_casts_and_domains_know_the_user_functions_they_run(catalog: CatalogSnapshot) -> None:
    assert catalog.operators[("cc", "##>")] == ("cc.peek",)
    assert catalog.casts["cc.ref"] == ("cc.ref_ssn",) and "pg_catalog.text" not in catalog.casts
    assert catalog.domains["cc.checked"] == ("cc.positive",)
    assert catalog.domains["cc.checked_again"] == ("cc.positive",)  # the base domain's check runs too


def test_a_function_reading_a_view_over_a_masked_table_is_refused(catalog: CatalogSnapshot) -> None:
    assert judged(catalog, "select cc.peek(1, 0)") == "unlisted-function"


def test_operator_cast_domain_and_field_selection_reach_the_function_rule(catalog: CatalogSnapshot) -> None:
    assert judged(catalog, "select 1 operator(cc.##>) 0") == "unlisted-function"
    assert judged(catalog, "select 1 where 1 operator(cc.##>) any (select 0)") == "unlisted-function"
    assert judged(catalog, "select id from cc.notes order by id using operator(cc.##>)") == (
        "unlisted-function")
    assert judged(catalog, "select row(1)::cc.ref::text") == "unlisted-function"
    assert judged(catalog, "select 1::cc.checked_again") == "unlisted-function"
    assert judged(catalog, "select (p).assigned from cc.notes p") == "allowed"  # no such function on the path
    assert judged(catalog, "select (n).harmless from cc.notes n") == "allowed"


def test_writing_a_table_whose_default_or_check_reads_a_masked_table_is_refused(
        catalog: CatalogSnapshot) -> None:
    assert set(catalog.write_code["cc.tickets"]) == {"cc.positive", "cc.assigned"}
    assert judged(catalog, "select id from cc.tickets") == "allowed"
    assert judged(catalog, "insert into cc.tickets (id) values (1) returning who") == "unlisted-function"


def test_ordinary_casts_and_builtin_operator_symbols_stay_allowed(catalog: CatalogSnapshot) -> None:
    # a user cast from a user type to text does not make every ::text suspect; a user `=` with an
    # opaque function does not make every `=` suspect (only one known to read relations would)
    assert judged(catalog, "select id::text, id = 1, 'a' || 'b' from cc.notes") == "allowed"


def test_a_compiled_cast_of_a_column_type_is_not_opaque_unless_called_by_name(
        catalog: CatalogSnapshot) -> None:
    assert catalog.casts["cc.label"] == ("cc.label_text",)
    assert judged(catalog, "select id, l::text from cc.labelled") == "allowed"
    assert judged(catalog, "select cc.label_text(l) from cc.labelled") == "unlisted-function"


def test_a_function_the_catalog_does_not_know_is_refused(catalog: CatalogSnapshot) -> None:
    assert judged(catalog, "select cc.nowhere(1)") == "unknown-function"
    assert judged(catalog, "select nowhere(1)") == "unknown-function"
    assert judged(catalog, "select pg_catalog.lower('A'), upper('a'), now()") == "allowed"


def test_the_change_marker_moves_when_a_function_is_replaced_without_the_event_trigger(
        catcode_db: str, upstream: Upstream) -> None:
    watch = CatalogWatch(catcode_db)

    async def markers() -> tuple[str, list[str], str]:
        try:
            first = await watch.marker()
            together = await asyncio.gather(*(watch.marker() for _ in range(4)))
            upstream.execute("CREATE OR REPLACE FUNCTION cc.harmless(i integer) RETURNS integer "
                             "LANGUAGE sql IMMUTABLE AS 'SELECT i + 2'", dbname=DATABASE)
            return first, list(together), await watch.marker()
        finally:
            await watch.close()

    first, together, after = asyncio.run(markers())
    assert first.startswith("rows:") and set(together) == {first} and after != first


def test_with_the_event_trigger_the_marker_is_the_ddl_log_read_in_the_catalog_snapshot(
        catcode_db: str, upstream: Upstream) -> None:
    assert asyncio.run(install_catalog_watch(catcode_db)) is True
    assert asyncio.run(install_catalog_watch(catcode_db)) is True  # idempotent
    before = asyncio.run(load_catalog(catcode_db))
    assert before.change_marker.startswith("ddl:")
    upstream.execute("CREATE OR REPLACE VIEW cc.people_view AS SELECT id, ssn, 1 AS one FROM cc.people",
                     dbname=DATABASE)
    after = asyncio.run(load_catalog(catcode_db))
    assert after.change_marker != before.change_marker
    assert [c.name for c in after.relations["cc.people_view"].columns] == ["id", "ssn", "one"]
    upstream.execute("CREATE TEMPORARY TABLE cc_scratch (x integer); DROP TABLE cc_scratch", dbname=DATABASE)
    assert asyncio.run(load_catalog(catcode_db)).change_marker == after.change_marker  # not for temp objects
    upstream.execute("ALTER DATABASE catcode_test SET work_mem = '8MB'")  # no event trigger fires
    assert asyncio.run(load_catalog(catcode_db)).change_marker != after.change_marker


def test_a_login_that_may_not_create_event_triggers_installs_nothing(
        catcode_db: str, upstream: Upstream) -> None:
    upstream.execute("DROP ROLE IF EXISTS cc_plain; CREATE ROLE cc_plain LOGIN PASSWORD 'plain'")
    try:
        assert asyncio.run(install_catalog_watch(upstream.dsn("cc_plain", "plain", DATABASE))) is False
        # the log is not readable for it: its catalog falls back to the fingerprint
        plain = asyncio.run(load_catalog(upstream.dsn("cc_plain", "plain", DATABASE)))
        assert plain.change_marker.startswith("rows:")
    finally:
        upstream.execute("DROP ROLE IF EXISTS cc_plain")
