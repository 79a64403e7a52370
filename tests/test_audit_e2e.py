"""Through the proxy with psycopg: audit before forward, failing sinks, metrics, reload, elevation."""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from proxy.audit import AuditError, AuditSink, JsonLinesFileSink, MappingWrites, Unsealed, verify
from proxy.cli import main as pgveil
from proxy.config import Settings
from proxy.connection_policy import ClientInfo, ConnectionPolicy
from proxy.embedded import free_port
from proxy.enforcement import Enforcement
from proxy.operations import build_connection_policy_factory, serve_hooks
from tests.conftest import Upstream
from tests.proxy_harness import RunningProxy, ServeProcess, running_proxy, spawn_serve, wait_until

DATABASE = "ops_test"
PASSWORD = "ops-pw-2718"
GRANT_KEY = "ops-test-grant-key-0123456789abcdef"
SCHEMA = """
CREATE TABLE ops_items (id serial PRIMARY KEY, tag text);
CREATE TABLE ops_secrets (id int, secret text);
INSERT INTO ops_secrets VALUES (1, 'launch codes');
"""
POLICY = """\
version: 1
settings: {default_role: deny}
roles:
  ops_reader:
    members: [ops_alice, ops_dev]
    statements: [select, insert]
    tables: ["public.ops_items"]
    reveal: [public, internal, confidential, restricted]
  ops_support:
    members: [ops_nobody]
    statements: [select, insert]
    tables: ["public.ops_items", "public.ops_secrets"]
    reveal: [public, internal, confidential, restricted]
elevations:
  - role: ops_support
    users: [ops_dev]
    max_duration: 10m
    approver_required: true
    approvers: [ops_lead]
"""


@dataclass
class World:
    upstream: Upstream
    directory: Path
    policy: Path

    @property
    def upstream_dsn(self) -> str:
        return self.upstream.dsn(dbname=DATABASE)


