"""End-to-end cost of auditing: pgbench -S through pgveil with audit off, never fsynced, the default
(written before forwarding, fsynced within 1 s) and strict (each statement waits for a group fsync).

    python bench/audit_proxy.py [--duration 10] [--rounds 2] [--clients 8,32,128] [--threads 2]
                                [--mode simple] [--only strict,...]

Starts its own embedded PostgreSQL 18, initialises pgbench (scale 1), writes a policy with one
role that may do everything (so the guard decides every statement and masks nothing), and starts
pgveil as its own process for each configuration, exactly as `pgveil serve` runs it with
proxy.operations.serve_hooks. Configurations run interleaved for ROUNDS rounds, for each client
count; prints the median tps of each and its ratio to the first configuration. `-M simple`
(default) sends every statement as a Query, so every transaction's statement is decided and
audited (access + completion record).
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.embedded import EmbeddedPostgres, bin_dir, free_port

POLICY = """\
version: 1
settings: {default_role: deny}
roles:
  bench:
    members: [postgres]
    statements: [all]
    tables: ["*"]
    reveal: [public, internal, confidential, restricted]
"""

LAUNCH = """\
import sys
from proxy.config import load_settings
from proxy.operations import serve_hooks
from proxy.server import configure_logging, serve
configure_logging("warning")
settings = load_settings({"upstream": sys.argv[1], "policy": sys.argv[2], "listen": sys.argv[3],
                          "audit_log": sys.argv[4] or None, "config": sys.argv[5] or None})
sys.exit(serve(settings.validate(), serve_hooks))
"""

CONFIGURATIONS = {  # name: the audit: section of the config file (None: no audit log)
    "audit off": None,
    "never": "{fsync: never}",
    "default": "{}",
    "strict": "{fsync_interval_ms: 0}",
}


def wait_listening(port: int, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            error = process.stderr.read().decode() if process.stderr else ""
            raise RuntimeError(f"pgveil exited with {process.returncode}: {error}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"pgveil is not listening on {port}")


def pgbench(port: int, mode: str, clients: int, threads: int, duration: int) -> float:
    result = subprocess.run(
        [str(bin_dir() / "pgbench"), "-n", "-S", "-M", mode, "-c", str(clients),
         "-j", str(min(threads, clients)), "-T", str(duration), "-h", "127.0.0.1", "-p", str(port),
         "-U", "postgres", "bench"],
        capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"pgbench failed: {result.stderr.strip()}")
    match = re.search(r"tps = ([\d.]+)", result.stdout)
    assert match is not None
    return float(match.group(1))


def run_configuration(pg: EmbeddedPostgres, directory: Path, name: str, audit: str | None,
                      clients: int, args: argparse.Namespace) -> float:
    policy = directory / "policy.yaml"
    policy.write_text(POLICY)
    audit_log, config = "", ""
    if audit is not None:
        audit_log = str(directory / f"audit-{name}.jsonl")
        config_path = directory / f"config-{name}.yaml"
        config_path.write_text(f"audit: {audit}\n")
        config = str(config_path)
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-c", LAUNCH, pg.dsn(dbname="bench"), str(policy), f"127.0.0.1:{port}", audit_log,
         config],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        cwd=Path(__file__).resolve().parent.parent)
    try:
        wait_listening(port, process)
        return pgbench(port, args.mode, clients, args.threads, args.duration)
    finally:
        process.terminate()
        process.wait(30)
        if audit_log:
            Path(audit_log).unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", default="8", help="comma-separated client counts, e.g. 8,32,128")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mode", default="simple", choices=["simple", "extended", "prepared"])
    parser.add_argument("--only", help="comma-separated configurations to run (default: all)")
    args = parser.parse_args()
    pg = EmbeddedPostgres.start()
    try:
        pg.psql("CREATE DATABASE bench")
        subprocess.run([str(bin_dir() / "pgbench"), "-i", "-q", "-s", "1", "-d", pg.dsn(dbname="bench")],
                       check=True, capture_output=True)
        chosen = {name: audit for name, audit in CONFIGURATIONS.items()
                  if not args.only or name in args.only.split(",")}
        counts = [int(count) for count in args.clients.split(",")]
        results: dict[tuple[int, str], list[float]] = {(c, name): [] for c in counts for name in chosen}
        with tempfile.TemporaryDirectory() as tmp:
            os.chmod(tmp, 0o755)
            for _ in range(args.rounds):
                for clients in counts:
                    for name, audit in chosen.items():
                        results[clients, name].append(
                            run_configuration(pg, Path(tmp), name, audit, clients, args))
        print(f"pgbench -S -M {args.mode} -j {args.threads} -T {args.duration}, {args.rounds} rounds "
              f"(median tps; load average {os.getloadavg()[0]:.1f})")
        for clients in counts:
            first = next(iter(chosen))
            base = statistics.median(results[clients, first])
            for name in chosen:
                tps = statistics.median(results[clients, name])
                print(f"  -c {clients:<4} {name:<10}{tps:>10.0f} tps  {tps / base:>6.1%} of {first}")
    finally:
        pg.stop()


if __name__ == "__main__":
    main()
