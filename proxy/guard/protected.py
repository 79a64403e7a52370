"""What a role may not see of one relation: its masked columns and its row filter (policy x catalog)."""

from __future__ import annotations

from dataclasses import dataclass

from proxy.catalog import PGVEIL_SCHEMA, SYSTEM_SCHEMAS, CatalogSnapshot, Relation, effective_dataset
from proxy.policy.model import ColumnPolicy, Policy, Protection, Redact, Role


@dataclass(frozen=True, slots=True)
class RelationMasks:
    """How one relation must be presented to one role: masks per column and an optional row filter."""

    masks: dict[str, Protection]  # column name -> protection, only for columns the role may not see
    row_filter: str | None
    child_row_filter: bool = False  # an inheritance child or partition has a row filter of its own

    @property
    def protected(self) -> bool:
        return bool(self.masks) or self.row_filter is not None or self.child_row_filter


UNPROTECTED = RelationMasks({}, None)


def relation_masks(policy: Policy, role: Role, relation: Relation) -> RelationMasks:
    """Masks and row filter of `relation` for `role`. System catalogs are never masked (their
    value-exposing parts are refused by rule); partitions and children inherit from their parent."""
    if relation.schema in SYSTEM_SCHEMAS or relation.schema == PGVEIL_SCHEMA:
        return UNPROTECTED
    dataset = effective_dataset(policy, relation)
    masks: dict[str, Protection] = {}
    for column in relation.columns:
        column_policy = dataset.column(column.name) if dataset is not None else ColumnPolicy()
        if not role.sees_unmasked(column_policy):
            masks[column.name] = column_policy.effective_protection
    return RelationMasks(masks, _row_filter(role, relation))


def _row_filter(role: Role, relation: Relation) -> str | None:
    qualified = f"{relation.schema}.{relation.name}"
    if qualified in role.row_filters:
        return role.row_filters[qualified]
    for ancestor in relation.parents:
        if ancestor in role.row_filters:
            return role.row_filters[ancestor]
    return None


def scanned_masks(policy: Policy, role: Role, relation: Relation, catalog: CatalogSnapshot,
                  inherit: bool) -> RelationMasks:
    """Masks for a scan of `relation` that also returns its children's rows (no ONLY): each column
    as strictly as the parent or any descendant masks it (two different protections: redact)."""
    own = relation_masks(policy, role, relation)
    if not inherit:
        return own
    qualified = f"{relation.schema}.{relation.name}"
    masks = dict(own.masks)
    child_row_filter = False
    for candidate in catalog.relations.values():
        if qualified not in candidate.parents:
            continue
        child = relation_masks(policy, role, candidate)
        child_row_filter = child_row_filter or child.row_filter not in (None, own.row_filter)
        for name, protection in child.masks.items():
            if relation.column(name) is None:
                continue
            if name not in masks:
                masks[name] = protection
            elif masks[name] != protection:
                masks[name] = Redact()
    return RelationMasks(masks, own.row_filter, child_row_filter)
