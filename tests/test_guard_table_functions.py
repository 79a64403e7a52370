"""A role limited to some tables (`tables` other than `*`), even one that sees every column
unmasked, reads through functions only what its allow-list allows: user functions whose bodies read
other relations, opaque bodies, SQL given as text and the fast-path FunctionCall message are
refused; functions over its own tables, views it may use and functions listed under `datasets` run.

Verdicts are asked of the guard over a catalog of the shared canary database (tests/guard_setup.py)
with this module's functions in schema `tblfn`; a few cases go through a running pgveil to show the
catalog is kept current for such a role as it is for a masked one."""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from proxy.catalog import CatalogSnapshot, load_catalog
from proxy.guard.pipeline import guard
from proxy.guard.statement import GuardContext
from proxy.guard.verdict import Refuse, Verdict
from proxy.policy.loader import parse_policy
from proxy.policy.model import Policy
from proxy.wire import FunctionCall
from tests import guard_setup
from tests.guard_setup import DATABASE, PASSWORD, GuardWorld, leaked_canaries
from tests.guard_setup import GuardDatabase as _GuardDatabase
from tests.proxy_harness import RunningProxy, running_proxy
from tests.test_redteam_protocol import MaskedClient, everything

world = guard_setup.world

LOGIN = "gv_admin"  # reveals every sensitivity: no masked column, only the table allow-list limits it
ADMIN = '  admin:\n    members: [gv_admin]\n    statements: [all]\n    tables: ["*"]\n'


def narrowed(tables: str, listed_function: str | None = None) -> str:
    """The canary policy with the administrator limited to `tables` (a YAML flow list)."""
    text = guard_setup.POLICY.replace(
        ADMIN, f"  admin:\n    members: [gv_admin]\n    statements: [select]\n    tables: {tables}\n")
    assert text != guard_setup.POLICY
    if listed_function is not None:
        text += f"  {listed_function}:\n    description: reviewed; may run for every role\n"
    return text


ORDERS_ONLY = narrowed('["gv.orders"]')

FUNCTIONS = """
DROP SCHEMA IF EXISTS tblfn CASCADE;
CREATE SCHEMA tblfn;
GRANT USAGE ON SCHEMA tblfn TO gv_admin;
CREATE FUNCTION tblfn.order_amount(i integer) RETURNS numeric LANGUAGE sql STABLE
    AS 'SELECT amount FROM gv.orders WHERE id = i';
CREATE FUNCTION tblfn.total_of(i integer) RETURNS numeric LANGUAGE sql STABLE
    AS 'SELECT total FROM gv.order_totals WHERE person_id = i';
CREATE FUNCTION tblfn.replaced_later(i integer) RETURNS text LANGUAGE sql STABLE
    AS 'SELECT amount::text FROM gv.orders WHERE id = i';
DROP FUNCTION IF EXISTS public.tblfn_person_ssn(gv.orders);
CREATE FUNCTION public.tblfn_person_ssn(o gv.orders) RETURNS text LANGUAGE sql STABLE
    AS 'SELECT ssn FROM gv.people WHERE id = o.person_id';
CREATE FUNCTION tblfn.plpgsql_amount(i integer) RETURNS numeric LANGUAGE plpgsql STABLE AS $$
BEGIN RETURN (SELECT amount FROM gv.orders WHERE id = i); END $$;
"""


@pytest.fixture(scope="module")
def catalog(world: GuardWorld) -> CatalogSnapshot:
    world.upstream.execute(FUNCTIONS, dbname=DATABASE)
    return asyncio.run(load_catalog(world.dsn()))


def verdict(catalog: CatalogSnapshot, policy_text: str, sql: str) -> Verdict:
    policy: Policy = parse_policy(policy_text, "table-functions.yaml")
    role = policy.role_for_user(LOGIN)
    assert role is not None
    context = GuardContext(policy=policy, role=role, catalog=catalog, user=LOGIN,
                           search_path=catalog.default_search_path(LOGIN, DATABASE))
    return guard(sql, context)


def refusal(catalog: CatalogSnapshot, policy_text: str, sql: str) -> Refuse:
    result = verdict(catalog, policy_text, sql)
    assert isinstance(result, Refuse), result
    return result


# ---- the guard ---------------------------------------------------------------------------------


def test_function_whose_body_reads_another_table_is_refused_naming_both(catalog: CatalogSnapshot) -> None:
    refused = refusal(catalog, ORDERS_ONLY, "select gv.leak_ssn(1)")
    assert refused.rule == "table-not-allowed"
    assert "gv.leak_ssn()" in refused.message and "gv.people" in refused.message


def test_function_reached_as_functional_notation_is_refused_too(catalog: CatalogSnapshot) -> None:
    # o.tblfn_person_ssn is tblfn_person_ssn(o), found on the search_path (public)
    for sql in ("select o.tblfn_person_ssn from gv.orders o", "select (o).tblfn_person_ssn from gv.orders o"):
        assert refusal(catalog, ORDERS_ONLY, sql).rule == "table-not-allowed", sql


def test_function_whose_body_reads_only_allowed_tables_runs(catalog: CatalogSnapshot) -> None:
    for sql in ("select tblfn.order_amount(10)", "select tblfn.plpgsql_amount(10)",
                "select id, tblfn.order_amount(id) from gv.orders",
                "select gv.add_one(1), upper('a'), now()"):
        assert not isinstance(verdict(catalog, ORDERS_ONLY, sql), Refuse), sql


