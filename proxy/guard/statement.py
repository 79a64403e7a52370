"""What every guard pass sees: one statement as parsed and resolved, and the context it runs in."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from pglast import ast

from proxy.catalog import CatalogSnapshot, Relation
from proxy.guard.verdict import Refuse
from proxy.policy.model import Policy, Role


@dataclass(slots=True)
class RelationRef:
    """One RangeVar of the statement and what the guard resolved it to.

    `position` says where it stands: `from` (a FROM/JOIN/USING item, replaceable by a derived
    table), `target` (INSERT/UPDATE/DELETE/MERGE target), `copy` (COPY's table) or `other`
    (DDL objects, LOCK, VACUUM, ...). `qualified` is `schema.name` as resolved through the catalog
    and search_path, or None for a CTE reference (`cte` True) or an unknown relation.
    """

    node: ast.RangeVar
    position: str
    parts: tuple[str, ...]
    qualified: str | None = None
    cte: bool = False
    relation: Relation | None = None

    @property
    def alias(self) -> str | None:
        alias = self.node.alias
        return alias.aliasname if alias is not None else None


@dataclass(slots=True)
class FunctionRef:
    """One function call (FuncCall or RangeFunction item): name parts lower-cased as PostgreSQL folds them."""

    parts: tuple[str, ...]
    node: ast.Node

    @property
    def name(self) -> str:
        return self.parts[-1]

    @property
    def schema(self) -> str | None:
        return self.parts[-2] if len(self.parts) > 1 else None


@dataclass(slots=True)
class GuardStatement:
    """One statement of a Query/Parse message on its way through the guard passes.

    `sql` is the whole message text; this statement is `sql[start:end]` and `node` is pglast's
    parse of it (the RawStmt's `stmt`). Rules that look at the *values* of literals (settings,
    SQL text passed to functions, tautologies, ...) must call `mark_literal_dependent()` so the
    verdict cache keys the verdict on the exact text instead of the statement's shape.
    """

    sql: str
    start: int
    end: int
    node: ast.Node
    statement_class: str = "unknown"
    fingerprint: str = ""
    relations: list[RelationRef] = field(default_factory=list)
    functions: list[FunctionRef] = field(default_factory=list)
    column_refs: list[ast.ColumnRef] = field(default_factory=list)
    cte_names: frozenset[str] = frozenset()
    modifications: list[ast.Node] = field(default_factory=list)  # INSERT/UPDATE/DELETE/MERGE nested inside
    schemas_named: set[str] = field(default_factory=set)  # schema parts of type and operator names
    type_names: list[tuple[str, ...]] = field(default_factory=list)  # every TypeName (casts, ...)
    operator_names: list[tuple[str, ...]] = field(default_factory=list)  # every A_Expr operator
    field_selections: list[str] = field(default_factory=list)  # `(x).f`: f may be the call f(x)
    columns_read: tuple[str, ...] = ()  # schema.table.column referenced (filled by the mask pass)
    literal_dependent: bool = False
    reads_definitions: bool = False  # set by the rules: see StatementInfo.reads_definitions
    findings: list[str] = field(default_factory=list)  # firewall rules that matched (`alert`: not refused)

    @property
    def text(self) -> str:
        return self.sql[self.start : self.end]

    @property
    def node_type(self) -> str:
        return type(self.node).__name__

    def mark_literal_dependent(self) -> None:
        self.literal_dependent = True


@dataclass(frozen=True, slots=True)
class GuardContext:
    """Everything a verdict depends on besides the SQL text (all of it goes into the cache key)."""

    policy: Policy
    role: Role
    catalog: CatalogSnapshot
    user: str
    search_path: tuple[str, ...]
    settings: Mapping[str, str] = field(default_factory=dict)

    @property
    def masked(self) -> bool:
        """The role has data it may not see raw: fail-closed rules apply to it."""
        return role_is_masked(self.policy, self.role)


def role_is_masked(policy: Policy, role: Role) -> bool:
    from proxy.policy.model import Sensitivity

    return (
        Sensitivity.INTERNAL not in role.reveal
        or bool(role.row_filters)
        or policy.has_masked_columns(role)
    )


Rule = Callable[[GuardStatement, GuardContext], Refuse | None]
"""A check over one analysed statement: a Refuse stops it, None lets it go on."""
