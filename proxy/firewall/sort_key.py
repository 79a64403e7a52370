"""Rule `sort-key-probe`: a sort key or row count that a value, the same for every row, decides.

Injected into `ORDER BY <input>` or `LIMIT/OFFSET <input>`, a probe cannot add a condition; it shows
its answer through the order or the number of rows (or an error, or the time taken):
`ORDER BY (SELECT 1 FROM pg_sleep(5))`, `ORDER BY id, (SELECT usename FROM pg_user LIMIT 1)`,
`ORDER BY CASE WHEN starts_with((SELECT usename FROM pg_user LIMIT 1), 'p') THEN id ELSE name END`,
`LIMIT CASE WHEN EXISTS (SELECT 1 FROM pg_user WHERE usename LIKE 'p%') THEN 1 ELSE 0 END`.
Caught (every role): a statement sort key that is the same for every row and is computed by a
subquery; a CASE in a sort key, LIMIT or OFFSET whose condition is the same for every row and is
computed (a subquery or a function call, without parameters).
Let through: sort keys of columns and expressions of them (`ORDER BY lower(name)`, `ORDER BY
owner = current_user DESC`), `ORDER BY random()`, positions (`ORDER BY 2`), correlated subqueries
(`ORDER BY (SELECT count(*) FROM lines l WHERE l.order_id = o.id)`, and unqualified
`ORDER BY (SELECT name FROM categories WHERE id = category_id)` when the catalog says
`categories` has no `category_id`), CASE on a parameter (`ORDER BY
CASE WHEN $1 = 'name' THEN name END`), row counts from subqueries (`LIMIT (SELECT count(*) / 10
FROM t)`), window and aggregate ORDER BY (`row_number() OVER (ORDER BY (SELECT NULL))`).
"""

from __future__ import annotations

from pglast import ast

from proxy.firewall.facts import DatabaseFacts
from proxy.firewall.positions import row_count_and_sort_positions
from proxy.firewall.statement import Finding, SubmittedSql, quote
from proxy.firewall.tree import is_row_independent, walk
from proxy.policy.model import Role

RULE = "sort-key-probe"
_COMPUTED = (ast.SubLink, ast.FuncCall, ast.SQLValueFunction)


def find_sort_key_probe(submitted: SubmittedSql, role: Role, facts: DatabaseFacts) -> Finding | None:
    for position in row_count_and_sort_positions(submitted):
        key = position.root
        if isinstance(key, ast.ColumnRef | ast.A_Const | ast.ParamRef):
            continue  # the common case: `ORDER BY name`, `ORDER BY 2`, `LIMIT 20`
        inner = list(walk(key))
        if not any(isinstance(node, ast.SubLink | ast.CaseExpr) for node in inner):
            continue  # the common case: columns and expressions of them
        if (position.place == "sort key" and any(isinstance(node, ast.SubLink) for node in inner)
                and is_row_independent(key) and not _reads_outer_columns(inner, facts)):
            return Finding(RULE, f"the sort key `{quote(key)}` is the same for every row, so it orders "
                                 "nothing: the shape of a probe injected into ORDER BY; sort by columns")
        for node in inner:
            if not isinstance(node, ast.CaseExpr):
                continue
            for test in case_conditions(node):
                if is_fixed_and_computed(test, facts):
                    return Finding(RULE, f"the {position.place} `{quote(key)}` is chosen by `{quote(test)}`, "
                                         "which is the same for every row: the shape of a boolean probe "
                                         "injected into ORDER BY, LIMIT or OFFSET; choose with a parameter")
    return None


def _reads_outer_columns(nodes: list[ast.Node], facts: DatabaseFacts) -> bool:
    """Does a subquery read the outer row through an unqualified name its own tables do not have
    (`ORDER BY (SELECT name FROM categories WHERE id = category_id)`)? Known from the catalog only."""
    own: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.RangeVar):
            relation = facts.relation(node)
            if relation is None:
                return False  # a CTE, a catalog pgveil does not load, or no catalog: unknown
            own.update(column.name for column in relation.columns)
    names = [fields[0] for node in nodes if isinstance(node, ast.ColumnRef)
             and len(fields := tuple(node.fields or ())) == 1]
    return any(isinstance(name, ast.String) and str(name.sval) not in own for name in names)


def case_conditions(case: ast.CaseExpr) -> list[ast.Node]:
    if case.arg is not None:
        return [case.arg]  # `CASE (SELECT ...) WHEN 'p' THEN ...`: the tested value decides
    return [when.expr for when in case.args or () if isinstance(when, ast.CaseWhen) and when.expr is not None]


def is_fixed_and_computed(test: ast.Node, facts: DatabaseFacts) -> bool:
    """The same for every row (no column, parameter or aggregate) and computed by a subquery or call."""
    if not is_row_independent(test):
        return False  # the common case, found at the first column
    nodes = list(walk(test))
    return any(isinstance(node, _COMPUTED) for node in nodes) and not _reads_outer_columns(nodes, facts)
