"""Guard benchmark: verdict-cache hit cost and miss cost (full analysis) for reporting queries.

    python bench/guard.py            # starts an embedded PostgreSQL for the catalog
    PGVEIL_TEST_DSN=postgresql://... python bench/guard.py

Prints per-statement microseconds: cache hit (p50, mean), miss p50/p90 for masked and unmasked
roles. Targets: hit < 5 us, miss p50 < 1 ms.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.embedded import EmbeddedPostgres  # noqa: E402
from proxy.guard.cache import VerdictCache  # noqa: E402
from proxy.guard.pipeline import analyse  # noqa: E402
from tests.conftest import Upstream  # noqa: E402
from tests.guard_setup import build_world  # noqa: E402

QUERIES = [
    "SELECT id, email, region FROM gv.people WHERE id = {n}",
    "SELECT region, count(*), avg(salary) FROM gv.people WHERE birth_date > '19{y}-01-01' GROUP BY region",
    "SELECT p.region, sum(o.amount) FROM gv.orders o JOIN gv.people p ON p.id = o.person_id "
    "WHERE o.placed >= '2024-0{m}-01' GROUP BY 1 ORDER BY 2 DESC LIMIT {n}",
    "SELECT ssn, count(*) FROM gv.people GROUP BY ssn HAVING count(*) > {n}",
    "SELECT * FROM gv.orders WHERE amount BETWEEN {n} AND {n}.5 ORDER BY placed",
    "WITH recent AS (SELECT * FROM gv.orders WHERE placed > '2024-0{m}-01') "
    "SELECT person_id, count(*) FROM recent GROUP BY 1",
    "UPDATE gv.scratch SET note = 'n{n}' WHERE id = {n}",
    "SELECT abalance FROM gv.orders WHERE id = {n}",
]


def variants(count: int) -> list[str]:
    return [q.format(n=i % 97 + 1, y=50 + i % 40, m=1 + i % 9) for i in range(count) for q in QUERIES]


def measure(world: object, login: str, rounds: int = 300) -> None:
    context = world.context(login)  # type: ignore[attr-defined]
    statements = variants(rounds)
    miss: list[float] = []
    for sql in statements[: 40 * len(QUERIES)]:
        start = time.perf_counter()
        analyse(sql, context)
        miss.append((time.perf_counter() - start) * 1e6)
    cache = VerdictCache()
    key = (context.policy.version, context.role.name, context.user, context.search_path, (), "gen")
    for sql in statements[: len(QUERIES)]:
        cache.store(sql, key, analyse(sql, context))
    hits: list[float] = []
    for sql in statements:
        start = time.perf_counter()
        hit = cache.lookup(sql, key)
        hits.append((time.perf_counter() - start) * 1e6)
        assert hit is not None, sql
    miss.sort()
    hits.sort()
    print(f"{login:12} miss p50 {statistics.median(miss):8.1f} us  p90 {miss[int(len(miss) * .9)]:8.1f} us"
          f"   | hit p50 {statistics.median(hits):5.2f} us  mean {statistics.fmean(hits):5.2f} us"
          f"  ({len(hits)} lookups)")


def main() -> None:
    given = os.environ.get("PGVEIL_TEST_DSN")
    server = None
    if given:
        from urllib.parse import urlsplit
        parts = urlsplit(given)
        upstream = Upstream(parts.hostname or "127.0.0.1", parts.port or 5432, parts.username or "postgres",
                            parts.password)
    else:
        server = EmbeddedPostgres.start()
        upstream = Upstream(server.host, server.port, server.superuser, None, server)
    try:
        world = build_world(upstream)
        for login in ("gv_analyst", "gv_admin"):
            measure(world, login)
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
