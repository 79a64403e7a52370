"""Audit durability modes: written before forwarding (default), strict group commit, never; every
mode's log verifies, a SIGKILL loses no access record, a failed fsync refuses."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from proxy.audit import AuditError, JsonLinesFileSink, StdoutSink, verify
from proxy.audit.chain import serialise
from proxy.audit.connection import AuditedConnection
from proxy.audit.file import rotated_files
from proxy.audit.postgres import PostgresSink
from proxy.audit.sink import unsealed
from proxy.connection_policy import ClientInfo, Outcome, PassThrough
from proxy.enforcement import Enforcement
from proxy.guard.verdict import Allow, Refuse, StatementInfo, Verdict
from proxy.operations import build_connection_policy_factory
from tests.conftest import Upstream
from tests.proxy_harness import ServeProcess, running_proxy, spawn_serve, wait_until

DATABASE = "durability_test"
PASSWORD = "durability-pw-1618"
POLICY = """\
version: 1
settings: {default_role: deny}
roles:
  dur_writer:
    members: [dur_alice]
    statements: [select, insert]
    tables: ["public.dur_items"]
    reveal: [public, internal, confidential, restricted]
"""
CLIENT = ClientInfo(connection_id=7, address="127.0.0.1:50000", user="alice", database="shop",
                    application_name="report", tls=False)
INFO = StatementInfo(kind="select", fingerprint="abc123",
                     normalized_sql="SELECT email FROM users WHERE id = $1", relations=("public.users",),
                     columns=("public.users.email",),
                     masks=("public.users.email:email",), findings=("tautology",))
MODES = {"default": 1.0, "strict": 0.0, "never": None}


class GuardStandIn(PassThrough):
    """A real ConnectionPolicy with fixed verdicts (the guard is tested on its own)."""

    role_name = "analyst"
    policy_version = "v-test"

    async def on_query(self, sql: str) -> Verdict:
        if "secret" in sql:
            return Refuse("tables", "role analyst may not read public.secret", info=INFO)
        return Allow(sql, info=INFO)

    async def on_parse(self, statement_name: str, sql: str, param_types: tuple[int, ...]) -> Verdict:
        return Allow(sql, info=INFO)


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---- the sink on its own ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
async def test_every_mode_writes_a_log_that_verify_accepts(tmp_path: Path, mode: str) -> None:
    log = tmp_path / "audit.jsonl"
    sink = JsonLinesFileSink(log, fsync_interval=MODES[mode], max_bytes=4000)
    connections = [AuditedConnection(GuardStandIn(), sink, CLIENT) for _ in range(4)]

    async def statements(audited: AuditedConnection) -> None:
        for number in range(10):
            await audited.on_query(f"SELECT {number}")
            await audited.on_complete(Outcome(rows=1, sqlstate=None, upstream_seconds=0.001))

    await asyncio.gather(*(statements(audited) for audited in connections))
    await sink.close()
    files = [*rotated_files(log), log]
    assert len(files) > 2  # it rotated too
    written = [record for file in files for record in records(file)]
    assert [record["seq"] for record in written] == list(range(80))
    assert sorted(record["type"] for record in written) == ["access"] * 40 + ["completion"] * 40
    assert verify(log) == []


async def test_the_chain_goes_on_across_modes_and_older_settings(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    for options in ({"fsync_interval": None}, {"fsync_interval": 1.0}, {"fsync_interval": 0.0},
                    {"fsync": "always"}, {"fsync": "batch"}, {"fsync": "never"}, {}):
        sink = JsonLinesFileSink(log, **options)  # type: ignore[arg-type]
        audited = AuditedConnection(GuardStandIn(), sink, CLIENT)
        await audited.on_query("SELECT 1")
        await audited.on_complete(Outcome(rows=1, sqlstate=None, upstream_seconds=0.001))
        await sink.close()
    assert [record["seq"] for record in records(log)] == list(range(14))
    assert verify(log) == []


async def test_by_default_the_access_record_is_in_the_file_when_the_verdict_is_answered(
        tmp_path: Path) -> None:
    """No await in between: the relay forwards the statement in the same callback."""
    log = tmp_path / "audit.jsonl"
    sink = JsonLinesFileSink(log)
    audited = AuditedConnection(GuardStandIn(), sink, CLIENT)
    answer = audited.record_access(Allow("SELECT 1", info=INFO), "query")
    assert isinstance(answer, Allow)
    assert [(r["type"], r["request"]) for r in records(log)] == [("access", 1)]
    await sink.close()


async def test_strict_mode_answers_only_after_the_fsync_covering_the_record(tmp_path: Path) -> None:
    sink = JsonLinesFileSink(tmp_path / "audit.jsonl", fsync_interval=0)
    audited = AuditedConnection(GuardStandIn(), sink, CLIENT)
    await audited.on_query("SELECT 0")  # the writer thread runs
    gate = threading.Event()
    blocked = sink._writer.run(gate.wait)  # the writer thread is busy: no fsync can happen now
    first = asyncio.ensure_future(audited.on_query("SELECT 1"))
    second = asyncio.ensure_future(audited.on_query("SELECT 2"))
    for _ in range(20):
        await asyncio.sleep(0)
    assert not first.done() and not second.done()  # written, but not yet fsynced: not answered
    assert [r["request"] for r in records(sink.path)] == [1, 2, 3]
    gate.set()
    await blocked
    assert isinstance(await first, Allow) and isinstance(await second, Allow)
    await sink.close()
    assert verify(sink.path) == []


async def test_strict_mode_shares_one_fsync_among_the_records_written_meanwhile(tmp_path: Path) -> None:
    sink = JsonLinesFileSink(tmp_path / "audit.jsonl", fsync_interval=0)
    fsyncs: list[int] = []
    real_sync = sink._sync

    def counted(fd: int | None, retired: list[int], directory: bool) -> None:
        fsyncs.append(1)
        real_sync(fd, retired, directory)

    sink._sync = counted  # type: ignore[method-assign]
    connections = [AuditedConnection(GuardStandIn(), sink, CLIENT) for _ in range(32)]
    answers = await asyncio.gather(*(audited.on_query("SELECT 1") for audited in connections))
    assert all(isinstance(answer, Allow) for answer in answers)
    assert len(fsyncs) == 1  # 32 records written in one turn of the loop, one fsync for all
    await sink.close()


@pytest.mark.parametrize("mode", ["strict", "default"])
async def test_a_failed_fsync_refuses_from_then_on(mode: str) -> None:
    """/dev/null takes writes but refuses fsync (EINVAL), as a failing disk would."""
    sink = JsonLinesFileSink("/dev/null", fsync_interval=MODES[mode])
    audited = AuditedConnection(GuardStandIn(), sink, CLIENT)
    first = await audited.on_query("SELECT 1")
    if mode == "strict":  # nobody may see the result of a statement whose record is not durable
        assert isinstance(first, Refuse) and first.rule == "audit-unavailable"
    else:  # written before forwarding; the fsync comes later
        assert isinstance(first, Allow)
        await sink.flush()
    later = await audited.on_query("SELECT 2")
    assert isinstance(later, Refuse) and later.rule == "audit-unavailable"
    assert later.text.startswith("pgveil: audit-unavailable: ")
    with pytest.raises(AuditError, match=r"fsync of audit log /dev/null failed .*restart pgveil"):
        await sink.write({"type": "access"})
    await sink.close()


async def test_a_failed_write_refuses_in_every_mode() -> None:
    for interval in MODES.values():
        sink = JsonLinesFileSink("/dev/full", fsync_interval=interval)
        audited = AuditedConnection(GuardStandIn(), sink, CLIENT)
        verdict = await audited.on_query("SELECT 1")
        assert isinstance(verdict, Refuse) and verdict.rule == "audit-unavailable", interval
        await sink.close()


async def test_access_record_text_is_the_record_as_json(tmp_path: Path) -> None:
    """The record built from cached fragments is byte for byte the JSON of the record's fields."""
    log = tmp_path / "audit.jsonl"
    sink = JsonLinesFileSink(log)
    audited = AuditedConnection(GuardStandIn(), sink, CLIENT, include_literals=True,
                                clock=lambda: "2026-01-01T00:00:00.000001+00:00")
    await audited.on_parse("s\"1", "SELECT 'é'", ())
    await audited.on_query("SELECT secret")
    await audited.on_complete(Outcome(rows=0, sqlstate=None, upstream_seconds=0.0012345678, verdicts=2))
    await sink.close()
    lines = log.read_text().splitlines()
    client = {"connection_id": 7, "client_address": "127.0.0.1:50000", "login": "alice", "database": "shop",
              "application_name": "report", "role": "analyst", "policy_version": "v-test"}
    statement = {"statement_kind": "select", "fingerprint": "abc123",
                 "normalized_sql": "SELECT email FROM users WHERE id = $1", "relations": ["public.users"],
                 "columns": ["public.users.email"], "masks": ["public.users.email:email"]}
    when = "2026-01-01T00:00:00.000001+00:00"
    expected = [
        {"type": "access", "time": when, **client, "request": 1, "protocol": "parse", **statement,
         "decision": "allow", "rule": None, "findings": ["tautology"], "statement_name": "s\"1",
         "sql": "SELECT 'é'"},
        {"type": "access", "time": when, **client, "request": 2, "protocol": "query", **statement,
         "decision": "refuse", "rule": "tables", "findings": ["tautology"], "sql": "SELECT secret"},
        {"type": "completion", "time": when, **client, "request": 1, "rows": 0,
         "upstream_seconds": 0.001235, "sqlstate": None, "requests": [1, 2]},
    ]
    for line, fields in zip(lines, expected, strict=True):
        record = json.loads(line)
        body = serialise({"seq": record["seq"], **fields, "prev": record["prev"], "chain": "sha256"})
        assert line == f'{body[:-1]},"hash":"{record["hash"]}"}}'


