"""Guard benchmark: verdict-cache hit cost and miss cost (full analysis) for reporting queries,
and with --pgbench a masked-columns pgbench script straight to PostgreSQL, through pgbouncer and
through pgveil, in simple and prepared protocol.

    python bench/guard.py                 # starts an embedded PostgreSQL for the catalog
    python bench/guard.py --pgbench 10    # also pgbench, 10 s per run
    PGVEIL_TEST_DSN=postgresql://... python bench/guard.py

Prints per-statement microseconds: cache hit (p50, mean), miss p50/p90 for masked and unmasked
roles (targets: hit < 5 us, miss p50 < 1 ms), then pgbench tps per target and protocol.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.embedded import EmbeddedPostgres
from proxy.guard.cache import VerdictCache
from proxy.guard.pipeline import analyse
from tests.conftest import Upstream
from tests.guard_setup import build_world

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


BENCH_POLICY = """
version: 1
settings: {default_role: deny, hash_key_env: PGVEIL_HASH_KEY}
roles:
  bench:
    members: [bench_masked]
    statements: [select]
    tables: ["public.*"]
    reveal: [public, internal]
  full:
    members: [bench_full]
    statements: [select]
    tables: ["public.*"]
    reveal: [public, internal, confidential, restricted]
datasets:
  public.pgbench_accounts:
    columns:
      abalance: {sensitivity: confidential, protection: {generalize: {bucket: 100}}}
      filler:   {sensitivity: confidential, protection: {partial: {keep_first: 2}}}
"""
BENCH_SCRIPT = """\\set aid random(1, 100000)
SELECT aid, bid, abalance, filler FROM pgbench_accounts WHERE aid = :aid;
"""
BENCH_PASSWORD = "bench-pw-7"


def _tps(output: str) -> float:
    match = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", output)
    return float(match.group(1)) if match else float("nan")


def run_pgbench(upstream: Upstream, seconds: int) -> None:
    """pgbench -f masked script: direct, through pgbouncer (session pool) and through pgveil."""
    from proxy.embedded import bin_dir, free_port
    from proxy.policy.loader import parse_policy

    os.environ.setdefault("PGVEIL_HASH_KEY", "bench-hash-key-0123456789")
    upstream.execute("DROP DATABASE IF EXISTS guard_bench WITH (FORCE)")
    upstream.execute("CREATE DATABASE guard_bench")
    for login in ("bench_masked", "bench_full"):
        upstream.execute(f"DROP ROLE IF EXISTS {login}")
        upstream.execute(f"CREATE ROLE {login} LOGIN PASSWORD '{BENCH_PASSWORD}'")
    subprocess.run([str(bin_dir() / "pgbench"), "-i", "-q", "-s", "1", upstream.dsn(dbname="guard_bench")],
                   check=True, capture_output=True)
    upstream.execute("GRANT SELECT ON ALL TABLES IN SCHEMA public TO bench_masked, bench_full",
                     dbname="guard_bench")
    parse_policy(BENCH_POLICY, "bench")
    with tempfile.TemporaryDirectory() as directory:
        os.chmod(directory, 0o755)
        script = Path(directory, "masked.sql")
        script.write_text(BENCH_SCRIPT)
        policy = Path(directory, "policy.yaml")
        policy.write_text(BENCH_POLICY)
        targets: dict[str, tuple[str, int]] = {"postgres": (upstream.host, upstream.port)}
        processes: list[subprocess.Popen[bytes]] = []
        try:
            bouncer = _start_pgbouncer(Path(directory), upstream)
            if bouncer is not None:
                processes.append(bouncer[0])
                targets["pgbouncer"] = ("127.0.0.1", bouncer[1])
            veil_port = free_port()
            veil = subprocess.Popen(
                [sys.executable, "-m", "proxy", "serve", "--upstream", upstream.dsn(dbname="guard_bench"),
                 "--policy", str(policy), "--listen", f"127.0.0.1:{veil_port}", "--log-level", "warning"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            processes.append(veil)
            _wait_for_port(veil_port)
            targets["pgveil"] = ("127.0.0.1", veil_port)
            print(f"\npgbench -c 4 -j 2 -T {seconds}, masked-columns script "
                  "(tps; bench_full sees everything):")
            runs = [(mode, name, login) for mode in ("simple", "prepared") for name in targets
                    for login in ("bench_masked", "bench_full")
                    if login == "bench_masked" or name == "pgveil"]
            for mode, name, login in runs:
                host, port = targets[name]
                result = subprocess.run(
                    [str(bin_dir() / "pgbench"), "-n", "-c", "4", "-j", "2", "-T", str(seconds),
                     "-M", mode, "-f", str(script), "-h", host, "-p", str(port), "-U", login, "guard_bench"],
                    capture_output=True, text=True, env={**os.environ, "PGPASSWORD": BENCH_PASSWORD})
                tps = _tps(result.stdout)
                print(f"  {mode:9} {name:10} {login:13} {tps:10.0f}" + (
                    "" if result.returncode == 0 else f"  (failed: {result.stderr.strip()[:120]})"))
        finally:
            for process in processes:
                process.terminate()
                process.wait(10)


def _wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def _start_pgbouncer(directory: Path, upstream: Upstream) -> tuple[subprocess.Popen[bytes], int] | None:
    """pgbouncer in session pooling (runs as the embedded server's user when we are root)."""
    binary = shutil.which("pgbouncer")
    if binary is None:
        print("pgbouncer not installed: skipped")
        return None
    from proxy.embedded import SERVICE_USER, free_port

    port = free_port()
    (directory / "users.txt").write_text(
        f'"bench_masked" "{BENCH_PASSWORD}"\n"bench_full" "{BENCH_PASSWORD}"\n')
    (directory / "pgbouncer.ini").write_text(
        f"[databases]\nguard_bench = host={upstream.host} port={upstream.port} dbname=guard_bench\n"
        f"[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nauth_type = scram-sha-256\n"
        f"auth_file = {directory / 'users.txt'}\npool_mode = session\nmax_client_conn = 100\n"
        f"default_pool_size = 10\nunix_socket_dir =\nlogfile = {directory / 'pgbouncer.log'}\n")
    command = [binary, str(directory / "pgbouncer.ini")]
    if os.geteuid() == 0:
        for name in ("users.txt", "pgbouncer.ini"):
            os.chmod(directory / name, 0o644)
        os.chmod(directory, 0o777)
        command = [binary, "-u", SERVICE_USER, str(directory / "pgbouncer.ini")]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_port(port)
    return process, port


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
        if "--pgbench" in sys.argv:
            run_pgbench(upstream, int(sys.argv[sys.argv.index("--pgbench") + 1]))
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
