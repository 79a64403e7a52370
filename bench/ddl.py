"""DDL latency through pgveil: what a DDL statement costs the session that runs it, and others.

    python bench/ddl.py [--iterations 100] [--source SOURCE_TREE]

Starts an embedded PostgreSQL 18 with one table (public.people, its ssn masked for one role)
and `pgveil serve` in front of it (a subprocess; with --source, the proxy package of another
source tree, e.g. `git archive` of an older commit, to compare). Two logins: bench_admin, whose
role may run DDL and sees everything (as a migration or a test suite would connect), and
bench_masked, whose role reads people with ssn masked.

For each kind of DDL it times, over --iterations rounds, the DDL statement and the `SELECT 1` the
same session sends right after it (pgveil judges a session's statements in order, so whatever it
does after a DDL shows in the next statement), straight to PostgreSQL and through pgveil:

- temp: CREATE TEMP TABLE / DROP TABLE of it,
- table: CREATE TABLE / DROP TABLE,
- column: ALTER TABLE ADD COLUMN / ALTER TABLE DROP COLUMN (on a table of its own).

Then the effect on a concurrent session: bench_masked runs `SELECT id, ssn FROM people WHERE
id = $n` in a loop (psycopg, one connection) alone, and while bench_admin runs CREATE TABLE /
DROP TABLE in a loop; its median and 99th percentile are printed for both.

Times are wall clock on a shared machine: compare runs made together, not across days.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psycopg

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from proxy.embedded import EmbeddedPostgres  # noqa: E402

SCHEMA = """
CREATE TABLE public.people (id integer PRIMARY KEY, name text, ssn text);
INSERT INTO public.people SELECT n, 'person ' || n, lpad(n::text, 9, '0') FROM generate_series(1, 1000) n;
CREATE TABLE public.widened (id integer);
CREATE ROLE bench_admin LOGIN PASSWORD 'bench-admin-pw';
CREATE ROLE bench_masked LOGIN PASSWORD 'bench-masked-pw';
GRANT ALL ON SCHEMA public TO bench_admin;
ALTER TABLE public.widened OWNER TO bench_admin;
GRANT SELECT ON public.people TO bench_masked;
"""
POLICY = """
version: 1
roles:
  admin:
    members: [bench_admin]
    statements: [all]
    tables: ["*"]
    reveal: [public, internal, confidential, restricted]
  analyst:
    members: [bench_masked]
    statements: [select]
    tables: ["public.*"]
    reveal: [public, internal]
datasets:
  public.people:
    columns:
      ssn: {sensitivity: restricted, protection: redact}
"""
DDL = {
    "temp": ("CREATE TEMP TABLE scratch (x integer)", "DROP TABLE scratch"),
    "table": ("CREATE TABLE public.scratch (x integer)", "DROP TABLE public.scratch"),
    "column": ("ALTER TABLE public.widened ADD COLUMN extra integer",
               "ALTER TABLE public.widened DROP COLUMN extra"),
}


def serve(upstream: str, policy: Path, source: Path | None) -> tuple[subprocess.Popen[str], int]:
    env = dict(os.environ)
    if source is not None:
        env["PYTHONPATH"] = str(source)
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy", "serve", "--upstream", upstream, "--policy", str(policy),
         "--listen", "127.0.0.1:0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
        cwd=str(source) if source is not None else None)
    assert process.stderr is not None
    for line in process.stderr:
        match = re.search(r"listening on \S+:(\d+)", line)
        if match:
            threading.Thread(target=_show_problems, args=(process,), daemon=True).start()
            return process, int(match.group(1))
    raise SystemExit("pgveil serve did not start")


def _show_problems(process: subprocess.Popen[str]) -> None:
    """Print what pgveil logs at warning level or above (the rest is dropped)."""
    assert process.stderr is not None
    for line in process.stderr:
        if " WARNING " in line or " ERROR " in line or "Traceback" in line:
            print(f"pgveil: {line.rstrip()}", file=sys.stderr)


def milliseconds(samples: list[float]) -> str:
    ordered = sorted(samples)
    p90 = ordered[int(len(ordered) * 0.9) - 1]
    return f"median {statistics.median(ordered) * 1000:7.2f} ms  p90 {p90 * 1000:7.2f} ms"


def time_ddl(dsn: str, kind: str, iterations: int) -> tuple[list[float], list[float]]:
    """(each DDL statement, each SELECT 1 right after one)."""
    create, drop = DDL[kind]
    ddl: list[float] = []
    after: list[float] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        for _ in range(iterations):
            for statement in (create, drop):
                started = time.perf_counter()
                conn.execute(statement)
                middle = time.perf_counter()
                conn.execute("SELECT 1")
                ddl.append(middle - started)
                after.append(time.perf_counter() - middle)
    return ddl, after


def concurrent_reads(dsn: str, admin_dsn: str | None, seconds: float) -> list[float]:
    stop = threading.Event()

    def churn() -> None:
        assert admin_dsn is not None
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            while not stop.is_set():
                admin.execute(DDL["table"][0])
                admin.execute(DDL["table"][1])

    worker = threading.Thread(target=churn) if admin_dsn is not None else None
    samples: list[float] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT id, ssn FROM people WHERE id = %s", (1,))
        if worker is not None:
            worker.start()
        deadline = time.monotonic() + seconds
        n = 0
        while time.monotonic() < deadline:
            n += 1
            started = time.perf_counter()
            conn.execute("SELECT id, ssn FROM people WHERE id = %s", (n % 1000 + 1,)).fetchall()
            samples.append(time.perf_counter() - started)
    stop.set()
    if worker is not None:
        worker.join()
    return samples


def percentiles(samples: list[float]) -> str:
    ordered = sorted(samples)
    p99 = ordered[max(0, int(len(ordered) * 0.99) - 1)]
    median = statistics.median(ordered) * 1000
    return f"median {median:6.2f} ms  p99 {p99 * 1000:6.2f} ms  ({len(ordered)} reads)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each concurrent-session run")
    parser.add_argument("--source", type=Path,
                        help="source tree whose proxy package serves (default: this one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pgveil-bench-ddl-") as scratch, \
            EmbeddedPostgres.start(Path(scratch) / "data") as pg:
        pg.psql(SCHEMA)
        policy = Path(scratch) / "policy.yaml"
        policy.write_text(POLICY)
        process, port = serve(pg.dsn(), policy, args.source)
        try:
            direct = pg.dsn("bench_admin", "bench-admin-pw")
            proxied = f"postgresql://bench_admin:bench-admin-pw@127.0.0.1:{port}/postgres"
            for kind in DDL:
                for label, dsn in (("direct", direct), ("pgveil", proxied)):
                    time_ddl(dsn, kind, 3)  # warm up
                    ddl, after = time_ddl(dsn, kind, args.iterations)
                    print(f"{kind:6} {label:6}  DDL {milliseconds(ddl)}   "
                          f"next SELECT 1 {milliseconds(after)}")
            masked = f"postgresql://bench_masked:bench-masked-pw@127.0.0.1:{port}/postgres"
            print(f"masked reads alone        {percentiles(concurrent_reads(masked, None, args.seconds))}")
            print(f"masked reads during DDL   {percentiles(concurrent_reads(masked, proxied, args.seconds))}")
        finally:
            process.terminate()
            process.wait(30)


if __name__ == "__main__":
    main()
