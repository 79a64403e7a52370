"""Relay benchmark: pgbench straight to PostgreSQL, through pgbouncer and through pgveil, interleaved.

    python bench/relay.py [--duration 10] [--rounds 3] [--clients 8] [--threads 2] [--workers 1]
                          [--before-python PYTHON | --before-cmd "COMMAND"] [--no-pgbouncer]
    python bench/relay.py --bare-relay [--idle 1000] [--modes simple,extended,prepared]
                          [--policy FILE|pgbench [--user LOGIN ...]] [--audit never|batch|always]
                          [--baseline SOURCE_TREE] [--profile FILE] [--no-bare]

By default it measures pgveil as deployed: `pgveil serve --policy FILE --audit-log FILE
--metrics HOST:PORT`, the audit in its default durability mode (no audit settings given, so each
pgveil version runs its own default). Four workloads, each `-c CLIENTS -j THREADS -T DURATION`:
`pgbench -S` (one row of pgbench_accounts by aid) as login bench_full, whose role sees
everything, in the simple and the prepared protocol; and one row of bench_people (five masked
columns) by id as login bench_masked, simple and prepared. Targets: PostgreSQL directly,
pgbouncer (session pooling; said clearly when it is not installed) and pgveil; with
--before-python (another pgveil installation's interpreter, e.g. /work/before/.venv/bin/python,
run as `PYTHON -m proxy serve` from a scratch directory so it imports its own pgveil) or
--before-cmd (a command that is `pgveil`, e.g. "/work/before/.venv/bin/pgveil") a second pgveil
named "before" joins the same interleaved rounds. Direct and pgbouncer run the same SQL as
postgres. Rounds are interleaved (each round runs every workload on every target in turn) so
drift on a shared machine hits every column alike. Printed: median tps per target, each
pgveil's ratio to pgbouncer and its CPU µs per transaction (/proc), then what pgveil counted in
its metrics and wrote to its audit log (proof the deployed configuration ran).

--bare-relay runs the earlier benchmark instead: pgbench -S through pgveil without a policy
(the relay alone) in the simple, extended and prepared protocols, beside "bare", the floor for
any Python proxy (a uvloop byte pump of a dozen lines that parses nothing); then IDLE
connections through pgveil (its resident memory) and the scanner alone (µs per relayed
message, in-process). There --policy gives pgveil a policy ("pgbench": a built-in one for
pgbench's tables, where login bench_full sees everything and bench_masked sees
pgbench_accounts.abalance and filler masked) and pgbench logs in through it as each --user;
--audit adds an audit file with that fsync mode; --baseline runs a second pgveil from another
source tree (e.g. `git archive` of an older commit) as target "before"; --profile runs pgveil
under cProfile and writes its stats to FILE when it stops (CPU figures are then the
profiler's, not pgveil's).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.embedded import SERVICE_USER, EmbeddedPostgres, bin_dir, free_port

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its waited-for children (workers), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(f) for f in fields[11:15])
    total = utime + stime + cutime + cstime
    for child in _children(pid):
        total += sum(int(f) for f in Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[11:13])
    return total / TICKS


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def rss_mib(pid: int) -> float:
    total = 0
    for p in [pid, *_children(pid)]:
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


def pgbench(dsn: str, mode: str, clients: int, threads: int, duration: int) -> tuple[float, int]:
    result = subprocess.run(
        [str(bin_dir() / "pgbench"), "-n", "-S", "-M", mode, "-c", str(clients), "-j", str(threads),
         "-T", str(duration), "-d", dsn],
        capture_output=True, text=True, timeout=duration + 120, env={**os.environ, "PGPASSWORD": PASSWORD},
    )
    if result.returncode != 0:
        raise RuntimeError(f"pgbench failed on {dsn}: {result.stderr.strip()}")
    tps = float(re.search(r"tps = ([\d.]+)", result.stdout).group(1))  # type: ignore[union-attr]
    done = int(re.search(r"actually processed: (\d+)", result.stdout).group(1))  # type: ignore[union-attr]
    return tps, done


PGBENCH_POLICY = """\
version: 1
settings: {default_role: deny}
roles:
  full:
    members: [bench_full]
    statements: [select]
    tables: ["public.*"]
    reveal: [public, internal, confidential, restricted]
  masked:
    members: [bench_masked]
    statements: [select]
    tables: ["public.*"]
    reveal: [public, internal]
