"""Property: however a masked role combines names, quoting, nesting and functions, no canary
reaches it. Hypothesis builds statements from PostgreSQL syntax pieces; each one is judged by the
guard and what the guard forwards runs as the masked login on the real PostgreSQL."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.guard.verdict import Refuse
from tests.guard_setup import GuardWorld, leaked_canaries, world  # noqa: F401

TABLE_NAMES = ["gv.people", '"gv"."people"', "GV.People", "guard_test.gv.people", "only gv.people",
               "gv.people *", "gv . people", 'U&"gv".people', "gv./*x*/people"]
COLUMNS = ["ssn", "email", "full_name", "birth_date", "salary", "card", "notes", "password_hash", "city"]


@st.composite
def relation(draw: st.DrawFn) -> tuple[str, str]:
    """(FROM item, the name columns are qualified with)."""
    name = draw(st.sampled_from(TABLE_NAMES))
    alias = draw(st.sampled_from(["", "p", '"P"', "people"]))
    if draw(st.booleans()):
        return f"(select * from {name}) {alias or 'sub'}", alias or "sub"
    qualifier = alias or ("people" if "people" in name.lower() else "p")
    return (f"{name} {alias}" if alias else name), qualifier.strip('"') if alias != '"P"' else '"P"'


@st.composite
def expression(draw: st.DrawFn, qualifier: str) -> str:
    column = draw(st.sampled_from(COLUMNS))
    reference = draw(st.sampled_from([column, f"{qualifier}.{column}", f"({qualifier}).{column}",
                                      f"{column}({qualifier})", qualifier, f"{qualifier}.*"]))
    wrap = draw(st.sampled_from(["{}", "{}::text", "upper({}::text)", "row_to_json(row({}))", "({})::int",
                                 "string_agg({}::text, ',')", "max({}::text)", "md5({}::text)",
                                 "left({}::text, 3)", "array_agg({})::text", "coalesce({}::text, 'x')"]))
    if reference.endswith(".*") and wrap != "{}":
        reference = qualifier
    return wrap.format(reference)


@st.composite
def statement(draw: st.DrawFn) -> str:
    item, qualifier = draw(relation())
    select = draw(expression(qualifier))
    where = draw(st.sampled_from(["", " where {} is not null", " where {} like '9%'", " where {} = '914-27-6380'",
                                  " where position('6380' in {}::text) > 0"]))
    if where:
        where = where.format(draw(expression(qualifier)))
    tail = draw(st.sampled_from(["", " order by 1", " limit 5", " group by 1" if "agg(" not in select else ""]))
    shape = draw(st.sampled_from([
        "select {s} from {f}{w}{t}",
        "with c as (select {s} from {f}{w}{t}) select * from c",
        "select * from gv.orders o, lateral (select {s} from {f}{w}{t}) x",
        "select (select {s} from {f}{w} limit 1)",
        "select {s} from {f}{w} union all select null{t}",
        "copy (select {s} from {f}{w}{t}) to stdout",
        "explain analyze select {s} from {f}{w}{t}",
        "prepare q as select {s} from {f}{w}{t}; execute q; deallocate q",
    ]))
    return shape.format(s=select, f=item, w=where, t=tail)


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(sql=statement())
def test_no_generated_statement_leaks_a_canary(world: GuardWorld, sql: str) -> None:
    verdict, outcome = world.guarded(sql, "gv_analyst")
    text = outcome.text() + (verdict.text if isinstance(verdict, Refuse) else "")
    assert [c for c in leaked_canaries(text) if c not in sql] == [], (sql, verdict, outcome)
