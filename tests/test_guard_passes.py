"""The guard's passes one by one: the re-gate catches a rewrite that leaves a masked relation
outside its derived table, the cache never mixes two shapes, inheritance takes the strictest
masks, shadowed masking functions and analysis failures are refused, explain and reload."""

from __future__ import annotations

import asyncio
import os
import re
import tempfile
from dataclasses import replace

import pytest

from proxy.cli import main
from proxy.enforcement import Enforcement, EnforcementError
from proxy.guard import pipeline
from proxy.guard.cache import VerdictCache
from proxy.guard.mask import Edit
from proxy.guard.pipeline import analyse
from proxy.guard.regate import regate
from proxy.guard.statement import GuardContext, GuardStatement
from proxy.guard.verdict import Refuse, Rewrite
from proxy.policy.loader import parse_policy
from tests.guard_setup import DATABASE, POLICY, GuardWorld, world  # noqa: F401


def test_regate_refuses_a_rewrite_that_reads_a_masked_table_directly(world: GuardWorld) -> None:
    context = world.context()
    analysis = analyse("select ssn from gv.people", context)
    assert isinstance(analysis.verdict, Rewrite)
    refusal = regate('select ssn from "gv"."people"', analysis.statements, (), context)
    assert refusal is not None and refusal.rule == "rewrite-check-failed"


def test_regate_refuses_a_derived_table_that_smuggles_a_second_read(world: GuardWorld) -> None:
    context = world.context()
    analysis = analyse("select ssn from gv.people", context)
    edit = analysis.edits[0]
    smuggled = Edit(edit.start, edit.end, '(select * from "gv"."people" join "gv"."people" q using (id)) people',
                    edit.substitutes)
    text = "select ssn from " + smuggled.text
    refusal = regate(text, analysis.statements, (smuggled,), context)
    assert refusal is not None and refusal.rule == "rewrite-check-failed"


def test_regate_refuses_a_changed_statement_kind(world: GuardWorld) -> None:
    context = world.context()
    analysis = analyse("select 1", context)
    refusal = regate("delete from gv.orders", analysis.statements, (), context)
    assert refusal is not None and refusal.rule == "rewrite-check-failed"


def test_cache_never_serves_one_table_for_another_with_the_same_digits_dropped(world: GuardWorld) -> None:
    context = world.context("gv_admin")
    cache = VerdictCache()
    cache.store("select * from gv.t1 where id = 1", "k", analyse("select * from gv.orders where id = 1", context))
    assert cache.lookup("select * from gv.t2 where id = 1", "k") is None
    assert cache.lookup("select * from gv.t1 where id = 22", "k") is not None


def test_cache_hit_reinserts_the_new_literals_into_the_masked_rewrite(world: GuardWorld) -> None:
    context = world.context()
    cache = VerdictCache()
    cache.store("select email from gv.people where id = 1", "k",
                analyse("select email from gv.people where id = 1", context))
    hit = cache.lookup("select email from gv.people where id = 2", "k")
    assert hit is not None and isinstance(hit.verdict, Rewrite)
    assert hit.verdict.sql == analyse("select email from gv.people where id = 2", context).verdict.sql
    assert hit.verdict.sql.endswith("where id = 2")


def test_inheritance_parent_scans_take_the_strictest_masks_of_their_children(world: GuardWorld) -> None:
    policy = parse_policy(POLICY.replace("  gv.base:\n    columns:\n      secret: {sensitivity: restricted, "
                                         "protection: redact}\n",
                                         "  gv.child:\n    columns:\n      secret: {sensitivity: restricted, "
                                         "protection: redact}\n"), "p.yaml")
    context = replace(world.context(), policy=policy)
    verdict = analyse("select secret from gv.base", context).verdict
    assert isinstance(verdict, Rewrite) and 'NULL::text AS "secret"' in verdict.sql
    only = analyse("select secret from only gv.base", context).verdict
    assert 'NULL::text' not in only.sql if isinstance(only, Rewrite) else False


