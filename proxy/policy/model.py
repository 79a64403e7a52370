"""Policy format v1 as typed, immutable values (what the YAML means, after validation)."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Literal


class Sensitivity(IntEnum):
    """Ordered levels: a role that reveals a level sees columns of that level unmasked."""

    PUBLIC = 0
    INTERNAL = 1
    CONFIDENTIAL = 2
    RESTRICTED = 3


STATEMENT_CLASSES = frozenset(
    {"select", "insert", "update", "delete", "copy_out", "copy_in", "ddl", "procedural", "admin", "all"}
)


@dataclass(frozen=True, slots=True)
class Partial:
    keep_first: int = 0
    keep_last: int = 0
    mask_char: str = "*"


@dataclass(frozen=True, slots=True)
class Email:
    pass


@dataclass(frozen=True, slots=True)
class Hash:
    pass


@dataclass(frozen=True, slots=True)
class Generalize:
    """`unit` is 'year' or 'month' for dates/timestamps; `bucket` floors numbers to a multiple."""

    unit: Literal["year", "month"] | None = None
    bucket: float | None = None


@dataclass(frozen=True, slots=True)
class Redact:
    pass


@dataclass(frozen=True, slots=True)
class Constant:
    value: str | int | float | bool | None


Protection = Partial | Email | Hash | Generalize | Redact | Constant


@dataclass(frozen=True, slots=True)
class ColumnPolicy:
    sensitivity: Sensitivity = Sensitivity.INTERNAL
    protection: Protection | None = None  # None: redact when masked
    quasi_identifier: bool = False
    joinable: bool = True
    description: str = ""
    mode: str = "NULLABLE"
    originating_source: str = ""

    @property
    def effective_protection(self) -> Protection:
        return self.protection if self.protection is not None else Redact()


@dataclass(frozen=True, slots=True)
class Dataset:
    """A table, view or materialized view listed under `datasets:`, keyed by 'schema.name'."""

    name: str
    columns: dict[str, ColumnPolicy]
    description: str = ""
    version: str = ""
    registered_by: str = ""
    registered_at: str = ""
    originating_source: str = ""

    def column(self, name: str) -> ColumnPolicy:
        """Policy of a column; columns with no entry are `internal` with no protection."""
        return self.columns.get(name, ColumnPolicy())


@dataclass(frozen=True, slots=True)
class Role:
    name: str
    members: tuple[str, ...] = ()
    description: str = ""
    statements: frozenset[str] = frozenset({"select"})
    tables: tuple[str, ...] = ()
    reveal: frozenset[Sensitivity] = frozenset({Sensitivity.PUBLIC, Sensitivity.INTERNAL})
    max_quasi_identifiers: int | None = None
    row_filters: dict[str, str] = field(default_factory=dict)
    injection: Literal["enforce", "alert", "off"] = "enforce"
    fingerprints: Literal["off", "learn", "enforce"] = "off"
    # The role's SQL is built by application code (not typed by people): the firewall then also
    # applies the rules for shapes only injected SQL has (stacked statements, catalog probing, ...).
    application: bool = False
    # Exfiltration budgets (docs/dlp.md): rows one statement's result may hand the client, and rows
    # one login of this role may receive in any rolling hour; None: no limit.
    max_rows_per_statement: int | None = None
    max_rows_per_hour: int | None = None

    @property
    def has_row_budget(self) -> bool:
        return self.max_rows_per_statement is not None or self.max_rows_per_hour is not None

    def matches(self, login: str) -> bool:
        return any(fnmatch.fnmatchcase(login, pattern) for pattern in self.members)

    def may_run(self, statement_class: str) -> bool:
        return "all" in self.statements or statement_class in self.statements

    def may_touch(self, qualified_name: str) -> bool:
        return any(fnmatch.fnmatchcase(qualified_name, pattern) for pattern in self.tables)

    def sees_unmasked(self, column: ColumnPolicy) -> bool:
        return column.sensitivity in self.reveal


@dataclass(frozen=True, slots=True)
class Elevation:
    """Which users may assume `role`, for how long at most, and whether an approver is required."""

    role: str
    users: tuple[str, ...]
    max_duration_seconds: int
    approver_required: bool = True
    approvers: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Honeytoken:
    """A planted row no legitimate query reads: `value` in `table`.`column` (docs/dlp.md)."""

    name: str
    table: str  # schema.name
    column: str
    value: str
    action: Literal["alert", "terminate"] = "alert"


@dataclass(frozen=True, slots=True)
class Settings:
    default_role: str = "deny"
    hash_key_env: str = "PGVEIL_HASH_KEY"
    # how long a login that read a `terminate` honeytoken is refused new connections
    honeytoken_lockout_seconds: int = 3600


@dataclass(frozen=True, slots=True)
class Policy:
    """A loaded, validated policy. `version` is a content hash: it changes iff the policy does."""

    version: str
    settings: Settings
    roles: dict[str, Role]
    datasets: dict[str, Dataset]
    elevations: tuple[Elevation, ...] = ()
    source: str = ""  # file it was loaded from
    honeytokens: tuple[Honeytoken, ...] = ()

    def role_for_user(self, login: str) -> Role | None:
        """First role (in file order) whose members match the login, else the default role."""
        for role in self.roles.values():
            if role.matches(login):
                return role
        if self.settings.default_role != "deny":
            return self.roles.get(self.settings.default_role)
        return None

    def has_masked_columns(self, role: Role) -> bool:
        """True when some column is hidden from this role (fail-closed rules apply). Unlisted
        columns are `internal`, so a role that does not reveal `internal` has masked data everywhere."""
        if not role.sees_unmasked(ColumnPolicy()):
            return True
        return any(
            not role.sees_unmasked(column)
            for dataset in self.datasets.values()
            for column in dataset.columns.values()
        )