datasets:
  public.pgbench_accounts:
    columns:
      abalance: {sensitivity: confidential, protection: {generalize: {bucket: 100}}}
      filler:   {sensitivity: confidential, protection: {partial: {keep_first: 2}}}
"""
PGBENCH_LOGINS = ("bench_full", "bench_masked")
PASSWORD = "bench-pw-7"


def start_pgveil(upstream_dsn: str, workers: int, *, source: Path | None = None, policy: Path | None = None,
                 audit: str | None = None, workdir: Path | None = None,
                 profile: str | None = None, max_connections: int = 500) -> tuple[subprocess.Popen[str], int]:
    """`pgveil serve` from `source` (default: this tree), with an optional policy and audit file."""
    port = free_port()
    command = [sys.executable]
    if profile:
        command += ["-m", "cProfile", "-o", profile]
    command += ["-m", "proxy", "serve", "--upstream", upstream_dsn, "--listen", f"127.0.0.1:{port}",
                "--workers", str(workers), "--log-level", "warning", "--max-connections", str(max_connections)]
    if policy is not None:
        command += ["--policy", str(policy)]
    if audit is not None:
        assert workdir is not None
        config = workdir / f"audit-{port}.yaml"
        config.write_text(f"audit:\n  fsync: {audit}\n")
        command += ["--audit-log", str(workdir / f"audit-{port}.jsonl"), "--config", str(config)]
    tree = source or Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(tree)}
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=tree, env=env)
    _wait_port(port, process)
    return process, port


def serve_bare(listen_port: int, upstream_port: int) -> None:
    """A bare uvloop byte pump (no parsing at all): what any Python relay costs at least."""
    import uvloop

    class Leg(asyncio.Protocol):
        def __init__(self) -> None:
            self.peer: Leg | None = None
            self.transport: asyncio.Transport | None = None
            self.early: list[bytes] = []

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport  # type: ignore[assignment]

        def data_received(self, data: bytes) -> None:
            if self.peer is not None and self.peer.transport is not None:
                self.peer.transport.write(data)
            else:
                self.early.append(data)

        def connection_lost(self, exc: Exception | None) -> None:
            if self.peer is not None and self.peer.transport is not None:
                self.peer.transport.close()

    class ClientLeg(Leg):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            asyncio.get_running_loop().create_task(self.connect())

        async def connect(self) -> None:
            upstream = Leg()
            upstream.peer, self.peer = self, upstream
            await asyncio.get_running_loop().create_connection(lambda: upstream, "127.0.0.1", upstream_port)
            assert upstream.transport is not None
            for data in self.early:
                upstream.transport.write(data)

    async def run() -> None:
        await asyncio.get_running_loop().create_server(ClientLeg, "127.0.0.1", listen_port)
        await asyncio.Event().wait()

    uvloop.install()
    asyncio.run(run())


def start_bare(pg_port: int) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    process = subprocess.Popen([sys.executable, __file__, "--serve-bare", str(port), str(pg_port)])
    _wait_port(port, process)
    return process, port


def start_pgbouncer(pg_port: int, workdir: Path) -> tuple[subprocess.Popen[bytes], int] | None:
    binary = shutil.which("pgbouncer")
    if binary is None and Path("/usr/sbin/pgbouncer").exists():
        binary = "/usr/sbin/pgbouncer"
    if binary is None:
        return None
    port = free_port()
    (workdir / "userlist.txt").write_text('"postgres" ""\n')
    ini = workdir / "pgbouncer.ini"
    ini.write_text(
        "[databases]\n"
        f"* = host=127.0.0.1 port={pg_port}\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = trust\nauth_file = {workdir / 'userlist.txt'}\n"
        "pool_mode = session\nmax_client_conn = 2000\ndefault_pool_size = 100\n"
        f"logfile = {workdir / 'pgbouncer.log'}\npidfile = {workdir / 'pgbouncer.pid'}\n"
        "log_connections = 0\nlog_disconnections = 0\n"
    )
    command = [binary, str(ini)]
    if os.geteuid() == 0:  # pgbouncer refuses to run as root
        os.chmod(workdir, 0o777)
        for f in workdir.iterdir():
            os.chmod(f, 0o666)
        command = [binary, "-u", SERVICE_USER, str(ini)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_port(port, process)
    return process, port


def _wait_port(port: int, process: subprocess.Popen) -> None:  # type: ignore[type-arg]
    import socket

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


async def open_idle(port: int, count: int) -> list[asyncio.StreamWriter]:
    """Log `count` sessions in (trust auth) and leave them idle."""
    startup = struct.pack("!I", 3 << 16) + b"user\x00postgres\x00database\x00postgres\x00\x00"
    packet = struct.pack("!I", len(startup) + 4) + startup

    async def one() -> asyncio.StreamWriter:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(packet)
        buffer = b""
        while not re.search(rb"Z\x00\x00\x00\x05[ITE]$", buffer):
            chunk = await reader.read(4096)
            if not chunk:
                raise RuntimeError("connection closed during startup")
            buffer += chunk
        return writer

    writers: list[asyncio.StreamWriter] = []
    for start in range(0, count, 25):  # under --max-logins-per-address (32) at a time
        writers += await asyncio.gather(*(one() for _ in range(min(25, count - start))))
    return writers


def scanner_micro() -> tuple[float, float]:
    """µs per message for the backend scanner (+ inspection) on a pgbench -S-like response stream."""
    from proxy.wire import BACKEND_TAGS, MessageScanner
    from proxy.wire.backend import CommandComplete, DataRow, FieldDescription, ReadyForQuery, RowDescription

    response = b"".join(m.encode() for m in (
        RowDescription((FieldDescription("abalance", type_oid=23, type_size=4),)), DataRow((b"0",)),
        CommandComplete("SELECT 1"), ReadyForQuery("I")))
    chunk = response * 250  # 1000 messages
    scanner = MessageScanner(b"CEZG", BACKEND_TAGS, 1 << 30)
    rounds = 400
    started = time.perf_counter()
    for _ in range(rounds):
        scanner.feed(chunk)
    whole_chunks = (time.perf_counter() - started) / (rounds * 1000) * 1e6
    started = time.perf_counter()
    for _ in range(rounds * 250):
        scanner.feed(response)
    per_read = (time.perf_counter() - started) / (rounds * 1000) * 1e6
    return whole_chunks, per_read


# ---- pgveil as deployed (the default run) ------------------------------------------------------

DEPLOYED_POLICY = """\
version: 1
settings: {default_role: deny}
roles:
  full:
    members: [bench_full]
    statements: [select]
    tables: ["public.*"]
    reveal: [public, internal, confidential, restricted]
  masked:
    members: [bench_masked]
    statements: [select]
    tables: ["public.*"]
    reveal: [public, internal]
