"""The harness itself: pgveil in-process and as `pgveil serve`, relaying a first query."""

from __future__ import annotations

import psycopg

from tests.proxy_harness import running_proxy, spawn_serve


def test_in_process_proxy_relays_a_query(upstream):
    with running_proxy(upstream) as proxy, psycopg.connect(proxy.dsn()) as conn:
        assert conn.execute("select 1 + 1").fetchone() == (2,)
    assert proxy.counters.opened == 1


def test_pgveil_serve_listens_and_relays(upstream):
    with spawn_serve("--upstream", upstream.dsn(), "--listen", "127.0.0.1:0") as served:
        with psycopg.connect(served.dsn()) as conn:
            assert conn.execute("select 'through pgveil'").fetchone() == ("through pgveil",)
        served.terminate()
        assert served.wait() == 0
