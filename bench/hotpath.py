"""Hot-path benchmark: pgveil's own CPU per pgbench -S transaction, in-process, without sockets.

    python bench/hotpath.py [--transactions 20000] [--rounds 3] [--baseline SOURCE_TREE]
                            [--profile FILE]

Starts an embedded PostgreSQL 18 with pgbench's tables (scale 1) and the logins of
`bench/relay.py --policy pgbench` (bench_full sees everything, bench_masked has
pgbench_accounts.abalance and filler masked), builds the policy runtime exactly as
`pgveil serve` does (Enforcement, AuditedConnection, MeteredConnection through
proxy.operations), and drives one Relay with the bytes pgbench -S sends and PostgreSQL answers,
in the simple, extended and prepared protocol. The legs are in-memory transports, so what is
timed is pgveil's Python work per transaction only: framing, the policy (verdict-cache hit or
prepared-statement re-check), audit records, metrics, completion reports. No kernel, no
PostgreSQL round trip; the steadiest figure to compare code changes with.

Configurations: relay without a policy; the policy for bench_full and bench_masked; bench_full
with metrics (`--metrics`: the relay observer and MeteredConnection); bench_full with an audit
file (fsync never; the default, fsynced within 1 s; strict: the strict figure includes the
writer thread's hand-off and the fsync, as CPU time of the whole process from
time.process_time). In-process nothing runs between two transactions, so strict here is one
fsync per transaction.
With --baseline the same runs are made with the proxy package of another source tree (e.g.
`git archive` of an older commit), interleaved round by round, and both are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
MODES = ("simple", "extended", "prepared")
CONFIGURATIONS = ("relay", "full", "masked", "full+metrics", "full+audit never", "full+audit default",
                  "full+audit strict", "deployed", "deployed masked")
DEPLOYED = ("deployed", "deployed masked")
"""Policy + audit file in its default mode (each tree's own default) + metrics, as `pgveil serve
--policy --audit-log --metrics` runs; bench_full or bench_masked."""
AUDIT_FSYNC_INTERVALS = {"never": {"fsync": "never"}, "default": {}, "strict": {"fsync": "batch"}}
"""The `audit:` config section of each audit configuration, in a form every version reads (before
the durability modes, the default was `batch`, which is now strict mode)."""


# ---- the bytes pgbench -S exchanges ------------------------------------------------------------

def _messages(mode: str, aid: int) -> tuple[bytes, bytes, bytes]:
    """(first client request, later client request, PostgreSQL's answer to a later request)."""
    from proxy.wire.backend import (
        BindComplete,
        CommandComplete,
        DataRow,
        FieldDescription,
        ParseComplete,
        ReadyForQuery,
        RowDescription,
    )
    from proxy.wire.frontend import Bind, Describe, Execute, Parse, Query, Sync

    rows = (RowDescription((FieldDescription("abalance", type_oid=23, type_size=4),)).encode()
            + DataRow((b"0",)).encode() + CommandComplete("SELECT 1").encode() + ReadyForQuery("I").encode())
    sql = "SELECT abalance FROM pgbench_accounts WHERE aid = $1;"
    if mode == "simple":
        query = Query(f"SELECT abalance FROM pgbench_accounts WHERE aid = {aid};").encode()
        return query, query, rows
    execute = Bind("", "" if mode == "extended" else "P0_1", (0,), (str(aid).encode(),), ()).encode() + \
        Describe("P", "").encode() + Execute("").encode() + Sync().encode()
    if mode == "extended":
        request = Parse("", sql).encode() + execute
        return request, request, ParseComplete().encode() + BindComplete().encode() + rows
    return Parse("P0_1", sql).encode() + execute, execute, BindComplete().encode() + rows


_COLD = 0
"""Bytes written over before each timed transaction (--cold): 0, the caches stay warm."""


class _Transport:
    """The in-memory end of a leg: collects what the relay writes."""

    def __init__(self) -> None:
        self.written = 0
        self.wake: asyncio.Event | None = None

    def write(self, data: bytes) -> None:
        self.written += 1
        if self.wake is not None:
            self.wake.set()

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None: ...

    def set_protocol(self, protocol: Any) -> None: ...

    def resume_reading(self) -> None: ...

    def close(self) -> None: ...

    def get_extra_info(self, name: str) -> Any:
        return None


async def _relay_run(policy: Any, observer: Any, mode: str, transactions: int) -> float:
    """CPU µs per transaction of one Relay driven `transactions` times in `mode`."""
    from proxy.session.endpoint import Endpoint
    from proxy.session.observer import NullObserver
    from proxy.session.session import Relay  # the compiled one when built

    client, upstream = Endpoint(1 << 26), Endpoint(1 << 26)
    client_transport, upstream_transport = _Transport(), _Transport()
    client.transport, upstream.transport = client_transport, upstream_transport  # type: ignore[assignment]
    upstream_transport.wake = asyncio.Event()
    relay = Relay(client=client, upstream=upstream, policy=policy, observer=observer or NullObserver(),
                  max_message_size=1 << 26, marker_prefix="pgveil_refused_bench",
                  cancel_upstream=lambda: None, on_finished=lambda reason: None, label="bench")
    relay.start(b"", b"")
    first, later, answer = _messages(mode, 4242)
    # the first request (a Parse of the prepared statement) is a verdict-cache miss: not timed
    await _exchange(client, upstream, upstream_transport, first, answer if mode != "prepared" else
                    _messages("extended", 1)[2])
    for _ in range(200):  # warm up
        await _exchange(client, upstream, upstream_transport, later, answer)
    if _COLD:  # the caches are emptied before each transaction; only the transaction is timed
        buffer, filler = bytearray(_COLD), bytes(range(256)) * (_COLD // 256)
        used = 0.0
        for _ in range(transactions):
            buffer[:] = filler
            started = time.process_time()
            await _exchange(client, upstream, upstream_transport, later, answer)
            used += time.process_time() - started
    else:
        started = time.process_time()
        for _ in range(transactions):
            await _exchange(client, upstream, upstream_transport, later, answer)
        used = time.process_time() - started
    relay.finish("bench over")
    return used / transactions * 1e6


async def _exchange(client: Any, upstream_leg: Any, upstream: _Transport, request: bytes,
                    answer: bytes) -> None:
    """One transaction, fed to the legs as their transports do (data_received: the relay path the
    session chose, with or without a policy)."""
    wake = upstream.wake
    assert wake is not None
    wake.clear()
    client.data_received(request)
    if not wake.is_set():  # the verdict is awaited (an audit write): let the loop run
        await wake.wait()
    upstream_leg.data_received(answer)


async def _policy_for(configuration: str, dsn: str, policy_file: Path, workdir: Path,
                      runtimes: dict[str, Any]) -> tuple[Any, Any]:
    """(connection policy, relay observer) as `pgveil serve` builds them for `configuration`."""
    from proxy.connection_policy import ClientInfo, PassThrough

    if configuration == "relay":
        return PassThrough(), None
    from proxy.enforcement import Enforcement
    from proxy.metrics import Metrics
    from proxy.operations import AuditSettings, build_connection_policy_factory, open_audit_sink

    if "enforcement" not in runtimes:
        runtimes["enforcement"] = await Enforcement.create(str(policy_file), dsn)
        runtimes["metrics"] = Metrics()
    deployed = configuration in DEPLOYED
    metrics = runtimes["metrics"] if configuration == "full+metrics" or deployed else None
    login = "bench_masked" if configuration in ("masked", "deployed masked") else "bench_full"
    sink = None
    audit = AuditSettings()
    if deployed:
        audit = AuditSettings(log=str(workdir / "audit-deployed.jsonl"))
        sink = runtimes.get("deployed") or open_audit_sink(audit)
        runtimes["deployed"] = sink
    elif "audit" in configuration:
        fsync = configuration.rsplit(" ", 1)[1]
        audit = AuditSettings.from_settings(str(workdir / f"audit-{fsync}.jsonl"),
                                            {"audit": AUDIT_FSYNC_INTERVALS[fsync]})
        sink = runtimes.get(fsync) or open_audit_sink(audit)
        runtimes[fsync] = sink
    factory = build_connection_policy_factory(runtimes["enforcement"].connection_policy, sink,
                                              metrics, audit)
    client = ClientInfo(connection_id=1, address="127.0.0.1:1", user=login, database="bench",
                        application_name="pgbench", tls=False)
    policy = factory(client)
    refusal = await policy.on_startup({"user": login, "database": "bench"}, client)
    assert refusal is None, refusal
    policy.on_parameter_status("search_path", '"$user", public')
    assert not isinstance(policy, PassThrough)
    return policy, metrics


async def _child_main(dsn: str, policy_file: Path, transactions: int, configurations: list[str]) -> None:
    """One measurement pass in this process (the tree on sys.path): prints a JSON line."""
    with tempfile.TemporaryDirectory(prefix="pgveil-hotpath-") as directory:
        await _measure(dsn, policy_file, transactions, configurations, Path(directory))


async def _measure(dsn: str, policy_file: Path, transactions: int, configurations: list[str],
                   workdir: Path) -> None:
    runtimes: dict[str, Any] = {}
    results: dict[str, float] = {}
    for configuration in configurations:
        for mode in MODES:
            policy, observer = await _policy_for(configuration, dsn, policy_file, workdir, runtimes)
            results[f"{configuration}|{mode}"] = await _relay_run(policy, observer, mode, transactions)
    if "enforcement" in runtimes:
        results.update(await _cache_hit(runtimes["enforcement"], transactions))
    for name in (*AUDIT_FSYNC_INTERVALS, "deployed"):
        if name in runtimes:
            await runtimes[name].close()
    if "enforcement" in runtimes:
        await runtimes["enforcement"].close()
    print(json.dumps(results), flush=True)


async def _cache_hit(enforcement: Any, lookups: int) -> dict[str, float]:
    """CPU µs of one verdict-cache lookup that hits (pgbench -S's statement, bench_full), and of the
    guard's whole synchronous cache-hit path (role, session checks, key, lookup) where it exists."""
    from proxy.connection_policy import ClientInfo

    guarded = enforcement.connection_policy()
    client = ClientInfo(connection_id=2, address="127.0.0.1:2", user="bench_full", database="bench",
                        application_name="pgbench", tls=False)
    await guarded.on_startup({"user": "bench_full", "database": "bench"}, client)
    guarded.on_parameter_status("search_path", '"$user", public')
    sql = "SELECT abalance FROM pgbench_accounts WHERE aid = 4242;"
    await guarded.on_query(sql)
    key = guarded.context_and_key(guarded.role())[1]
    assert enforcement.cache.lookup(sql, key) is not None
    results: dict[str, float] = {}
    started = time.process_time()
    for _ in range(lookups):
        enforcement.cache.lookup(sql, key)
    results["verdict-cache lookup (hit)|-"] = (time.process_time() - started) / lookups * 1e6
    if hasattr(guarded, "fast_query"):
        assert guarded.fast_query(sql) is not None
        started = time.process_time()
        for _ in range(lookups):
            guarded.fast_query(sql)
        results["guard fast path (hit)|-"] = (time.process_time() - started) / lookups * 1e6
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transactions", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", metavar="SOURCE_TREE")
    parser.add_argument("--only", help="comma-separated configurations (default: all)")
    parser.add_argument("--profile", metavar="FILE", help="profile the current tree's pass (cProfile)")
    parser.add_argument("--cold", type=int, default=0, metavar="KIB",
                        help="write over KIB KiB before each transaction (cold caches, as live)")
    parser.add_argument("--child", nargs=3, metavar=("DSN", "POLICY", "CONFIGS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import uvloop

        uvloop.install()
        dsn, policy_file, chosen = args.child
        global _COLD
        _COLD = args.cold * 1024
        asyncio.run(_child_main(dsn, Path(policy_file), args.transactions, chosen.split(",")))
        return 0

    sys.path.insert(0, str(HERE.parent))
    from bench.relay import PASSWORD, PGBENCH_LOGINS, PGBENCH_POLICY
    from proxy.embedded import EmbeddedPostgres, bin_dir

    configurations = args.only.split(",") if args.only else list(CONFIGURATIONS)
    pg = EmbeddedPostgres.start()
    workdir = Path(tempfile.mkdtemp(prefix="pgveil-hotpath-"))
    try:
        pg.psql("create database bench")
        subprocess.run([str(bin_dir() / "pgbench"), "-i", "-q", "-s", "1", "-d", pg.dsn(dbname="bench")],
                       check=True, capture_output=True)
        for login in PGBENCH_LOGINS:
            pg.psql(f"create role {login} login password '{PASSWORD}'")
        pg.psql("grant select on all tables in schema public to public", dbname="bench")
        policy = workdir / "policy.yaml"
        policy.write_text(PGBENCH_POLICY)
        trees = [("after", HERE.parent)]
        if args.baseline:
            trees.insert(0, ("before", Path(args.baseline).resolve()))
        results: dict[str, dict[str, list[float]]] = {name: {} for name, _ in trees}
        for round_number in range(args.rounds):
            for name, tree in trees:
                command = [sys.executable]
                if args.profile and name == "after" and round_number == 0:
                    command += ["-m", "cProfile", "-o", args.profile]
                command += [str(HERE / "hotpath.py"), "--transactions", str(args.transactions),
                            *(["--cold", str(args.cold)] if args.cold else []),
                            "--child", pg.dsn(dbname="bench"), str(policy), ",".join(configurations)]
                child = subprocess.run(command, check=False, capture_output=True, text=True, cwd=tree,
                                       env={**os.environ, "PYTHONPATH": str(tree)})
                if child.returncode != 0:
                    raise RuntimeError(f"the {name} pass failed:\n{child.stderr[-4000:]}")
                for key, value in json.loads(child.stdout.strip().splitlines()[-1]).items():
                    results[name].setdefault(key, []).append(value)
        cold = f", {args.cold} KiB written over before each transaction" if args.cold else ""
        print(f"pgveil CPU µs per pgbench -S transaction, in-process, median and best of {args.rounds} "
              f"rounds of {args.transactions}{cold} (load average {os.getloadavg()[0]:.1f})")
        header = f"{'configuration':<18} {'mode':<9}" + "".join(
            f" {name + ' median':>14} {name + ' best':>12}" for name, _ in trees)
        print(header)
        for configuration in configurations:
            for mode in MODES:
                key = f"{configuration}|{mode}"
                cells = "".join(
                    f" {statistics.median(results[name][key]):>14.1f} {min(results[name][key]):>12.1f}"
                    for name, _ in trees)
                print(f"{configuration:<18} {mode:<9}{cells}")
        for key in ("verdict-cache lookup (hit)|-", "guard fast path (hit)|-"):
            name_key = key.split("|")[0]
            cells = "".join(
                f" {statistics.median(results[name][key]):>14.1f} {min(results[name][key]):>12.1f}"
                if key in results[name] else f" {'-':>14} {'-':>12}" for name, _ in trees)
            print(f"{name_key:<28}{cells}")
        if "relay" in configurations and "deployed" in configurations:
            for name, _ in trees:
                medians = {key: statistics.median(values) for key, values in results[name].items()}
                added = ", ".join(f"{mode} {medians[f'deployed|{mode}'] - medians[f'relay|{mode}']:.1f}"
                                  for mode in MODES)
                print(f"{name}: policy + audit + metrics add (deployed - relay, µs per transaction): {added}")
        return 0
    finally:
        pg.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