@pytest.fixture(scope="module")
def world(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> World:
    upstream.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
    upstream.execute(f"CREATE DATABASE {DATABASE}")
    for login in ("ops_alice", "ops_dev"):
        upstream.execute(f"DROP ROLE IF EXISTS {login}; CREATE ROLE {login} LOGIN PASSWORD '{PASSWORD}'")
    upstream.execute(SCHEMA + "GRANT ALL ON ALL TABLES IN SCHEMA public TO ops_alice, ops_dev;"
                     "GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO ops_alice, ops_dev;", dbname=DATABASE)
    directory = tmp_path_factory.mktemp("ops")
    policy = directory / "policy.yaml"
    policy.write_text(POLICY)
    return World(upstream, directory, policy)


def connect(proxy: RunningProxy, login: str = "ops_alice") -> psycopg.Connection[Any]:
    # No automatic server-side prepare, so each statement here gives exactly one access record
    # (re-executions are audited too: tests/test_prepared_statements.py).
    return psycopg.connect(proxy.dsn(login, PASSWORD, DATABASE), autocommit=True, prepare_threshold=None)


def rows_in(world: World, table: str) -> int:
    with psycopg.connect(world.upstream_dsn) as conn:
        count = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
    assert count is not None
    return int(count[0])


def audit_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def completion_of(path: Path, access: dict[str, Any], timeout: float = 10) -> dict[str, Any]:
    """The completion record of an access record; it is written after the client has its answer."""
    deadline = time.monotonic() + timeout
    while True:
        for record in audit_records(path):
            if (record["type"], record.get("connection_id"), record.get("request")) == (
                    "completion", access["connection_id"], access["request"]):
                return record
        assert time.monotonic() < deadline, f"no completion record for {access}"
        time.sleep(0.02)


class LateBound:
    """Lets the proxy start before the policy runtime exists (it is built on the proxy's loop)."""

    def __init__(self) -> None:
        self.factory: Any = None
        self.observer: Any = None

    def policy(self, client: ClientInfo) -> ConnectionPolicy:
        return self.factory(client)  # type: ignore[no-any-return]

    def __getattr__(self, name: str) -> Any:  # the RelayObserver calls
        observer = self.__dict__.get("observer")
        return getattr(observer, name) if observer is not None else (lambda *args: None)


@contextmanager
def served(world: World, **overrides: Any) -> Iterator[tuple[RunningProxy, Any]]:
    """pgveil as `pgveil serve` builds it (proxy.operations.serve_hooks), on the test harness."""
    late = LateBound()
    with running_proxy(world.upstream, policy_factory=late.policy, observer=late) as proxy:
        settings = Settings(upstream=world.upstream_dsn, listen="127.0.0.1:0", policy=str(world.policy),
                            **overrides)
        hooks = proxy.run(serve_hooks(settings, 0))
        late.factory, late.observer = hooks.policy_factory, hooks.observer
        proxy.run(hooks.on_started(proxy.server))
        try:
            yield proxy, hooks
        finally:
            proxy.run(hooks.on_stopped())


class ProbeSink(MappingWrites):
    """A real file sink that also notes, once each access record is durable, how many rows
    PostgreSQL holds: a statement that ran before its record would already show up."""

    def __init__(self, inner: AuditSink, world: World) -> None:
        self.inner, self.world = inner, world
        self.seen: list[tuple[str, str, int]] = []

    def append(self, record: Unsealed) -> None:
        assert self.inner.append(record) is None  # the default mode: written at once
        if record.type == "access":
            fields = json.loads(f"{{{record.body}}}")
            self.seen.append((fields["decision"], fields["normalized_sql"], rows_in(self.world, "ops_items")))

    def append_behind(self, record: Unsealed) -> None:
        self.inner.append_behind(record)

    async def flush(self) -> None:
        await self.inner.flush()

    async def close(self) -> None:
        await self.inner.close()


class SwitchableSink(MappingWrites):
    """A real file sink whose storage can be made to fail (as a full or vanished disk would)."""

    def __init__(self, inner: AuditSink) -> None:
        self.inner = inner
        self.broken = threading.Event()

    def append(self, record: Unsealed) -> Awaitable[None] | None:
        if self.broken.is_set():
            raise AuditError("injected: no space left on device")
        return self.inner.append(record)

    def append_behind(self, record: Unsealed) -> None:
        if not self.broken.is_set():
            self.inner.append_behind(record)

    async def flush(self) -> None:
        await self.inner.flush()

    async def close(self) -> None:
        await self.inner.close()


@contextmanager
def guarded_proxy(world: World, sink: AuditSink) -> Iterator[RunningProxy]:
    """The guard's Enforcement behind AuditedConnection with `sink`, as serve wires them."""
    late = LateBound()
    with running_proxy(world.upstream, policy_factory=late.policy) as proxy:
        enforcement = proxy.run(Enforcement.create(str(world.policy), world.upstream_dsn))
        late.factory = build_connection_policy_factory(enforcement.connection_policy, sink, None)
        try:
            yield proxy
        finally:
            proxy.run(sink.close())


def test_every_statement_is_audited_before_it_reaches_postgresql(world: World) -> None:
    probe = ProbeSink(JsonLinesFileSink(world.directory / "probe.jsonl"), world)
    before = rows_in(world, "ops_items")
    with guarded_proxy(world, probe) as proxy, connect(proxy) as conn:
        for tag in ("p1", "p2", "p3"):
            conn.execute("INSERT INTO ops_items (tag) VALUES (%s)", (tag,))
        conn.execute("SELECT count(*) FROM ops_items").fetchone()
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="pgveil: table-not-allowed"):
            conn.execute("SELECT secret FROM ops_secrets")
    inserts = [count for decision, sql, count in probe.seen if sql.startswith("INSERT")]
    assert inserts == [before, before + 1, before + 2]  # each record was durable before its row existed
    assert rows_in(world, "ops_items") == before + 3
    decisions = [decision for decision, _, _ in probe.seen]
    assert decisions[-2] in ("allow", "rewrite") and decisions[-1] == "refuse"  # refusals are audited too
    assert verify(world.directory / "probe.jsonl") == []


def test_statements_fail_and_never_run_while_the_audit_sink_fails(world: World) -> None:
    sink = SwitchableSink(JsonLinesFileSink(world.directory / "switch.jsonl"))
    before = rows_in(world, "ops_items")
    with guarded_proxy(world, sink) as proxy, connect(proxy) as conn:
        sink.broken.set()
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="pgveil: audit-unavailable"):
            conn.execute("INSERT INTO ops_items (tag) VALUES ('unaudited')")
        assert rows_in(world, "ops_items") == before
        sink.broken.clear()  # the connection stays usable once the sink recovers
        conn.execute("INSERT INTO ops_items (tag) VALUES ('audited')")
    assert rows_in(world, "ops_items") == before + 1


