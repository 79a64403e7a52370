"""Sensitive join keys and quasi-identifier concentration, traced through aliases, CTEs and subqueries."""

from __future__ import annotations

import pytest
from pglast import parse_sql

from proxy.catalog import CatalogSnapshot, Column, Relation
from proxy.firewall.sensitive import (
    SensitiveColumns,
    find_join_on_sensitive_key,
    find_quasi_identifier_concentration,
    trace,
)
from proxy.guard.pipeline import analyse
from proxy.guard.statement import GuardContext
from proxy.guard.verdict import Refuse
from proxy.policy.model import ColumnPolicy, Dataset, Policy, Role, Sensitivity, Settings


def _table(schema: str, name: str, *columns: str) -> Relation:
    return Relation(schema, name, "table", tuple(Column(column, "text", 25) for column in columns))


CATALOG = CatalogSnapshot(
    database="fw",
    relations={relation.qualified_name: relation for relation in (
        _table("public", "users", "id", "full_name", "ssn", "birth_date", "zip", "gender", "tax_id"),
        _table("public", "tax_records", "id", "ssn", "tax_id", "amount"),
        _table("public", "orders", "id", "user_id", "amount", "ssn"),
        _table("public", "blocklist", "ssn", "reason"),
    )},
    functions={}, role_settings={}, server_search_path=("public",), generation="fw-sensitive",
)
QI = ColumnPolicy(sensitivity=Sensitivity.INTERNAL, quasi_identifier=True)
POLICY = Policy(
    version="fw-sensitive", settings=Settings(),
    roles={}, datasets={
        "public.users": Dataset("public.users", {
            "ssn": ColumnPolicy(sensitivity=Sensitivity.INTERNAL, joinable=False),
            "birth_date": QI, "zip": QI, "gender": QI,
        }),
        "public.tax_records": Dataset("public.tax_records", {
            "ssn": ColumnPolicy(sensitivity=Sensitivity.INTERNAL, joinable=False)}),
    },
)
ANALYST = Role(name="fw_qi_analyst", members=("fw_qi",), tables=("*",), max_quasi_identifiers=2,
               reveal=frozenset(Sensitivity))
COLUMNS = SensitiveColumns(POLICY, CATALOG)


def join_finding(sql: str) -> str | None:
    finding = find_join_on_sensitive_key(trace(parse_sql(sql)[0].stmt, COLUMNS, ("public",), None), COLUMNS)
    return finding.message if finding else None


def concentration(sql: str) -> str | None:
    analysis = trace(parse_sql(sql)[0].stmt, COLUMNS, ("public",), None)
    finding = find_quasi_identifier_concentration(analysis, COLUMNS, ANALYST)
    return finding.message if finding else None