def test_a_row_filter_on_a_child_refuses_reading_it_through_the_parent(world: GuardWorld) -> None:
    policy = parse_policy(POLICY.replace('      gv.people: "region <> \'hidden\'"',
                                         '      gv.people: "region <> \'hidden\'"\n      gv.child: "extra = \'y\'"'),
                          "p.yaml")
    context = replace(world.context(), policy=policy, role=policy.roles["analyst"])
    verdict = analyse("select * from gv.base", context).verdict
    assert isinstance(verdict, Refuse) and verdict.rule == "row-filtered-child"


def test_masking_expressions_call_only_schema_qualified_functions(world: GuardWorld) -> None:
    # An unqualified call could resolve to a same-named function a user created on the search_path.
    verdict = analyse("select * from gv.people", world.context()).verdict
    assert isinstance(verdict, Rewrite)
    derived = verdict.sql[verdict.sql.index("(SELECT") :]
    assert re.findall(r"(?<![.\w:])([a-z_][a-z0-9_]*)\(", derived) == []


def test_a_rule_that_crashes_refuses_instead_of_letting_the_statement_through(
        world: GuardWorld, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(statement: GuardStatement, context: GuardContext) -> Refuse | None:
        raise ValueError("bug")

    monkeypatch.setattr(pipeline, "RULES", [broken, *pipeline.RULES])
    verdict = analyse("select ssn from gv.people", world.context()).verdict
    assert isinstance(verdict, Refuse) and verdict.rule == "analysis-failed"


def _policy_file(directory: str, text: str = POLICY) -> str:
    path = os.path.join(directory, "policy.yaml")
    with open(path, "w") as handle:
        handle.write(text)
    return path


def test_explain_prints_decision_rule_and_rewritten_sql(
        world: GuardWorld, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGVEIL_UPSTREAM", raising=False)
    with tempfile.TemporaryDirectory() as directory:
        path = _policy_file(directory)
        assert main(["explain", "--policy", path, "--user", "gv_analyst", "--upstream", world.dsn(),
                     "select email from gv.people"]) == 0
        masked = capsys.readouterr().out
        assert main(["explain", "--policy", path, "--role", "analyst", "--upstream", world.dsn(),
                     "select query_to_xml('select 1', true, true, '')"]) == 0
        refused = capsys.readouterr().out
        assert main(["explain", "--policy", path, "--role", "analyst", "select 1"]) == 2
        missing = capsys.readouterr().err
    assert "decision: rewrite" in masked and "gv.people.email:email" in masked
    assert "rewritten SQL:" in masked and '"gv"."people"' in masked
    assert "decision: refuse" in refused and "rule: side-door-function" in refused
    assert "--upstream" in missing


async def test_reload_keeps_the_old_policy_when_the_new_one_is_invalid(world: GuardWorld) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = _policy_file(directory)
        enforcement = await Enforcement.create(path, world.dsn())
        before = enforcement.policy
        _policy_file(directory, "version: 1\nroles: [not, a, mapping]\n")
        with pytest.raises(EnforcementError):
            await enforcement.reload()
        assert enforcement.policy is before
        _policy_file(directory, POLICY.replace("reveal: [public, internal]\n    row_filters:",
                                               "reveal: [public, internal, confidential, restricted]\n"
                                               "    row_filters:"))
        reloaded = await enforcement.reload()
        assert reloaded.version != before.version and enforcement.policy is reloaded


async def test_a_missing_policy_file_is_a_one_line_error(world: GuardWorld) -> None:
    with pytest.raises(EnforcementError) as raised:
        await Enforcement.create("/nonexistent/policy.yaml", world.dsn())
    assert "\n" not in str(raised.value) and "policy" in str(raised.value)


async def test_the_catalog_is_refreshed_after_ddl_so_new_tables_are_guarded(world: GuardWorld) -> None:
    with tempfile.TemporaryDirectory() as directory:
        enforcement = await Enforcement.create(_policy_file(directory), world.dsn())
        from proxy.connection_policy import ClientInfo, Outcome

        connection = enforcement.connection_policy()
        client = ClientInfo(1, "test", "gv_admin", DATABASE, "", False)
        assert await connection.on_startup({"user": "gv_admin", "database": DATABASE}, client) is None
        created = await connection.on_query("create table gv.fresh (id integer, ssn text)")
        assert not isinstance(created, Refuse)
        await asyncio.to_thread(world.upstream.execute, created.sql, DATABASE)
        await connection.on_complete(Outcome(rows=0, sqlstate=None, upstream_seconds=0.0))
        try:
            # The admin sees everything, so its session goes on while the catalog follows the DDL in
            # the background; a masked session's next statement waits for it (never judged stale).
            analyst = enforcement.connection_policy()
            await analyst.on_startup({"user": "gv_public", "database": DATABASE},
                                     replace(client, user="gv_public"))
            verdict = await analyst.on_query("select ssn from gv.fresh")
            assert isinstance(verdict, Rewrite) and 'NULL::text AS "ssn"' in verdict.sql
            assert "gv.fresh" in enforcement.state.catalog.relations
        finally:
            world.upstream.execute("DROP TABLE gv.fresh", dbname=DATABASE)


def test_a_function_listed_under_datasets_may_be_called_by_a_masked_role(world: GuardWorld) -> None:
    policy = parse_policy(POLICY + "  gv.leak_ssn:\n    description: reviewed\n    columns: {}\n", "p.yaml")
    context = replace(world.context(), policy=policy, role=policy.roles["analyst"])
    assert not isinstance(analyse("select gv.leak_ssn(2)", context).verdict, Refuse)
    assert isinstance(analyse("select gv.leak_ssn(2)", world.context()).verdict, Refuse)


def test_a_syntax_error_is_postgresqls_own_error_and_its_audit_facts_hold_no_literal(
        world: GuardWorld) -> None:
    verdict = analyse("select '914-27-6380' '9' from", world.context()).verdict
    assert isinstance(verdict, Refuse) and verdict.rule == "unparseable"  # the rule audit and metrics see
    assert (verdict.sqlstate, verdict.position) == ("42601", 22)
    assert verdict.text == "syntax error at or near \"'9'\""
    assert "914" not in repr(verdict.info)


def test_drivers_and_psql_catalog_queries_pass_for_a_masked_role(world: GuardWorld) -> None:
    from pathlib import Path

    from tests.test_firewall_corpus import benign_entries

    corpus = Path(__file__).parent / "corpus" / "benign"
    refused = [(label, verdict.text)
               for name in ("drivers.sql", "psql_catalog.sql")
               for label, sql in benign_entries(corpus / name)
               if isinstance(verdict := analyse(sql, world.context()).verdict, Refuse)]
    assert refused == []


async def test_startup_and_fast_path_refusals_of_a_guarded_connection(world: GuardWorld) -> None:
    from proxy.connection_policy import ClientInfo

    with tempfile.TemporaryDirectory() as directory:
        enforcement = await Enforcement.create(_policy_file(directory), world.dsn())
    client = ClientInfo(1, "test", "gv_analyst", DATABASE, "", False)
    other_database = await enforcement.connection_policy().on_startup(
        {"user": "gv_analyst", "database": "postgres"}, client)
    assert other_database is not None and (other_database.rule, other_database.sqlstate) == ("wrong-database", "28000")
    nobody = await enforcement.connection_policy().on_startup({"user": "gv_nobody", "database": DATABASE}, client)
    assert nobody is not None and (nobody.rule, nobody.sqlstate) == ("no-role", "28000")
    masked = enforcement.connection_policy()
    assert await masked.on_startup({"user": "gv_analyst", "database": DATABASE, "client_encoding": "'utf-8'"},
                                   client) is None
    refused = await masked.on_function_call(1234)
    assert isinstance(refused, Refuse) and refused.rule == "function-call-message"
    admin = enforcement.connection_policy()
    assert await admin.on_startup({"user": "gv_admin", "database": "postgres"}, client) is None
    assert not isinstance(await admin.on_function_call(1234), Refuse)


async def test_an_elevation_applies_from_the_next_statement_and_ends_the_same_way(world: GuardWorld) -> None:
    from proxy.connection_policy import ClientInfo

    elevated: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as directory:
        enforcement = await Enforcement.create(_policy_file(directory), world.dsn(), active_role=elevated.get)
    connection = enforcement.connection_policy()
    await connection.on_startup({"user": "gv_analyst", "database": DATABASE},
                                ClientInfo(1, "test", "gv_analyst", DATABASE, "", False))
    masked = await connection.on_query("select ssn from gv.people")
    elevated["gv_analyst"] = "admin"
    raw = await connection.on_query("select ssn from gv.people")
    del elevated["gv_analyst"]
    again = await connection.on_query("select ssn from gv.people")
    assert isinstance(masked, Rewrite) and "mask_hash" in masked.sql
    assert "mask_hash" not in raw.sql
    assert isinstance(again, Rewrite) and again.sql == masked.sql


async def test_an_upstream_where_masking_cannot_be_installed_is_a_one_line_error(world: GuardWorld) -> None:
    with tempfile.TemporaryDirectory() as directory:
        with pytest.raises(EnforcementError) as raised:
            await Enforcement.create(_policy_file(directory), world.dsn("gv_analyst"))
    assert str(raised.value).startswith("cannot install pgveil's masking functions upstream:")
    assert "\n" not in str(raised.value)


async def test_a_server_side_client_encoding_other_than_utf8_refuses_masked_logins(world: GuardWorld) -> None:
    from proxy.connection_policy import ClientInfo

    world.upstream.execute("ALTER ROLE gv_public IN DATABASE guard_test SET client_encoding = 'SJIS'")
    try:
        with tempfile.TemporaryDirectory() as directory:
            enforcement = await Enforcement.create(_policy_file(directory), world.dsn())
        refusal = await enforcement.connection_policy().on_startup(
            {"user": "gv_public", "database": DATABASE}, ClientInfo(1, "t", "gv_public", DATABASE, "", False))
        assert refusal is not None and refusal.rule == "session-setting" and "SJIS" in refusal.message
    finally:
        world.upstream.execute("ALTER ROLE gv_public IN DATABASE guard_test RESET client_encoding")


async def test_a_user_operator_with_closer_types_never_receives_raw_values_inside_a_mask(
        world: GuardWorld) -> None:
    # public./(numeric, integer) would beat pg_catalog's numeric / numeric for `salary / 1000`;
    # masks spell their operators OPERATOR(pg_catalog.x), so it is never called.
    await asyncio.to_thread(world.upstream.execute, """
        CREATE FUNCTION public.gv_num_div(numeric, integer) RETURNS numeric LANGUAGE plpgsql
            AS $$ BEGIN RAISE NOTICE 'raw %', $1; RETURN $1 / $2::numeric; END $$;
        CREATE OPERATOR public./ (LEFTARG = numeric, RIGHTARG = integer, FUNCTION = public.gv_num_div);
        """, DATABASE)
    try:
        verdict, outcome = await asyncio.to_thread(world.guarded, "select salary from gv.people")
        assert isinstance(verdict, Rewrite) and outcome.error is None
        assert outcome.notices == []
        assert all("123457.89" not in str(row) for row in outcome.rows)
    finally:
        await asyncio.to_thread(world.upstream.execute,
                                "DROP OPERATOR public./ (numeric, integer); DROP FUNCTION public.gv_num_div",
                                DATABASE)