def test_a_full_disk_refuses_new_connections(world: World) -> None:
    with served(world, audit_log="/dev/full", extra={"audit": {"fsync": "never"}}) as (proxy, _), \
            pytest.raises(psycopg.OperationalError, match="pgveil: audit-unavailable"):
        connect(proxy)


@dataclass
class Live:
    proxy: RunningProxy
    log: Path
    metrics_port: int
    reload: Any  # what SIGHUP runs


@pytest.fixture(scope="module")
def live(world: World) -> Iterator[Live]:
    """One pgveil with audit log, metrics and elevation, shared by the tests below."""
    log, grants, port = world.directory / "audit.jsonl", world.directory / "grants.jsonl", free_port()
    extra = {"audit": {"fsync": "batch"}, "elevation": {"grants_file": str(grants)}}
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PGVEIL_GRANT_KEY", GRANT_KEY)
        with served(world, audit_log=str(log), metrics=f"127.0.0.1:{port}", extra=extra) as (proxy, hooks):
            yield Live(proxy, log, port, hooks.reload)


def scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def sample(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(f"{name}{{{wanted}}} ") or (not labels and line.startswith(f"{name} ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_the_audit_log_of_a_session_is_complete_and_verifies(live: Live) -> None:
    proxy, log = live.proxy, live.log
    with connect(proxy) as conn:
        conn.execute("INSERT INTO ops_items (tag) VALUES ('x')")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT secret FROM ops_secrets")
    records = audit_records(log)
    accesses = [r for r in records if r["type"] == "access" and r["login"] == "ops_alice"]
    insert, refused = accesses[-2:]
    assert (insert["role"], insert["statement_kind"], insert["relations"]) == (
        "ops_reader", "insert", ["public.ops_items"])
    assert insert["decision"] in ("allow", "rewrite")
    assert "'x'" not in insert["normalized_sql"]
    assert (refused["decision"], refused["rule"]) == ("refuse", "table-not-allowed")
    assert insert["policy_version"] and insert["database"] == DATABASE and insert["client_address"]
    assert completion_of(log, insert)["rows"] == 1
    assert completion_of(log, refused)["sqlstate"] == "42501"
    assert pgveil(["audit", "verify", str(log)]) == 0


def test_metrics_move_as_statements_run(live: Live) -> None:
    proxy, port = live.proxy, live.metrics_port
    assert scrape(port, "/healthz") == (200, "ok\n")
    assert scrape(port, "/readyz") == (200, "ready\n")
    _, before = scrape(port)
    with connect(proxy) as conn:
        conn.execute("SELECT count(*) FROM ops_items")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT secret FROM ops_secrets")
    _, after = scrape(port)
    forwarded = [sample(text, "pgveil_statements_total", role="ops_reader", kind="select", decision=d)
                 for text in (before, after) for d in ("allow", "rewrite")]
    assert sum(forwarded[2:]) > sum(forwarded[:2])
    for name, labels in [
        ("pgveil_statements_total", {"role": "ops_reader", "kind": "select", "decision": "refuse"}),
        ("pgveil_refusals_total", {"rule": "table-not-allowed"}),
        ("pgveil_connections_total", {"result": "accepted"}),
        ("pgveil_audit_write_seconds_count", {"type": "access"}),
        ("pgveil_statement_upstream_seconds_count", {}),
        ("pgveil_statement_pgveil_seconds_count", {}),
    ]:
        assert sample(after, name, **labels) > sample(before, name, **labels), (name, labels)
    assert sample(after, "pgveil_bytes_relayed_total", direction="server_to_client") > 0
    assert 'pgveil_policy_info{source=' in after
    hits, misses = (sample(after, "pgveil_verdict_cache_total", result=r) for r in ("hit", "miss"))
    assert hits + misses > 0


def test_elevation_grants_and_expires_mid_session(world: World, live: Live) -> None:
    proxy, log = live.proxy, live.log
    grants = world.directory / "grants.jsonl"
    with connect(proxy, "ops_dev") as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="table-not-allowed"):
            conn.execute("SELECT secret FROM ops_secrets")
        assert pgveil(["elevate", "--user", "ops_dev", "--role", "ops_support", "--for", "2s",
                       "--reason", "INC-42 check a secret", "--approver", "ops_lead",
                       "--policy", str(world.policy), "--grants", str(grants)]) == 0
        assert conn.execute("SELECT secret FROM ops_secrets").fetchone() == ("launch codes",)
        deadline = time.monotonic() + 20
        while True:  # the grant runs out while the session stays open
            try:
                conn.execute("SELECT secret FROM ops_secrets")
            except psycopg.errors.InsufficientPrivilege:
                break
            assert time.monotonic() < deadline, "the elevation never expired"
            time.sleep(0.1)
    records = [r for r in audit_records(log) if r.get("login") == "ops_dev"]
    events = [r["event"] for r in records if r["type"] == "elevation"]
    assert events == ["granted", "used", "expired"]
    roles = [(r["role"], r["decision"]) for r in records if r["type"] == "access"]
    assert roles[0] == ("ops_reader", "refuse") and roles[1][0] == ("ops_support")
    assert roles[-1] == ("ops_reader", "refuse")
    granted = next(r for r in records if r.get("event") == "granted")
    assert (granted["reason"], granted["approver"], granted["elevated_role"]) == (
        "INC-42 check a secret", "ops_lead", "ops_support")


def test_reload_changes_what_an_open_connection_sees_and_an_invalid_policy_changes_nothing(
        world: World, live: Live) -> None:
    proxy, port = live.proxy, live.metrics_port
    hooks_reload = live.reload
    try:
        with connect(proxy) as conn:
            conn.execute("SELECT count(*) FROM ops_items")
            world.policy.write_text(POLICY.replace('tables: ["public.ops_items"]\n    reveal',
                                                   'tables: ["public.nothing"]\n    reveal', 1))
            proxy.run(hooks_reload())
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="table-not-allowed"):
                conn.execute("SELECT count(*) FROM ops_items")
            world.policy.write_text(POLICY.replace("members: [ops_alice, ops_dev]", "members: 42"))
            proxy.run(hooks_reload())
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="table-not-allowed"):
                conn.execute("SELECT count(*) FROM ops_items")
        _, text = scrape(port)
        assert sample(text, "pgveil_policy_reloads_total", result="ok") == 1
        assert sample(text, "pgveil_policy_reloads_total", result="invalid") == 1
    finally:
        world.policy.write_text(POLICY)
        proxy.run(hooks_reload())