# ---- the PostgreSQL table sink ---------------------------------------------------------------------

async def test_postgres_sink_writes_the_records_of_one_loop_turn_with_one_copy(upstream: Upstream) -> None:
    upstream.execute("DROP TABLE IF EXISTS dur_audit_batched; DROP TABLE IF EXISTS dur_audit_batches;"
                     "CREATE TABLE dur_audit_batches (rows int);"
                     "CREATE TABLE dur_audit_batched (chain text NOT NULL, seq bigint NOT NULL,"
                     " at timestamptz NOT NULL, type text NOT NULL, line text NOT NULL,"
                     " PRIMARY KEY (chain, seq));"
                     "CREATE OR REPLACE FUNCTION dur_count_batch() RETURNS trigger LANGUAGE plpgsql AS $$"
                     " BEGIN INSERT INTO dur_audit_batches SELECT count(*) FROM batch; RETURN NULL; END $$;"
                     "CREATE TRIGGER dur_batches AFTER INSERT ON dur_audit_batched"
                     " REFERENCING NEW TABLE AS batch FOR EACH STATEMENT EXECUTE FUNCTION dur_count_batch()")
    sink = PostgresSink(upstream.dsn(), table="dur_audit_batched")
    connections = [AuditedConnection(GuardStandIn(), sink, CLIENT) for _ in range(40)]
    answers = await asyncio.gather(*(audited.on_query("SELECT 1") for audited in connections))
    assert all(isinstance(answer, Allow) for answer in answers)
    await sink.close()
    with psycopg.connect(upstream.dsn()) as conn:
        batches = [row[0] for row in conn.execute("SELECT rows FROM dur_audit_batches").fetchall()]
    assert batches == [40]  # forty statements, one COPY (one statement, one transaction)
    from proxy.audit.postgres import verify_table

    assert await verify_table(upstream.dsn(), "dur_audit_batched") == []


