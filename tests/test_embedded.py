"""The test PostgreSQL is real and reachable with password authentication."""

import psycopg

from tests.conftest import Upstream


def test_upstream_answers(upstream: Upstream) -> None:
    with psycopg.connect(upstream.dsn()) as conn:
        row = conn.execute("select current_setting('server_version_num')::int").fetchone()
    assert row is not None and row[0] >= 150000
