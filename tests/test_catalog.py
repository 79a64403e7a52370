"""The catalog snapshot read from a real PostgreSQL: relations, columns, ancestry, reads, search_path."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from proxy.catalog import CatalogError, CatalogSnapshot, effective_dataset, load_catalog, parse_search_path
from proxy.embedded import free_port
from proxy.policy.loader import parse_policy
from tests.conftest import Upstream

DATABASE = "catalog_test"
USER = "catalog_user"
OTHER_USER = "catalog_other"

SCHEMA = f"""
CREATE SCHEMA cat_a;
CREATE SCHEMA cat_b;
CREATE SCHEMA {USER};
CREATE DOMAIN cat_a.email_address AS character varying(200) NOT NULL CHECK (VALUE LIKE '%@%');
CREATE DOMAIN cat_a.work_email AS cat_a.email_address;
CREATE TABLE cat_a.contacts (id integer, email cat_a.work_email, plain text);
CREATE TABLE cat_a.people (id integer PRIMARY KEY, dropped text, email text, salary numeric(10,2),
                           born date, note character varying(40));
ALTER TABLE cat_a.people DROP COLUMN dropped;
CREATE TABLE cat_b.people (id bigint);
CREATE TABLE {USER}.people (mine text);
CREATE TABLE cat_a.pg_class (shadow text);
CREATE TABLE cat_a.events (id integer, at timestamp with time zone, ssn text) PARTITION BY RANGE (at);
CREATE TABLE cat_a.events_2024 PARTITION OF cat_a.events
    FOR VALUES FROM ('2024-01-01') TO ('2025-01-01') PARTITION BY LIST (id);
CREATE TABLE cat_a.events_2024_small PARTITION OF cat_a.events_2024 FOR VALUES IN (1, 2, 3);
CREATE TABLE cat_a.base (id integer, secret text);
CREATE TABLE cat_a.child (extra text) INHERITS (cat_a.base);
CREATE VIEW cat_a.people_view AS SELECT id, email FROM cat_a.people;
CREATE VIEW cat_a.people_view_view AS SELECT v.id, e.ssn FROM cat_a.people_view v, cat_a.events e;
CREATE MATERIALIZED VIEW cat_a.salary_stats AS SELECT avg(salary) AS average FROM cat_a.people;
CREATE SEQUENCE cat_a.counter;
CREATE FUNCTION cat_a.count_people() RETURNS bigint LANGUAGE sql AS 'SELECT count(*) FROM cat_a.people';
CREATE FUNCTION cat_a.count_people(region text) RETURNS bigint LANGUAGE sql SECURITY DEFINER
    AS 'SELECT 1::bigint';
CREATE FUNCTION cat_a.atomic_salary() RETURNS numeric LANGUAGE sql
    BEGIN ATOMIC SELECT max(salary) FROM cat_a.people; END;
CREATE FUNCTION cat_a.dynamic(t text) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE n bigint; BEGIN EXECUTE 'SELECT count(*) FROM ' || t INTO n; RETURN n; END $$;
CREATE FUNCTION cat_a.pure(x integer) RETURNS integer LANGUAGE sql IMMUTABLE AS 'SELECT x + 1';
CREATE FUNCTION cat_a.wrapper() RETURNS bigint LANGUAGE plpgsql
    AS $$ BEGIN RETURN cat_a.count_people(); END $$;
