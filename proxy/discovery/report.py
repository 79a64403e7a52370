"""Turns discovery results into a draft `datasets:` section (YAML or JSON) or a policy gap report."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from proxy.discovery.detectors import Finding, suggested_protection
from proxy.discovery.sample import Column, Table
from proxy.policy.model import (
    ColumnPolicy,
    Constant,
    Dataset,
    Email,
    Generalize,
    Hash,
    Policy,
    Protection,
    Redact,
    Sensitivity,
)

_PLAIN_KEY = re.compile(r"^[a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)?$")
_YAML_WORDS = frozenset({"y", "n", "yes", "no", "true", "false", "on", "off", "null"})


@dataclass(frozen=True, slots=True)
class Gap:
    """A finding the policy does not cover: no entry, a lower sensitivity, or a missing flag."""

    status: str                # 'unclassified' | 'under-classified'
    detail: str
    policy: ColumnPolicy | None


def protection_value(protection: Protection | None) -> Any:
    """The protection as it is written in a policy (a name or a one-key mapping)."""
    if protection is None:
        return None
    if isinstance(protection, Email):
        return "email"
    if isinstance(protection, Hash):
        return "hash"
    if isinstance(protection, Redact):
        return "redact"
    if isinstance(protection, Generalize):
        return {"generalize": protection.unit if protection.unit else {"bucket": protection.bucket}}
    if isinstance(protection, Constant):
        return {"constant": protection.value}
    options: dict[str, int | str] = {key: value for key, value in (("keep_first", protection.keep_first),
                                             ("keep_last", protection.keep_last)) if value}
    if protection.mask_char != "*":
        options["mask_char"] = protection.mask_char
    return {"partial": options}


def column_entry(column: Column) -> dict[str, Any]:
    """The suggested policy entry for a column with findings (keys of policy format v1)."""
    best = column.findings[0]
    entry: dict[str, Any] = {"sensitivity": best.sensitivity.name.lower()}
    protection = protection_value(suggested_protection(best.kind, column.facts.type_sql))
    if protection is not None:
        entry["protection"] = protection
    if best.quasi_identifier:
        entry["quasi_identifier"] = True
    if best.identifier:
        entry["joinable"] = False
    return entry


def gap(column: Column, table: Table, policy: Policy) -> Gap | None:
    """The table's own entry governs it, else its nearest listed inheritance ancestor's."""
    dataset = next((policy.datasets[name] for name in (table.qualified_name, *table.ancestors)
                    if name in policy.datasets), None)
    return coverage_gap(column.findings[0], dataset, table.qualified_name, column.facts.name)


def coverage_gap(best: Finding, dataset: Dataset | None, relation: str, column_name: str) -> Gap | None:
    """How the policy entry governing a relation (None: it has none) falls short of a finding."""
    if dataset is None:
        return Gap("unclassified", f"the policy does not list {relation}", None)
    listed = dataset.columns.get(column_name)
    if listed is None:
        return Gap("unclassified", "the policy does not list this column (it is internal, unmasked "
                                   "for any role that reveals internal)", None)
    if listed.sensitivity < best.sensitivity:
        return Gap("under-classified", f"the policy says {listed.sensitivity.name.lower()}", listed)
    if best.quasi_identifier and not listed.quasi_identifier:
        return Gap("under-classified", "the policy does not mark it quasi_identifier", listed)
    return None


def _yaml_key(name: str) -> str:
    return name if _PLAIN_KEY.match(name) and name not in _YAML_WORDS else json.dumps(name)


def _yaml_flow(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_yaml_key(k)}: {_yaml_flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if re.fullmatch(r"[a-z_]+", value) and value not in _YAML_WORDS else json.dumps(value)
    return json.dumps(value)


def _comment(text: str) -> str:
    return " ".join(text.split())  # one line, whatever a name contains


def _evidence(finding: Finding) -> str:
    return f"{finding.kind}, confidence {finding.confidence:.2f}: " + "; ".join(finding.evidence)


Selection = list[tuple[Table, list[tuple[Column, "Gap | None"]]]]


def selected(tables: list[Table], policy: Policy | None) -> Selection:
    """Tables with the columns to report: every finding, or with a policy only the gaps."""
    chosen = []
    for table in tables:
        columns: list[tuple[Column, Gap | None]] = []
        for column in table.columns:
            if not column.findings:
                continue
            found_gap = gap(column, table, policy) if policy is not None else None
            if policy is None or found_gap is not None:
                columns.append((column, found_gap))
        if columns:
            chosen.append((table, columns))
    return chosen


def to_yaml(tables: list[Table], policy: Policy | None, header: list[str]) -> str:
    lines = [f"# {_comment(line)}" for line in header]
    chosen = selected(tables, policy)
    lines.append("datasets:" if chosen else "datasets: {}")
    for table, columns in chosen:
        lines.append(f"  {_yaml_key(table.qualified_name)}:")
        if table.problem:
            lines.append(f"    # {_comment(table.problem)}")
        lines.append("    columns:")
        for column, found_gap in columns:
            if found_gap is not None:
                lines.append(f"      # {found_gap.status}: {_comment(found_gap.detail)}")
            lines.append(f"      # {_comment(_evidence(column.findings[0]))}")
            for other in column.findings[1:]:
                lines.append(f"      #   also {other.kind} (confidence {other.confidence:.2f})")
            lines.append(f"      {_yaml_key(column.facts.name)}: {_yaml_flow(column_entry(column))}")
    return "\n".join(lines) + "\n"


def to_json(tables: list[Table], policy: Policy | None, header: list[str]) -> str:
    report_tables = []
    datasets: dict[str, Any] = {}
    for table, columns in selected(tables, policy):
        report_columns = []
        for column, found_gap in columns:
            best = column.findings[0]
            item: dict[str, Any] = {
                "name": column.facts.name,
                "type": column.facts.type_sql,
                "kind": best.kind,
                "confidence": best.confidence,
                "evidence": list(best.evidence),
                "matched": best.matched,
                "sampled": best.sampled,
                "suggested": column_entry(column),
                "also": [{"kind": f.kind, "confidence": f.confidence} for f in column.findings[1:]],
            }
            if found_gap is not None:
                item["policy"] = {"status": found_gap.status, "detail": found_gap.detail}
            report_columns.append(item)
        report_tables.append({"name": table.qualified_name, "sampled_rows": table.sampled_rows,
                              "problem": table.problem or None, "columns": report_columns})
        datasets[table.qualified_name] = {"columns": {c.facts.name: column_entry(c) for c, _ in columns}}
    return json.dumps({"summary": header, "tables": report_tables, "datasets": datasets}, indent=2) + "\n"


def at_or_above(tables: list[Table], policy: Policy | None, level: Sensitivity) -> int:
    """How many reported columns are at or above `level` (the CI gate)."""
    return sum(1 for _, columns in selected(tables, policy) for column, _ in columns
               if column.findings[0].sensitivity >= level)