datasets:
  public.bench_people:
    description: One row per person, five columns masked for role masked
    columns:
      id:         {sensitivity: internal}
      name:       {sensitivity: confidential, protection: {partial: {keep_first: 1}}}
      email:      {sensitivity: confidential, protection: email}
      phone:      {sensitivity: confidential, protection: {partial: {keep_last: 4, mask_char: "#"}}}
      birth_date: {sensitivity: confidential, protection: {generalize: year}}
      salary:     {sensitivity: restricted, protection: {generalize: {bucket: 1000}}}
"""
PEOPLE_ROWS = 10000
PEOPLE_TABLE = f"""
create table bench_people (id integer primary key, name text not null, email text not null,
                           phone text not null, birth_date date not null, salary integer not null);
insert into bench_people
  select i, 'Person ' || i, 'person' || i || '@example.test', '+1 555 ' || lpad(i::text, 7, '0'),
         date '1950-01-01' + (i * 7 % 20000), 20000 + i * 13 % 150000
  from generate_series(1, {PEOPLE_ROWS}) as i;
"""
PEOPLE_SCRIPT = f"\\set id random(1, {PEOPLE_ROWS})\nSELECT * FROM bench_people WHERE id = :id;\n"
# (name, login through pgveil, pgbench -M mode, pgbench script: None for the built-in -S)
WORKLOADS = (
    ("-S simple, unmasked login", "bench_full", "simple", None),
    ("-S prepared, unmasked login", "bench_full", "prepared", None),
    ("5 masked columns by id, simple", "bench_masked", "simple", "people"),
    ("5 masked columns by id, prepared", "bench_masked", "prepared", "people"),
)


def run_pgbench(dsn: str, mode: str, script: Path | None, clients: int, threads: int,
                duration: int) -> tuple[float, int]:
    """tps and transactions of one pgbench run: -S, or `script`."""
    workload = ["-S"] if script is None else ["-f", str(script)]
    result = subprocess.run(
        [str(bin_dir() / "pgbench"), "-n", *workload, "-M", mode, "-c", str(clients), "-j", str(threads),
         "-T", str(duration), "-d", dsn],
        capture_output=True, text=True, timeout=duration + 120, env={**os.environ, "PGPASSWORD": PASSWORD},
    )
    if result.returncode != 0:
        raise RuntimeError(f"pgbench failed on {dsn}: {result.stderr.strip()}")
    tps = float(re.search(r"tps = ([\d.]+)", result.stdout).group(1))  # type: ignore[union-attr]
    done = int(re.search(r"actually processed: (\d+)", result.stdout).group(1))  # type: ignore[union-attr]
    return tps, done


def start_deployed(upstream_dsn: str, workdir: Path, name: str, policy: Path, workers: int,
                   command: list[str] | None = None) -> tuple[subprocess.Popen[str], int, int, Path]:
    """`pgveil serve` as deployed: policy, audit log (its default durability) and --metrics.
    `command` is another installation's `pgveil` (default: this tree's, as `python -m proxy`).
    Returns the process, its port, its metrics port and its audit log."""
    port, metrics_port = free_port(), free_port()
    audit_log = workdir / f"audit-{name}.jsonl"
    env = dict(os.environ)
    if command is None:
        tree = Path(__file__).resolve().parent.parent
        command, cwd = [sys.executable, "-m", "proxy"], tree
        env["PYTHONPATH"] = str(tree)
    else:
        cwd = workdir  # the other installation imports its own pgveil, not this tree's
        env.pop("PYTHONPATH", None)
    process = subprocess.Popen(
        [*command, "serve", "--upstream", upstream_dsn, "--listen", f"127.0.0.1:{port}",
         "--policy", str(policy), "--audit-log", str(audit_log), "--metrics", f"127.0.0.1:{metrics_port}",
         "--workers", str(workers), "--log-level", "warning", "--max-connections", "500"],
        stderr=subprocess.PIPE, text=True, cwd=cwd, env=env)
    try:
        _wait_port(port, process)
    except RuntimeError as exc:
        said = process.stderr.read() if process.stderr and process.poll() is not None else ""
        raise RuntimeError(f"pgveil {name} did not start: {exc}\n{said}") from None
    return process, port, metrics_port, audit_log


def scraped(metrics_port: int, name: str) -> float:
    """The sum of a metric's samples named `name` (0 when absent), from /metrics."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def deployed(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="pgveil-bench-"))
    os.chmod(workdir, 0o755)
    pg = EmbeddedPostgres.start(settings={"max_connections": "300"})
    processes: list[subprocess.Popen] = []  # type: ignore[type-arg]
    try:
        pg.psql("create database bench")
        subprocess.run([str(bin_dir() / "pgbench"), "-i", "-q", "-s", "1", "-d", pg.dsn(dbname="bench")],
                       check=True, capture_output=True)
        pg.psql(PEOPLE_TABLE, dbname="bench")
        pg.psql("analyze", dbname="bench")
        for login in ("bench_full", "bench_masked"):
            pg.psql(f"create role {login} login password '{PASSWORD}'")
        pg.psql("grant select on all tables in schema public to public", dbname="bench")
        policy = workdir / "policy.yaml"
        policy.write_text(DEPLOYED_POLICY)
        people = workdir / "people.sql"
        people.write_text(PEOPLE_SCRIPT)
        os.chmod(people, 0o644)

        # target -> {login: dsn} and the pid whose CPU is counted
        targets: dict[str, tuple[dict[str | None, str], int | None]] = {
            "direct": ({None: pg.dsn(dbname="bench")}, None)}
        bouncer = None if args.no_pgbouncer else start_pgbouncer(pg.port, workdir)
        if bouncer is not None:
            processes.append(bouncer[0])
            bouncer_dsn = f"postgresql://postgres@127.0.0.1:{bouncer[1]}/bench"
            targets["pgbouncer"] = ({None: bouncer_dsn}, bouncer[0].pid)
        veils: list[tuple[str, list[str] | None]] = [("pgveil", None)]
        if args.before_python:
            veils.insert(0, ("before", [args.before_python, "-m", "proxy"]))
        elif args.before_cmd:
            veils.insert(0, ("before", args.before_cmd.split()))
        observed: dict[str, tuple[int, Path]] = {}
        for name, command in veils:
            process, port, metrics_port, audit_log = start_deployed(
                pg.dsn(dbname="bench"), workdir, name, policy, args.workers, command)
            processes.append(process)
            observed[name] = (metrics_port, audit_log)
            targets[name] = ({login: f"postgresql://{login}@127.0.0.1:{port}/bench"
                              for login in ("bench_full", "bench_masked")}, process.pid)
        bouncer_note = "on" if bouncer else (
            "OFF (--no-pgbouncer)" if args.no_pgbouncer else "NOT INSTALLED: no ratios against pgbouncer")
        print(f"pgveil as deployed (policy + audit log in its default mode + --metrics), "
              f"-c {args.clients} -j {args.threads} -T {args.duration}, {args.rounds} interleaved rounds, "
              f"workers={args.workers}, pgbouncer {bouncer_note}; {os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.1f}", flush=True)
        tps: dict[tuple[str, str], list[float]] = {}
        cpu: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.rounds):
            for workload, login, mode, script in WORKLOADS:
                for name, (dsns, pid) in targets.items():
                    dsn = dsns.get(login) or dsns[None]
                    before = cpu_seconds(pid) if pid else 0.0
                    rate, done = run_pgbench(dsn, mode, people if script else None, args.clients,
                                             args.threads, args.duration)
                    tps.setdefault((workload, name), []).append(rate)
                    if pid:
                        cpu.setdefault((workload, name), []).append((cpu_seconds(pid) - before) / done * 1e6)
        names = list(targets)
        veil_names = [name for name, _ in veils]
        header = (f"| workload | {' | '.join(names)} |" + "".join(f" {n} / pgbouncer |" for n in veil_names)
                  + "".join(f" {n} CPU µs/tx |" for n in veil_names))
        print(f"\nmedian tps of {args.rounds} rounds\n\n{header}\n|" + "---|" * (header.count("|") - 1))
        for workload, *_ in WORKLOADS:
            rates = {name: statistics.median(tps[(workload, name)]) for name in names}
            ratios = "".join(f" {rates[n] / rates['pgbouncer']:.2f} |" if "pgbouncer" in rates else " - |"
                             for n in veil_names)
            used = "".join(f" {statistics.median(cpu[(workload, n)]):.1f} |" for n in veil_names)
            cells = " | ".join(f"{rates[n] / 1000:.1f}k" for n in names)
            print(f"| {workload} | {cells} |{ratios}{used}")
        print(f"\nload average after: {os.getloadavg()[0]:.1f}")
        for name, (metrics_port, audit_log) in observed.items():
            counted = scraped(metrics_port, "pgveil_statements_total")
            refused = scraped(metrics_port, "pgveil_refusals_total")
            files = [path for path in audit_log.parent.glob(audit_log.name + "*")
                     if not path.name.endswith("-head")]
            records = sum(sum(1 for _ in path.open("rb")) for path in files)
            print(f"{name}: {counted:.0f} statements counted ({refused:.0f} refused), "
                  f"{records} audit records in {audit_log.name} and its {len(files) - 1} rotated files")
        return 0
    finally:
        for process in processes:
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
        pg.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--idle", type=int, default=1000)
    parser.add_argument("--no-pgbouncer", action="store_true")
    parser.add_argument("--no-bare", action="store_true")
    parser.add_argument("--modes", default="simple,extended,prepared")
    parser.add_argument("--policy", metavar="FILE", help='policy for pgveil ("pgbench": the built-in one)')
    parser.add_argument("--user", action="append", metavar="LOGIN", help="login through pgveil (repeatable)")
    parser.add_argument("--audit", choices=["never", "batch", "always"], help="audit file with this fsync")
    parser.add_argument("--baseline", metavar="SOURCE_TREE", help='also run pgveil from this tree ("before")')
    parser.add_argument("--profile", metavar="FILE", help="run pgveil under cProfile, stats to FILE")
    parser.add_argument("--bare-relay", action="store_true",
                        help="the relay benchmark without a policy (the earlier default)")
    parser.add_argument("--before-python", metavar="PYTHON",
                        help="also run the pgveil this interpreter has installed, as target 'before'")
    parser.add_argument("--before-cmd", metavar="COMMAND",
                        help="also run this pgveil command (e.g. /work/before/.venv/bin/pgveil) as 'before'")
    parser.add_argument("--serve-bare", nargs=2, type=int, metavar=("LISTEN", "UPSTREAM"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_bare:
        serve_bare(*args.serve_bare)
        return 0
    if not args.bare_relay:
        return deployed(args)

    workdir = Path(tempfile.mkdtemp(prefix="pgveil-bench-"))
    os.chmod(workdir, 0o755)
    pg = EmbeddedPostgres.start(settings={"max_connections": str(args.idle + 100)})
    processes: list[subprocess.Popen] = []  # type: ignore[type-arg]
    try:
        pg.psql("create database bench")
        subprocess.run([str(bin_dir() / "pgbench"), "-i", "-q", "-s", "1", "-d", pg.dsn(dbname="bench")],
                       check=True, capture_output=True)
        policy: Path | None = None
        logins: list[str | None] = [None]
        if args.policy:
            policy = Path(args.policy).resolve() if args.policy != "pgbench" else workdir / "policy.yaml"
            if args.policy == "pgbench":
                policy.write_text(PGBENCH_POLICY)
            logins = list(args.user or (PGBENCH_LOGINS if args.policy == "pgbench" else ["postgres"]))
            for login in logins:
                if login != "postgres":
                    pg.psql(f"create role {login} login password '{PASSWORD}'")
            pg.psql("grant select on all tables in schema public to public", dbname="bench")
        targets: dict[str, tuple[str, int | None]] = {"direct": (pg.dsn(dbname="bench"), None)}
        bouncer = None if args.no_pgbouncer else start_pgbouncer(pg.port, workdir)
        if bouncer is not None:
            processes.append(bouncer[0])
            targets["pgbouncer"] = (f"postgresql://postgres@127.0.0.1:{bouncer[1]}/bench", bouncer[0].pid)
        if not args.no_bare:
            bare, bare_port = start_bare(pg.port)
            processes.append(bare)
            targets["bare"] = (f"postgresql://postgres@127.0.0.1:{bare_port}/bench", bare.pid)
        trees: list[tuple[str, Path | None]] = [("pgveil", None)]
        if args.baseline:
            trees.insert(0, ("before", Path(args.baseline).resolve()))
        veil = None
        veil_port = 0
        for tree_name, source in trees:
            process, port = start_pgveil(pg.dsn(dbname="bench"), args.workers, source=source, policy=policy,
                                         audit=args.audit, workdir=workdir,
                                         profile=args.profile if source is None else None,
                                         max_connections=max(500, args.idle + 100))
            processes.append(process)
            if source is None:
                veil, veil_port = process, port
            for login in logins:
                name = tree_name if login is None else f"{tree_name}:{login}"
                targets[name] = (f"postgresql://{login or 'postgres'}@127.0.0.1:{port}/bench", process.pid)
        assert veil is not None
        print(f"pgbench -S -c {args.clients} -j {args.threads} -T {args.duration}, {args.rounds} rounds, "
              f"pgveil workers={args.workers}, policy={args.policy or 'none'}, audit={args.audit or 'off'}, "
              f"pgbouncer {'on' if bouncer else 'not installed'}; {os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.1f}", flush=True)
        print(f"{'mode':<9} {'target':<22} {'tps':>8} {'/direct':>8} {'/pgbouncer':>10} {'CPU µs/tx':>10}")
        for mode in args.modes.split(","):
            tps: dict[str, list[float]] = {name: [] for name in targets}
            cpu: dict[str, list[float]] = {name: [] for name in targets}
            for _ in range(args.rounds):
                for name, (dsn, pid) in targets.items():
                    before = cpu_seconds(pid) if pid else 0.0
                    rate, done = pgbench(dsn, mode, args.clients, args.threads, args.duration)
                    tps[name].append(rate)
                    if pid:
                        cpu[name].append((cpu_seconds(pid) - before) / done * 1e6)
            direct = statistics.median(tps["direct"])
            bouncer_tps = statistics.median(tps["pgbouncer"]) if "pgbouncer" in tps else None
            for name in targets:
                rate = statistics.median(tps[name])
                ratio = f"{rate / bouncer_tps:.2f}" if bouncer_tps else "-"
                used = f"{statistics.median(cpu[name]):.1f}" if cpu[name] else "-"
                print(f"{mode:<9} {name:<22} {rate:>8.0f} {rate / direct:>8.2f} {ratio:>10} {used:>10}",
                      flush=True)
        print(f"load average after: {os.getloadavg()[0]:.1f}")

        if args.idle and policy is None:
            base = rss_mib(veil.pid)

            async def idle_test() -> float:
                writers = await open_idle(veil_port, args.idle)
                await asyncio.sleep(1)
                held = rss_mib(veil.pid)
                for writer in writers:
                    writer.close()
                return held

            held = asyncio.run(idle_test())
            print(f"idle: {args.idle} connections through pgveil: RSS {held:.1f} MiB "
                  f"(was {base:.1f} MiB before; {(held - base) * 1024 / args.idle:.1f} KiB per connection)")
        whole, per_read = scanner_micro()
        print(f"scanner: {whole:.2f} µs per message in large reads, {per_read:.2f} µs per message "
              f"when each read holds one 4-message response")
        return 0
    finally:
        for process in processes:
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
        pg.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