# ---- the real command line: pgveil serve with signals and workers ----------------------------------


def refused(proxy_dsn: str, sql: str) -> bool:
    with psycopg.connect(proxy_dsn, autocommit=True, prepare_threshold=None) as conn:
        try:
            conn.execute(sql)
        except psycopg.errors.InsufficientPrivilege:
            return True
    return False


def test_serve_reloads_on_sighup_keeps_an_old_policy_when_invalid_and_drains_on_sigterm(
        world: World) -> None:
    log, port = world.directory / "serve" / "audit.jsonl", free_port()
    log.parent.mkdir()
    policy = world.directory / "serve-policy.yaml"
    policy.write_text(POLICY)
    with spawn_serve("--upstream", world.upstream_dsn, "--policy", str(policy), "--listen", "127.0.0.1:0",
                     "--audit-log", str(log), "--metrics", f"127.0.0.1:{port}") as served:
        dsn = served.dsn("ops_alice", PASSWORD, DATABASE)
        assert scrape(port, "/readyz") == (200, "ready\n")
        with psycopg.connect(dsn, autocommit=True, prepare_threshold=None) as conn:
            conn.execute("SELECT count(*) FROM ops_items")
            policy.write_text(POLICY.replace('tables: ["public.ops_items"]\n    reveal',
                                             'tables: ["public.nothing"]\n    reveal', 1))
            served.process.send_signal(signal.SIGHUP)
            served.wait_for_line("policy reloaded")
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="table-not-allowed"):
                conn.execute("SELECT count(*) FROM ops_items")  # the open connection sees the new policy
            policy.write_text("version: 1\nroles: [not, a, mapping]\n")
            served.process.send_signal(signal.SIGHUP)
            served.wait_for_line("policy reload refused")
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="table-not-allowed"):
                conn.execute("SELECT count(*) FROM ops_items")
        _, text = scrape(port)
        assert sample(text, "pgveil_policy_reloads_total", result="ok") == 1
        assert sample(text, "pgveil_policy_reloads_total", result="invalid") == 1
        assert sample(text, "pgveil_connections_open") == 0
        served.terminate()
        assert served.wait() == 0
    records = audit_records(log)
    assert [r["type"] for r in records].count("completion") == [r["type"] for r in records].count("access")
    assert verify(log) == []