CORRELATING = [
    "SELECT u.id FROM users u JOIN tax_records t ON u.ssn = t.ssn",
    "SELECT u.id FROM users u JOIN tax_records t ON t.ssn = u.ssn AND t.amount > 0",
    "SELECT id FROM users JOIN tax_records USING (ssn)",
    "SELECT u.id FROM users u NATURAL JOIN blocklist",
    "SELECT u.id FROM users u, tax_records t WHERE u.ssn = t.ssn",
    "SELECT u.id FROM users u, orders o WHERE lower(u.ssn) = o.ssn",
    "SELECT u.id FROM users u JOIN orders o ON replace(u.ssn, '-', '') = o.ssn",
    "SELECT id FROM users WHERE ssn IN (SELECT ssn FROM blocklist)",
    "SELECT id FROM users u WHERE EXISTS (SELECT 1 FROM blocklist b WHERE b.ssn = u.ssn)",
    "SELECT id FROM users WHERE ssn = ANY (ARRAY(SELECT ssn FROM blocklist))",
    "SELECT id FROM users WHERE ssn = ANY (SELECT ssn FROM blocklist)",
    "SELECT ssn FROM users INTERSECT SELECT ssn FROM blocklist",
    "SELECT ssn FROM users EXCEPT SELECT ssn FROM blocklist",
    "SELECT a.id FROM users a JOIN users b ON a.ssn = b.ssn AND a.id <> b.id",
    "WITH s AS (SELECT id, ssn AS k FROM users) SELECT s.id FROM s JOIN orders o ON o.ssn = s.k",
    "WITH s AS (SELECT ssn FROM users) SELECT 1 FROM s x JOIN s y ON x.ssn = y.ssn",
    "SELECT d.id FROM (SELECT id, upper(ssn) AS key FROM users) d JOIN blocklist b ON b.ssn = d.key",
    "SELECT u.id, (SELECT max(o.amount) FROM orders o WHERE o.ssn = u.ssn) FROM users u",
    "SELECT u.id FROM users u CROSS JOIN LATERAL (SELECT * FROM orders o WHERE o.ssn = u.ssn) x",
    "SELECT u.id FROM users u JOIN tax_records t ON u.tax_id = t.tax_id AND t.ssn LIKE u.ssn",
    "UPDATE orders o SET amount = 0 FROM users u WHERE u.ssn = o.ssn",
    "DELETE FROM orders o USING users u WHERE o.ssn = u.ssn",
    "SELECT * FROM users u JOIN (tax_records t JOIN orders o ON o.id = t.id) ON t.ssn = u.ssn",
    "SELECT u.id FROM users u, blocklist b WHERE strpos(b.reason, u.ssn) > 0",
    "SELECT u.id FROM users u JOIN blocklist b ON starts_with(u.ssn, b.ssn)",
    "SELECT u.id FROM users u JOIN orders o ON (u.ssn, u.id) = (o.ssn, o.user_id)",
    "SELECT u.id FROM users u JOIN orders o ON u.ssn IS NOT DISTINCT FROM o.ssn",
    # chained through a third value: a.ssn = s AND s = b.ssn is a.ssn = b.ssn
    "SELECT a.id, b.id FROM users a, users b, unnest(ARRAY['1', '2']) s WHERE s = a.ssn AND s = b.ssn",
    "SELECT u.id FROM users u, orders o, (VALUES ('1'), ('2')) v(k) WHERE v.k = u.ssn AND lower(v.k) = o.ssn",
    "SELECT u.id FROM users u JOIN generate_series(1, 9) g ON g::text = u.ssn "
    "JOIN orders o ON o.ssn = g::text",
    "WITH k AS (SELECT generate_series(1, 9)::text AS k) SELECT 1 FROM users u, blocklist b, k "
    "WHERE k.k = u.ssn AND b.ssn = k.k",
    "SELECT u.id FROM users u, orders o, unnest(ARRAY['1']) s "
    "WHERE u.ssn = s AND s IN (SELECT ssn FROM blocklist)",
    "SELECT u.id FROM users u, orders o WHERE u.ssn = u.tax_id AND u.tax_id = o.ssn",
    "SELECT u.id FROM users u, orders o, unnest(ARRAY['1'], ARRAY[2]) s(k, n) "
    "WHERE (u.ssn, u.id) = (s.k, s.n) AND o.ssn = s.k",
    "SELECT u.id FROM users u, orders o, unnest(ARRAY['1'], ARRAY['2']) s(k, n) WHERE s.k || s.n = u.ssn "
    "AND o.ssn = s.k",
    # grouping a value merged from two tables' keys puts matching rows in one group
    "SELECT k, array_agg(src) FROM (SELECT ssn k, 'u' src FROM users UNION ALL SELECT ssn, 't' "
    "FROM tax_records) x GROUP BY 1",
    "SELECT DISTINCT ON (k) k, src FROM (SELECT ssn k, 'u' src FROM users UNION ALL SELECT ssn, 't' "
    "FROM tax_records) x ORDER BY k, src",
    "SELECT k, count(*) OVER w FROM (SELECT ssn k FROM users UNION ALL SELECT ssn FROM tax_records) x "
    "WINDOW w AS (PARTITION BY k)",
]