# ---- through `pgveil serve` --------------------------------------------------------------------------

@dataclass
class World:
    upstream: Upstream
    directory: Path
    policy: Path

    @property
    def upstream_dsn(self) -> str:
        return self.upstream.dsn(dbname=DATABASE)

    def rows(self) -> int:
        with psycopg.connect(self.upstream_dsn) as conn:
            count = conn.execute("SELECT count(*) FROM dur_items").fetchone()
        assert count is not None
        return int(count[0])

    def serve(self, audit_log: str, config: str) -> ServeProcess:
        path = self.directory / f"config-{abs(hash((audit_log, config)))}.yaml"
        path.write_text(config)
        return spawn_serve("--upstream", self.upstream_dsn, "--policy", str(self.policy),
                           "--listen", "127.0.0.1:0", "--audit-log", audit_log, "--config", str(path))


@pytest.fixture(scope="module")
def world(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> World:
    upstream.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
    upstream.execute(f"CREATE DATABASE {DATABASE}")
    upstream.execute(f"DROP ROLE IF EXISTS dur_alice; CREATE ROLE dur_alice LOGIN PASSWORD '{PASSWORD}'")
    upstream.execute("CREATE TABLE dur_items (id serial PRIMARY KEY, tag text);"
                     "GRANT ALL ON dur_items, dur_items_id_seq TO dur_alice", dbname=DATABASE)
    directory = tmp_path_factory.mktemp("durability")
    policy = directory / "policy.yaml"
    policy.write_text(POLICY)
    return World(upstream, directory, policy)


@pytest.fixture
def killed() -> Iterator[list[ServeProcess]]:
    started: list[ServeProcess] = []
    yield started
    for served in started:
        served.terminate()
        served.wait()


def test_sigkill_right_after_a_statement_returns_keeps_its_access_record(
        world: World, killed: list[ServeProcess]) -> None:
    log = world.directory / "killed.jsonl"
    served = world.serve(str(log), "audit: {}\n")  # the default mode
    killed.append(served)
    with psycopg.connect(served.dsn("dur_alice", PASSWORD, DATABASE), autocommit=True,
                         prepare_threshold=None) as conn:
        conn.execute("INSERT INTO dur_items (tag) VALUES ('before the kill') RETURNING id").fetchone()
        os.kill(served.process.pid, signal.SIGKILL)
    assert served.wait() == -signal.SIGKILL
    accesses = [r for r in records(log) if r["type"] == "access"]
    assert [r["normalized_sql"] for r in accesses] == ["INSERT INTO dur_items (tag) VALUES ($1) RETURNING id"]
    assert verify(log) == []


@pytest.mark.parametrize("config", ["audit: {fsync_interval_ms: 0}\n", "audit: {fsync: batch}\n"])
def test_strict_mode_accepts_nothing_whose_record_could_not_be_fsynced(
        world: World, killed: list[ServeProcess], config: str) -> None:
    """/dev/null takes every write and fails every fsync (EINVAL): in strict mode not even the
    connection is accepted, since its connect record never becomes durable."""
    served = world.serve("/dev/null", config)
    killed.append(served)
    with pytest.raises(psycopg.OperationalError, match="pgveil: audit-unavailable"):
        psycopg.connect(served.dsn("dur_alice", PASSWORD, DATABASE), autocommit=True)


class LateBound:
    """Lets the proxy start before the policy runtime exists (it is built on the proxy's loop)."""

    def __init__(self) -> None:
        self.factory: Any = None

    def policy(self, client: ClientInfo) -> Any:
        return self.factory(client)


def test_strict_mode_forwards_a_statement_only_after_the_fsync_of_its_record(world: World) -> None:
    """The audit writer thread is held busy, so no fsync can happen: the INSERT's access record
    reaches the file, and the INSERT must not reach PostgreSQL until the fsync is let through."""
    log = world.directory / "strict.jsonl"
    late = LateBound()
    with running_proxy(world.upstream, policy_factory=late.policy) as proxy:
        enforcement = proxy.run(Enforcement.create(str(world.policy), world.upstream_dsn))
        sink = JsonLinesFileSink(log, fsync_interval=0)
        late.factory = build_connection_policy_factory(enforcement.connection_policy, sink, None)
        before = world.rows()
        with psycopg.connect(proxy.dsn("dur_alice", PASSWORD, DATABASE), autocommit=True,
                             prepare_threshold=None) as conn:
            gate = threading.Event()

            async def hold_the_writer() -> None:
                sink._writer.run(gate.wait)

            proxy.run(hold_the_writer())
            answer: list[object] = []
            client = threading.Thread(target=lambda: answer.append(
                conn.execute("INSERT INTO dur_items (tag) VALUES ('strict')").rowcount))
            client.start()
            try:
                wait_until(lambda: any(r.get("normalized_sql", "").startswith("INSERT")
                                       for r in records(log)), "the INSERT's access record")
                assert world.rows() == before and answer == []  # written, not durable: not run
            finally:
                gate.set()
                client.join(30)
            assert answer == [1] and world.rows() == before + 1
        proxy.run(sink.close())
        proxy.run(enforcement.close())
    assert verify(log) == []


def test_by_default_a_statement_runs_once_its_record_is_written(
        world: World, killed: list[ServeProcess]) -> None:
    """The same /dev/null in the default mode: written is enough to forward; the failed fsync
    refuses what comes after it (without waiting for it here: that would be timing)."""
    served = world.serve("/dev/null", "audit: {fsync_interval_ms: 60000}\n")
    killed.append(served)
    before = world.rows()
    with psycopg.connect(served.dsn("dur_alice", PASSWORD, DATABASE), autocommit=True,
                         prepare_threshold=None) as conn:
        conn.execute("INSERT INTO dur_items (tag) VALUES ('written first')")
    assert world.rows() == before + 1


# ---- standard output -----------------------------------------------------------------------------

async def test_stdout_sink_writes_at_once_while_the_pipe_has_room_and_waits_when_it_is_full() -> None:
    """A collector that stops reading holds up the statements being audited, not the event loop."""
    import fcntl

    read_end, write_end = os.pipe()
    sink = StdoutSink(fd=write_end)
    assert sink.append(unsealed({"type": "access", "request": 1})) is None  # written at once
    flags = fcntl.fcntl(write_end, fcntl.F_GETFL)
    fcntl.fcntl(write_end, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    filler = 0
    with contextlib.suppress(BlockingIOError):
        while True:
            filler += os.write(write_end, b"\n" * 4096)
    fcntl.fcntl(write_end, fcntl.F_SETFL, flags)
    waiter = sink.append(unsealed({"type": "access", "request": 2}))
    assert waiter is not None  # the pipe is full: queued for the writer thread, the loop goes on
    drained = b""
    while len(drained) < filler:
        await asyncio.sleep(0)
        drained += os.read(read_end, 1 << 16)
    await waiter
    await sink.close()
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        text = (drained + pipe.read()).decode()
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert [(r["seq"], r["request"]) for r in lines] == [(0, 1), (1, 2)]
    assert lines[1]["prev"] == lines[0]["hash"]


async def test_text_that_is_not_utf8_is_recorded_as_json_escapes_and_verifies(tmp_path: Path) -> None:
    """A lone surrogate (what undecodable client bytes become) cannot be written as UTF-8; it is
    recorded as the JSON escape that reads back as the same text, and the chain verifies."""
    log = tmp_path / "audit.jsonl"
    sink = JsonLinesFileSink(log)
    audited = AuditedConnection(GuardStandIn(), sink, CLIENT, include_literals=True)
    assert isinstance(await audited.on_query("SELECT '\udcff'"), Allow)
    await sink.close()
    assert records(log)[0]["sql"] == "SELECT '\udcff'"
    assert verify(log) == []


def test_a_record_sealed_from_text_is_the_line_earlier_versions_wrote() -> None:
    """`seal` is how every earlier version sealed a record; the text path gives the same bytes, so
    logs of either verify alike and a chain can go on from one into the other."""
    from proxy.audit.chain import ChainState, HashChain

    record = {"type": "access", "time": "2026-01-01T00:00:00.000001+00:00", "relations": ["public.t"],
              "rule": None, "rows": 3, "upstream_seconds": 0.001235, "text": "é \\ \" \n"}
    for chain in (HashChain(), HashChain(key=b"k" * 32)):
        state = ChainState(41, "ab" * 32)
        line, after = chain.seal(record, state)
        body_line, body_after = chain.seal_body(unsealed(record).body, state)
        assert body_line == f"{line}\n".encode() and body_after == after
