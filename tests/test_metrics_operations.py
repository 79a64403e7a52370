"""Operations wiring: settings, the decorated factory, reload accounting, readiness against PostgreSQL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from proxy.audit import AuditError, JsonLinesFileSink, MappingWrites, Unsealed
from proxy.connection_policy import ClientInfo, PassThrough
from proxy.embedded import free_port
from proxy.guard.verdict import Refuse
from proxy.metrics import Metrics
from proxy.operations import (
    AuditSettings,
    ElevationSettings,
    FanOutSink,
    OperationsSettingsError,
    build_connection_policy_factory,
    open_audit_sink,
    readiness,
    reload_policy,
    upstream_answers,
)
from proxy.policy.loader import load_policy
from proxy.policy.model import Policy
from tests.conftest import Upstream

CLIENT = ClientInfo(3, "127.0.0.1:4", "carol", "postgres", "psql", False)


def test_audit_settings_come_from_the_flag_and_the_config_section() -> None:
    audit = AuditSettings.from_settings("/var/log/a.jsonl", {"audit": {"fsync": "always", "max_bytes": 0}})
    assert (audit.log, audit.fsync_interval, audit.max_bytes, audit.on_failure) == (
        "/var/log/a.jsonl", 0, None, "refuse")
    assert AuditSettings.from_settings(None, {}).fsync_interval == 1.0
    assert AuditSettings.from_settings(None, {"audit": {"fsync": "never"}}).fsync_interval is None
    assert AuditSettings.from_settings(None, {"audit": {"fsync": "batch"}}).fsync_interval == 0
    assert AuditSettings.from_settings(None, {"audit": {"fsync_interval_ms": 250}}).fsync_interval == 0.25
    with pytest.raises(OperationsSettingsError, match=r"fsync_interval_ms or its older form fsync"):
        AuditSettings.from_settings(None, {"audit": {"fsync": "never", "fsync_interval_ms": 0}})
    with pytest.raises(OperationsSettingsError, match=r"audit\.fsync_interval_ms must be a whole number"):
        AuditSettings.from_settings(None, {"audit": {"fsync_interval_ms": -1}})
    with pytest.raises(OperationsSettingsError, match=r"audit\.fsync must be one of always, batch, never"):
        AuditSettings.from_settings(None, {"audit": {"fsync": "sometimes"}})
    with pytest.raises(OperationsSettingsError, match=r"audit\.rotate: unknown setting"):
        AuditSettings.from_settings(None, {"audit": {"rotate": 1}})
    assert ElevationSettings.from_settings({"elevation": {"grants_file": "/g"}}).grants_file == "/g"


def test_an_audit_log_that_cannot_be_opened_fails_at_start(tmp_path: Path) -> None:
    with pytest.raises(OperationsSettingsError, match="cannot open audit log"):
        open_audit_sink(AuditSettings(log=str(tmp_path / "no" / "such" / "dir.jsonl")))
    assert open_audit_sink(AuditSettings()) is None


async def test_factory_audits_then_meters_each_connection(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    sink = open_audit_sink(AuditSettings(log=str(log)))
    metrics = Metrics()
    factory = build_connection_policy_factory(lambda client: PassThrough(), sink, metrics)
    policy = factory(CLIENT)
    await policy.on_startup({}, CLIENT)
    await policy.on_query("SELECT 1")
    assert [json.loads(line)["type"] for line in log.read_text().splitlines()] == ["connect", "access"]
    assert metrics.registry.get_sample_value(
        "pgveil_statements_total", {"role": "unknown", "kind": "unknown", "decision": "allow"}) == 1
    assert metrics.registry.get_sample_value("pgveil_audit_write_seconds_count", {"type": "access"}) == 1
    assert sink is not None
    await sink.close()


class BrokenSink(MappingWrites):
    def append(self, record: Unsealed) -> None:
        raise AuditError("table sink down")

    def append_behind(self, record: Unsealed) -> None:
        return None

    async def flush(self) -> None:
        return None

    async def close(self) -> None:
        return None


async def test_fan_out_fails_when_any_sink_fails(tmp_path: Path) -> None:
    file_sink = JsonLinesFileSink(tmp_path / "a.jsonl")
    factory = build_connection_policy_factory(lambda client: PassThrough(),
                                              FanOutSink([file_sink, BrokenSink()]), None)
    verdict = await factory(CLIENT).on_query("SELECT 1")
    assert isinstance(verdict, Refuse) and verdict.rule == "audit-unavailable"
    await file_sink.close()


async def test_reloads_are_counted_and_an_invalid_policy_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("version: 1\nroles:\n  r:\n    members: [a]\n    tables: ['public.*']\n")
    metrics = Metrics()
    current: list[Policy] = [load_policy(path)]

    async def reload() -> Policy:
        current[0] = load_policy(path)  # raises before swapping when invalid
        return current[0]

    first = await reload_policy(reload, metrics)
    assert first is not None
    path.write_text("version: 1\nroles:\n  r:\n    members: a-string-not-a-list\n")
    assert await reload_policy(reload, metrics) is None
    assert current[0] is first
    assert metrics.registry.get_sample_value("pgveil_policy_reloads_total", {"result": "ok"}) == 1
    assert metrics.registry.get_sample_value("pgveil_policy_reloads_total", {"result": "invalid"}) == 1
    assert metrics.registry.get_sample_value(
        "pgveil_policy_info", {"version": first.version, "source": first.source}) == 1


async def test_readiness_needs_a_policy_and_an_answering_upstream(upstream: Upstream) -> None:
    assert await upstream_answers(upstream.host, upstream.port)
    assert not await upstream_answers("127.0.0.1", free_port())
    policy = load_policy_text()
    assert await readiness(lambda: policy, upstream.host, upstream.port)()
    assert not await readiness(lambda: None, upstream.host, upstream.port)()


def load_policy_text() -> Policy:
    from proxy.policy.loader import parse_policy

    return parse_policy("version: 1\nroles: {}\n")