NOT_CORRELATING = [
    "SELECT id, ssn FROM users WHERE ssn = '914-27-6380'",
    "SELECT id FROM users WHERE ssn = $1",
    "SELECT ssn, count(*) FROM users GROUP BY ssn",
    "SELECT u.id FROM users u JOIN orders o ON o.user_id = u.id",
    "SELECT u.id FROM users u JOIN tax_records t ON u.tax_id = t.tax_id",
    "SELECT ssn FROM users UNION SELECT ssn FROM blocklist",
    "SELECT id FROM users WHERE ssn IS NOT NULL AND length(ssn) = 11",
    "SELECT id FROM users WHERE id IN (SELECT user_id FROM orders)",
    "SELECT t.id FROM tax_records t WHERE t.amount > (SELECT avg(amount) FROM tax_records)",
    "WITH s AS (SELECT id, ssn FROM users) SELECT s.ssn FROM s JOIN orders o ON o.user_id = s.id",
    "SELECT u.id FROM users u JOIN orders o ON o.user_id = u.id WHERE u.ssn LIKE '9%' AND o.amount > 5",
    "SELECT concat(u.ssn, o.amount) FROM users u JOIN orders o ON o.user_id = u.id",
    # a list of values to look for filters, it does not correlate
    "SELECT id FROM users WHERE ssn IN (VALUES ('1'), ('2'))",
    "SELECT id FROM users WHERE ssn IN (SELECT s FROM unnest(ARRAY['1', '2']) s)",
    "SELECT u.id FROM users u, unnest(ARRAY['1', '2']) s WHERE s = u.ssn",
    "SELECT u.id FROM users u JOIN (VALUES ('1', 'x'), ('2', 'y')) v(k, note) ON v.k = u.ssn",
    "WITH p AS (SELECT $1::text AS ssn) SELECT u.id, t.id FROM users u, tax_records t, p "
    "WHERE u.ssn = p.ssn AND t.ssn = p.ssn",
    "SELECT u.id FROM users u, orders o, generate_series(1, 9) g "
    "WHERE u.id = g::text AND o.user_id = g::text AND u.ssn LIKE '9%'",
    "SELECT u.id FROM users u JOIN orders o ON o.user_id = u.id WHERE coalesce(u.ssn, u.tax_id) = $1",
    "SELECT ssn, count(*) OVER (PARTITION BY ssn) FROM users",
    "SELECT u.ssn, count(o.id) FROM users u JOIN orders o ON o.user_id = u.id GROUP BY u.ssn",
]


@pytest.mark.parametrize("sql", CORRELATING)
def test_correlating_rows_on_a_sensitive_key_is_refused(sql: str) -> None:
    assert join_finding(sql) is not None


@pytest.mark.parametrize("sql", NOT_CORRELATING)
def test_reading_or_filtering_a_sensitive_key_alone_is_allowed(sql: str) -> None:
    assert join_finding(sql) is None


def test_join_refusal_names_both_columns_how_and_what_to_do() -> None:
    message = join_finding("SELECT u.id FROM users u JOIN tax_records t ON lower(u.ssn) = t.ssn")
    assert message is not None
    assert "public.users.ssn" in message and "public.tax_records.ssn" in message
    assert "(comparison)" in message and "joinable: false" in message
    assert "correlate on a non-sensitive key" in message


CONCENTRATED = [
    "SELECT birth_date, zip, gender FROM users",
    "SELECT * FROM users",
    "SELECT u.* FROM users u",
    "SELECT extract(year FROM birth_date) AS y, left(zip, 3), gender FROM users",
    "WITH p AS (SELECT birth_date AS b, zip AS z, gender AS g FROM users) SELECT b, z, g FROM p",
    "SELECT q.a, q.b, q.c FROM (SELECT birth_date, zip, gender FROM users) AS q(a, b, c)",
    "SELECT zip, gender, max(birth_date) FROM users GROUP BY zip, gender",
    "SELECT birth_date, zip FROM users UNION ALL SELECT NULL, gender FROM users",
    "SELECT row_to_json(u) FROM users u",
    "SELECT zip || gender || birth_date FROM users",
    "SELECT zip, gender, (SELECT birth_date FROM users x WHERE x.id = u.id) FROM users u",
    # over a group of one row an aggregate is the value
    "SELECT id, zip, gender, avg(birth_date) FROM users GROUP BY id, zip, gender",
    "SELECT id, zip, gender, sum(birth_date) FROM users GROUP BY id, zip, gender",
    "SELECT id, zip, gender, percentile_cont(0.5) WITHIN GROUP (ORDER BY birth_date) FROM users "
    "GROUP BY id, zip, gender",
    "SELECT id, zip, gender, mode() WITHIN GROUP (ORDER BY birth_date) FROM users GROUP BY id, zip, gender",
    "SELECT id, zip, gender, sum(birth_date) OVER (PARTITION BY id) FROM users",
    "SELECT id, zip, gender, dense_rank() OVER (ORDER BY birth_date) FROM users",
    "SELECT id, zip, gender, rank() OVER w FROM users WINDOW w AS (ORDER BY birth_date)",
    "SELECT id, zip, gender, count(*) OVER (ORDER BY birth_date) FROM users",
    "SELECT id, zip, gender, count(*) FILTER (WHERE birth_date > '1990') FROM users GROUP BY id, zip, gender",
    "SELECT id, zip, gender, count(CASE WHEN birth_date > '1990' THEN 1 END) FROM users "
    "GROUP BY id, zip, gender",
    "SELECT id, zip, gender, string_agg(birth_date, ',') FROM users GROUP BY id, zip, gender",
    # a subquery that reads the outer row is a value per row: its conditions decide it
    "SELECT id, zip, gender, (SELECT count(*) FROM users x WHERE x.id = u.id AND x.birth_date > '1990') "
    "FROM users u",
    "SELECT id, zip, gender, EXISTS (SELECT 1 FROM users x WHERE x.id = u.id AND x.birth_date > '1990') "
    "FROM users u",
]

