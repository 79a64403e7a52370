"""Injection probes where an application's input lands — a string, a number, a LIKE pattern, a sort key,
LIMIT/OFFSET — are refused for every role with `injection: enforce`, not only for roles marked
`application: true` (issue 13 §3), while people's ordinary SQL next to them passes."""

from __future__ import annotations

import pytest

from proxy.catalog import CatalogSnapshot, Column, Relation
from proxy.firewall.injection import screen_injection
from proxy.firewall.statement import SubmittedSql
from proxy.guard.pipeline import analyse
from proxy.guard.statement import GuardContext
from proxy.guard.verdict import Refuse
from proxy.policy.model import Policy, Role, Settings

APP = Role(name="fw_app", members=("fw_app",), tables=("*",), application=True)
UNMARKED = Role(name="fw_unmarked", members=("fw_unmarked",), tables=("*",))  # injection: enforce

STRING = "SELECT id, name, price FROM products WHERE name = '{}' AND active"
NUMBER = "SELECT id, name, price FROM products WHERE id = {} AND active"
LIKE = "SELECT id, name, price FROM products WHERE name LIKE '%{}%' ORDER BY name"
SORT = "SELECT id, name, price FROM products WHERE active ORDER BY {} LIMIT 20"
LIMIT = "SELECT id, name, price FROM products WHERE active ORDER BY id LIMIT {}"
OFFSET = "SELECT id, name, price FROM products WHERE active ORDER BY id LIMIT 20 OFFSET {}"

PROBES = [
    # (rule that refuses it for a role not marked application, template, injected input)
    # a scalar subquery whose FROM is a time-delay function, in every context
    ("time-based-probe", SORT, "(SELECT 1 FROM pg_sleep(5))"),
    ("time-based-probe", SORT, "id, (SELECT count(*) FROM generate_series(1, 50000000))"),
    ("time-based-probe", STRING, "x' || (SELECT '' FROM pg_sleep(5)) || '"),
    ("time-based-probe", NUMBER, "42 + (SELECT 0 FROM pg_sleep(5))"),
    ("time-based-probe", LIKE, "x' || (SELECT '' FROM pg_sleep(5)) || '"),
    ("time-based-probe", LIMIT, "(SELECT 20 FROM pg_sleep(5))"),
    ("time-based-probe", OFFSET, "(SELECT 0 FROM pg_sleep(5))"),
    ("time-based-probe", SORT,
     "(SELECT CASE WHEN (SELECT count(*) FROM pg_user) > 0 THEN pg_sleep(5) END)::text"),
    ("time-based-probe", NUMBER, "42; SELECT pg_sleep(5)"),
    ("time-based-probe", NUMBER,
     "42 + (SELECT count(*) FROM generate_series(1, 99999) a, generate_series(1, 99999) b)"),
    ("time-based-probe", LIMIT, "(WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r "
                                "WHERE n < 100000000) SELECT count(*) FROM r)"),
    ("time-based-probe", SORT, "price; SELECT count(*) FROM generate_series(1, 5000000)"),
    # a subquery reading a catalog view of logins
    ("catalog-probe", SORT, "id, (SELECT usename FROM pg_user LIMIT 1)"),
    ("catalog-probe", SORT, "id, (SELECT passwd FROM pg_shadow LIMIT 1)"),
    ("catalog-probe", SORT, "id, (SELECT rolname FROM pg_roles LIMIT 1)"),
    ("catalog-probe", SORT, "id, (SELECT rolpassword FROM pg_authid LIMIT 1)"),
    ("catalog-probe", STRING, "x' || (SELECT usename FROM pg_user LIMIT 1) || '"),
    ("catalog-probe", NUMBER, "(SELECT usesysid::int FROM pg_user LIMIT 1)"),
    ("catalog-probe", LIMIT, "(SELECT count(*) FROM pg_roles)"),
    ("catalog-probe", OFFSET, "(SELECT count(*) FROM pg_stat_activity)"),
    ("catalog-probe", SORT, "CASE WHEN (SELECT substr(usename, 1, 1) FROM pg_user LIMIT 1) = 'p' "
                            "THEN name ELSE id::text END"),
    # a scalar subquery reading server identity, in a string literal's place and the other contexts
    ("catalog-probe", STRING, "x' || (SELECT version()) || '"),
    ("catalog-probe", STRING, "x' || (SELECT current_user) || '"),
    ("catalog-probe", STRING, "x' || (SELECT session_user) || '"),
    ("catalog-probe", STRING, "x' || (SELECT current_database()) || '"),
    ("catalog-probe", STRING, "x' || (SELECT inet_server_addr()) || '"),
    ("catalog-probe", STRING, "x' || (SELECT pg_backend_pid()) || '"),
    ("catalog-probe", STRING, "x' || version() || '"),
    ("catalog-probe", STRING, "x' || current_setting('data_directory') || '"),
    ("catalog-probe", LIKE, "x' || (SELECT version()) || '"),
    ("catalog-probe", LIKE, "x' || (SELECT current_user) || '"),
    ("catalog-probe", NUMBER, "42 + (SELECT length(current_user))"),
    ("catalog-probe", NUMBER, "(SELECT pg_backend_pid())"),
    ("catalog-probe", NUMBER, "42 + length(version())"),
    ("catalog-probe", LIMIT, "(SELECT length(version()))"),
    ("catalog-probe", LIMIT, "20 + pg_backend_pid()"),
    ("catalog-probe", LIMIT, "length(current_user)"),
    ("catalog-probe", OFFSET, "(SELECT inet_server_port())"),
    ("catalog-probe", SORT, "id, (SELECT version())"),
    ("catalog-probe", SORT, "id, (SELECT current_user)"),
    ("catalog-probe", SORT, "(SELECT CASE WHEN starts_with(current_user, 'p') THEN 1 ELSE 1/0 END)"),
    # a UNION branch with no table whose columns are session-information functions
    ("union-extraction", NUMBER, "42 UNION SELECT 1, current_user, 3 "
                                 "FROM (VALUES (true)) v(active) WHERE TRUE"),
    ("union-extraction", NUMBER, "42 UNION SELECT pg_backend_pid(), version(), 3.0 "
                                 "FROM (VALUES (true)) v(active) WHERE TRUE"),
    ("union-extraction", STRING, "x' AND active UNION SELECT 1, current_user, 3 "
                                 "FROM products WHERE name <> '"),
    ("union-extraction", LIKE, "x%' UNION SELECT inet_server_port(), inet_server_addr()::text, price "
                               "FROM products WHERE name LIKE '"),
    # boolean probes whose answer shows in the order or the row count
    ("sort-key-probe", SORT, "CASE WHEN starts_with((SELECT name FROM secrets LIMIT 1), 'p') "
                             "THEN name ELSE id::text END"),
    ("sort-key-probe", SORT, "(SELECT max(id) FROM secrets)"),
    ("sort-key-probe", LIMIT, "CASE WHEN EXISTS (SELECT 1 FROM secrets WHERE k LIKE 'p%') THEN 1 ELSE 0 END"),
    ("sort-key-probe", OFFSET, "CASE WHEN (SELECT true FROM secrets LIMIT 1) THEN 0 ELSE 5 END"),
    ("tautology", SORT, "CASE WHEN 5323 = 5323 THEN name ELSE id::text END"),
    ("tautology", NUMBER, "42 + CASE WHEN starts_with(current_user, 'p') THEN 1/0 ELSE 0 END"),
    ("tautology", STRING, "x' || CASE WHEN starts_with(current_user, 'p') "
                          "THEN (SELECT count(*) FROM pg_class a, pg_class b)::text ELSE '' END || '"),
    ("tautology", LIKE, "x' || CASE WHEN (SELECT true FROM secrets LIMIT 1) THEN 'a' ELSE 'b' END || '"),
    # error-based: a server value cast to a number prints it
    ("error-based-extraction", NUMBER, "current_user::int"),
    ("error-based-extraction", NUMBER, "CAST((SELECT usename FROM pg_user LIMIT 1) AS int)"),
    ("error-based-extraction", LIMIT, "version()::int"),
    ("error-based-extraction", SORT, "id, current_setting('data_directory')::int"),
]

