"""The harness itself: pgveil in-process and as `pgveil serve`, relaying a first query."""

from __future__ import annotations

import psycopg

from tests.proxy_harness import running_proxy


def test_in_process_proxy_relays_a_query(upstream):
    with running_proxy(upstream) as proxy, psycopg.connect(proxy.dsn()) as conn:
        assert conn.execute("select 1 + 1").fetchone() == (2,)
    assert proxy.counters.opened == 1

