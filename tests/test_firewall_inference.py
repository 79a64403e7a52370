"""Injection rules that read the catalog and the policy: blind-inference probes on confidential columns
(`inference-probe`), tautologies that read a column (NOT NULL, widening ORs, match-all patterns) and
heavy-query timing probes, over the canary database of tests/guard_setup.py. Verdicts come from the
guard itself; nothing here is executed."""

from __future__ import annotations

import pytest

from proxy.guard.pipeline import guard
from proxy.guard.statement import GuardContext
from proxy.guard.verdict import Refuse, Verdict
from proxy.policy.loader import parse_policy
from proxy.policy.model import Policy
from tests import guard_setup
from tests.guard_setup import DATABASE, GuardWorld

world = guard_setup.world

# The canary policy with the administrator as an application that sees everything: only the
# firewall stands between an injection and the data.
APPLICATION_POLICY = guard_setup.POLICY.replace(
    "  admin:\n    members: [gv_admin]\n",
    "  admin:\n    members: [gv_admin]\n    application: true\n    injection: enforce\n")
APPLICATION = "gv_admin"


@pytest.fixture(scope="module")
def policy() -> Policy:
    return parse_policy(APPLICATION_POLICY, "firewall-inference.yaml")


def verdict(world: GuardWorld, policy: Policy, sql: str, login: str = APPLICATION) -> Verdict:
    role = policy.role_for_user(login)
    assert role is not None
    context = GuardContext(policy=policy, role=role, catalog=world.catalog, user=login,
                           search_path=world.catalog.default_search_path(login, DATABASE))
    return guard(sql, context)


def rule_of(result: Verdict) -> str | None:
    return result.rule if isinstance(result, Refuse) else None


Q = "select * from gv.orders o where o.id = 10 "

PROBES = {
    "through a CTE": "with s as (select ssn from gv.people where id = 2) " + Q
                     + "and exists (select 1 from s where s.ssn like '1%')",
    "through a user function": Q + "and starts_with(gv.leak_ssn(2), '1')",
    "in ORDER BY": "select * from gv.orders o order by (select ssn from gv.people p "
                   "where p.id = o.person_id) ^@ '1'",
    "ANY over a subquery": Q + "and '1' = any (select substr(ssn, 1, 1) from gv.people where id = 2)",
    "CASE on a subquery": Q + "and o.amount > case (select substr(ssn, 1, 1) from gv.people p "
                          "where p.id = o.person_id) when '1' then 0 else 1000 end",
    "aggregate of one row": Q + "and (select max(salary) from gv.people p where p.id = o.person_id) > 50000",
    "whole row as text": Q + "and exists (select 1 from gv.people p where id = 2 and p::text like '%914%')",
    "in a select-list subquery": "select (select count(*) from gv.people where ssn like '9%') from gv.orders",
    "renamed in a derived table": Q + "and exists (select 1 from (select id, ssn as x from gv.people) t "
                                  "where t.id = 2 and t.x like '1%')",
    "renamed by a CTE's column list": "with s(k, x) as (select id, ssn from gv.people) " + Q
                                      + "and exists (select 1 from s where s.k = 2 and s.x like '1%')",
    "guess from a subquery": Q + "and exists (select 1 from gv.people p where p.id = 2 "
                             "and left(p.ssn, 1) = (select '1'))",
}


APPENDED = {
    "UNION branch returning another column": "select full_name from gv.people where id = 1 union all "
                                             "select max(email) from gv.people",
    "UNION branch returning a whole row": "select id::text from gv.orders union all "
                                          "select p::text from gv.people p",
    "select-list array subquery": "select o.*, array(select card from gv.people) from gv.orders o",
}


@pytest.mark.parametrize("name", sorted(APPENDED))
def test_appending_another_tables_confidential_values_is_union_extraction(world: GuardWorld, policy: Policy,
                                                                          name: str) -> None:
    assert rule_of(verdict(world, policy, APPENDED[name])) == "union-extraction"


@pytest.mark.parametrize("name", sorted(PROBES))
def test_subquery_testing_a_confidential_column_against_a_constant_is_an_inference_probe(
        world: GuardWorld, policy: Policy, name: str) -> None:
    assert rule_of(verdict(world, policy, PROBES[name])) == "inference-probe"


ORDINARY_APPLICATION_SQL = {
    "parameter in a subquery": "select * from gv.orders where person_id in "
                               "(select id from gv.people where email = $1)",
    "sensitive value returned, not tested": "select o.id, (select p.ssn from gv.people p "
                                            "where p.id = o.person_id) from gv.orders o where o.id = 10",
    "the query's own filter": "select id from gv.people where ssn like '1%'",
    "subquery filtering a public column": Q + "and exists (select 1 from gv.people p "
                                          "where p.region = 'north' and p.id = o.person_id)",
    "an OR that does not widen": Q + "or o.id = 11",
    "IS NULL": Q + "or o.person_id is null",
    "IS NOT NULL of a nullable column": Q + "or o.person_id is not null",
    "IS NOT NULL on the outer side of a LEFT JOIN":
        "select o.id from gv.orders o left join gv.people p on p.id = o.person_id "
        "where o.id = 10 or p.id is not null",
    "EXISTS with a parameter": Q + "or exists (select 1 from gv.people where region = $1)",
    "small cross join of series": "select count(*) from generate_series(1, 100) a, generate_series(1, 100) b",
    "series with a step": "select * from generate_series(0, 1000000, 1000)",
    "short lpad": "select lpad(id::text, 8, '0') from gv.orders",
    "a series in a derived table with a small limit": "select * from (select generate_series(1, 50000) "
                                                      "limit 10) a, generate_series(1, 1000) b",
    "a short recursive CTE": "with recursive r(n) as (select 1 union all select n + 1 from r where n < 100) "
                             "select * from r",
    "a LIKE pattern that filters": Q + "or o.placed::text like '2024-%'",
    "two disjoint ranges": Q + "or o.amount < 5 or o.amount > 100",
    "a length that filters": Q + "or length(o.placed::text) > 10",
    "UNION of the same column": "select email from gv.people where id = 1 union select email from gv.people "
                                "where region = $1",
    "select-list count of another table": "select o.*, (select count(*) from gv.people) from gv.orders o",
    "select-list average of the same table": "select p.id, p.salary, (select avg(salary) from gv.people) "
                                             "from gv.people p",
}


