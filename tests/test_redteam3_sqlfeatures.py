"""Red team round 3: less common SQL features through pgveil as a masked login.

SQL/JSON (JSON_TABLE, JSON_VALUE, JSON_QUERY, constructors), TABLESAMPLE, grouping sets, ROWS FROM,
window frames, record functions over masked rows, pg_input_error_info, ranges, arrays of rows,
LATERAL over whole rows, recursive CTEs with SEARCH/CYCLE, MERGE ... RETURNING and PG 18's
RETURNING old/new all see masked values only (regression tests). The hole found: the bounds of a
partition of a table partitioned by a masked column are that column's raw values, and a masked
login could read each partition's rows next to its bounds."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from tests import guard_setup
from tests.guard_setup import CANARIES, DATABASE, PASSWORD, POLICY, GuardWorld
from tests.guard_setup import GuardDatabase as _GuardDatabase
from tests.proxy_harness import RunningProxy, running_proxy

world = guard_setup.world  # the shared guard database with canary values

TIER_CANARY = "GOLD-TIER-CANARY"

PARTITIONED = f"""
DROP SCHEMA IF EXISTS rt3 CASCADE;
CREATE SCHEMA rt3;
CREATE TABLE rt3.accounts (id integer, tier text) PARTITION BY LIST (tier);
CREATE TABLE rt3.accounts_a PARTITION OF rt3.accounts FOR VALUES IN ('{TIER_CANARY}');
CREATE TABLE rt3.accounts_b PARTITION OF rt3.accounts FOR VALUES IN ('basic');
INSERT INTO rt3.accounts VALUES (1, '{TIER_CANARY}'), (2, 'basic');
GRANT USAGE ON SCHEMA rt3 TO gv_analyst, gv_writer;
GRANT SELECT ON ALL TABLES IN SCHEMA rt3 TO gv_analyst, gv_writer;
"""

ANALYST_TABLES = '    tables: ["gv.*"]\n    reveal: [public, internal]\n    row_filters:'
RT3_POLICY = POLICY.replace(
    ANALYST_TABLES, '    tables: ["gv.*", "rt3.*"]\n    reveal: [public, internal]\n    row_filters:'
) + """  rt3.accounts:
    columns:
      id:   {sensitivity: public}
      tier: {sensitivity: confidential, protection: redact}
