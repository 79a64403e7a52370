"""Rule `union-extraction`: UNION shapes that bolt extra rows onto a query to read other data.

UNION-based injection appends `UNION ALL SELECT NULL,NULL,...` (padding to the column count
of the app's query) and then `UNION ALL SELECT NULL,usename,NULL FROM pg_user`.
Caught: a UNION branch without FROM whose columns are all constants and include NULL, next to a
branch that reads a relation; a UNION branch reading system catalogs or information_schema next
to one reading user tables; for application roles also FROM-less all-constant branches
(`UNION SELECT 1,2,3`) and branches that are constants except one column
(`UNION ALL SELECT NULL, password, NULL FROM users`).
Let through: UNIONs of ordinary queries (`SELECT a FROM t1 UNION SELECT a FROM t2`), totals rows
computed from tables, VALUES lists, all-constant UNIONs that read no table.
"""

from __future__ import annotations

from pglast import ast
from pglast.enums import SetOperation

from proxy.firewall.facts import DatabaseFacts
from proxy.firewall.statement import Finding, SubmittedSql, quote
from proxy.firewall.tree import (
    is_catalog_relation,
    is_null_constant,
    is_row_independent,
    relation_name,
    relations_in,
    select_leaves,
)
from proxy.policy.model import Role

RULE = "union-extraction"


def find_union_extraction(submitted: SubmittedSql, role: Role, facts: DatabaseFacts) -> Finding | None:
    cte_names: set[str] | None = None
    for node in submitted.nodes_of(ast.SelectStmt):
        assert isinstance(node, ast.SelectStmt)
        if node.op != SetOperation.SETOP_UNION:
            continue
        if cte_names is None:
            cte_names = {str(item.ctename) for item in submitted.nodes
                         if isinstance(item, ast.CommonTableExpr)}
        finding = _union_finding(select_leaves(node), role, cte_names)
        if finding is not None:
            return finding
    return None


def _union_finding(leaves: list[ast.SelectStmt], role: Role, cte_names: set[str]) -> Finding | None:
    reads_user_data = any(_user_relations(leaf, cte_names) for leaf in leaves)
    reads_a_relation = any(leaf.fromClause for leaf in leaves)
    for leaf in leaves:
        if leaf.valuesLists:
            continue
        targets = [target.val for target in leaf.targetList or () if isinstance(target, ast.ResTarget)]
        constant = [is_row_independent(value) for value in targets]
        if (not leaf.fromClause and reads_a_relation and all(constant)
                and (any(is_null_constant(value) for value in targets) or role.application)):
            return Finding(
                RULE,
                f"the UNION branch `{quote(leaf)}` adds constant rows to a query over a table, the "
                "shape of UNION-based injection; select the rows from a table or use VALUES",
            )
        catalogs = [relation_name(rel) for rel in relations_in(leaf) if is_catalog_relation(rel)]
        if catalogs and reads_user_data:
            return Finding(
                RULE,
                f"the UNION mixes system catalog {catalogs[0]} into a query over user tables, the shape "
                "of catalog extraction; query the catalog in a statement of its own",
            )
        if (role.application and leaf.fromClause and len(targets) >= 2
                and sum(constant) >= len(targets) - 1 and any(is_null_constant(v) for v in targets)):
            return Finding(
                RULE,
                f"the UNION branch `{quote(leaf)}` pads all columns but one with constants, the shape of "
                "UNION-based extraction; select real columns in every branch",
            )
    return None


def _user_relations(leaf: ast.SelectStmt, cte_names: set[str]) -> list[ast.RangeVar]:
    """Relations that are neither catalogs nor the statement's own CTEs."""
    return [rel for rel in relations_in(leaf) if not is_catalog_relation(rel)
            and not (rel.schemaname is None and str(rel.relname) in cte_names)]
