"""Usability: a masked role still runs ordinary reporting SQL and gets correct results —
aggregates, joins on non-sensitive keys, grouping by hashed values, date generalisation."""

from __future__ import annotations

import datetime
from decimal import Decimal

from proxy.guard.verdict import Allow, Refuse, Rewrite
from tests.guard_setup import GuardWorld, world  # noqa: F401


def rows(world: GuardWorld, sql: str, login: str = "gv_analyst") -> list[tuple[object, ...]]:
    verdict, outcome = world.guarded(sql, login)
    assert not isinstance(verdict, Refuse), verdict
    assert outcome.error is None, outcome.error
    return outcome.rows


def test_aggregates_over_visible_rows_are_exact(world: GuardWorld) -> None:
    assert rows(world, "select count(*), count(distinct region) from gv.people") == [(3, 2)]
    assert rows(world, "select region, count(*) from gv.people group by region order by region") == [
        ("north", 2), ("south", 1)]


def test_join_on_a_non_sensitive_key_gives_the_right_totals(world: GuardWorld) -> None:
    result = rows(world, "select p.region, sum(o.amount) from gv.orders o join gv.people p on p.id = o.person_id "
                         "group by p.region order by p.region")
    assert result == [("north", Decimal("125.50")), ("south", Decimal("7.25"))]


def test_grouping_by_a_hashed_column_groups_equal_values_together(world: GuardWorld) -> None:
    result = rows(world, "select ssn, count(*) from gv.people group by ssn")
    assert len(result) == 3 and all(count == 1 for _, count in result)
    hashes = {ssn for ssn, _ in result}
    assert all(isinstance(h, str) and len(h) == 64 and int(h, 16) >= 0 for h in hashes)
    again = rows(world, "select ssn from gv.people where id = 1")[0][0]
    assert again in hashes  # deterministic: the same value hashes the same in every statement


def test_dates_are_generalised_to_the_year_and_keep_their_type(world: GuardWorld) -> None:
    result = rows(world, "select extract(year from birth_date)::int, birth_date from gv.people order by id")
    assert result == [(1987, datetime.date(1987, 1, 1)), (1990, datetime.date(1990, 1, 1)),
                      (1975, datetime.date(1975, 1, 1))]


def test_numbers_are_bucketed_and_partial_keeps_the_length(world: GuardWorld) -> None:
    assert rows(world, "select salary, length(full_name), card from gv.people where id = 1") == [
        (Decimal("123000.00"), 14, "***************1098")]


def test_email_keeps_its_domain_for_reporting_by_domain(world: GuardWorld) -> None:
    result = rows(world, "select split_part(email, '@', 2) d, count(*) from gv.people group by d order by d")
    assert result == [("example.com", 2), ("leak.example", 1)]


def test_unlisted_columns_are_internal_and_masked_for_a_role_that_reveals_only_public(world: GuardWorld) -> None:
    assert rows(world, "select id, at, secret from gv.events", "gv_public") == [(None, None, None)]
    assert rows(world, "select id, at from gv.events", "gv_analyst") == [(1, datetime.date(2024, 5, 5))]


def test_tables_without_protected_columns_are_forwarded_fully_qualified_but_unmasked(world: GuardWorld) -> None:
    verdict = world.verdict("select sum(amount) from orders", "gv_analyst")
    assert isinstance(verdict, Refuse) and verdict.rule == "unknown-relation"  # gv is not on the search_path
    verdict = world.verdict("select sum(amount) from gv.orders", "gv_analyst")
    assert isinstance(verdict, Rewrite) and '"gv"."orders"' in verdict.sql and "SELECT" not in verdict.sql


def test_a_role_that_sees_everything_gets_raw_values(world: GuardWorld) -> None:
    assert rows(world, "select ssn, city from gv.people where id = 4", "gv_admin") == [("333-33-3333", "HIDDENCITY")]


def test_statements_without_relations_are_allowed_unchanged(world: GuardWorld) -> None:
    verdict = world.verdict("select 1 + 1, now() is not null")
    assert isinstance(verdict, Allow) and verdict.sql == "select 1 + 1, now() is not null"


def test_writes_to_unmasked_tables_work_for_a_masked_writer(world: GuardWorld) -> None:
    assert rows(world, "insert into gv.scratch values (100, 'n', 'e') returning id", "gv_writer") == [(100,)]
    assert rows(world, "delete from gv.scratch where id = 100 returning note", "gv_writer") == [("n",)]


def test_a_listed_view_is_masked_by_its_own_column_policies(world: GuardWorld) -> None:
    result = rows(world, "select id, length(ssn), region from gv.people_listed order by id", "gv_writer")
    assert result == [(1, 64, "north"), (2, 64, "north"), (3, 64, "south"), (4, 64, "hidden")]


def test_a_listed_view_may_not_skip_a_base_tables_row_filter(world: GuardWorld) -> None:
    verdict = world.verdict("select * from gv.people_listed", "gv_analyst")
    assert isinstance(verdict, Refuse) and verdict.rule == "view-skips-row-filter"


def test_audit_information_names_relations_columns_and_masks(world: GuardWorld) -> None:
    verdict = world.verdict("select email from gv.people p join gv.orders o on o.person_id = p.id")
    assert verdict.info.kind == "select"
    assert verdict.info.relations == ("gv.people", "gv.orders")
    assert "gv.people.email" in verdict.info.columns
    assert "gv.people.email:email" in verdict.info.masks
    assert "914" not in verdict.info.normalized_sql


def test_copy_of_a_parent_table_copies_only_its_own_rows_as_postgresql_does(world: GuardWorld) -> None:
    assert rows(world, "copy gv.base to stdout") == []
    assert rows(world, "select count(*) from gv.base") == [(1,)]
