"""Metrics counted in plain integers are exported exactly as prometheus-client's own metrics were."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import Metric

from proxy.connection_policy import Outcome
from proxy.guard.verdict import Allow, Refuse, StatementInfo, Verdict
from proxy.metrics import MeteredConnection, Metrics
from tests.test_metrics import CLIENT, GuardStandIn

PGVEIL_SECONDS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
UPSTREAM_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0)
AUDIT_SECONDS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 1.0)


class Reference:
    """The per-statement metrics as they were defined with prometheus-client's Counter and Histogram."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.statements = Counter("pgveil_statements", "Statements decided, by role, statement kind and "
                                  "decision", ["role", "kind", "decision"], registry=r)
        self.refusals = Counter("pgveil_refusals", "Statements refused, by the rule that refused them",
                                ["rule"], registry=r)
        self.findings = Counter("pgveil_findings", "Firewall findings of rules in alert mode (statement let "
                                "through), by rule", ["rule"], registry=r)
        self.pgveil_seconds = Histogram("pgveil_statement_pgveil_seconds", "pgveil's own time per statement: "
                                        "decision, rewrite and audit write", buckets=PGVEIL_SECONDS,
                                        registry=r)
        self.upstream_seconds = Histogram("pgveil_statement_upstream_seconds", "Time from forwarding a "
                                          "statement to PostgreSQL's ReadyForQuery", buckets=UPSTREAM_SECONDS,
                                          registry=r)
        self.statement_errors = Counter("pgveil_statement_errors", "Forwarded statements that PostgreSQL "
                                        "answered with an error, by SQLSTATE class (first two characters)",
                                        ["sqlstate_class"], registry=r)
        self.audit_write_seconds = Histogram("pgveil_audit_write_seconds", "Time to make one audit record "
                                             "durable", ["type"], buckets=AUDIT_SECONDS, registry=r)
        self.audit_failures = Counter("pgveil_audit_failures", "Audit records the sink could not write",
                                      ["type"], registry=r)


def shape(families: list[Metric]) -> dict[str, tuple[str, str, list[tuple[str, tuple[tuple[str, str], ...],
                                                                    float | None]]]]:
    """Name -> (type, help, samples); a `_created` sample's value is a time, so only its presence counts."""
    return {
        family.name: (family.type, family.documentation, [
            (s.name, tuple(sorted(s.labels.items())), None if s.name.endswith("_created") else s.value)
            for s in family.samples])
        for family in families
    }


def test_statement_metrics_are_exported_with_the_names_labels_types_and_values_of_before() -> None:
    metrics, reference = Metrics(), Reference()
    select = StatementInfo(kind="select", findings=("sql-comment",))
    events: list[tuple[str, Verdict, float]] = [
        ("analyst", Allow("SELECT 1", info=select), 0.00005),  # exactly on a bucket bound
        ("analyst", Allow("SELECT 2", info=StatementInfo(kind="select")), 0.0003),
        ("analyst", Refuse("injection", "no", info=StatementInfo(kind="select")), 2.0),  # past the last bound
        ("auditor", Allow("SELECT 3", info=StatementInfo(kind="select")), 0.0),
    ]
    for role, verdict, seconds in events:
        metrics.decided(role, verdict, seconds)
        reference.pgveil_seconds.observe(seconds)
        reference.statements.labels(role, verdict.info.kind, verdict.decision).inc()
        if isinstance(verdict, Refuse):
            reference.refusals.labels(verdict.rule).inc()
        for finding in verdict.info.findings:
            reference.findings.labels(finding).inc()
    for seconds in (0.0005, 0.003, 60.0, 61.0):
        metrics.upstream_seconds.observe(seconds)
        reference.upstream_seconds.observe(seconds)
    metrics.statement_errors[("22",)] += 1
    reference.statement_errors.labels("22").inc()
    for record_type, seconds in (("access", 0.0001), ("access", 0.02), ("completion", 0.5)):
        metrics.audit_written(record_type, seconds)
        reference.audit_write_seconds.labels(record_type).observe(seconds)
    metrics.audit_failed("access")
    reference.audit_failures.labels("access").inc()

    ours = shape([family for family in metrics.registry.collect() if family.name in shape(
        list(reference.registry.collect()))])
    assert ours == shape(list(reference.registry.collect()))


def test_an_unused_metric_is_still_described_without_series() -> None:
    families = {family.name: family for family in Metrics().registry.collect()}
    assert families["pgveil_statements"].type == "counter"
    assert families["pgveil_statements"].samples == []
    assert families["pgveil_statement_pgveil_seconds"].type == "histogram"
    assert [s.name for s in families["pgveil_statement_pgveil_seconds"].samples][-3:] == [
        "pgveil_statement_pgveil_seconds_count", "pgveil_statement_pgveil_seconds_sum",
        "pgveil_statement_pgveil_seconds_created"]


async def test_metered_connection_counts_in_plain_integers_read_at_scrape() -> None:
    metrics = Metrics()
    metered = MeteredConnection(GuardStandIn(), metrics)
    await metered.on_startup({}, CLIENT)
    for _ in range(3):
        await metered.on_query("SELECT 1")
        await metered.on_complete(Outcome(rows=1, sqlstate=None, upstream_seconds=0.002))
    assert metrics.statements[("analyst", "select", "allow")] == 3
    assert metrics.registry.get_sample_value(
        "pgveil_statements_total", {"role": "analyst", "kind": "select", "decision": "allow"}) == 3
    bucket = {"le": "0.0025"}
    assert metrics.registry.get_sample_value("pgveil_statement_upstream_seconds_bucket", bucket) == 3
