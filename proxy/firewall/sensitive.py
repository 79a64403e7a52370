"""Rules `join-on-sensitive-key` and `quasi-identifier-concentration`, over the statement's lineage.

`join-on-sensitive-key`: a column marked `joinable: false` may not be used to correlate rows.
Caught: `JOIN b ON a.ssn = b.ssn`, `JOIN b USING (ssn)`, `NATURAL JOIN` sharing `ssn`,
`WHERE a.ssn = b.ssn`, `lower(a.ssn) = b.tax_id`, `ssn IN (SELECT ssn FROM other)`,
`EXISTS (SELECT 1 FROM other o WHERE o.ssn = u.ssn)`, `ssn = ANY (ARRAY(SELECT ...))`,
`SELECT ssn FROM a INTERSECT SELECT ssn FROM b` (and EXCEPT) — through aliases, CTEs, derived
tables and self-joins — and comparisons chained through a third value
(`a.ssn = s AND s = b.ssn` with `s` from unnest, generate_series, VALUES, a CTE or another table),
GROUP BY / DISTINCT ON / PARTITION BY a UNION of two tables' ssn.
Let through: reading or filtering the column on its own (`WHERE ssn = $1`, `ssn IN (VALUES ...)`,
`GROUP BY ssn`), joins on other keys, UNION.

`quasi-identifier-concentration`: a role's `max_quasi_identifiers` caps how many distinct
`quasi_identifier: true` columns one statement may return. Columns count when their values reach
the result — directly, through `*`, aliases, CTEs, derived tables, expressions (`extract(year from
birth_date)`), and every aggregate or window function derived from them (`min`, `sum`, `avg`,
`percentile_cont(...) WITHIN GROUP (ORDER BY age)`, `dense_rank() OVER (ORDER BY age)`, FILTER
conditions): over a group of one row they are the value. Not when only counted (`count(zip)`,
`count(DISTINCT zip)`) or only used in WHERE/JOIN/GROUP BY/PARTITION BY.
"""

from __future__ import annotations

from pglast import ast

from proxy.catalog import CatalogSnapshot, effective_dataset
from proxy.firewall.lineage import BaseColumn, LineageAnalysis
from proxy.firewall.statement import Finding
from proxy.policy.model import ColumnPolicy, Policy, Role

JOIN_RULE = "join-on-sensitive-key"
CONCENTRATION_RULE = "quasi-identifier-concentration"


class SensitiveColumns:
    """Column policies of base columns, looked up through the catalog (partitions use their parent's)."""

    def __init__(self, policy: Policy, catalog: CatalogSnapshot) -> None:
        self.policy = policy
        self.catalog = catalog

    def policy_of(self, base: BaseColumn) -> ColumnPolicy:
        relation = self.catalog.relations.get(base.relation)
        dataset = effective_dataset(self.policy, relation) if relation is not None else None
        return dataset.column(base.column) if dataset is not None else ColumnPolicy()

    def not_joinable(self, base: BaseColumn) -> bool:
        return not self.policy_of(base).joinable

    def quasi_identifier(self, base: BaseColumn) -> bool:
        return self.policy_of(base).quasi_identifier

    @property
    def any_not_joinable(self) -> bool:
        return any(not column.joinable for dataset in self.policy.datasets.values()
                   for column in dataset.columns.values())

    @property
    def any_quasi_identifier(self) -> bool:
        return any(column.quasi_identifier for dataset in self.policy.datasets.values()
                   for column in dataset.columns.values())


def trace(node: ast.Node, columns: SensitiveColumns, search_path: tuple[str, ...], user: str | None,
          ) -> LineageAnalysis:
    return LineageAnalysis(columns.catalog, search_path, user, columns.not_joinable).statement(node)


def find_join_on_sensitive_key(analysis: LineageAnalysis, columns: SensitiveColumns) -> Finding | None:
    if not analysis.correlations:
        return None
    correlation = analysis.correlations[0]
    sensitive = correlation.left if columns.not_joinable(correlation.left) else correlation.right
    return Finding(
        JOIN_RULE,
        f"the statement matches {correlation.left.qualified} against {correlation.right.qualified} "
        f"({correlation.how}); {sensitive.qualified} is marked joinable: false, so rows may not be "
        "correlated on it, not even through an expression or a subquery; correlate on a non-sensitive key",
    )


def find_quasi_identifier_concentration(analysis: LineageAnalysis, columns: SensitiveColumns,
                                        role: Role) -> Finding | None:
    limit = role.max_quasi_identifiers
    if limit is None:
        return None
    returned = sorted({base.qualified for output in analysis.outputs for base in output.exposed
                       if columns.quasi_identifier(base)})
    if len(returned) <= limit:
        return None
    return Finding(
        CONCENTRATION_RULE,
        f"the statement returns {len(returned)} quasi-identifiers together ({', '.join(returned)}); "
        f"role {role.name} may return at most {limit} in one statement: leave some out, or only count "
        "them (count(*), count(DISTINCT col)); sum, avg, min/max, percentiles and ranks over a group of "
        "one row are the value, so they count as returning it",
    )