"""


def leaked(text: str) -> list[str]:
    return [canary for canary in (*CANARIES, TIER_CANARY) if canary in text]


@pytest.fixture(scope="module")
def proxy(world: GuardWorld) -> Iterator[RunningProxy]:
    assert RT3_POLICY.count("rt3.*") == 1
    with psycopg.connect(world.dsn(), autocommit=True) as admin:
        admin.execute(PARTITIONED)
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "policy.yaml")
        with open(path, "w") as handle:
            handle.write(RT3_POLICY)
        try:
            with running_proxy(_GuardDatabase(world), path) as running:
                yield running
        finally:
            with psycopg.connect(world.dsn(), autocommit=True) as admin:
                admin.execute("DROP SCHEMA rt3 CASCADE")


def received(proxy: RunningProxy, login: str, sql: str) -> str:
    """Everything the client gets for one statement, in a transaction rolled back afterwards:
    rows (or the command tag), notices, or the error text."""
    with psycopg.connect(proxy.dsn(login, PASSWORD, DATABASE)) as conn:
        notices: list[str] = []
        conn.add_notice_handler(lambda d: notices.append(f"{d.message_primary} {d.message_detail}"))
        try:
            cur = conn.execute(sql)
            rows: Any = cur.fetchall() if cur.description else cur.statusmessage
            return repr(rows) + repr(notices)
        except psycopg.Error as exc:
            return "ERROR " + str(exc) + repr(notices)
        finally:
            conn.rollback()


PARTITION_BOUND_READS = [
    "select a.id, pg_get_expr(c.relpartbound, c.oid) from rt3.accounts_a a, pg_class c "
    "where c.oid = 'rt3.accounts_a'::regclass",
    "select a.id, pg_get_partition_constraintdef('rt3.accounts_a'::regclass) from rt3.accounts_a a",
    "select c.relname, c.relpartbound from pg_catalog.pg_class c where c.relname like 'accounts_%'",
    "select to_jsonb(c) from pg_class c where c.relname = 'accounts_a'",
    "select c.* from pg_class c where c.relname = 'accounts_a'",
    "select * from (select * from pg_class) c where c.relname = 'accounts_a'",
    "select pg_class from pg_class where relname = 'accounts_a'",
]


@pytest.mark.parametrize("sql", PARTITION_BOUND_READS)
def test_partition_bounds_do_not_give_the_masked_partition_key(proxy: RunningProxy, sql: str) -> None:
    text = received(proxy, "gv_analyst", sql)
    assert "partition-bounds" in text
    assert leaked(text) == []


def test_masked_partition_key_itself_is_masked(proxy: RunningProxy) -> None:
    text = received(proxy, "gv_analyst", "select id, tier from rt3.accounts_a")
    assert "(1, None)" in text and leaked(text) == []


def test_catalog_reads_without_partition_bounds_still_work(proxy: RunningProxy) -> None:
    sql = "select c.relname, c.relkind from pg_class c where c.relname = 'accounts_a'"
    text = received(proxy, "gv_analyst", sql)
    assert "accounts_a" in text and "ERROR" not in text


SQL_FEATURES = [
    "select * from json_table((select to_jsonb(p) from gv.people p where id = 1), '$' "
    "columns (s text path '$.ssn', n text path '$.notes', nested path '$.*' columns (v text path '$')))",
    "select json_value(to_jsonb(p), '$.ssn'), json_query(to_jsonb(p), '$') from gv.people p where id = 1",
    "select json_exists(to_jsonb(p), '$.ssn ? (@ starts with \"914\")') from gv.people p where id = 1",
    "select json_object('s': ssn, 'n': notes), json_array(ssn, notes), json_scalar(card) "
    "from gv.people where id = 1",
    "select json_objectagg(id: ssn), json_arrayagg(full_name) from gv.people",
    "select ssn, notes, grouping(ssn, notes) from gv.people group by grouping sets ((ssn), (notes), ())",
    "select ssn, full_name, count(*) from gv.people group by cube (ssn, full_name)",
    "select * from rows from (jsonb_each_text((select to_jsonb(p) from gv.people p where id = 1)), "
    "generate_series(1, 2)) with ordinality",
    "select first_value(ssn) over (order by id rows between unbounded preceding and unbounded following), "
    "nth_value(card, 1) over (order by id groups between current row and 1 following exclude ties) "
    "from gv.people",
    "select (jsonb_populate_record(null::gv.people, to_jsonb(p))).* from gv.people p where id = 1",
    "select * from jsonb_to_record((select to_jsonb(p) from gv.people p where id = 1)) "
    "as x(ssn text, notes text)",
    "select * from jsonb_populate_recordset(null::gv.people, (select jsonb_agg(p) from gv.people p))",
    "select pg_input_error_info(ssn, 'integer'), pg_input_error_info(full_name, 'date'), "
    "pg_input_is_valid(card, 'int8') from gv.people where id = 1",
    "select int4range(length(notes), 20), array[row(ssn, notes)], array(select p from gv.people p) "
    "from gv.people where id = 1",
    "select x.* from gv.people p, lateral jsonb_each_text(to_jsonb(p)) x",
    "select x.* from gv.people p cross join lateral (select p.*) x",
    "with recursive t(n, s) as (select 1, ssn from gv.people where id = 1 union all "
    "select n + 1, s from t where n < 2) search depth first by n set ord select * from t",
    "with recursive t(n, s) as (select 1, full_name from gv.people where id = 1 union all "
    "select n + 1, s from t where n < 2) cycle s set is_cycle using path select * from t",
    "select ssn from gv.people tablesample bernoulli (100)",
    "explain (generic_plan, verbose) select ssn from gv.people where ssn = $1",
]


@pytest.mark.parametrize("sql", SQL_FEATURES)
def test_less_common_sql_features_see_masked_values(proxy: RunningProxy, sql: str) -> None:
    assert leaked(received(proxy, "gv_analyst", sql)) == []


WRITER_STATEMENTS = [
    "merge into gv.scratch s using gv.people p on s.id = p.id when not matched then "
    "insert values (p.id, p.ssn, p.notes) returning s.*, p.*, merge_action()",
    "merge into gv.people p using (select 1 id) v on p.id = v.id when matched then "
    "update set region = p.region returning old.ssn, new.notes, p",
    "update gv.people set region = region where id = 1 returning old, new",
    "with m as (merge into gv.people p using (select 1 id) v on p.id = v.id when matched then "
    "update set region = p.region returning old.ssn as s) select s from m",
    "insert into gv.scratch values (1, 'x', 'y') on conflict do nothing "
    "returning (select ssn from gv.people where id = 1)",
]


@pytest.mark.parametrize("sql", WRITER_STATEMENTS)
def test_merge_and_returning_old_new_see_masked_values(proxy: RunningProxy, sql: str) -> None:
    text = received(proxy, "gv_writer", sql)
    assert [canary for canary in leaked(text) if canary != "HIDDENCITY"] == []  # writer has no row filter
