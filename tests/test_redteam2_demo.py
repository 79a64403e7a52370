"""Red team, round 2: the demo policy (policies/reviews.yaml) through a running pgveil. The product
manager may return at most 2 quasi-identifiers of analytics.review_sentiment_demographics
(birth_year, gender, location) in one statement.

Every test asserts the SAFE behaviour (refused with 42501). A failing test is a hole;
docs/redteam.md, *Round 2*, lists them."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from proxy.demo import DEMO_LOGINS, POLICY_PATH, load_dataset
from tests.conftest import Upstream
from tests.proxy_harness import RunningProxy, running_proxy

VIEW = "analytics.review_sentiment_demographics"
PASSWORDS = {login.login: login.password for login in DEMO_LOGINS}


class _DemoDatabase:
    """The test PostgreSQL with the demo database as the proxy's default database."""

    def __init__(self, upstream: Upstream, database: str) -> None:
        self.upstream, self.database = upstream, database
        self.superuser, self.superpassword = upstream.superuser, upstream.superpassword

    def dsn(self, user: str | None = None, password: str | None = None, dbname: str | None = None) -> str:
        return self.upstream.dsn(user, password, dbname or self.database)


@pytest.fixture(scope="module")
def proxy(upstream: Upstream) -> Iterator[RunningProxy]:
    os.environ.setdefault("PGVEIL_HASH_KEY", "redteam2-demo-hash-key-0123456789")
    database = f"redteam2_demo_{uuid.uuid4().hex[:8]}"
    asyncio.run(load_dataset(upstream.dsn(), database))
    try:
        with running_proxy(_DemoDatabase(upstream, database), str(POLICY_PATH)) as running:
            running.database = database  # type: ignore[attr-defined]
            yield running
    finally:
        upstream.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")


def answer(proxy: RunningProxy, login: str, sql: str) -> Any:
    """The rows, or the SQLSTATE of the error."""
    dsn = proxy.dsn(login, PASSWORDS[login], proxy.database)  # type: ignore[attr-defined]
    with psycopg.connect(dsn, autocommit=True) as conn:
        try:
            return conn.execute(sql.encode()).fetchall()
        except psycopg.Error as exc:
            return exc.sqlstate


BLOCKED = {
    "star": f"select * from {VIEW}",
    "three columns": f"select review_id, birth_year, gender, location from {VIEW}",
    "concatenation": f"select review_id, gender || '/' || location, birth_year from {VIEW}",
    "correlated subquery": f"select review_id, birth_year, gender, (select max(location) from {VIEW} x "
                           f"where x.review_id = d.review_id) from {VIEW} d",
    "self join": f"select d.review_id, d.birth_year, d.gender, x.location from {VIEW} d join {VIEW} x "
                 "using (review_id)",
    "comparison": f"select review_id, birth_year, gender, location = 'Berlin' from {VIEW}",
}


@pytest.mark.parametrize("name", sorted(BLOCKED))
def test_product_manager_cannot_return_three_quasi_identifiers(proxy: RunningProxy, name: str) -> None:
    assert answer(proxy, "pete_product", BLOCKED[name]) == "42501"


# A "reducing" aggregate (sum, avg, percentile) over a group of one row is the value itself.
ONE_ROW_AGGREGATES = {
    "avg per review": f"select review_id, gender, location, avg(birth_year) from {VIEW} "
                      "group by review_id, gender, location",
    "sum per review": f"select review_id, gender, location, sum(birth_year) from {VIEW} "
                      "group by review_id, gender, location",
    "percentile per review": f"select review_id, gender, location, percentile_cont(0.5) within group "
                             f"(order by birth_year) from {VIEW} group by review_id, gender, location",
    "window sum per review": "select review_id, gender, location, sum(birth_year) "
                             f"over (partition by review_id) from {VIEW}",
    # dense_rank over the years is the year's ordinal: with one known year, the year itself
    "dense rank": "select review_id, gender, location, dense_rank() over (order by birth_year) "
                  f"from {VIEW}",
}


@pytest.mark.parametrize("name", sorted(ONE_ROW_AGGREGATES))
def test_product_manager_cannot_get_a_third_quasi_identifier_through_a_one_row_aggregate(
        proxy: RunningProxy, name: str) -> None:
    result = answer(proxy, "pete_product", ONE_ROW_AGGREGATES[name] + " order by review_id limit 3")
    assert result == "42501", f"three quasi-identifiers per review: {result}"