CREATE FUNCTION cat_a.calls_dynamic() RETURNS bigint LANGUAGE sql AS 'SELECT cat_a.dynamic(''x'')';
CREATE VIEW cat_a.counted AS SELECT cat_a.wrapper() AS n, cat_a.pure(1) AS p;
CREATE VIEW cat_a.opaque_view AS SELECT cat_a.dynamic('cat_b.people') AS n;
"""


@pytest.fixture(scope="module")
def catalog_db(upstream: Upstream) -> Iterator[str]:
    upstream.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
    upstream.execute(f"CREATE DATABASE {DATABASE}")
    upstream.execute(f"DROP ROLE IF EXISTS {USER}; DROP ROLE IF EXISTS {OTHER_USER}; "
                     f"CREATE ROLE {USER} LOGIN; CREATE ROLE {OTHER_USER} LOGIN")
    upstream.execute(SCHEMA, dbname=DATABASE)
    upstream.execute(f"ALTER ROLE {USER} SET search_path = cat_b, public; "
                     f"ALTER ROLE {USER} IN DATABASE {DATABASE} SET search_path = \"$user\", cat_a; "
                     f"ALTER DATABASE {DATABASE} SET search_path = cat_a, \"Mixed Case\"")
    yield upstream.dsn(dbname=DATABASE)
    upstream.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
    upstream.execute(f"DROP ROLE IF EXISTS {USER}; DROP ROLE IF EXISTS {OTHER_USER}")


@pytest.fixture(scope="module")
def catalog(catalog_db: str) -> CatalogSnapshot:
    return asyncio.run(load_catalog(catalog_db))


def test_tables_list_columns_in_order_with_types_and_without_dropped_ones(catalog: CatalogSnapshot) -> None:
    people = catalog.relations["cat_a.people"]
    assert people.kind == "table" and people.qualified_name == "cat_a.people"
    assert [(c.name, c.type_sql) for c in people.columns] == [
        ("id", "integer"), ("email", "text"), ("salary", "numeric(10,2)"), ("born", "date"),
        ("note", "character varying(40)")]
    assert people.columns[0].type_oid == 23
    assert people.column("salary") is not None and people.column("dropped") is None
    assert catalog.database == DATABASE


def test_types_outside_pg_catalog_are_schema_qualified_whatever_the_search_path(
        catalog: CatalogSnapshot) -> None:
    # the database's search_path (cat_a first) makes cat_a's types visible to the catalog's session
    assert catalog.relations["cat_a.contacts"].columns[1].type_sql == "cat_a.work_email"


def test_domain_columns_know_their_base_type_for_masking(catalog: CatalogSnapshot) -> None:
    email, plain = catalog.relations["cat_a.contacts"].columns[1:]
    assert (email.type_sql, email.base_type_sql, email.mask_type_sql) == (
        "cat_a.work_email", "character varying(200)", "character varying(200)")
    assert (plain.type_sql, plain.base_type_sql, plain.mask_type_sql) == ("text", "", "text")


def test_every_relation_kind_is_known(catalog: CatalogSnapshot) -> None:
    kinds = {name: catalog.relations[name].kind for name in (
        "cat_a.people", "cat_a.events", "cat_a.people_view", "cat_a.salary_stats", "cat_a.counter")}
    assert kinds == {"cat_a.people": "table", "cat_a.events": "partitioned", "cat_a.people_view": "view",
                     "cat_a.salary_stats": "matview", "cat_a.counter": "sequence"}


def test_system_catalogs_and_information_schema_are_included(catalog: CatalogSnapshot) -> None:
    assert catalog.relations["pg_catalog.pg_class"].kind == "table"
    assert catalog.relations["pg_catalog.pg_stats"].kind == "view"
    assert "information_schema.columns" in catalog.relations
    assert all(r.schema not in ("pg_catalog", "information_schema") for r in catalog.user_relations())


def test_partitions_and_inheritance_children_know_their_ancestors_nearest_first(
        catalog: CatalogSnapshot) -> None:
    assert catalog.relations["cat_a.events_2024_small"].parents == ("cat_a.events_2024", "cat_a.events")
    assert catalog.relations["cat_a.events_2024"].parents == ("cat_a.events",)
    assert catalog.relations["cat_a.child"].parents == ("cat_a.base",)
    assert [c.name for c in catalog.relations["cat_a.child"].columns] == ["id", "secret", "extra"]
    assert catalog.relations["cat_a.people"].parents == ()


def test_views_and_matviews_list_what_they_read(catalog: CatalogSnapshot) -> None:
    assert catalog.relations["cat_a.people_view"].depends_on == ("cat_a.people",)
    assert catalog.relations["cat_a.salary_stats"].depends_on == ("cat_a.people",)
    outer = catalog.relations["cat_a.people_view_view"]
    assert set(outer.depends_on) == {"cat_a.people_view", "cat_a.events"}
    assert catalog.base_relations(outer) == {"cat_a.people_view", "cat_a.people", "cat_a.events"}


def test_functions_say_what_their_bodies_read(catalog: CatalogSnapshot) -> None:
    count_people = catalog.functions["cat_a.count_people"]
    assert count_people.overloads == 2
    assert count_people.security_definer  # one overload is
    assert "cat_a.people" in count_people.reads and count_people.reads_relations
    assert {"cat_a.people", "cat_b.people", f"{USER}.people"} >= set(count_people.reads)
    assert "cat_a.people" in catalog.functions["cat_a.atomic_salary"].reads
    dynamic = catalog.functions["cat_a.dynamic"]
    assert dynamic.opaque_body and dynamic.reads_relations and dynamic.language == "plpgsql"
    pure = catalog.functions["cat_a.pure"]
    assert (pure.reads, pure.opaque_body, pure.reads_relations) == ((), False, False)
    assert not any(name.startswith("pg_catalog.") for name in catalog.functions)


def test_function_reads_follow_the_functions_they_call(catalog: CatalogSnapshot) -> None:
    wrapper = catalog.functions["cat_a.wrapper"]
    assert wrapper.calls == ("cat_a.count_people",)
    assert "cat_a.people" in wrapper.reads and not wrapper.opaque_body
    assert catalog.functions["cat_a.calls_dynamic"].opaque_body


def test_views_that_call_functions_read_what_the_functions_read(catalog: CatalogSnapshot) -> None:
    counted = catalog.relations["cat_a.counted"]
    assert set(counted.calls) == {"cat_a.wrapper", "cat_a.pure"} and counted.depends_on == ()
    assert "cat_a.people" in catalog.base_relations(counted)
    everything = {relation.qualified_name for relation in catalog.user_relations()}
    assert catalog.base_relations(catalog.relations["cat_a.opaque_view"]) == everything


def test_resolve_follows_postgresql_search_path_rules(catalog: CatalogSnapshot) -> None:
    def resolved(parts: tuple[str, ...], path: tuple[str, ...], user: str | None = None) -> str | None:
        relation = catalog.resolve(parts, path, user)
        return None if relation is None else relation.qualified_name

    assert resolved(("people",), ("cat_b", "cat_a")) == "cat_b.people"
    assert resolved(("people",), ("cat_a", "cat_b")) == "cat_a.people"
    assert resolved(("people",), ("$user", "cat_a"), USER) == f"{USER}.people"
    assert resolved(("people",), ("$user", "cat_a")) == "cat_a.people"
    assert resolved(("people",), ("pg_temp", "cat_b")) == "cat_b.people"
    assert resolved(("pg_class",), ("cat_a",)) == "pg_catalog.pg_class"
    assert resolved(("pg_class",), ("cat_a", "pg_catalog")) == "cat_a.pg_class"
    assert resolved(("cat_a", "people"), ("cat_b",)) == "cat_a.people"
    assert resolved((DATABASE, "cat_a", "people"), ()) == "cat_a.people"
    assert resolved(("people",), ("public",)) is None
    assert resolved(("nope", "people"), ("cat_a",)) is None


def test_default_search_path_follows_role_and_database_settings(catalog: CatalogSnapshot) -> None:
    assert catalog.default_search_path(USER, DATABASE) == (USER, "cat_a")
    assert catalog.default_search_path(USER, "postgres") == ("cat_b", "public")
    assert catalog.default_search_path(OTHER_USER, DATABASE) == ("cat_a", "Mixed Case")
    assert catalog.default_search_path(OTHER_USER, "postgres") == (OTHER_USER, "public")


def test_search_path_values_are_split_like_postgresql() -> None:
    assert parse_search_path('"$user", public') == ("$user", "public")
    assert parse_search_path('Sales, "Odd, Name", "q""uote"') == ("sales", "Odd, Name", 'q"uote')
    assert parse_search_path("") == ()


def test_partitions_and_children_are_governed_by_their_parents_dataset(catalog: CatalogSnapshot) -> None:
    policy = parse_policy("version: 1\ndatasets:\n"
                          "  cat_a.events: {columns: {ssn: {sensitivity: restricted}}}\n"
                          "  cat_a.events_2024: {columns: {ssn: {sensitivity: confidential}}}\n"
                          "  cat_a.base: {columns: {secret: {sensitivity: restricted}}}\n")
    small = effective_dataset(policy, catalog.relations["cat_a.events_2024_small"])
    assert small is not None and small.name == "cat_a.events_2024"
    own = effective_dataset(policy, catalog.relations["cat_a.events"])
    assert own is not None and own.name == "cat_a.events"
    child = effective_dataset(policy, catalog.relations["cat_a.child"])
    assert child is not None and child.name == "cat_a.base"
    assert effective_dataset(policy, catalog.relations["cat_a.people"]) is None


def test_generation_is_stable_until_the_schema_changes(catalog_db: str, catalog: CatalogSnapshot,
                                                      upstream: Upstream) -> None:
    again = asyncio.run(load_catalog(catalog_db))
    assert again.generation == catalog.generation and again == catalog and hash(again) == hash(catalog)
    upstream.execute("ALTER TABLE cat_b.people ADD COLUMN added text", dbname=DATABASE)
    try:
        changed = asyncio.run(load_catalog(catalog_db))
        assert changed.generation != catalog.generation
        assert [c.name for c in changed.relations["cat_b.people"].columns] == ["id", "added"]
    finally:
        upstream.execute("ALTER TABLE cat_b.people DROP COLUMN added", dbname=DATABASE)


def test_the_database_can_be_chosen_apart_from_the_dsn(upstream: Upstream, catalog_db: str) -> None:
    other = asyncio.run(load_catalog(upstream.dsn(dbname="postgres"), database=DATABASE))
    assert other.database == DATABASE and "cat_a.people" in other.relations


def test_an_unreachable_upstream_is_a_catalog_error() -> None:
    with pytest.raises(CatalogError) as raised:
        asyncio.run(load_catalog(f"postgresql://postgres@127.0.0.1:{free_port()}/postgres", timeout=5))
    assert "cannot connect to the upstream" in str(raised.value)
