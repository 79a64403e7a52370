"""What PostgreSQL pays for a masked statement: pgbench straight on PostgreSQL (no proxy), simple
protocol, the unmasked original against what pgveil sends for it, in interleaved rounds.

    python bench/masked_statements.py                  # embedded PostgreSQL 18, 3 rounds x 8 s
    python bench/masked_statements.py --rounds 5 --seconds 10

A table of ten columns and 100,000 rows, five of them masked (partial, email, hash, generalize,
redact) for the benchmark's login; the statement is `SELECT * FROM t WHERE id = :id`. Variants:

- original: the client's statement, unmasked;
- inline:   the guard's rewrite (masked derived table), as pgveil sent every execution before;
- prepared: what pgveil sends now for a repeated shape: PREPARE once per connection, then
            `EXECUTE name(:id)` (taken from proxy/guard/upstream_prepare.py);
- view:     the same masks as a `security_invoker` view (the alternative not taken).

Prints tps per round and variant, the ratio to the original in the same round, and the backend's
CPU per statement (from /proc/<backend>/schedstat, less sensitive to other load than tps).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.catalog import load_catalog
from proxy.embedded import EmbeddedPostgres
from proxy.guard.cache import VerdictCache
from proxy.guard.pipeline import analyse
from proxy.guard.statement import GuardContext
from proxy.guard.upstream_prepare import prepared_form
from proxy.guard.verdict import Rewrite
from proxy.policy.loader import parse_policy
from proxy.upstream_setup import install_masking_functions

LOGIN, PASSWORD = "bench_masked", "bench-masked-pw"
SETUP = f"""
DROP TABLE IF EXISTS public.bench_masked_people CASCADE;
DROP ROLE IF EXISTS {LOGIN};
CREATE ROLE {LOGIN} LOGIN PASSWORD '{PASSWORD}';
CREATE TABLE public.bench_masked_people (
  id integer PRIMARY KEY, full_name text NOT NULL, email text NOT NULL, ssn text NOT NULL,
  birth_date date NOT NULL, salary integer NOT NULL, city text NOT NULL, notes text,
  created_at timestamptz NOT NULL DEFAULT now(), active boolean NOT NULL DEFAULT true);
INSERT INTO public.bench_masked_people SELECT g, 'Person Number ' || g, 'user' || g || '@example.com',
  lpad(g::text, 9, '0'), date '1950-01-01' + (g % 20000), 30000 + (g % 90000), 'City ' || (g % 100),
  'note ' || g, now(), g % 2 = 0 FROM generate_series(1, 100000) g;
ANALYZE public.bench_masked_people;
GRANT SELECT ON public.bench_masked_people TO {LOGIN};
"""
POLICY = f"""
version: 1
settings: {{default_role: deny, hash_key_env: PGVEIL_HASH_KEY}}
roles:
  analyst: {{members: [{LOGIN}], statements: [select], tables: ["public.*"], reveal: [public, internal]}}
datasets:
  public.bench_masked_people:
    columns:
      full_name: {{sensitivity: confidential, protection: {{partial: {{keep_first: 1}}}}}}
      email: {{sensitivity: confidential, protection: email}}
      ssn: {{sensitivity: restricted, protection: hash}}
      birth_date: {{sensitivity: confidential, protection: {{generalize: year}}}}
      notes: {{sensitivity: restricted, protection: redact}}