WITHIN_LIMIT = [
    "SELECT birth_date, zip FROM users",
    "SELECT id, full_name, zip FROM users WHERE gender = 'f' AND birth_date > '1990-01-01'",
    "SELECT zip, gender, count(*) FROM users GROUP BY zip, gender, birth_date",
    "SELECT zip, gender, count(DISTINCT birth_date), avg(length(zip)) FROM users GROUP BY zip, gender",
    "SELECT a.zip, b.zip FROM users a JOIN users b ON a.id = b.id",
    "SELECT count(*) FROM users",
    "SELECT zip, gender, count(birth_date), count(DISTINCT birth_date) FROM users GROUP BY zip, gender",
    "SELECT zip, gender, count(*) OVER (PARTITION BY birth_date) FROM users",
    "SELECT zip, gender, (SELECT count(*) FROM users WHERE birth_date > '1990') FROM users",
]


@pytest.mark.parametrize("sql", CONCENTRATED)
def test_returning_more_quasi_identifiers_than_the_role_may_is_refused(sql: str) -> None:
    assert concentration(sql) is not None


@pytest.mark.parametrize("sql", WITHIN_LIMIT)
def test_quasi_identifiers_within_the_limit_or_only_aggregated_are_allowed(sql: str) -> None:
    assert concentration(sql) is None


def test_concentration_refusal_lists_the_columns_and_the_limit() -> None:
    message = concentration("SELECT * FROM users")
    assert message == (
        "the statement returns 3 quasi-identifiers together (public.users.birth_date, public.users.gender, "
        "public.users.zip); role fw_qi_analyst may return at most 2 in one statement: leave some out, "
        "or only count them (count(*), count(DISTINCT col)); sum, avg, min/max, percentiles and ranks over "
        "a group of one row are the value, so they count as returning it"
    )


def test_roles_without_a_limit_are_not_capped() -> None:
    unlimited = Role(name="fw_unlimited", tables=("*",))
    analysis = trace(parse_sql("SELECT * FROM users")[0].stmt, COLUMNS, ("public",), None)
    assert find_quasi_identifier_concentration(analysis, COLUMNS, unlimited) is None


def _context(role: Role) -> GuardContext:
    policy = Policy(version="fw-s", settings=Settings(), roles={role.name: role}, datasets=POLICY.datasets)
    return GuardContext(policy=policy, role=role, catalog=CATALOG, user="fw_qi", search_path=("public",))


def test_guard_pipeline_refuses_join_on_sensitive_key_for_every_role() -> None:
    verdict = analyse("SELECT u.id FROM users u JOIN blocklist b USING (ssn)", _context(ANALYST)).verdict
    assert isinstance(verdict, Refuse) and verdict.rule == "join-on-sensitive-key"
    assert verdict.text.startswith("pgveil: join-on-sensitive-key: the statement matches public.users.ssn")


def test_guard_pipeline_refuses_quasi_identifier_concentration() -> None:
    verdict = analyse("SELECT birth_date, zip, gender FROM users", _context(ANALYST)).verdict
    assert isinstance(verdict, Refuse) and verdict.rule == "quasi-identifier-concentration"


def test_a_statement_the_lineage_cannot_analyse_is_refused_not_let_through(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from proxy.firewall import passes

    def broken(*args: object) -> None:
        raise RecursionError("too deep")

    monkeypatch.setattr(passes, "trace", broken)
    verdict = analyse("SELECT id FROM users", _context(ANALYST)).verdict
    assert isinstance(verdict, Refuse) and verdict.rule == "join-on-sensitive-key"
    assert "could not analyse this statement" in verdict.message