def test_workers_keep_their_own_audit_chains_share_one_metrics_port_and_all_get_signals(world: World) -> None:
    log = world.directory / "workers" / "audit.jsonl"
    log.parent.mkdir()
    port = free_port()  # the parent serves every worker's metrics on this one port
    with spawn_serve("--upstream", world.upstream_dsn, "--policy", str(world.policy), "--listen",
                     "127.0.0.1:0", "--audit-log", str(log), "--metrics", f"127.0.0.1:{port}",
                     "--workers", "2") as served:
        assert scrape(port, "/healthz") == (200, "ok\n")
        for _ in range(6):
            assert not refused(served.dsn("ops_alice", PASSWORD, DATABASE), "SELECT count(*) FROM ops_items")
        served.process.send_signal(signal.SIGHUP)  # relayed to every worker
        wait_until(lambda: sample(scrape(port)[1], "pgveil_policy_reloads_total", result="ok") == 2,
                   "both workers to reload")
        served.terminate()
        assert served.wait() == 0
    assert sorted(p.name for p in log.parent.iterdir()) == [  # each log with its head file
        "audit-w0.jsonl", "audit-w0.jsonl-head", "audit-w1.jsonl", "audit-w1.jsonl-head"]
    assert sum(len(audit_records(p)) for p in log.parent.glob("*.jsonl")) >= 6 * 3
    assert verify(log.parent) == []


@pytest.mark.parametrize(("arguments", "config", "reason"), [
    (["--audit-log", "/nonexistent-dir/audit.jsonl"], None,
     "cannot open audit log /nonexistent-dir/audit.jsonl: No such file or directory"),
    ([], "audit:\n  fsync: sometimes\n",
     "audit.fsync must be one of always, batch, never, not 'sometimes' (or use fsync_interval_ms)"),
])
def test_serve_refuses_to_start_with_an_unusable_audit_setting(
        tmp_path: Path, arguments: list[str], config: str | None, reason: str) -> None:
    if config is not None:
        (tmp_path / "pgveil.yaml").write_text(config)
        arguments = [*arguments, "--config", str(tmp_path / "pgveil.yaml")]
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--upstream", "postgresql://postgres@127.0.0.1:1/postgres",
         "--listen", "127.0.0.1:0", *arguments], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert result.stderr.strip().endswith(reason)


@pytest.mark.parametrize("mode", ["never", "default"])
def test_a_disk_that_fills_up_mid_session_makes_statements_fail_never_run_unaudited(
        world: World, mode: str) -> None:
    log = world.directory / f"full-{mode}" / "audit.jsonl"
    log.parent.mkdir()
    limit = 6000  # bytes pgveil may write to any file: the audit log fills up after a few statements
    config = world.directory / f"{mode}.yaml"
    config.write_text("audit:\n  fsync: never\n" if mode == "never" else "audit: {}\n")
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy", "serve", "--upstream", world.upstream_dsn, "--policy",
         str(world.policy), "--listen", "127.0.0.1:0", "--audit-log", str(log), "--config", str(config)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    served = ServeProcess(process)
    served._reader = threading.Thread(target=lambda: served.stderr_lines.extend(process.stderr or ()),
                                      daemon=True)
    served._reader.start()
    with served:
        line = served.wait_for_line(r"listening on \S+:\d+")
        served.host, served.port = "127.0.0.1", int(line.rsplit(":", 1)[1].split()[0])
        before = rows_in(world, "ops_items")
        inserted = 0
        with psycopg.connect(served.dsn("ops_alice", PASSWORD, DATABASE), autocommit=True,
                             prepare_threshold=None) as conn:
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="pgveil: audit-unavailable"):
                for n in range(100):
                    conn.execute("INSERT INTO ops_items (tag) VALUES (%s)", (f"full-{n}",))
                    inserted += 1
            assert 0 < inserted < 100
        assert rows_in(world, "ops_items") == before + inserted  # the refused INSERT never ran
        served.terminate()
        served.wait()
    accesses = [r for r in audit_records(log) if r["type"] == "access"]
    assert len(accesses) == inserted  # every statement that ran has its access record
    assert log.stat().st_size <= limit
