"""What the injection rules know of the database a statement runs against: relations by name,
which of their columns the policy calls confidential or restricted, and which are NOT NULL."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from pglast import ast

from proxy.catalog import CatalogSnapshot, Relation, effective_dataset, effective_search_path
from proxy.policy.model import Policy, Sensitivity

# Does a policy (by identity; the entry keeps it alive) mark any column confidential or restricted?
_POLICIES_WITH_SENSITIVE_COLUMNS: dict[int, tuple[Policy, bool]] = {}


@dataclass(frozen=True)
class DatabaseFacts:
    """Catalog and policy as the firewall reads them; `DatabaseFacts()` knows nothing (no catalog)."""

    policy: Policy | None = None
    catalog: CatalogSnapshot | None = None
    search_path: tuple[str, ...] = ()
    user: str | None = None
    _sensitive: dict[str, frozenset[str]] = field(default_factory=dict, repr=False, compare=False)

    @property
    def knows_sensitive_columns(self) -> bool:
        if self.policy is None or self.catalog is None:
            return False
        entry = _POLICIES_WITH_SENSITIVE_COLUMNS.get(id(self.policy))
        if entry is None or entry[0] is not self.policy:
            known = any(column.sensitivity >= Sensitivity.CONFIDENTIAL
                        for dataset in self.policy.datasets.values() for column in dataset.columns.values())
            if len(_POLICIES_WITH_SENSITIVE_COLUMNS) > 64:
                _POLICIES_WITH_SENSITIVE_COLUMNS.clear()
            entry = _POLICIES_WITH_SENSITIVE_COLUMNS[id(self.policy)] = (self.policy, known)
        return entry[1]

    def relation(self, node: ast.RangeVar) -> Relation | None:
        if self.catalog is None:
            return None
        parts = tuple(str(part) for part in (node.catalogname, node.schemaname, node.relname) if part)
        return self.catalog.resolve(parts, self.search_path, self.user)

    def sensitive_columns(self, relation: Relation) -> frozenset[str]:
        """Columns of sensitivity confidential or restricted; a view without its own policy entry
        counts the sensitive column names of every relation it reads (a view renames nothing here)."""
        known = self._sensitive.get(relation.qualified_name)
        if known is not None:
            return known
        names = self._own_sensitive_columns(relation)
        if not names and relation.depends_on and self.catalog is not None:
            column_names = {column.name for column in relation.columns}
            read = (self.catalog.relations.get(name) for name in self.catalog.base_relations(relation))
            names = frozenset(name for base in read if base is not None
                              for name in self._own_sensitive_columns(base) if name in column_names)
        self._sensitive[relation.qualified_name] = names
        return names

    def _own_sensitive_columns(self, relation: Relation) -> frozenset[str]:
        dataset = effective_dataset(self.policy, relation) if self.policy is not None else None
        if dataset is None:
            return frozenset()
        return frozenset(name for name, column in dataset.columns.items()
                         if column.sensitivity >= Sensitivity.CONFIDENTIAL)

    def function_reads_sensitive(self, call: ast.FuncCall) -> str | None:
        """The sensitive table a user function reads (its body, transitively), if it reads one; a
        SQL or PL/pgSQL body pgveil cannot read (dynamic SQL) counts as reading anything."""
        if self.catalog is None or not call.funcname:
            return None
        parts = [str(part.sval) for part in call.funcname if isinstance(part, ast.String)]
        schemas = parts[-2:-1] or effective_search_path(self.search_path, self.user)
        for schema in schemas:
            function = self.catalog.functions.get(f"{schema}.{parts[-1]}")
            if function is None:
                continue
            if function.opaque_body and function.language in ("sql", "plpgsql"):
                return f"whatever {function.qualified_name}() reads"
            for name in function.reads:
                relation = self.catalog.relations.get(name)
                if relation is not None and self.sensitive_columns(relation):
                    return f"{relation.qualified_name} (through {function.qualified_name}())"
            return None
        return None

    def sensitive_names(self, relations: Iterable[ast.RangeVar]) -> tuple[frozenset[str], frozenset[str]]:
        """(sensitive column names, names of row sources that have one) over the given FROM items."""
        columns: set[str] = set()
        sources: set[str] = set()
        for node in relations:
            relation = self.relation(node)
            if relation is None:
                continue
            names = self.sensitive_columns(relation)
            if names:
                columns |= names
                sources.add(str(node.relname).lower())
                if node.alias is not None and node.alias.aliasname:
                    sources.add(str(node.alias.aliasname).lower())
        return frozenset(columns), frozenset(sources)
