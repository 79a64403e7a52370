"""Checks a loaded policy against the live upstream schema: names, types, row filters, coverage."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Literal

from proxy.catalog import CatalogError, CatalogSnapshot, Relation, effective_dataset
from proxy.policy.model import Policy
from proxy.policy.protections import ProtectionError, mask_expression

# Parts of column names that usually mean personal or secret data. Short ones must be a whole
# `_`-separated word (so `dob` does not match `adobe`); long ones may appear anywhere in the name.
_SENSITIVE_WORDS = frozenset({
    "ssn", "sin", "dob", "pan", "cvv", "cvc", "pin", "pwd", "iban", "bic", "tin", "ip", "zip",
    "nin", "nhs", "vat", "mrn", "otp", "lat", "lon", "lng", "gps",
})
_SENSITIVE_PARTS = (
    "email", "e_mail", "mail", "phone", "mobile", "password", "passwd", "passphrase", "token",
    "secret", "api_key", "apikey", "private_key", "credential", "iban", "card", "credit",
    "birth", "address", "street", "postcode", "postal", "salary", "income", "wage", "passport",
    "license", "licence", "national_id", "social_security", "tax_id", "taxid", "bank",
    "account_number",
    "routing", "swift", "latitude", "longitude", "geo", "location", "ethnic", "religion",
    "diagnosis", "medical", "health", "gender", "sexual", "biometric", "fingerprint", "face",
    "signature", "full_name", "first_name", "last_name", "surname", "maiden",
)
_WORD_SPLIT = re.compile(r"[^a-z0-9]+")
_CHECKED_KINDS = frozenset({"table", "partitioned", "view", "matview", "foreign"})


@dataclass(frozen=True, slots=True)
class Finding:
    """One problem of a policy against the live schema; errors make the policy invalid."""

    path: str
    message: str
    severity: Literal["error", "warning"] = "error"


def looks_sensitive(column_name: str) -> bool:
    name = column_name.lower()
    words = set(_WORD_SPLIT.split(name))
    return bool(words & _SENSITIVE_WORDS) or any(part in name for part in _SENSITIVE_PARTS)


def lint_policy(policy: Policy) -> list[Finding]:
    """Warnings about a valid policy that does not do what it seems to: entries that never apply."""
    findings: list[Finding] = []
    claimed: dict[str, str] = {}
    for role in policy.roles.values():
        for index, pattern in enumerate(role.members):
            if pattern in claimed:
                findings.append(Finding(
                    f"roles.{role.name}.members[{index}]",
                    f"'{pattern}' is already a member pattern of role {claimed[pattern]}, which comes first: "
                    "this entry never applies (a login gets the first role that matches)",
                    "warning"))
            else:
                claimed[pattern] = role.name
        for table in role.row_filters:
            if not role.may_touch(table):
                findings.append(Finding(
                    f"roles.{role.name}.row_filters.{table}",
                    f"role {role.name} may not read {table} (not in its tables:), "
                    "so the filter never applies",
                    "warning"))
    if policy.roles:
        for name, dataset in policy.datasets.items():
            for column_name, column in dataset.columns.items():
                if column.protection is not None and all(
                        role.sees_unmasked(column) for role in policy.roles.values()):
                    findings.append(Finding(
                        f"datasets.{name}.columns.{column_name}.protection",
                        f"never applies: every role reveals sensitivity '{column.sensitivity.name.lower()}' "
                        "(raise the column's sensitivity, or remove the level from some role's reveal:)",
                        "warning"))
    return findings


def check_policy_against_catalog(policy: Policy, catalog: CatalogSnapshot) -> list[Finding]:
    """Every dataset and column exists and each protection fits its column's type; plus warnings:
    table patterns that match nothing, unlisted views over protected data, and columns whose
    names look sensitive but have no policy entry."""
    findings: list[Finding] = []
    findings.extend(_dataset_findings(policy, catalog))
    findings.extend(_role_findings(policy, catalog))
    findings.extend(_view_findings(policy, catalog))
    findings.extend(_coverage_findings(policy, catalog))
    findings.extend(_honeytoken_findings(policy, catalog))
    return findings


def _honeytoken_findings(policy: Policy, catalog: CatalogSnapshot) -> list[Finding]:
    """Each honeytoken's table and column exist (the unmasked-for-every-role check is only as good
    as the names it checks)."""
    findings: list[Finding] = []
    for index, token in enumerate(policy.honeytokens):
        relation = catalog.relations.get(token.table)
        if relation is None:
            findings.append(Finding(f"honeytokens[{index}].table",
                                    f"no table or view {token.table} in the upstream database "
                                    f"'{catalog.database}' (plant it there, or fix the name)"))
        elif relation.column(token.column) is None:
            known = ", ".join(column.name for column in relation.columns) or "none"
            findings.append(Finding(f"honeytokens[{index}].column",
                                    f"no column '{token.column}' in {token.table} (its columns: {known})"))
    return findings


def _dataset_findings(policy: Policy, catalog: CatalogSnapshot) -> list[Finding]:
    findings: list[Finding] = []
    for name, dataset in policy.datasets.items():
        path = f"datasets.{name}"
        relation = catalog.relations.get(name)
        if relation is None:
            findings.append(Finding(path, f"no table or view {name} in the upstream database "
                                          f"'{catalog.database}' (create it, or fix the name)"))
            continue
        if relation.kind == "sequence":
            findings.append(Finding(path, f"{name} is a sequence, not a table or view (remove the entry)"))
            continue
        for column_name, column_policy in dataset.columns.items():
            column_path = f"{path}.columns.{column_name}"
            column = relation.column(column_name)
            if column is None:
                known = ", ".join(column.name for column in relation.columns) or "none"
                findings.append(Finding(column_path, f"no column '{column_name}' in {name} "
                                                     f"(its columns: {known})"))
                continue
            try:
                mask_expression(f'"{column.name}"', column.mask_type_sql, column_policy.effective_protection)
            except ProtectionError as exc:
                findings.append(Finding(f"{column_path}.protection",
                                        f"does not fit type {column.mask_type_sql}: {exc}"))
    return findings


def _role_findings(policy: Policy, catalog: CatalogSnapshot) -> list[Finding]:
    findings: list[Finding] = []
    user_names = [relation.qualified_name for relation in catalog.user_relations()]
    for role in policy.roles.values():
        for index, pattern in enumerate(role.tables):
            if not any(fnmatch.fnmatchcase(name, pattern) for name in user_names):
                findings.append(Finding(f"roles.{role.name}.tables[{index}]",
                                        f"'{pattern}' matches no table or view in the upstream", "warning"))
        for table in role.row_filters:
            if table not in catalog.relations:
                findings.append(Finding(f"roles.{role.name}.row_filters.{table}",
                                        f"no table {table} in the upstream (fix the name)"))
    return findings


def _view_findings(policy: Policy, catalog: CatalogSnapshot) -> list[Finding]:
    findings: list[Finding] = []
    for relation in catalog.user_relations():
        if relation.kind not in ("view", "matview") or relation.qualified_name in policy.datasets:
            continue
        protected = sorted(name for name in catalog.base_relations(relation) if _has_protected_columns(
            policy, catalog.relations.get(name)))
        if protected:
            findings.append(Finding(
                f"datasets.{relation.qualified_name}",
                f"{relation.kind} {relation.qualified_name} reads protected {', '.join(protected)} but is "
                "not listed: roles with masked data are refused it (list it under datasets:)",
                "warning",
            ))
    return findings


def _has_protected_columns(policy: Policy, relation: Relation | None) -> bool:
    """Some role of the policy sees some column of this relation masked."""
    if relation is None:
        return False
    dataset = effective_dataset(policy, relation)
    return dataset is not None and any(
        not role.sees_unmasked(column)
        for column in dataset.columns.values() for role in policy.roles.values()
    )


def _coverage_findings(policy: Policy, catalog: CatalogSnapshot) -> list[Finding]:
    findings: list[Finding] = []
    for relation in catalog.user_relations():
        if relation.kind not in _CHECKED_KINDS or _is_partition(relation, catalog):
            continue
        dataset = effective_dataset(policy, relation)
        listed = dataset.columns if dataset is not None else {}
        unlisted = [column.name for column in relation.columns
                    if column.name not in listed and looks_sensitive(column.name)]
        if unlisted:
            findings.append(Finding(
                f"datasets.{relation.qualified_name}",
                (f"columns {', '.join(unlisted)} of {relation.qualified_name} look sensitive but have"
                 if len(unlisted) > 1 else
                 f"column {unlisted[0]} of {relation.qualified_name} looks sensitive but has")
                + " no policy entry (list it under datasets: with a sensitivity and protection)",
                "warning",
            ))
    return findings


def _is_partition(relation: Relation, catalog: CatalogSnapshot) -> bool:
    """Partitions share their parent's columns: warn once, on the partitioned table."""
    return any(parent.kind == "partitioned" for parent in catalog.ancestors(relation))


async def check_row_filters(dsn: str, policy: Policy, catalog: CatalogSnapshot) -> list[Finding]:
    """Plan (never run) each row filter over its table, so misspelt columns and type errors show."""
    import asyncpg

    findings: list[Finding] = []
    try:
        connection = await asyncpg.connect(dsn)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise CatalogError(f"cannot connect to the upstream to check row filters: {exc}") from exc
    try:
        for role in policy.roles.values():
            for table, expression in role.row_filters.items():
                relation = catalog.relations.get(table)
                if relation is None:
                    continue
                target = f'"{relation.schema.replace(chr(34), chr(34) * 2)}".' \
                         f'"{relation.name.replace(chr(34), chr(34) * 2)}"'
                try:
                    async with connection.transaction(readonly=True):
                        await connection.execute(
                            f"EXPLAIN (COSTS OFF) SELECT 1 FROM {target} WHERE ({expression})")
                except asyncpg.PostgresError as exc:
                    findings.append(Finding(f"roles.{role.name}.row_filters.{table}",
                                            f"the row filter does not work on {table}: {exc}"))
    finally:
        await connection.close()
    return findings
