"""Discovery while serving, by column names only: counts and logs what the policy leaves unclassified."""

from __future__ import annotations

import logging

from proxy.catalog import CatalogSnapshot, Relation, effective_dataset
from proxy.discovery.detectors import ColumnFacts, Finding, classify
from proxy.discovery.report import coverage_gap
from proxy.policy.model import Dataset, Policy, Sensitivity

log = logging.getLogger("pgveil.discovery")

_KINDS = frozenset({"table", "partitioned", "matview", "foreign"})
SENSITIVE = Sensitivity.CONFIDENTIAL  # the gauge counts gaps at or above this

Key = tuple[str, str, str]  # (relation, column, kind)


class UnclassifiedColumns:
    """Run after each catalog (re)read: the detectors on names, types and nothing else (no value is
    read while serving). Relations unchanged since the last run (same definition, same policy
    entry) are not classified again."""

    def __init__(self) -> None:
        self.sensitive = 0  # gaps at or above confidential: pgveil_unclassified_sensitive_columns
        self._gaps: dict[Key, Sensitivity] = {}
        self._by_relation: dict[str, tuple[Relation, Dataset | None, dict[Key, Sensitivity]]] = {}
        self._findings: dict[tuple[str, str, str], Finding | None] = {}  # names-only, policy-independent

    def update(self, policy: Policy, catalog: CatalogSnapshot) -> list[Key]:
        """Recount; log one line per gap not seen in the previous run and return them."""
        by_relation: dict[str, tuple[Relation, Dataset | None, dict[Key, Sensitivity]]] = {}
        for relation in catalog.user_relations():
            if relation.kind not in _KINDS or any(p.kind == "partitioned"
                                                  for p in catalog.ancestors(relation)):
                continue  # partitions share their parent's columns: counted once, on the parent
            dataset = effective_dataset(policy, relation)
            cached = self._by_relation.get(relation.qualified_name)
            if cached is not None and cached[0] == relation and cached[1] is dataset:
                by_relation[relation.qualified_name] = cached
                continue
            gaps: dict[Key, Sensitivity] = {}
            for column in relation.columns:
                best = self._finding(relation.name, column.name, column.type_sql)
                if best is not None and _uncovered(best, dataset, relation, column.name):
                    gaps[(relation.qualified_name, column.name, best.kind)] = best.sensitivity
            by_relation[relation.qualified_name] = (relation, dataset, gaps)
        current = {key: level for _, _, gaps in by_relation.values() for key, level in gaps.items()}
        new = [key for key in current if key not in self._gaps]
        for key in new:
            log.warning("discovery: column %s.%s looks like %s (%s) by its name and the policy does not "
                        "classify it that high (run pgveil discover --policy to check its values)",
                        key[0], key[1], key[2], current[key].name.lower())
        self._by_relation, self._gaps = by_relation, current
        if len(self._findings) > 4 * sum(len(r.columns) for r, _, _ in by_relation.values()) + 1024:
            self._findings.clear()  # dropped relations: start the memo again rather than let it grow
        self.sensitive = sum(1 for level in current.values() if level >= SENSITIVE)
        return new


    def _finding(self, table: str, column: str, type_sql: str) -> Finding | None:
        """The strongest names-only finding, remembered across catalog reads and policy reloads."""
        key = (table, column, type_sql)
        if key not in self._findings:
            findings = classify(ColumnFacts(table, column, type_sql), [])
            self._findings[key] = findings[0] if findings else None
        return self._findings[key]


def _uncovered(best: Finding, dataset: Dataset | None, relation: Relation, column: str) -> bool:
    return coverage_gap(best, dataset, relation.qualified_name, column) is not None
