"""Session settings under the guard: startup options read as PostgreSQL splits them, writes to
pg_settings refused for masked roles, and a masked session judged with the settings PostgreSQL
reports (ParameterStatus) — refused until settings pgveil cannot read SQL under are reset."""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import psycopg
import pytest

from proxy.catalog import load_catalog
from proxy.enforcement import _startup_settings, split_startup_options
from proxy.guard.pipeline import guard
from proxy.guard.verdict import Refuse
from tests import guard_setup
from tests.conftest import Upstream
from tests.guard_setup import DATABASE, PASSWORD, POLICY, GuardWorld, leaked_canaries
from tests.guard_setup import GuardDatabase as _GuardDatabase
from tests.proxy_harness import RunningProxy, running_proxy

world = guard_setup.world

SUPERUSER_LOGIN = "settings_super"  # a PostgreSQL superuser that the policy puts in a masked role
# gv_public sees everything until `_demote` reloads the plain guard policy (public_only: masked).
PROMOTED = (POLICY.replace("members: [gv_admin]", "members: [gv_admin, gv_public]")
            .replace("members: [gv_public]", "members: [gv_nobody]")
            .replace("members: [gv_analyst]", f"members: [gv_analyst, {SUPERUSER_LOGIN}]"))
DEMOTED = PROMOTED.replace("members: [gv_admin, gv_public]", "members: [gv_admin]").replace(
    "members: [gv_nobody]", "members: [gv_public]")
GBK_SWALLOWS_BACKSLASH = "select E'\u4e01\\' , (select ssn from gv.people where id = 1) as x -- ', 1".encode()


# ---- startup options ------------------------------------------------------------------------------


@pytest.mark.parametrize(("options", "words"), [
    ("-c\vsearch_path=gv", ["-c", "search_path=gv"]),
    ("-c\fclient_encoding=GBK \r\n--a=b", ["-c", "client_encoding=GBK", "--a=b"]),
    ("-c application_name=two\\ words", ["-c", "application_name=two words"]),
    ("-c 'search_path=gv'", ["-c", "'search_path=gv'"]),
    ("-c a=back\\\\slash\\", ["-c", "a=back\\slash"]),
])
def test_startup_options_are_split_like_pg_split_opts(options: str, words: list[str]) -> None:
    assert split_startup_options(options) == words


def test_startup_options_split_at_vertical_tab_as_postgresql_reads_them(upstream: Upstream) -> None:
    options = "-c\vapplication_name=split\\ by\\ vt\f-c\fextra_float_digits=1"
    with psycopg.connect(upstream.dsn(), options=options, autocommit=True) as conn:
        shown = conn.execute("select current_setting('application_name'), "
                             "current_setting('extra_float_digits')").fetchone()
    assert shown == ("split by vt", "1")
    assert ("application_name", "split by vt") in _startup_settings({"options": options})
    assert ("extra_float_digits", "1") in _startup_settings({"options": options})


def test_startup_option_that_is_not_a_plain_setting_name_is_kept_for_refusal() -> None:
    for options in ("-c 'search_path=gv'", "-c search path=gv", "-ec search_path=gv", "-c", "café"):
        assert any(name == "options" for name, _ in _startup_settings({"options": options})), options


# ---- writes to pg_settings ---------------------------------------------------------------------------


@pytest.mark.parametrize("sql", [
    "update pg_catalog.pg_settings set setting = 'gv' where name = 'search_path'",
    "with changed as (update pg_settings set setting = 'gv' where name = 'search_path' returning name) "
    "select * from changed",
    "insert into pg_settings (name, setting) values ('search_path', 'gv')",
    "merge into pg_settings s using (select 'search_path' as name) n on s.name = n.name "
    "when matched then update set setting = 'gv'",
])
def test_masked_role_cannot_write_to_pg_settings(world: GuardWorld, sql: str) -> None:
    verdict = world.verdict(sql, "gv_writer")
    assert isinstance(verdict, Refuse) and verdict.rule == "session-setting", verdict


def test_explain_analyze_of_a_pg_settings_update_is_refused(world: GuardWorld) -> None:
    verdict = world.verdict("explain analyze update pg_settings set setting = 'GBK' "
                            "where name = 'client_encoding'", "gv_writer")
    assert isinstance(verdict, Refuse), verdict


def test_update_through_a_view_over_pg_settings_is_refused(world: GuardWorld) -> None:
    world.upstream.execute("CREATE OR REPLACE VIEW gv.settings_mirror AS SELECT * FROM pg_settings; "
                           "GRANT SELECT, UPDATE ON gv.settings_mirror TO gv_writer", dbname=DATABASE)
    try:
        # PostgreSQL does change the setting through such a view (pg_settings' update rule applies)
        with psycopg.connect(world.dsn("gv_writer"), autocommit=True) as conn:
            conn.execute("update gv.settings_mirror set setting = 'gv_other' where name = 'search_path'")
            assert conn.execute("show search_path").fetchone() == ("gv_other",)
        catalog = asyncio.run(load_catalog(world.dsn()))
        context = replace(world.context("gv_writer"), catalog=catalog)
        verdict = guard("update gv.settings_mirror set setting = 'gv' where name = 'search_path'", context)
    finally:
        world.upstream.execute("DROP VIEW IF EXISTS gv.settings_mirror", dbname=DATABASE)
    assert isinstance(verdict, Refuse) and verdict.rule == "session-setting", verdict


def test_role_that_sees_everything_may_update_pg_settings(world: GuardWorld) -> None:
    verdict = world.verdict("update pg_settings set setting = 'UTC' where name = 'TimeZone'", "gv_admin")
    assert not isinstance(verdict, Refuse), verdict


