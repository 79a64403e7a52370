"""Red team, round 2: injection shapes an `application: true` role in `injection: enforce` sends that
no firewall rule catches, and correlations on a `joinable: false` column that the lineage misses.

The verdicts are asked of pgveil's guard directly (the policy below over the catalog of the shared
canary database of tests/guard_setup.py), so heavy-query probes are judged without ever running
them. A couple of attacks also go through a running pgveil to show the oracle works end to end.

Every test asserts the SAFE behaviour (the statement is refused). A failing test is a hole;
docs/redteam.md, *Round 2*, lists them with the statements and where a fix belongs."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from proxy.guard.pipeline import guard
from proxy.guard.statement import GuardContext
from proxy.guard.verdict import Refuse, Verdict
from proxy.policy.loader import parse_policy
from proxy.policy.model import Policy
from tests import guard_setup
from tests.guard_setup import DATABASE, PASSWORD, GuardWorld
from tests.guard_setup import GuardDatabase as _GuardDatabase
from tests.proxy_harness import RunningProxy, running_proxy

world = guard_setup.world

# The canary policy, with the administrator turned into an application (everything revealed, so the
# firewall is all that stands between an injection and the data) and gv.orders.person_id and
# gv.people.ssn not joinable.
FIREWALL_POLICY = (
    guard_setup.POLICY
    .replace("  admin:\n    members: [gv_admin]\n",
             "  admin:\n    members: [gv_admin]\n    application: true\n    injection: enforce\n")
    .replace("      ssn:           {sensitivity: restricted, protection: hash}",
             "      ssn:           {sensitivity: restricted, protection: hash, joinable: false}")
    .replace("      person_id: {sensitivity: public}",
             "      person_id: {sensitivity: public, joinable: false}")
)
APPLICATION = "gv_admin"
Q = "select * from gv.orders where id = 10 "  # the application's query; the rest is injected


@pytest.fixture(scope="module")
def policy() -> Policy:
    parsed = parse_policy(FIREWALL_POLICY, "redteam2-firewall.yaml")
    assert parsed.role_for_user(APPLICATION) is not None
    return parsed


def verdict(world: GuardWorld, policy: Policy, sql: str, login: str = APPLICATION) -> Verdict:
    role = policy.role_for_user(login)
    assert role is not None
    context = GuardContext(policy=policy, role=role, catalog=world.catalog, user=login,
                           search_path=world.catalog.default_search_path(login, DATABASE))
    return guard(sql, context)


# ---- blocked: kept as regression tests ------------------------------------------------------------

BLOCKED_INJECTIONS = [
    Q + "or 1 <> 2",
    Q + "or 'a' || 'b' = 'ab'",
    Q + "or coalesce(null, true)",
    Q + "or 1::boolean",
    Q + "or int4eq(1, 1)",
    Q + "or 1 operator(pg_catalog.=) 1",
    Q + "or exists (select 1)",
    Q + "/* /* nested */ */ or id > 0",
    Q + "union select id, null, null, null from gv.people",
    Q + "and (select 1 from pg_catalog.pg_sleep(1)) is null",
    Q + "and (select pg_catalog.\"pg_sleep\"(0.1)) is null",
    Q + "and (select count(*) from \"generate_series\"(1, 100000000)) > 0",
    Q + "and length(repeat(md5('a'), 10000000)) > 0",
    Q + "and ((select ssn from gv.people where id = 2) || '')::int = 1",
    Q + "and numeric_in((select ssn from gv.people where id=2)::cstring, 0, -1) = 1",
    Q + "and (select substr(ssn, 1, 1) from gv.people where id = 2) = '1'",
    Q + "and (select ssn from gv.people where id = 2) ~ '^1'",
    Q + "and version() like 'P%'",
    "select * from gv.orders where id = 10; select ssn from gv.people",
    Q + "and amount < (case when (select ssn from gv.people where id = 2) "
    "like '1%' then (select count(*) from generate_series(1, 99999) a, generate_series(1, 9999) b) "
    "else 0 end)",
]


@pytest.mark.parametrize("sql", BLOCKED_INJECTIONS)
def test_known_injection_shapes_are_refused_for_an_application(world: GuardWorld, policy: Policy,
                                                               sql: str) -> None:
    assert isinstance(verdict(world, policy, sql), Refuse)


BLOCKED_CORRELATIONS = [
    "select a.id from gv.people a, gv.people b where md5(a.ssn) = md5(b.ssn)",
    "select a.id from gv.people a join gv.people b on a.ssn ^@ b.ssn",
    "select a.id from gv.people a join (select string_agg(ssn, ',') j from gv.people) b "
    "on position(a.ssn in b.j) > 0",
    "with recursive r(s) as (select ssn from gv.people union select ssn from gv.people) "
    "select 1 from r, gv.people b where r.s = b.ssn",
    "select p.id, sum(case when o.person_id = p.id then 1 else 0 end) from gv.people p, gv.orders o "
    "group by p.id",
    "select * from (select p.id a, o.person_id b from gv.people p, gv.orders o) s where a = b",
    "select id from gv.people intersect select person_id from gv.orders",
    "select a.id, b.id from gv.people a cross join gv.people b order by a.ssn = b.ssn desc",
    "select a.id, b.id from gv.people a, gv.people b, (select ssn from gv.people) c "
    "where c.ssn = a.ssn and c.ssn = b.ssn",
]


@pytest.mark.parametrize("sql", BLOCKED_CORRELATIONS)
def test_correlations_on_a_not_joinable_column_are_refused(world: GuardWorld, policy: Policy,
                                                           sql: str) -> None:
    result = verdict(world, policy, sql, "gv_analyst")
    assert isinstance(result, Refuse) and result.rule == "join-on-sensitive-key", result


# ---- holes --------------------------------------------------------------------------------------

# Boolean-blind inference of another customer's SSN, one character per request: the injected
# condition is true or false depending on the data, and the page shows a row or not.
BLIND_PROBES = {
    "starts_with": Q + "and starts_with((select ssn from gv.people where id = 2), '1')",
    "prefix operator": Q + "and (select ssn from gv.people where id = 2) ^@ '1'",
    "regexp_like": Q + "and regexp_like((select ssn from gv.people where id = 2), '^1')",
    "exists": Q + "and exists (select 1 from gv.people p where p.id = 2 "
              "and substr(p.ssn, 1, 1) = '1')",
    "in subquery": Q + "and person_id in (select 1 from gv.people "
                   "where id = 2 and ssn like '1%')",
    "correlated scalar": "select * from gv.orders o where id = 10 and (select substr(ssn, 1, 1) "
                         "from gv.people p where p.id = 2 and p.id <> o.id) = '1'",
    "jsonpath": Q + "and jsonb_path_exists((select to_jsonb(p) from gv.people p "
                "where id = 2), '$.ssn ? (@ starts with \"1\")')",
    "is not null": Q + "and (select ssn from gv.people where id = 2 "
                   "and ssn like '1%') is not null",
}


@pytest.mark.parametrize("name", sorted(BLIND_PROBES))
def test_boolean_blind_probe_on_another_table_is_refused(world: GuardWorld, policy: Policy,
                                                         name: str) -> None:
    assert isinstance(verdict(world, policy, BLIND_PROBES[name]), Refuse)


# `WHERE id = 10 OR <always true>`: the classic tautology, written so that it reads a column.
TAUTOLOGIES = {
    "untyped 't'": Q + "or 't'",
    "is not null": Q + "or id is not null",
    "not is null": Q + "or not (id is null)",
    "arithmetic self": Q + "or id = id + 0",
    "greater than -1": Q + "or id > -1",
    "like %": Q + "or id::text like '%'",
    "empty regex": Q + "or id::text ~ ''",
    "exists table": Q + "or exists (select 1 from gv.orders)",
    "array contains": Q + "or array[1] @> array[1]",
    "arithmetic self, other side": Q + "or id * 1 = id",
    "constant in uncorrelated subquery": Q + "or 1 in (select 1 from gv.orders)",
    "uncorrelated boolean subquery": Q + "or (select true from gv.orders limit 1)",
}


@pytest.mark.parametrize("name", sorted(TAUTOLOGIES))
def test_tautology_that_reads_a_column_is_refused(world: GuardWorld, policy: Policy, name: str) -> None:
    assert isinstance(verdict(world, policy, TAUTOLOGIES[name]), Refuse)


# UNION extraction with the column count matched by an aggregate instead of NULL padding.
UNIONS = {
    "string_agg": "select full_name from gv.people where id = 1 union all select string_agg(ssn, ',') "
                  "from gv.people",
    "row_to_json": "select full_name from gv.people where id = 1 union all select row_to_json(p)::text "
                   "from gv.people p",
    # the same without UNION: an uncorrelated scalar subquery injected into the select list
    "select-list subquery": "select *, (select string_agg(ssn, ',') from gv.people) from gv.orders "
                            "where id = 10",
}


@pytest.mark.parametrize("name", sorted(UNIONS))
def test_union_that_appends_another_columns_values_is_refused(world: GuardWorld, policy: Policy,
                                                              name: str) -> None:
    assert isinstance(verdict(world, policy, UNIONS[name]), Refuse)


# Heavy queries as a timing oracle (pg_sleep is caught; these are not). Never executed here.
HEAVY_QUERIES = {
    "cross join of series": Q + "and amount < (select count(*) from "
                            "generate_series(1, 99999) a, generate_series(1, 99999) b)",
    "array_fill": Q + "and amount < (select count(*) from "
                  "unnest(array_fill(1, array[100000000])))",
    "lpad": Q + "and amount < length(lpad('a', 1000000000))",
    "computed series bound": Q + "and amount < (select count(*) from "
                             "generate_series(1, 50000 * 1000))",
}


@pytest.mark.parametrize("name", sorted(HEAVY_QUERIES))
def test_heavy_query_timing_probe_is_refused(world: GuardWorld, policy: Policy, name: str) -> None:
    assert isinstance(verdict(world, policy, HEAVY_QUERIES[name]), Refuse)


# A third row source that carries no lineage (a series, VALUES, an array, a CTE over a series)
# equals both sides: a.key = g AND g = b.key is a.key = b.key.
TRANSITIVE_JOINS = {
    "generate_series": "select distinct p.id, o.id from gv.people p, gv.orders o, generate_series(1, 10) g "
                       "where g = o.person_id and g = p.id",
    "values": "select p.id, o.id from gv.people p, gv.orders o, (values (1), (2), (3), (4)) v(k) "
              "where v.k = o.person_id and v.k = p.id",
    "unnest": "select p.id, o.id from gv.people p, gv.orders o, unnest(array[1, 2, 3, 4]) k "
              "where k = o.person_id and k = p.id",
    "join on": "select p.id, o.id from gv.people p join generate_series(1, 10) g on g = p.id "
               "join gv.orders o on o.person_id = g",
    "cte": "with k as (select generate_series(1, 10) as k) "
           "select p.id, o.id from gv.people p, gv.orders o, k where k.k = o.person_id and k.k = p.id",
    "ssn through literals": "select a.id, b.id from gv.people a, gv.people b, "
                            "unnest(array['914-27-6380', '111-11-1111']) s where s = a.ssn and s = b.ssn",
}


@pytest.mark.parametrize("name", sorted(TRANSITIVE_JOINS))
def test_join_through_a_third_row_source_is_refused(world: GuardWorld, policy: Policy, name: str) -> None:
    result = verdict(world, policy, TRANSITIVE_JOINS[name], "gv_analyst")
    assert isinstance(result, Refuse), result


# ---- end to end: the blind oracle through a running pgveil ---------------------------------------


@pytest.fixture(scope="module")
def proxy(world: GuardWorld) -> Iterator[RunningProxy]:
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "policy.yaml")
        with open(path, "w") as handle:
            handle.write(FIREWALL_POLICY)
        with running_proxy(_GuardDatabase(world), path) as running:
            yield running


def _rows_or_refusal(proxy: RunningProxy, sql: str) -> Any:
    with psycopg.connect(proxy.dsn(APPLICATION, PASSWORD, DATABASE), autocommit=True) as conn:
        try:
            return conn.execute(sql.encode()).fetchall()
        except psycopg.Error as exc:
            return exc.sqlstate


def test_application_cannot_read_another_customers_ssn_one_character_at_a_time(proxy: RunningProxy) -> None:
    probe = ("select id from gv.orders where id = 10 and starts_with((select ssn from gv.people "
             "where id = 1), '{prefix}')")
    answers = {prefix: _rows_or_refusal(proxy, probe.format(prefix=prefix)) for prefix in ("9", "8")}
    assert answers == {"9": "42501", "8": "42501"}, f"the oracle answers: {answers}"


def test_application_tautology_with_an_untyped_literal_is_refused_by_the_proxy(proxy: RunningProxy) -> None:
    assert _rows_or_refusal(proxy, "select id from gv.orders where id = 10 or 't'") == "42501"


# ---- the table allow-list of a role that sees its tables raw ----------------------------------

# A role that may read gv.orders only, unmasked (what an application or a support role looks like).
# The table allow-list is its only restriction; the checks for functions and side doors apply to
# masked roles only.
NARROW_POLICY = guard_setup.POLICY.replace(
    '  admin:\n    members: [gv_admin]\n    statements: [all]\n    tables: ["*"]\n',
    '  admin:\n    members: [gv_admin]\n    statements: [select]\n    tables: ["gv.orders"]\n')

OTHER_TABLE_READS = {
    "function": "select gv.leak_ssn(1)",
    "ts_stat": "select string_agg(word, ',') from ts_stat('select to_tsvector(''simple'', "
               "replace(ssn, ''-'', '''')) from gv.people')",
    "ts_rewrite": "select ts_rewrite(to_tsquery('simple', 'a'), 'select to_tsquery(''simple'', ''a''), "
                  "to_tsquery(''simple'', replace(ssn, ''-'', '''')) from gv.people where id = 1')",
    "dynamic sql function": "select gv.dyn('select count(*) from gv.people where ssn like ''9%''')",
    "query_to_xml": "select query_to_xml('select ssn from gv.people', true, true, '')",
}


@pytest.mark.parametrize("name", sorted(OTHER_TABLE_READS))
def test_role_limited_to_one_table_cannot_read_another_through_functions(world: GuardWorld,
                                                                          name: str) -> None:
    narrow = parse_policy(NARROW_POLICY, "redteam2-narrow.yaml")
    assert "gv.orders" in str(narrow.role_for_user("gv_admin"))
    assert isinstance(verdict(world, narrow, "select ssn from gv.people"), Refuse)
    assert isinstance(verdict(world, narrow, OTHER_TABLE_READS[name]), Refuse)
