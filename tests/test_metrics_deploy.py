"""The Grafana dashboard and the Prometheus alert rules only use metrics pgveil exposes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from proxy.metrics import Metrics
from proxy.metrics_workers import group_metrics

DEPLOY = Path(__file__).parent.parent / "deploy"
METRIC = re.compile(r"\bpgveil_[a-z_]+")


def exposed_series() -> set[str]:
    names: set[str] = set()
    for family in Metrics().registry.collect():
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"], "info": ["_info"]}
        names.update(family.name + suffix for suffix in suffixes.get(family.type, [""]))
    for line in group_metrics(2, 2, 0).splitlines():  # the parent's own with --workers N
        if not line.startswith("#"):
            names.add(line.split()[0])
    return names


def test_dashboard_queries_name_only_exposed_metrics() -> None:
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    used = {name for expr in expressions for name in METRIC.findall(expr)}
    assert used and used <= exposed_series(), used - exposed_series()


def test_alert_rules_name_only_exposed_metrics_and_say_what_is_wrong() -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus-rules.yaml").read_text())["groups"][0]["rules"]
    used = {name for rule in rules for name in METRIC.findall(rule["expr"])}
    assert used and used <= exposed_series(), used - exposed_series()
    assert all(rule["annotations"]["summary"] and rule["labels"]["severity"] for rule in rules)
    alerts = {rule["alert"] for rule in rules}
    assert {"PgveilAuditWriteFailures", "PgveilPolicyReloadFailed", "PgveilRefusalSpike",
            "PgveilUpstreamErrors", "PgveilOwnLatencyP99High"} <= alerts
