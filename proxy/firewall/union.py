"""Rule `union-extraction`: UNION shapes that bolt extra rows onto a query to read other data.

UNION-based injection appends `UNION ALL SELECT NULL,NULL,...` (padding to the column count
of the app's query) and then `UNION ALL SELECT NULL,usename,NULL FROM pg_user`.
Caught: a UNION branch without FROM whose columns are all constants and include NULL, next to a
branch that reads a relation; a UNION branch reading system catalogs or information_schema next
to one reading user tables; for application roles also FROM-less all-constant branches
(`UNION SELECT 1,2,3`) and branches that are constants except one column
(`UNION ALL SELECT NULL, password, NULL FROM users`).
For every role also a branch that returns a server value (`current_user`, `version()`) where the
first branch returns something else (`... UNION SELECT current_user, version(), 3`).
Let through: UNIONs of ordinary queries (`SELECT a FROM t1 UNION SELECT a FROM t2`), totals rows
computed from tables, VALUES lists, all-constant UNIONs that read no table.
"""

from __future__ import annotations

from pglast import ast
from pglast.enums import SetOperation, SubLinkType

from proxy.firewall.catalog_probe import is_server_value
from proxy.firewall.facts import DatabaseFacts
from proxy.firewall.inference import SensitiveReads
from proxy.firewall.statement import Finding, SubmittedSql, quote
from proxy.firewall.tree import (
    is_catalog_relation,
    is_null_constant,
    is_row_independent,
    references_outer_row,
    relation_name,
    relations_in,
    select_leaves,
    walk,
)
from proxy.policy.model import Role

RULE = "union-extraction"


def find_union_extraction(submitted: SubmittedSql, role: Role, facts: DatabaseFacts) -> Finding | None:
    cte_names: set[str] | None = None
    reads = (SensitiveReads(submitted, facts)
             if role.application and facts.knows_sensitive_columns else None)
    selects = [node for node in submitted.nodes_of(ast.SelectStmt) if isinstance(node, ast.SelectStmt)]
    # A UNION inside a UNION is judged with its parent's branches (once: chains are left-deep trees).
    inner_unions = {id(side) for node in selects if node.op == SetOperation.SETOP_UNION
                    for side in (node.larg, node.rarg) if side is not None}
    # A recursive CTE is a UNION of its constant start row and its step (`SELECT 1 UNION ALL ...`).
    inner_unions.update(id(common.ctequery) for node in submitted.nodes
                        if isinstance(node, ast.WithClause) and node.recursive
                        for common in node.ctes or () if isinstance(common, ast.CommonTableExpr))
    for node in selects:
        if reads is not None:
            finding = _select_list_subquery(node, reads)
            if finding is not None:
                return finding
        if node.op != SetOperation.SETOP_UNION or id(node) in inner_unions:
            continue
        if cte_names is None:
            cte_names = {str(item.ctename) for item in submitted.nodes
                         if isinstance(item, ast.CommonTableExpr)}
        leaves = select_leaves(node)
        finding = _union_finding(leaves, role, cte_names)
        if finding is None and reads is not None:
            finding = _branch_appends_sensitive_values(leaves, reads)
        if finding is not None:
            return finding
    return None


def _targets(select: ast.SelectStmt) -> list[ast.Node]:
    return [target.val for target in select.targetList or ()
            if isinstance(target, ast.ResTarget) and target.val is not None]


def _branch_appends_sensitive_values(leaves: list[ast.SelectStmt], reads: SensitiveReads) -> Finding | None:
    """A later UNION branch returns a confidential or restricted column in a position where the first
    branch does not (`SELECT full_name ... UNION ALL SELECT string_agg(ssn, ',') FROM people`)."""
    first = leaves[0]
    first_scope = reads.scope_of(first, None)
    expected = [set(reads.reads(value, first_scope)) for value in _targets(first)]
    for leaf in leaves[1:]:
        if leaf.valuesLists:
            continue
        scope = reads.scope_of(leaf, None)
        for position, value in enumerate(_targets(leaf)):
            extra = sorted(set(reads.reads(value, scope)) - (expected[position] if position < len(expected)
                                                            else set()))
            if extra:
                return Finding(
                    RULE,
                    f"the UNION branch `{quote(leaf)}` returns {extra[0]} (confidential or restricted in the "
                    "policy) where the first branch returns something else, the shape of UNION-based "
                    "extraction; return the same columns in every branch",
                )
    return None


def _select_list_subquery(select: ast.SelectStmt, reads: SensitiveReads) -> Finding | None:
    """An uncorrelated subquery in the select list that returns a confidential or restricted column of
    a table the query does not read: the same value appended to every row, a UNION without UNION."""
    if not select.targetList:
        return None
    outer = {relation_name(relation) for item in select.fromClause or () for relation in relations_in(item)}
    for value in _targets(select):
        for node in walk(value):
            if not (isinstance(node, ast.SubLink) and isinstance(node.subselect, ast.SelectStmt)
                    and node.subLinkType in (SubLinkType.EXPR_SUBLINK, SubLinkType.ARRAY_SUBLINK)):
                continue
            other = {relation_name(relation) for relation in relations_in(node.subselect)} - outer
            if not other or references_outer_row(node.subselect):
                continue
            column = reads.output_reads(node.subselect, reads.scope_of(node.subselect, None))
            if column is not None:
                return Finding(
                    RULE,
                    f"the select-list subquery `{quote(node)}` appends {column} (confidential or restricted "
                    f"in the policy) of {sorted(other)[0]}, which the query does not read, to every row: "
                    "UNION-based extraction without UNION; read the table in the query's FROM",
                )
    return None


def _union_finding(leaves: list[ast.SelectStmt], role: Role, cte_names: set[str]) -> Finding | None:
    reads_user_data = any(_user_relations(leaf, cte_names) for leaf in leaves)
    reads_a_relation = any(leaf.fromClause for leaf in leaves)
    if reads_a_relation:
        finding = _branch_appends_server_values(leaves)
        if finding is not None:
            return finding
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


def _branch_appends_server_values(leaves: list[ast.SelectStmt]) -> Finding | None:
    """A later branch returns a server value (`current_user`, `version()`, `inet_server_addr()`) where
    the first branch returns something else: `... UNION SELECT current_user, version(), 3`."""
    first = [_server_value_in(value) is not None for value in _targets(leaves[0])]
    for leaf in leaves[1:]:
        for position, value in enumerate(_targets(leaf)):
            found = _server_value_in(value)
            if found is not None and not (position < len(first) and first[position]):
                return Finding(
                    RULE,
                    f"the UNION branch `{quote(leaf)}` returns `{quote(found)}` (who or where the server "
                    "runs) where the first branch returns something else, the shape of UNION-based "
                    "server probing; read it in a statement of its own",
                )
    return None


def _server_value_in(value: ast.Node) -> ast.Node | None:
    return next((node for node in walk(value) if is_server_value(node)), None)


def _user_relations(leaf: ast.SelectStmt, cte_names: set[str]) -> list[ast.RangeVar]:
    """Relations that are neither catalogs nor the statement's own CTEs."""
    return [rel for rel in relations_in(leaf) if not is_catalog_relation(rel)
            and not (rel.schemaname is None and str(rel.relname) in cte_names)]