LET_THROUGH = [
    "SELECT id, title FROM docs WHERE owner = current_user ORDER BY updated_at DESC LIMIT 50",
    "SELECT id, title FROM docs WHERE owner = (SELECT current_user) AND NOT archived",
    "SELECT id FROM orders WHERE tenant_id IN (SELECT id FROM tenants WHERE db_login = session_user)",
    "SELECT id FROM orders WHERE tenant_id = current_setting('app.tenant_id')::int",
    "SELECT id FROM docs WHERE pg_has_role(owner, 'member') OR shared",
    "SELECT name FROM files WHERE path = '/home/' || current_user || '/inbox'",
    "SELECT at, message FROM app_log WHERE backend_pid = pg_backend_pid()",
    "SELECT id, owner = current_user AS mine FROM docs ORDER BY owner = current_user DESC, title",
    "SELECT id FROM products ORDER BY CASE WHEN stock = 0 THEN 1 ELSE 0 END, lower(name), 2",
    "SELECT c.id FROM customers c ORDER BY (SELECT count(*) FROM orders o WHERE o.customer_id = c.id) DESC",
    "SELECT id FROM products ORDER BY random() LIMIT 5",
    "SELECT id FROM products ORDER BY CASE WHEN $1 = 'price' THEN price END LIMIT $2 OFFSET $3",
    "SELECT id FROM scores ORDER BY score DESC LIMIT (SELECT count(*) / 10 FROM scores)",
    "SELECT id, row_number() OVER (ORDER BY (SELECT NULL)) FROM products",
    "SELECT count(*), current_database(), version() FROM products",
    "SELECT 'doc', title, current_user FROM docs UNION ALL SELECT 'file', path, current_user FROM files",
    "SELECT current_setting('server_version_num')::int",
    "SELECT id FROM allowed_networks WHERE net >>= inet_client_addr()",
    "SELECT id FROM docs WHERE owner_oid = current_user::regrole::oid",
    "SELECT id, pg_sleep(0.01) FROM products",
    "SELECT id FROM products WHERE CASE WHEN stock = 0 THEN backorder ELSE active END",
    "SELECT id FROM products WHERE price < CASE WHEN $1 THEN 10 ELSE 100 END",
    "SELECT CASE WHEN EXISTS (SELECT 1 FROM products) THEN 'yes' ELSE 'no' END",
    "SELECT pg_sleep(1)",
    "SELECT count(*) FROM generate_series(1, 10000000)",
    "SELECT relname FROM pg_class WHERE relowner = (SELECT oid FROM pg_roles WHERE rolname = current_user)",
]