# ---- settings PostgreSQL reports -------------------------------------------------------------------


@pytest.fixture(scope="module")
def proxy(world: GuardWorld) -> Iterator[tuple[RunningProxy, str]]:
    world.upstream.execute(f"DROP ROLE IF EXISTS {SUPERUSER_LOGIN}; "
                           f"CREATE ROLE {SUPERUSER_LOGIN} SUPERUSER LOGIN PASSWORD '{PASSWORD}'")
    try:
        with tempfile.TemporaryDirectory() as directory:
            path = os.path.join(directory, "policy.yaml")
            with open(path, "w") as handle:
                handle.write(PROMOTED)
            with running_proxy(_GuardDatabase(world), path) as running:
                yield running, path
    finally:
        world.upstream.execute(f"DROP ROLE IF EXISTS {SUPERUSER_LOGIN}")


@pytest.fixture
def promoted(proxy: tuple[RunningProxy, str]) -> Iterator[tuple[RunningProxy, str]]:
    running, path = proxy
    _write_and_reload(running, path, PROMOTED)
    yield running, path
    _write_and_reload(running, path, PROMOTED)


def _write_and_reload(proxy: RunningProxy, path: str, policy: str) -> None:
    with open(path, "w") as handle:
        handle.write(policy)
    proxy.run(proxy.server.reload())


def _demote(proxy: RunningProxy, path: str) -> None:
    _write_and_reload(proxy, path, DEMOTED)


def connect(proxy: RunningProxy, login: str) -> psycopg.Connection[Any]:
    return psycopg.connect(proxy.dsn(login, PASSWORD, DATABASE), autocommit=True)


def received(conn: psycopg.Connection[Any], statement: str | bytes) -> str:
    """Rows and the whole error message of one simple-protocol statement, as text."""
    result = conn.pgconn.exec_(statement.encode() if isinstance(statement, str) else statement)
    seen = [(result.error_message or b"").decode(errors="replace")]
    for row in range(result.ntuples):
        for column in range(result.nfields):
            value = result.get_value(row, column)
            seen.append("" if value is None else value.decode(errors="replace"))
    return "\n".join(seen)


MASKED_SSN = "select ssn from gv.people where id = 1"


def test_demoted_session_with_a_multibyte_client_encoding_is_refused_until_it_is_reset(
    promoted: tuple[RunningProxy, str],
) -> None:
    proxy, path = promoted
    with connect(proxy, "gv_public") as conn:
        received(conn, "set client_encoding = 'GBK'")
        assert "914-27-6380" in received(conn, MASKED_SSN)  # admin: sees the raw value
        _demote(proxy, path)
        text = received(conn, GBK_SWALLOWS_BACKSLASH)
        assert "pgveil: session-setting" in text and "client_encoding is GBK" in text
        assert leaked_canaries(text) == []
        assert "pgveil:" not in received(conn, "set client_encoding = 'UTF8'")
        answer = received(conn, MASKED_SSN)
        assert "pgveil:" not in answer and leaked_canaries(answer) == []


def test_demoted_session_with_standard_conforming_strings_off_is_refused_until_it_is_reset(
    promoted: tuple[RunningProxy, str],
) -> None:
    proxy, path = promoted
    with connect(proxy, "gv_public") as conn:
        received(conn, "set standard_conforming_strings = off")
        _demote(proxy, path)
        assert "standard_conforming_strings is off" in received(conn, MASKED_SSN)
        assert "pgveil:" not in received(conn, "reset standard_conforming_strings")
        assert "pgveil:" not in received(conn, MASKED_SSN)


def test_demoted_session_that_set_its_role_is_refused_until_reset_role(
    promoted: tuple[RunningProxy, str],
) -> None:
    proxy, path = promoted
    with connect(proxy, "gv_public") as conn:
        assert "pgveil:" not in received(conn, "set role gv_public")
        _demote(proxy, path)
        assert "RESET ROLE" in received(conn, MASKED_SSN)
        assert "pgveil:" not in received(conn, "reset role")
        assert "pgveil:" not in received(conn, MASKED_SSN)


def test_demoted_session_resolves_names_with_the_search_path_postgresql_reports(
    promoted: tuple[RunningProxy, str],
) -> None:
    proxy, path = promoted
    with connect(proxy, "gv_public") as conn:
        # rolled back: PostgreSQL reports the old path again, and pgveil follows it
        received(conn, "begin; set local search_path = gv_other; commit")
        received(conn, "begin; set search_path = gv_other; rollback")
        received(conn, "select set_config('search_path', 'gv', false)")
        _demote(proxy, path)
        text = received(conn, "select ssn from people where id = 1")  # gv.people, masked
    assert "pgveil:" not in text and "914-27-6380" not in text and text.strip()


def test_masked_login_that_is_a_postgresql_superuser_is_refused(proxy: tuple[RunningProxy, str]) -> None:
    running, _ = proxy
    with connect(running, SUPERUSER_LOGIN) as conn:
        text = received(conn, MASKED_SSN)
        assert "pgveil: session-setting" in text and "superuser" in text
        assert "pgveil:" not in received(conn, "set timezone = 'UTC'")  # settings still go through


def test_login_that_sees_everything_keeps_its_own_client_encoding(proxy: tuple[RunningProxy, str]) -> None:
    running, _ = proxy
    with connect(running, "gv_admin") as conn:
        received(conn, "set client_encoding = 'LATIN1'")
        assert "914-27-6380" in received(conn, MASKED_SSN)