@pytest.mark.parametrize("name", sorted(ORDINARY_APPLICATION_SQL))
def test_ordinary_application_sql_passes_the_injection_rules(world: GuardWorld, policy: Policy,
                                                             name: str) -> None:
    assert not isinstance(verdict(world, policy, ORDINARY_APPLICATION_SQL[name]), Refuse)


TAUTOLOGIES = {
    "IS NOT NULL of a qualified NOT NULL column": Q + "or o.id is not null",
    "a subtracted constant": Q + "and o.id = o.id - 1",
    "a constant added in front": Q + "or o.id <= 5 + o.id",
    "a wider inequality": Q + "or o.id <> 11",
    "a wider string inequality": "select * from gv.people where region = 'north' or region != 'x'",
    "ILIKE of percent signs": Q + "or o.placed::text ilike '%%'",
    "SIMILAR TO everything": Q + "or o.placed::text similar to '%'",
    "NOT EXISTS of a table": Q + "or not exists (select 1 from gv.people)",
    "EXISTS with a constant condition": Q + "or exists (select 1 from gv.people where region = 'north')",
    "untyped literal under AND": Q + "and 'yes'",
    "constant containment": Q + "or '{1,2}'::int[] && '{2}'::int[]",
    "a value and its complement": Q + "or o.person_id = 3 or o.person_id <> 3",
    "two rays that meet": Q + "or o.amount < 5 or o.amount >= 5",
    "an inequality inside a ray": Q + "or o.amount <> 5 or o.amount > 3",
    "a length that is never negative": Q + "or length(o.placed::text) >= 0",
    "NULL or not NULL": Q + "or o.person_id is null or not (o.person_id is null)",
}


@pytest.mark.parametrize("name", sorted(TAUTOLOGIES))
def test_tautology_variants_are_refused_for_every_role(world: GuardWorld, policy: Policy, name: str) -> None:
    assert rule_of(verdict(world, policy, TAUTOLOGIES[name], "gv_writer")) == "tautology"


HEAVY = {
    "series bound as a power": Q + "and amount < (select count(*) from generate_series(1, 10 ^ 9))",
    "rpad": Q + "and amount < length(rpad('a', 500000000, 'b'))",
    "JOIN of series": Q + "and amount < (select count(*) from generate_series(1, 9999) a "
                      "join generate_series(1, 9999) b on true)",
    "ROWS FROM": Q + "and amount < (select count(*) from rows from (generate_series(1, 9999)) a, "
                 "unnest(array_fill(0, '{9999}')) b)",
    "repeat with a computed count": Q + "and length(repeat('x', 1000 * 1000 * 100)) > 0",
    "series in derived tables": Q + "and amount < (select count(*) from (select * from "
                                "generate_series(1, 9999)) a, (select generate_series(1, 9999)) b)",
    "series in a CTE": "with s as (select generate_series(1, 9999) as n) " + Q
                       + "and amount < (select count(*) from s a, s b)",
    "recursive CTE": "with recursive r(n) as (select 1 union all select n + 1 from r where n < 100000000) "
                     + Q + "and amount < (select count(*) from r)",
}


@pytest.mark.parametrize("name", sorted(HEAVY))
def test_heavy_query_variants_are_refused_for_an_application(world: GuardWorld, policy: Policy,
                                                             name: str) -> None:
    assert rule_of(verdict(world, policy, HEAVY[name])) == "time-based-probe"


def test_a_cached_verdict_of_an_or_is_not_reused_for_other_literals(world: GuardWorld,
                                                                    policy: Policy) -> None:
    """`o.id = 10 OR o.id = 11` and `o.id = 10 OR o.id > -1` have one shape; the second widens."""
    from proxy.guard.cache import VerdictCache
    from proxy.guard.pipeline import analyse

    role = policy.role_for_user(APPLICATION)
    assert role is not None
    context = GuardContext(policy=policy, role=role, catalog=world.catalog, user=APPLICATION,
                           search_path=world.catalog.default_search_path(APPLICATION, DATABASE))
    cache = VerdictCache(max_entries=10)
    narrow = Q + "or o.id = 11"
    assert not isinstance(analyse(narrow, context).verdict, Refuse)
    cache.store(narrow, "key", analyse(narrow, context))
    assert cache.lookup(Q + "or o.id > -1", "key") is None