def test_function_over_a_view_follows_the_view_as_a_from_clause_would(catalog: CatalogSnapshot) -> None:
    # gv.order_totals reads gv.orders: allowed only when the view itself is in the allow-list
    assert refusal(catalog, ORDERS_ONLY, "select tblfn.total_of(1)").rule == "table-not-allowed"
    view_only = narrowed('["gv.order_totals"]')
    assert not isinstance(verdict(catalog, view_only, "select tblfn.total_of(1)"), Refuse)


def test_function_with_dynamic_sql_is_refused(catalog: CatalogSnapshot) -> None:
    refused = refusal(catalog, ORDERS_ONLY, "select gv.dyn('select count(*) from gv.orders')")
    assert refused.rule == "unlisted-function" and "gv.dyn()" in refused.message


@pytest.mark.parametrize("sql", [
    "select * from ts_stat('select to_tsvector(''simple'', full_name) from gv.people')",
    "select query_to_xml('select ssn from gv.people', true, true, '')",
    "select table_to_xml('gv.people', true, true, '')",
    "select lo_get(16400)",
])
def test_functions_that_run_sql_text_or_read_whole_tables_are_refused(catalog: CatalogSnapshot,
                                                                     sql: str) -> None:
    assert refusal(catalog, ORDERS_ONLY, sql).rule == "side-door-function"


@pytest.mark.parametrize("sql", [
    "select most_common_vals::text from pg_stats where tablename = 'people'",
    "select stavalues1::text from pg_catalog.pg_statistic",
])
def test_catalogs_that_hold_other_tables_values_are_refused(catalog: CatalogSnapshot, sql: str) -> None:
    assert refusal(catalog, ORDERS_ONLY, sql).rule == "value-exposing-catalog"


def test_code_blocks_and_definitions_are_refused_even_with_every_statement_class(
    catalog: CatalogSnapshot,
) -> None:
    every_class = ORDERS_ONLY.replace("    statements: [select]\n    tables: [\"gv.orders\"]",
                                      "    statements: [all]\n    tables: [\"gv.orders\"]")
    assert every_class != ORDERS_ONLY
    for sql in ("do $$ begin perform ssn from gv.people; end $$",
                "create function tblfn.f() returns text language sql as 'select ssn from gv.people'",
                "create trigger t after insert on gv.orders execute function tblfn.order_amount()"):
        assert refusal(catalog, every_class, sql).rule == "procedural-code", sql
    assert not isinstance(verdict(catalog, every_class, "create index on gv.orders (placed)"), Refuse)


def test_function_listed_under_datasets_runs(catalog: CatalogSnapshot) -> None:
    listed = narrowed('["gv.orders"]', listed_function="gv.leak_ssn")
    assert not isinstance(verdict(catalog, listed, "select gv.leak_ssn(1)"), Refuse)


def test_role_allowed_every_table_is_not_limited(catalog: CatalogSnapshot) -> None:
    for tables in ('["*"]', '["*.*"]'):
        for sql in ("select gv.leak_ssn(1)", "select gv.dyn('select 1::bigint')"):
            assert not isinstance(verdict(catalog, narrowed(tables), sql), Refuse), (tables, sql)


def test_function_name_pgveil_does_not_know_is_refused(catalog: CatalogSnapshot) -> None:
    assert refusal(catalog, ORDERS_ONLY, "select tblfn.no_such_function(1)").rule == "unknown-function"


# ---- through a running pgveil -------------------------------------------------------------------


@pytest.fixture(scope="module")
def proxy(world: GuardWorld, catalog: CatalogSnapshot) -> Iterator[RunningProxy]:
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "policy.yaml")
        with open(path, "w") as handle:
            handle.write(ORDERS_ONLY)
        with running_proxy(_GuardDatabase(world), path) as running:
            yield running


def _answer(conn: psycopg.Connection[Any], sql: str) -> str:
    try:
        return repr(conn.execute(sql.encode()).fetchall())
    except psycopg.Error as exc:
        return f"{exc.sqlstate}: {exc}"


def test_function_replaced_after_pgveil_read_the_catalog_is_judged_by_its_new_body(
    proxy: RunningProxy, world: GuardWorld
) -> None:
    with psycopg.connect(proxy.dsn(LOGIN, PASSWORD, DATABASE), autocommit=True) as conn:
        assert _answer(conn, "select tblfn.replaced_later(10)") == "[('20.00',)]"
        world.upstream.execute(
            "CREATE OR REPLACE FUNCTION tblfn.replaced_later(i integer) RETURNS text LANGUAGE sql STABLE "
            "AS 'SELECT ssn FROM gv.people WHERE id = i'", dbname=DATABASE)
        answer = _answer(conn, "select tblfn.replaced_later(1)")
        assert leaked_canaries(answer) == [] and "table-not-allowed" in answer, answer


def test_function_created_after_pgveil_read_the_catalog_can_be_called(
    proxy: RunningProxy, world: GuardWorld
) -> None:
    world.upstream.execute(
        "CREATE FUNCTION tblfn.created_later(i integer) RETURNS integer LANGUAGE sql STABLE "
        "AS 'SELECT person_id FROM gv.orders WHERE id = i'", dbname=DATABASE)
    with psycopg.connect(proxy.dsn(LOGIN, PASSWORD, DATABASE), autocommit=True) as conn:
        assert _answer(conn, "select tblfn.created_later(10)") == "[(1,)]"


def test_function_call_message_is_refused(proxy: RunningProxy, world: GuardWorld) -> None:
    row = world.run("select 'gv.leak_ssn'::regproc::oid", login=LOGIN).rows[0]
    client = MaskedClient(proxy.host, proxy.port, LOGIN)
    try:
        client.send(FunctionCall(int(row[0]), (0,), (b"1",), 0))
        text = everything(client.until_ready())
        assert "function-call-message" in text and leaked_canaries(text) == []
    finally:
        client.close()
