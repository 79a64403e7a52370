"""Audit sink throughput: access + completion records per second, never fsynced, default, strict.

    /work/venv/bin/python bench/audit.py [--writers 1,8,32] [--statements 2000] [--dir DIR]

Each writer plays one client connection: for every statement it writes the access record, waits
until it is as durable as the mode says (as the statement would), then queues the completion
record behind it. Reported per
mode and writer count: records/s, and µs per record (wall time / records).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from proxy.audit import JsonLinesFileSink

MODES = {"never": None, "default": 1.0, "strict": 0.0}  # audit.fsync_interval_ms / 1000

ACCESS = {"type": "access", "time": "2026-01-01T00:00:00.000000+00:00", "connection_id": 1,
          "client_address": "127.0.0.1:50000", "login": "alice", "role": "analyst", "database": "shop",
          "application_name": "bench", "request": 0, "protocol": "query", "statement_kind": "select",
          "fingerprint": "a1b2c3d4e5f60718",
          "normalized_sql": "SELECT id, email FROM public.users WHERE id = $1",
          "relations": ["public.users"], "columns": ["public.users.id", "public.users.email"],
          "masks": ["public.users.email:email"], "decision": "rewrite", "rule": None, "policy_version": "v1"}
COMPLETION = {"type": "completion", "time": "2026-01-01T00:00:00.000100+00:00", "connection_id": 1,
              "request": 0, "rows": 1, "upstream_seconds": 0.0002, "sqlstate": None}


async def one_run(directory: Path, fsync: str, writers: int, statements: int) -> tuple[float, int]:
    path = directory / f"bench-{fsync}-{writers}.jsonl"
    sink = JsonLinesFileSink(path, fsync_interval=MODES[fsync], max_bytes=None)
    per_writer = max(1, statements // writers)

    async def connection(cid: int) -> None:
        for n in range(per_writer):
            await sink.write({**ACCESS, "connection_id": cid, "request": n})
            sink.write_behind({**COMPLETION, "connection_id": cid, "request": n})

    started = time.perf_counter()
    await asyncio.gather(*(connection(c) for c in range(writers)))
    await sink.close()
    elapsed = time.perf_counter() - started
    path.unlink()
    return elapsed, per_writer * writers * 2


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--writers", default="1,8,32", help="comma-separated concurrent writer counts")
    parser.add_argument("--statements", type=int, default=2000, help="statements per run (all writers)")
    parser.add_argument("--dir", help="directory for the audit files (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        print(f"audit file on {tmp}; {args.statements} statements = {2 * args.statements} records per run")
        print(f"{'fsync':<8}{'writers':>8}{'records/s':>12}{'us/record':>11}")
        for fsync in MODES:
            for writers in (int(w) for w in args.writers.split(",")):
                elapsed, records = await one_run(Path(tmp), fsync, writers, args.statements)
                print(f"{fsync:<8}{writers:>8}{records / elapsed:>12.0f}{elapsed / records * 1e6:>11.1f}")


if __name__ == "__main__":
    asyncio.run(main())
