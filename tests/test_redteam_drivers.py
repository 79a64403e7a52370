"""Red team, regression: the ways real drivers carry rows (binary results, pipeline mode, server-side
cursors, COPY in text/CSV/binary, asyncpg cursors and COPY) never bring a canary to a masked
login through pgveil."""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from tests import guard_setup
from tests.guard_setup import DATABASE, PASSWORD, POLICY, GuardWorld, leaked_canaries
from tests.guard_setup import GuardDatabase as _GuardDatabase
from tests.proxy_harness import RunningProxy, running_proxy

world = guard_setup.world  # the shared guard database with canary values


@pytest.fixture(scope="module")
def proxy(world: GuardWorld) -> Iterator[RunningProxy]:
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "policy.yaml")
        with open(path, "w") as handle:
            handle.write(POLICY)
        with running_proxy(_GuardDatabase(world), path) as running:
            yield running


@pytest.fixture
def conn(proxy: RunningProxy) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(proxy.dsn("gv_analyst", PASSWORD, DATABASE), autocommit=True) as connection:
        yield connection


def test_binary_results_are_masked(conn: psycopg.Connection[Any]) -> None:
    with conn.cursor(binary=True) as cur:
        cur.execute("select p, ssn, birth_date, salary, card from gv.people p where id = %s", (1,))
        rows = cur.fetchall()
    assert rows and leaked_canaries(repr(rows)) == []


def test_pipeline_mode_with_a_refusal_in_the_middle(conn: psycopg.Connection[Any]) -> None:
    seen: list[str] = []
    with conn.pipeline() as pipeline:
        first = conn.execute("select email from gv.people where id = %s", (1,))
        try:
            conn.execute("select table_to_xml('gv.people', true, true, '')")
            pipeline.sync()
        except psycopg.errors.InsufficientPrivilege as exc:
            seen.append(str(exc))
        seen.append(repr(first.fetchall()))
    third = conn.execute("select string_agg(ssn || notes, ',') from gv.people").fetchall()
    text = "\n".join(seen) + repr(third)
    assert "q***@leak.example" in text
    assert leaked_canaries(text) == []


def test_server_side_cursor_is_masked(conn: psycopg.Connection[Any]) -> None:
    with conn.transaction(), conn.cursor(name="redteam_server_side") as cur:
        cur.itersize = 1
        cur.execute("select * from gv.people order by id")
        rows = list(cur)
        cur.scroll(0, mode="absolute")
    assert len(rows) == 3  # the row filter hides the fourth person
    assert leaked_canaries(repr(rows)) == []


@pytest.mark.parametrize("statement", [
    "copy gv.people to stdout",
    "copy gv.people (ssn, email, notes) to stdout with (format csv, header, force_quote *)",
    "copy (select p from gv.people p) to stdout with (format binary)",
    "copy (table gv.people) to stdout",
    "copy gv.events to stdout",
    "copy (select * from gv.people_listed) to stdout",
])
def test_copy_out_in_every_format_is_masked(conn: psycopg.Connection[Any], statement: str) -> None:
    chunks: list[bytes] = []
    try:
        with conn.cursor() as cur, cur.copy(statement.encode()) as copy:  # type: ignore[arg-type]
            chunks.extend(bytes(block) for block in copy)
    except psycopg.Error as exc:
        chunks.append(str(exc).encode())
    assert leaked_canaries(b"".join(chunks).decode(errors="replace")) == []


async def test_asyncpg_cursor_and_copy_from_table_are_masked(proxy: RunningProxy) -> None:
    import asyncpg

    connection = await asyncpg.connect(host=proxy.host, port=proxy.port, user="gv_analyst", password=PASSWORD,
                                       database=DATABASE)
    try:
        seen: list[str] = []
        async with connection.transaction():
            async for record in connection.cursor("select * from gv.people order by id", prefetch=1):
                seen.append(repr(record))
        for options in ({}, {"format": "csv", "header": True}):
            buffer = io.BytesIO()
            try:
                await connection.copy_from_table("people", schema_name="gv", output=buffer, **options)
            except asyncpg.InsufficientPrivilegeError as exc:  # a refusal is safe too
                seen.append(str(exc))
            seen.append(buffer.getvalue().decode())
        statement = await connection.prepare("select ssn, notes from gv.people where id = $1")
        seen.append(repr(await statement.fetch(1)))
        seen.append(repr(await statement.fetch(4)))  # outside the row filter: no row
    finally:
        await connection.close()
    text = "\n".join(seen)
    assert "q***@leak.example" in text
    assert leaked_canaries(text) == []