def rule_for(sql: str, role: Role) -> str | None:
    refusal = screen_injection(SubmittedSql.parse(sql), role).refusal
    return refusal.rule if refusal else None


@pytest.mark.parametrize(("rule", "template", "value"), PROBES)
def test_probe_is_refused_for_a_role_not_marked_application(rule: str, template: str, value: str) -> None:
    assert rule_for(template.format(value), UNMARKED) == rule


@pytest.mark.parametrize(("rule", "template", "value"), PROBES)
def test_probe_is_refused_for_an_application_role(rule: str, template: str, value: str) -> None:
    assert rule_for(template.format(value), APP) is not None


@pytest.mark.parametrize("sql", LET_THROUGH)
def test_ordinary_sql_next_to_the_probes_is_let_through_for_people(sql: str) -> None:
    alerting = Role(name="fw_people_alert", members=("x",), tables=("*",), injection="alert")
    assert screen_injection(SubmittedSql.parse(sql), alerting).findings == ()


CATALOG = CatalogSnapshot(
    database="shop",
    relations={
        "public.docs": Relation("public", "docs", "table", (
            Column("id", "integer", 23), Column("owner", "text", 25), Column("n", "text", 25))),
        "public.categories": Relation("public", "categories", "table", (
            Column("id", "integer", 23), Column("name", "text", 25))),
        "public.products": Relation("public", "products", "table", (
            Column("id", "integer", 23), Column("category_id", "integer", 23))),
        "public.favorites": Relation("public", "favorites", "table", (
            Column("product_id", "integer", 23), Column("login", "text", 25))),
    },
    functions={}, role_settings={}, server_search_path=("public",), generation="fw-probe-positions",
)


def context(role: Role) -> GuardContext:
    policy = Policy(version="fw", settings=Settings(), roles={role.name: role}, datasets={})
    return GuardContext(policy=policy, role=role, catalog=CATALOG, user=role.name, search_path=("public",))


def test_a_custom_setting_and_a_server_setting_do_not_share_a_cached_verdict() -> None:
    custom = analyse("SELECT id FROM docs WHERE n = 'x' || current_setting('app.tenant')", context(UNMARKED))
    assert not isinstance(custom.verdict, Refuse)
    assert custom.literal_dependent  # `current_setting('data_directory')` has the same shape
    server = analyse("SELECT id FROM docs WHERE n = 'x' || current_setting('data_directory')",
                     context(UNMARKED))
    assert isinstance(server.verdict, Refuse) and server.verdict.rule == "catalog-probe"


def test_refusal_names_the_rule_and_where_the_probe_was() -> None:
    verdict = analyse("SELECT id FROM docs ORDER BY id, (SELECT usename FROM pg_user LIMIT 1)",
                      context(UNMARKED)).verdict
    assert isinstance(verdict, Refuse) and verdict.sqlstate == "42501"
    assert verdict.text.startswith("pgveil: catalog-probe: the sort key reads pg_user, which lists logins")


def test_a_sort_key_subquery_correlated_by_an_unqualified_name_is_let_through_with_the_catalog() -> None:
    sql = "SELECT id FROM products ORDER BY (SELECT name FROM categories WHERE id = category_id)"
    assert not isinstance(analyse(sql, context(UNMARKED)).verdict, Refuse)
    constant = "SELECT id FROM products ORDER BY (SELECT name FROM categories WHERE id = 3)"
    refused = analyse(constant, context(UNMARKED)).verdict
    assert isinstance(refused, Refuse) and refused.rule == "sort-key-probe"


def test_a_case_on_a_subquery_correlated_by_an_unqualified_name_is_let_through_with_the_catalog() -> None:
    for sql in ("SELECT id FROM products ORDER BY CASE WHEN EXISTS (SELECT 1 FROM favorites "
                "WHERE product_id = id) THEN 0 ELSE 1 END",
                "SELECT id FROM products WHERE category_id = CASE WHEN EXISTS (SELECT 1 FROM favorites "
                "WHERE product_id = id) THEN 1 ELSE 2 END"):
        assert not isinstance(analyse(sql, context(UNMARKED)).verdict, Refuse), sql
    probe = ("SELECT id FROM products ORDER BY CASE WHEN EXISTS (SELECT 1 FROM favorites "
             "WHERE login LIKE 'a%') THEN id ELSE category_id END")
    refused = analyse(probe, context(UNMARKED)).verdict
    assert isinstance(refused, Refuse) and refused.rule == "sort-key-probe"
