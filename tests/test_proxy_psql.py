"""PostgreSQL's own tools through pgveil: psql describe commands, \\copy, multi-statement strings, pgbench."""

from __future__ import annotations

import re
import subprocess

import pytest

from proxy.embedded import bin_dir
from tests.proxy_harness import running_proxy


@pytest.fixture(scope="module")
def proxy(upstream):
    upstream.execute(
        "drop schema if exists relay_psql cascade; create schema relay_psql;"
        " create table relay_psql.items (id int primary key, name text not null, price numeric(8,2));"
        " create index on relay_psql.items (name);"
        " create view relay_psql.cheap as select * from relay_psql.items where price < 10;"
        " create function relay_psql.double(x int) returns int language sql as 'select x * 2';"
        " comment on table relay_psql.items is 'things for sale';"
    )
    with running_proxy(upstream) as running:
        yield running


def psql(dsn: str, *args: str, stdin: str | None = None) -> tuple[int, str, str]:
    result = subprocess.run(
        [str(bin_dir() / "psql"), "-X", "-d", dsn, *args],
        input=stdin, capture_output=True, text=True, timeout=60,
    )
    return result.returncode, result.stdout, result.stderr


def same_psql(upstream, proxy, *args: str, stdin: str | None = None) -> tuple[int, str, str]:
    direct = psql(upstream.dsn(), *args, stdin=stdin)
    relayed = psql(proxy.dsn(), *args, stdin=stdin)
    assert relayed == direct
    return relayed


DESCRIBE = [r"\d relay_psql.items", r"\dt relay_psql.*", r"\d+ relay_psql.cheap", r"\df relay_psql.*",
            r"\dn relay_psql", r"\l postgres", r"\dt+ relay_psql.*"]


@pytest.mark.parametrize("command", DESCRIBE)
def test_psql_describe_commands_print_the_same(upstream, proxy, command):
    code, out, _ = same_psql(upstream, proxy, "-c", command)
    assert code == 0 and out.strip()


def test_psql_multi_statement_string_and_errors(upstream, proxy):
    code, out, err = same_psql(upstream, proxy, "-c", "select 1 as a; select 'two' as b; select 1/0")
    assert code == 1 and "division by zero" in err and "two" in out


def test_psql_script_with_error_continues_like_postgres(upstream, proxy):
    script = "begin;\nselect 1;\nselect nope;\nselect 2;\nrollback;\nselect 'after';\n"
    _, out, err = same_psql(upstream, proxy, "-q", "-A", "-t", stdin=script)
    assert "current transaction is aborted" in err and out.strip().endswith("after")


def test_psql_backslash_copy_in_and_out(upstream, proxy):
    data = "".join(f"{i}\titem {i}\t{i}.50\n" for i in range(1, 501))
    script = (
        "create temp table relay_copy_t (like relay_psql.items);\n"
        "\\copy relay_copy_t from stdin\n" + data + "\\.\n"
        "\\copy (select * from relay_copy_t where id % 100 = 0 order by id) to stdout with csv header\n"
        "select count(*), sum(price) from relay_copy_t;\n"
    )
    code, out, _ = same_psql(upstream, proxy, "-A", "-t", stdin=script)
    assert code == 0
    assert "id,name,price\n100,item 100,100.50" in out and "500|" in out


@pytest.fixture(scope="module")
def bench_db(upstream):
    upstream.execute("drop database if exists relay_bench")
    upstream.execute("create database relay_bench")
    pgbench_init = [str(bin_dir() / "pgbench"), "-i", "-q", "-s", "1", "-d",
                    upstream.dsn(dbname="relay_bench")]
    subprocess.run(pgbench_init, check=True, capture_output=True, timeout=120)
    return "relay_bench"


@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_pgbench_through_pgveil_in_every_protocol_mode(proxy, bench_db, mode):
    result = subprocess.run(
        [str(bin_dir() / "pgbench"), "-n", "-M", mode, "-c", "4", "-j", "2", "-t", "50",
         "-d", proxy.dsn(dbname=bench_db)],
        capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stderr
    assert re.search(r"number of transactions actually processed: 200/200", result.stdout), result.stdout
    assert "number of failed transactions: 0" in result.stdout