"""
ORIGINAL = "SELECT * FROM bench_masked_people WHERE id = {}"


def statements(dsn: str) -> dict[str, tuple[str, str]]:
    """variant -> (statement run once per connection first, or "", the pgbench statement)."""
    policy = parse_policy(POLICY, "bench.yaml")
    catalog = asyncio.run(load_catalog(dsn))
    role = policy.roles["analyst"]
    context = GuardContext(policy=policy, role=role, catalog=catalog, user=LOGIN,
                           search_path=catalog.default_search_path(LOGIN, "postgres"))
    first = analyse(ORIGINAL.format(424242), context)
    inline = first.verdict
    assert isinstance(inline, Rewrite), inline
    cache = VerdictCache()
    cache.store(ORIGINAL.format(424242), "key", first)
    hit = cache.lookup(ORIGINAL.format(424243), "key")
    assert hit is not None and isinstance(hit.verdict, Rewrite)
    form = prepared_form(ORIGINAL.format(424243), hit.verdict, row_filtered=False)
    assert form is not None, "the statement is not prepared by pgveil"
    derived = re.search(r"FROM (\(SELECT .*\)) AS \"bench_masked_people\"", inline.sql)
    assert derived is not None
    prepare = f"PREPARE pgveil_bench({', '.join(form.types)}) AS {form.template}"
    view = f"CREATE VIEW public.bench_masked_view WITH (security_invoker = true) AS {derived.group(1)[1:-1]}"
    return {
        "original": ("", ORIGINAL.format(":id")),
        "inline": ("", inline.sql.replace("424242", ":id")),
        "prepared": (prepare, "EXECUTE pgveil_bench(:id)"),
        "view": (view, "SELECT * FROM public.bench_masked_view WHERE id = :id"),
    }


def pgbench_script(directory: Path, name: str, once: str, statement: str) -> Path:
    path = directory / f"{name}.pgb"
    lines = []
    if once and once.startswith("PREPARE"):  # once per client connection (pgbench variables are per client)
        lines += ["\\if :prepared = 0", once + ";", "\\set prepared 1", "\\endif"]
    lines += ["\\set id random(1, 100000)", statement + ";"]
    path.write_text("\n".join(lines) + "\n")
    return path


def tps(bin_dir: Path, server: EmbeddedPostgres, script: Path, seconds: int, clients: int,
        threads: int) -> float:
    output = subprocess.run(
        [str(bin_dir / "pgbench"), "-n", "-h", server.host, "-p", str(server.port), "-U", LOGIN,
         "-c", str(clients), "-j", str(threads), "-T", str(seconds), "-D", "prepared=0",
         "-f", str(script), "postgres"],
        capture_output=True, text=True, env={**os.environ, "PGPASSWORD": PASSWORD}, check=True).stdout
    match = re.search(r"tps = ([0-9.]+)", output)
    assert match is not None, output
    return float(match.group(1))


def backend_cpu_us(bin_dir: Path, server: EmbeddedPostgres, once: str, statement: str, count: int) -> float:
    """CPU the backend spends per statement (ns from /proc/self/schedstat), one connection."""
    chooser = random.Random(1)

    def batch(n: int) -> list[str]:
        return [statement.replace(":id", str(chooser.randint(1, 100000))) + ";" for _ in range(n)]

    read = "SELECT pg_catalog.pg_read_file('/proc/self/schedstat');"
    lines = ["\\o /dev/null", f"SET ROLE {LOGIN};"]
    if once.startswith("PREPARE"):
        lines.append(once + ";")
    lines += [*batch(200), "RESET ROLE;", "\\o", read, "\\o /dev/null", f"SET ROLE {LOGIN};", *batch(count),
              "RESET ROLE;", "\\o", read]
    output = subprocess.run(
        [str(bin_dir / "psql"), "-X", "-q", "-At", "-d", server.dsn()], input="\n".join(lines),
        capture_output=True, text=True, check=True).stdout.split()
    return (int(output[3]) - int(output[0])) / count / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cpu-statements", type=int, default=5000)
    args = parser.parse_args()
    os.environ.setdefault("PGVEIL_HASH_KEY", "bench-masked-statements-key")
    server = EmbeddedPostgres.start()
    try:
        bin_dir = server.bin
        server.psql(SETUP)
        asyncio.run(install_masking_functions(server.dsn(), os.environ["PGVEIL_HASH_KEY"].encode()))
        variants = statements(server.dsn())
        server.psql(variants["view"][0] + f";\nGRANT SELECT ON public.bench_masked_view TO {LOGIN};")
        with tempfile.TemporaryDirectory() as directory:
            scripts = {name: pgbench_script(Path(directory), name, once, statement)
                       for name, (once, statement) in variants.items()}
            results: dict[str, list[float]] = {name: [] for name in variants}
            cpu: dict[str, list[float]] = {name: [] for name in variants}
            for round_number in range(1, args.rounds + 1):
                for name in variants:
                    results[name].append(tps(bin_dir, server, scripts[name], args.seconds, args.clients,
                                             args.threads))
                    cpu[name].append(backend_cpu_us(bin_dir, server, *variants[name], args.cpu_statements))
                original = results["original"][-1]
                line = "  ".join(f"{name} {results[name][-1]:8.0f} ({results[name][-1] / original:.2f})"
                                 for name in variants)
                print(f"round {round_number}: {line}  load {os.getloadavg()[0]:.1f}", flush=True)
        print(f"\n| variant | tps, median of {args.rounds} | ratio to original, per round "
              "| backend CPU per statement |")
        print("|---|---|---|---|")
        for name in variants:
            ratios = ", ".join(f"{t / o:.2f}"
                               for t, o in zip(results[name], results["original"], strict=True))
            print(f"| {name} | {statistics.median(results[name]):.0f} | {ratios} | "
                  f"{statistics.median(cpu[name]):.0f} µs |")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
