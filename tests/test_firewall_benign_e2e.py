"""Benign work through pgveil with every firewall rule enforced: TPC-H, pgbench's built-in scripts
and psql's describe commands run for a people role exactly as they do on PostgreSQL."""

from __future__ import annotations

import subprocess
import textwrap
from collections.abc import Iterator

import psycopg
import pytest

from proxy.embedded import bin_dir
from tests.conftest import Upstream
from tests.proxy_harness import RunningProxy, running_proxy
from tests.test_firewall_corpus import CORPUS, benign_entries

DATABASE = "fw_bench"
LOGIN, PASSWORD = "fw_bench_analyst", "fw-bench-pw"

TPCH_SCHEMA = """
CREATE TABLE region (r_regionkey int PRIMARY KEY, r_name char(25), r_comment varchar(152));
CREATE TABLE nation (n_nationkey int PRIMARY KEY, n_name char(25), n_regionkey int,
    n_comment varchar(152));
CREATE TABLE part (p_partkey int PRIMARY KEY, p_name varchar(55), p_mfgr char(25), p_brand char(10),
    p_type varchar(25), p_size int, p_container char(10), p_retailprice numeric(15,2),
    p_comment varchar(23));
CREATE TABLE supplier (s_suppkey int PRIMARY KEY, s_name char(25), s_address varchar(40),
    s_nationkey int, s_phone char(15), s_acctbal numeric(15,2), s_comment varchar(101));
CREATE TABLE partsupp (ps_partkey int, ps_suppkey int, ps_availqty int, ps_supplycost numeric(15,2),
    ps_comment varchar(199), PRIMARY KEY (ps_partkey, ps_suppkey));
CREATE TABLE customer (c_custkey int PRIMARY KEY, c_name varchar(25), c_address varchar(40),
    c_nationkey int, c_phone char(15), c_acctbal numeric(15,2), c_mktsegment char(10),
    c_comment varchar(117));
CREATE TABLE orders (o_orderkey int PRIMARY KEY, o_custkey int, o_orderstatus char(1),
    o_totalprice numeric(15,2), o_orderdate date, o_orderpriority char(15), o_clerk char(15),
    o_shippriority int, o_comment varchar(79));
CREATE TABLE lineitem (l_orderkey int, l_partkey int, l_suppkey int, l_linenumber int,
    l_quantity numeric(15,2), l_extendedprice numeric(15,2), l_discount numeric(15,2),
    l_tax numeric(15,2), l_returnflag char(1), l_linestatus char(1), l_shipdate date,
    l_commitdate date, l_receiptdate date, l_shipinstruct char(25), l_shipmode char(10),
    l_comment varchar(44), PRIMARY KEY (l_orderkey, l_linenumber));
INSERT INTO region VALUES (0, 'AFRICA', ''), (1, 'AMERICA', ''), (2, 'ASIA', ''), (3, 'EUROPE', '');
"""

POLICY = f"""
version: 1
roles:
  bench_analyst:
    members: [{LOGIN}]
    statements: [select, insert, update]
    tables: ["public.*"]
    reveal: [public, internal, confidential, restricted]
    injection: enforce
datasets: {{}}
"""


@pytest.fixture(scope="module")
def proxy(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningProxy]:
    upstream.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
    upstream.execute(f"CREATE DATABASE {DATABASE}")
    upstream.execute(
        f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{LOGIN}') THEN "
        f"CREATE ROLE {LOGIN} LOGIN PASSWORD '{PASSWORD}'; END IF; END $$")
    upstream.execute(TPCH_SCHEMA, dbname=DATABASE)
    subprocess.run([str(bin_dir() / "pgbench"), "-i", "-q", "-s", "1", "-d", upstream.dsn(dbname=DATABASE)],
                   check=True, capture_output=True, timeout=120)
    upstream.execute(f"GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA public TO {LOGIN}",
                     dbname=DATABASE)
    policy = tmp_path_factory.mktemp("fw_bench") / "bench.yaml"
    policy.write_text(textwrap.dedent(POLICY))

    class BenchUpstream:
        superuser, superpassword = upstream.superuser, upstream.superpassword

        def dsn(self, user: str | None = None, password: str | None = None, dbname: str = DATABASE) -> str:
            return upstream.dsn(user, password, dbname)

    with running_proxy(BenchUpstream(), policy_path=str(policy)) as running:
        yield running


def test_the_22_tpch_queries_run_through_the_firewall(proxy: RunningProxy) -> None:
    queries = benign_entries(CORPUS / "benign" / "tpch.sql")
    assert len(queries) == 22
    with psycopg.connect(proxy.dsn(LOGIN, PASSWORD, DATABASE), autocommit=True) as connection:
        for _label, sql in queries:
            connection.execute(sql.encode()).fetchall()  # type: ignore[call-overload]


@pytest.mark.parametrize("protocol", ["simple", "extended", "prepared"])
def test_pgbench_builtin_scripts_run_through_the_firewall(proxy: RunningProxy, protocol: str) -> None:
    for script in ("tpcb-like", "simple-update", "select-only"):
        result = subprocess.run(
            [str(bin_dir() / "pgbench"), "-n", "-b", script, "-t", "5", "-M", protocol,
             "-d", proxy.dsn(LOGIN, PASSWORD, DATABASE)],
            capture_output=True, text=True, timeout=120, check=False)
        assert result.returncode == 0, result.stderr
        assert "number of failed transactions: 0" in result.stdout


@pytest.mark.parametrize("command", [r"\d", r"\dt", r"\df", r"\l", r"\dn", r"\du", r"\d pgbench_accounts"])
def test_psql_describe_commands_run_through_the_firewall(
        upstream: Upstream, proxy: RunningProxy, command: str) -> None:
    def psql(dsn: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(bin_dir() / "psql"), "-X", "-d", dsn, "-c", command],
                              capture_output=True, text=True, timeout=60, check=False)

    relayed = psql(proxy.dsn(LOGIN, PASSWORD, DATABASE))
    assert relayed.returncode == 0, relayed.stderr
    assert relayed.stdout == psql(upstream.dsn(LOGIN, PASSWORD, DATABASE)).stdout

