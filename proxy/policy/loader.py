"""Reads a policy YAML file, validates every key of format v1 and builds the typed Policy model."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any, Literal, NoReturn, TypeVar, cast

import yaml

from proxy.policy.model import (
    STATEMENT_CLASSES,
    ColumnPolicy,
    Constant,
    Dataset,
    Elevation,
    Email,
    Generalize,
    Hash,
    Honeytoken,
    Partial,
    Policy,
    Protection,
    Redact,
    Role,
    Sensitivity,
    Settings,
)

SENSITIVITY_NAMES = {level.name.lower(): level for level in Sensitivity}
INJECTION_MODES = ("enforce", "alert", "off")
FINGERPRINT_MODES = ("off", "learn", "enforce")
COLUMN_MODES = ("NULLABLE", "REQUIRED", "REPEATED")
MIN_HASH_KEY_BYTES = 16

_TOP_KEYS = ("version", "settings", "roles", "datasets", "elevations", "honeytokens")
_SETTINGS_KEYS = ("default_role", "hash_key_env", "honeytoken_lockout")
_ROLE_KEYS = (
    "members", "description", "statements", "tables", "reveal", "max_quasi_identifiers",
    "row_filters", "injection", "fingerprints", "application", "max_rows_per_statement",
    "max_rows_per_hour",
)
_HONEYTOKEN_KEYS = ("name", "table", "column", "value", "value_env", "action")
HONEYTOKEN_ACTIONS = ("alert", "terminate")
MIN_HONEYTOKEN_CHARS = 8
_DATASET_KEYS = (
    "description", "version", "registered_by", "registered_at", "originating_source", "columns",
)
_COLUMN_KEYS = (
    "sensitivity", "protection", "quasi_identifier", "joinable", "description", "mode",
    "originating_source",
)
_ELEVATION_KEYS = ("role", "users", "max_duration", "approver_required", "approvers")
_PARTIAL_KEYS = ("keep_first", "keep_last", "mask_char")
_PROTECTION_NAMES = ("partial", "email", "hash", "generalize", "redact", "constant")

T = TypeVar("T")
_ONE_LINE = {ord("\n"): "\\n", ord("\r"): "\\r"}  # every problem stays one line, whatever the names

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DURATION = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")
_ROW_FILTER_FORBIDDEN_NODES = {
    "SubLink": "a subquery",
    "ParamRef": "a parameter placeholder ($n)",
}


class PolicyError(ValueError):
    """A policy that cannot be loaded; `errors` holds one `FILE: PATH: what (what to do)` line each."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = [line.translate(_ONE_LINE) for line in errors]
        first = self.errors[0] if self.errors else "invalid policy"
        more = len(self.errors) - 1
        super().__init__(first if more == 0 else f"{first} (and {more} more problem{'s' * (more > 1)})")


class _PolicyYamlLoader(yaml.SafeLoader):
    """YAML 1.2-ish reading: only true/false are booleans (so `fingerprints: off` stays a word),
    dates stay strings, and a key given twice is an error instead of silently winning."""

    duplicate_keys: list[str]

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str | int | float | bool):
                continue
            if key in seen:
                self.duplicate_keys.append(
                    f"line {key_node.start_mark.line + 1}: key '{key}' is given twice "
                    "(remove one: a repeated key would silently replace the first)"
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_PolicyYamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers
            if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:timestamp")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_PolicyYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def load_policy(path: str | Path, *, require_hash_key: bool = True) -> Policy:
    """Read and validate a policy file; raise PolicyError listing every problem found.

    `require_hash_key=False` is for tools that never mask (catalog export): a policy using `hash`
    then loads even when its secret is not set."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError([f"{source}: cannot read the policy file: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError:
        raise PolicyError([f"{source}: the policy file is not UTF-8 text (save it as UTF-8)"]) from None
    return parse_policy(text, source, require_hash_key=require_hash_key)


def parse_policy(text: str, source: str = "<string>", *, require_hash_key: bool = True) -> Policy:
    """Validate policy YAML text; `source` names it in error messages."""
    loader = _PolicyYamlLoader(text)
    loader.duplicate_keys = []
    try:
        document = loader.get_single_data()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "document"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise PolicyError([f"{source}: {where}: not valid YAML: {problem} (fix the syntax)"]) from None
    finally:
        loader.dispose()
    if loader.duplicate_keys:
        raise PolicyError([f"{source}: {problem}" for problem in loader.duplicate_keys])
    return _PolicyBuilder(source, require_hash_key).build(document)


def hash_key(policy: Policy) -> bytes:
    """The secret for `hash` protections, read from the environment variable the policy names.

    Raises PolicyError when it is missing or shorter than 16 bytes. The key itself never appears
    in the policy object or in any message."""
    problem = _hash_key_problem(policy.settings.hash_key_env)
    if problem:
        raise PolicyError([f"{policy.source or '<policy>'}: settings.hash_key_env: {problem}"])
    return os.environ[policy.settings.hash_key_env].encode("utf-8")


def missing_secret(policy: Policy) -> str:
    """What is wrong with the secret a policy's `hash` protections need ("" when nothing is):
    a deployment problem, which `serve` refuses and `check` reports as a warning."""
    return _hash_key_problem(policy.settings.hash_key_env) if policy_uses_hash(policy) else ""


def policy_uses_hash(policy: Policy) -> bool:
    return any(isinstance(column.protection, Hash)
               for dataset in policy.datasets.values() for column in dataset.columns.values())


def qualify_relation_name(name: str) -> str:
    """`users` -> `public.users`; `schema.name` stays."""
    return name if "." in name else f"public.{name}"


def _hash_key_problem(env_name: str) -> str:
    value = os.environ.get(env_name)
    if value is None or value == "":
        return (f"environment variable {env_name} is not set, and a column uses protection 'hash' "
                f"(set {env_name} to a secret of at least {MIN_HASH_KEY_BYTES} bytes)")
    if len(value.encode("utf-8")) < MIN_HASH_KEY_BYTES:
        return (f"the secret in environment variable {env_name} is shorter than "
                f"{MIN_HASH_KEY_BYTES} bytes (use a longer random secret)")
    return ""


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _type_name(value: object) -> str:
    if value is None:
        return "nothing (null)"
    return {dict: "a mapping", list: "a list", str: "text", bool: "true/false",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def _valid_row_filter(expression: str) -> str:
    """'' when `expression` is one SQL boolean expression fit for `WHERE`, else what is wrong."""
    from pglast import parser

    try:
        tokens = parser.scan(expression)
    except parser.ParseError as exc:
        return f"not valid SQL: {exc}"
    for token in tokens:
        if token.name == "ASCII_59":
            return "contains ';' (write one boolean expression, not statements)"
        if token.name in ("SQL_COMMENT", "C_COMMENT"):
            return "contains a comment (remove it: the filter is embedded into other SQL)"
    try:
        tree = json.loads(parser.parse_sql_json(f"SELECT 1 WHERE {expression}"))
    except parser.ParseError as exc:
        return f"not a valid SQL boolean expression: {exc}"
    statements = tree.get("stmts", [])
    if len(statements) != 1:
        return "must be exactly one SQL boolean expression"
    select = statements[0].get("stmt", {}).get("SelectStmt")
    if select is None or set(select) - {"targetList", "whereClause", "limitOption", "op"} \
            or select.get("op") != "SETOP_NONE" or "whereClause" not in select:
        return "must be one boolean expression over the table's columns (no clauses after it)"
    found = _forbidden_nodes(select["whereClause"])
    if found:
        return f"contains {found} (row filters must be plain expressions over the table's columns)"
    return ""


def _forbidden_nodes(node: object) -> str:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in _ROW_FILTER_FORBIDDEN_NODES:
                return _ROW_FILTER_FORBIDDEN_NODES[key]
            found = _forbidden_nodes(value)
            if found:
                return found
    elif isinstance(node, list):
        for item in node:
            found = _forbidden_nodes(item)
            if found:
                return found
    return ""


class _Invalid(Exception):
    """Raised inside the builder to abandon one value after its error was recorded."""


class _PolicyBuilder:
    """Walks the YAML document, records every problem with its path, and builds the model."""

    def __init__(self, source: str, require_hash_key: bool) -> None:
        self.source = source
        self.require_hash_key = require_hash_key
        self.errors: list[str] = []

    def fail(self, path: str, message: str) -> NoReturn:
        self.error(path, message)
        raise _Invalid

    def error(self, path: str, message: str) -> None:
        self.errors.append(f"{self.source}: {path or 'document'}: {message}")

    # --- typed accessors -------------------------------------------------------------------

    def mapping(self, value: object, path: str, keys: tuple[str, ...]) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(path, f"expected a mapping, got {_type_name(value)}")
        for key in value:
            if key not in keys:
                self.error(_join(path, str(key)),
                           f"unknown key '{key}' (expected one of {', '.join(keys)})")
        return cast(dict[str, Any], value)

    def named_mapping(self, value: object, path: str) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(path, f"expected a mapping, got {_type_name(value)}")
        for key in value:
            if not isinstance(key, str) or not key:
                self.fail(_join(path, str(key)), "names must be non-empty text (quote the name)")
        return cast(dict[str, Any], value)

    def text(self, value: object, path: str, default: str = "") -> str:
        if value is None:
            return default
        if not isinstance(value, str):
            self.fail(path, f"expected text, got {_type_name(value)} (quote it)")
        return value

    def flag(self, value: object, path: str, default: bool) -> bool:
        if value is None:
            return default
        if not isinstance(value, bool):
            self.fail(path, f"expected true or false, got {value!r}")
        return value

    def count(self, value: object, path: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            self.fail(path, f"expected a whole number >= 0, got {value!r}")
        return value

    def choice(self, value: object, path: str, options: tuple[str, ...], default: str) -> str:
        if value is None:
            return default
        if not isinstance(value, str) or value not in options:
            self.fail(path, f"unknown value {value!r} (expected one of {', '.join(options)})")
        return value

    def text_list(self, value: object, path: str, check: Callable[[str, str], None] | None = None,
                  ) -> tuple[str, ...]:
        if value is None:
            return ()
        if not isinstance(value, list):
            self.fail(path, f"expected a list, got {_type_name(value)} (write [a, b])")
        items: list[str] = []
        for index, item in enumerate(value):
            item_path = _join(path, index)
            if not isinstance(item, str) or not item:
                self.error(item_path, f"expected non-empty text, got {_type_name(item)}")
                continue
            if check is not None:
                try:
                    check(item, item_path)
                except _Invalid:
                    continue
            items.append(item)
        return tuple(items)

    def attempt(self, build: Callable[[], T]) -> T | None:
        """Run one sub-build; on a recorded error return None so validation carries on."""
        try:
            return build()
        except _Invalid:
            return None

    # --- the document ----------------------------------------------------------------------

    def build(self, document: object) -> Policy:
        if document is None:
            raise PolicyError([f"{self.source}: document: the policy is empty "
                               "(start with 'version: 1' and a 'roles:' mapping)"])
        try:
            top = self.mapping(document, "", _TOP_KEYS)
        except _Invalid:
            raise PolicyError(self.errors) from None
        version = top.get("version")
        if "version" not in top:
            self.error("version", "missing (add 'version: 1' at the top)")
        elif isinstance(version, bool) or version != 1:
            self.error("version", f"unsupported policy format version {version!r} (this pgveil reads 1)")
        settings = self.attempt(lambda: self.settings(top.get("settings"))) or Settings()
        roles: dict[str, Role] = {}
        raw_roles = self.attempt(lambda: self.named_mapping(top.get("roles"), "roles")) or {}
        for name, spec in raw_roles.items():
            role = self.attempt(partial(self.role, name, spec))
            if role is not None:
                roles[name] = role
        datasets: dict[str, Dataset] = {}
        raw_datasets = self.attempt(lambda: self.named_mapping(top.get("datasets"), "datasets")) or {}
        for key, spec in raw_datasets.items():
            dataset = self.attempt(partial(self.dataset, key, spec))
            if dataset is None:
                continue
            if dataset.name in datasets:
                self.error(_join("datasets", key),
                           f"names the same table as another entry ({dataset.name}; merge them)")
                continue
            datasets[dataset.name] = dataset
        elevations = self.attempt(lambda: self.elevations(top.get("elevations"), raw_roles)) or ()
        honeytokens = self.attempt(lambda: self.honeytokens(top.get("honeytokens"), roles, datasets)) or ()
        if settings.default_role != "deny" and settings.default_role not in raw_roles:
            self.error("settings.default_role",
                       f"no role named '{settings.default_role}' (use 'deny' or one of the roles: "
                       f"{', '.join(raw_roles) or 'none defined'})")
        uses_hash = any(isinstance(column.protection, Hash)
                        for dataset in datasets.values() for column in dataset.columns.values())
        if self.require_hash_key and uses_hash:
            problem = _hash_key_problem(settings.hash_key_env)
            if problem:
                self.error("settings.hash_key_env", problem)
        if self.errors:
            raise PolicyError(self.errors)
        return Policy(
            version=self.content_version(document),
            settings=settings,
            roles=roles,
            datasets=datasets,
            elevations=elevations,
            source=self.source,
            honeytokens=honeytokens,
        )

    @staticmethod
    def content_version(document: object) -> str:
        canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                               default=repr)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]

    def settings(self, value: object) -> Settings:
        spec = self.mapping(value, "settings", _SETTINGS_KEYS)
        default_role = self.attempt(
            lambda: self.text(spec.get("default_role"), "settings.default_role", "deny")) or "deny"
        env_name = self.attempt(
            lambda: self.text(spec.get("hash_key_env"), "settings.hash_key_env", "PGVEIL_HASH_KEY"))
        if env_name is not None and not _ENV_NAME.match(env_name):
            self.error("settings.hash_key_env",
                       f"{env_name!r} is not an environment variable name (letters, digits, _)")
            env_name = None
        lockout = 3600
        if spec.get("honeytoken_lockout") is not None:
            lockout = self.attempt(lambda: self.duration(
                spec.get("honeytoken_lockout"), "settings.honeytoken_lockout")) or 3600
        return Settings(default_role=default_role, hash_key_env=env_name or "PGVEIL_HASH_KEY",
                        honeytoken_lockout_seconds=lockout)

    def role(self, name: str, value: object) -> Role:
        path = _join("roles", name)
        if name == "deny":
            self.error(path, "'deny' is reserved for settings.default_role (rename the role)")
        spec = self.mapping(value, path, _ROLE_KEYS)
        members = self.attempt(lambda: self.text_list(spec.get("members"), _join(path, "members")))
        description = self.attempt(lambda: self.text(spec.get("description"), _join(path, "description")))
        statements = self.attempt(lambda: self.text_list(
            spec.get("statements", ["select"]), _join(path, "statements"), self.check_statement_class))
        tables = self.attempt(lambda: self.text_list(
            spec.get("tables"), _join(path, "tables"), self.check_table_glob))
        reveal = self.attempt(lambda: self.text_list(
            spec.get("reveal", ["public", "internal"]), _join(path, "reveal"), self.check_sensitivity))
        limit = spec.get("max_quasi_identifiers")
        max_qi = None if limit is None else self.attempt(
            lambda: self.count(limit, _join(path, "max_quasi_identifiers")))
        row_filters = self.attempt(
            lambda: self.row_filters(spec.get("row_filters"), _join(path, "row_filters")))
        injection = self.attempt(lambda: self.choice(
            spec.get("injection"), _join(path, "injection"), INJECTION_MODES, "enforce"))
        fingerprints = self.attempt(lambda: self.choice(
            spec.get("fingerprints"), _join(path, "fingerprints"), FINGERPRINT_MODES, "off"))
        application = self.attempt(
            lambda: self.flag(spec.get("application"), _join(path, "application"), False))
        budgets = {key: self.attempt(partial(self.row_limit, spec.get(key), _join(path, key)))
                   for key in ("max_rows_per_statement", "max_rows_per_hour")}
        return Role(
            name=name,
            members=members or (),
            description=description or "",
            statements=frozenset(statements or ()),
            tables=tables or (),
            reveal=frozenset(SENSITIVITY_NAMES[level] for level in reveal or ()),
            max_quasi_identifiers=max_qi,
            row_filters=row_filters or {},
            injection=cast(Literal["enforce", "alert", "off"], injection or "enforce"),
            fingerprints=cast(Literal["off", "learn", "enforce"], fingerprints or "off"),
            application=application is True,
            max_rows_per_statement=budgets["max_rows_per_statement"],
            max_rows_per_hour=budgets["max_rows_per_hour"],
        )

    def row_limit(self, value: object, path: str) -> int | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            self.fail(path, f"expected a whole number of rows >= 1, got {value!r} "
                            "(leave the key out for no limit)")
        return value

    def honeytokens(self, value: object, roles: Mapping[str, Role],
                    datasets: Mapping[str, Dataset]) -> tuple[Honeytoken, ...]:
        if value is None:
            return ()
        if not isinstance(value, list):
            self.fail("honeytokens", f"expected a list, got {_type_name(value)}")
        built: list[Honeytoken] = []
        names: set[str] = set()
        for index, item in enumerate(value):
            path = _join("honeytokens", index)
            token = self.attempt(partial(self.honeytoken, item, path, roles, datasets))
            if token is None:
                continue
            if token.name in names:
                self.error(_join(path, "name"),
                           f"'{token.name}' is used twice (honeytoken names must be unique)")
                continue
            names.add(token.name)
            built.append(token)
        return tuple(built)

    def honeytoken(self, value: object, path: str, roles: Mapping[str, Role],
                   datasets: Mapping[str, Dataset]) -> Honeytoken:
        spec = self.mapping(value, path, _HONEYTOKEN_KEYS)
        for required in ("name", "table", "column"):
            if not spec.get(required):
                self.error(_join(path, required), "missing (honeytokens need name, table, column and value)")
        name = self.attempt(lambda: self.text(spec.get("name"), _join(path, "name")))
        table = self.attempt(lambda: self.text(spec.get("table"), _join(path, "table")))
        column = self.attempt(lambda: self.text(spec.get("column"), _join(path, "column")))
        action = self.attempt(lambda: self.choice(
            spec.get("action"), _join(path, "action"), HONEYTOKEN_ACTIONS, "alert"))
        token_value = self.honeytoken_value(spec, path)
        if not name or not table or not column or action is None or token_value is None:
            raise _Invalid
        if not self.check_relation_name(table, _join(path, "table")):
            raise _Invalid
        table = qualify_relation_name(table)
        dataset = datasets.get(table)
        policy = dataset.column(column) if dataset is not None else ColumnPolicy()
        for role in roles.values():
            if not role.sees_unmasked(policy):
                self.error(_join(path, "column"),
                           f"{table}.{column} is masked for role {role.name} (sensitivity "
                           f"{policy.sensitivity.name.lower()}); a honeytoken's column must be unmasked "
                           "for every role, so that pgveil sees its value in any role's results: plant it "
                           "in a column every role sees, or lower that column's sensitivity")
                raise _Invalid
        return Honeytoken(name=name, table=table, column=column, value=token_value,
                          action=cast(Literal["alert", "terminate"], action))

    def honeytoken_value(self, spec: Mapping[str, Any], path: str) -> str | None:
        """The marker: `value`, or the environment variable `value_env` names (so the policy file
        can be shared without the markers)."""
        if ("value" in spec) == ("value_env" in spec):
            self.error(path, "give exactly one of value and value_env")
            return None
        if "value_env" in spec:
            env_name = self.attempt(lambda: self.text(spec.get("value_env"), _join(path, "value_env")))
            if env_name is None:
                return None
            if not _ENV_NAME.match(env_name):
                self.error(_join(path, "value_env"),
                           f"{env_name!r} is not an environment variable name (letters, digits, _)")
                return None
            found = os.environ.get(env_name)
            if found is None:
                if not self.require_hash_key:  # pgveil check without the deployment's secrets
                    return "x" * MIN_HONEYTOKEN_CHARS
                self.error(_join(path, "value_env"), f"environment variable {env_name} is not set")
                return None
            where = _join(path, "value_env")
            text_value: str | None = found
        else:
            where = _join(path, "value")
            raw = spec.get("value")
            if isinstance(raw, int | float) and not isinstance(raw, bool):
                raw = str(raw)
            text_value = self.attempt(lambda: self.text(raw, where))
        if text_value is None:
            return None
        if "\x00" in text_value:
            self.error(where, "holds a NUL character, which PostgreSQL text never does")
            return None
        if len(text_value) < MIN_HONEYTOKEN_CHARS:
            self.error(where, f"too short ({len(text_value)} characters); a honeytoken value needs at least "
                       f"{MIN_HONEYTOKEN_CHARS}, or it matches ordinary data (pgveil honeytokens plant "
                       "makes unguessable ones)")
            return None
        return text_value

    def check_statement_class(self, item: str, path: str) -> None:
        if item not in STATEMENT_CLASSES:
            self.fail(path, f"unknown statement class '{item}' "
                            f"(expected one of {', '.join(sorted(STATEMENT_CLASSES))})")

    def check_sensitivity(self, item: str, path: str) -> None:
        if item not in SENSITIVITY_NAMES:
            self.fail(path, f"unknown sensitivity '{item}' (expected one of {', '.join(SENSITIVITY_NAMES)})")

    def check_table_glob(self, item: str, path: str) -> None:
        if item == "*":
            return
        parts = item.split(".")
        if len(parts) != 2 or not all(parts):
            self.fail(path, f"table pattern '{item}' is not schema.name "
                            "(write e.g. public.users, public.*, or * for every table)")

    def row_filters(self, value: object, path: str) -> dict[str, str]:
        filters: dict[str, str] = {}
        for table, expression in self.named_mapping(value, path).items():
            entry = _join(path, table)
            if not self.check_relation_name(table, entry):
                continue
            if not isinstance(expression, str) or not expression.strip():
                self.error(entry, f"expected a SQL boolean expression as text, got {_type_name(expression)}")
                continue
            problem = _valid_row_filter(expression)
            if problem:
                self.error(entry, f"row filter {problem}")
                continue
            name = qualify_relation_name(table)
            if name in filters:
                self.error(entry, f"names the same table as another row filter ({name}; combine them)")
                continue
            filters[name] = expression.strip()
        return filters

    def check_relation_name(self, name: str, path: str) -> bool:
        parts = name.split(".")
        if len(parts) > 2 or not all(parts) or any(ch in name for ch in "*?[]"):
            self.error(path, f"'{name}' is not a table name (write schema.name, e.g. public.users)")
            return False
        return True

    def dataset(self, key: str, value: object) -> Dataset:
        path = _join("datasets", key)
        if not self.check_relation_name(key, path):
            raise _Invalid
        spec = self.mapping(value, path, _DATASET_KEYS)
        if isinstance(spec.get("version"), int | float) and not isinstance(spec.get("version"), bool):
            spec["version"] = str(spec["version"])
        metadata = {
            field: self.attempt(partial(self.text, spec.get(field), _join(path, field))) or ""
            for field in ("description", "version", "registered_by", "registered_at", "originating_source")
        }
        columns: dict[str, ColumnPolicy] = {}
        raw_columns = self.named_mapping(spec.get("columns"), _join(path, "columns"))
        for column_name, column_spec in raw_columns.items():
            column_path = _join(_join(path, "columns"), column_name)
            column = self.attempt(partial(self.column, column_spec, column_path))
            if column is not None:
                columns[column_name] = column
        return Dataset(name=qualify_relation_name(key), columns=columns, **metadata)

    def column(self, value: object, path: str) -> ColumnPolicy:
        spec = self.mapping(value, path, _COLUMN_KEYS)
        level = self.attempt(lambda: self.choice(
            spec.get("sensitivity"), _join(path, "sensitivity"), tuple(SENSITIVITY_NAMES), "internal"))
        raw = spec.get("protection")
        protection = None if raw is None else self.protection(raw, _join(path, "protection"))
        return ColumnPolicy(
            sensitivity=SENSITIVITY_NAMES[level or "internal"],
            protection=protection,
            quasi_identifier=bool(self.attempt(lambda: self.flag(
                spec.get("quasi_identifier"), _join(path, "quasi_identifier"), False))),
            joinable=self.attempt(lambda: self.flag(spec.get("joinable"), _join(path, "joinable"), True))
            is not False,
            description=self.attempt(lambda: self.text(spec.get("description"), _join(path, "description")))
            or "",
            mode=self.attempt(lambda: self.choice(
                spec.get("mode"), _join(path, "mode"), COLUMN_MODES, "NULLABLE")) or "NULLABLE",
            originating_source=self.attempt(lambda: self.text(
                spec.get("originating_source"), _join(path, "originating_source"))) or "",
        )

    def protection(self, value: object, path: str) -> Protection:
        expected = "(expected one of partial, email, hash, generalize, redact, constant)"
        if isinstance(value, str):
            name, argument = value, None
        elif isinstance(value, dict) and len(value) == 1:
            name, argument = next(iter(value.items()))
        elif isinstance(value, dict):
            self.fail(path, f"give exactly one protection, got {len(value)} keys {expected}")
        else:
            self.fail(path, f"expected a protection name or mapping, got {_type_name(value)} {expected}")
        if name not in _PROTECTION_NAMES:
            self.fail(path, f"unknown protection {name!r} {expected}")
        inner = _join(path, str(name))
        if name in ("email", "hash", "redact"):
            if argument not in (None, {}):
                self.fail(inner, f"'{name}' takes no options")
            no_options: dict[str, Protection] = {"email": Email(), "hash": Hash(), "redact": Redact()}
            return no_options[name]
        if name == "partial":
            options = self.mapping(argument, inner, _PARTIAL_KEYS)
            keep_first = self.count(options.get("keep_first", 0), _join(inner, "keep_first"))
            keep_last = self.count(options.get("keep_last", 0), _join(inner, "keep_last"))
            mask_char = options.get("mask_char", "*")
            if not isinstance(mask_char, str) or len(mask_char) != 1 or mask_char == "\x00":
                self.fail(_join(inner, "mask_char"), f"expected exactly one character, got {mask_char!r}")
            return Partial(keep_first=keep_first, keep_last=keep_last, mask_char=mask_char)
        if name == "generalize":
            return self.generalize(argument, inner)
        return Constant(self.constant(argument, inner))

    def generalize(self, argument: object, path: str) -> Generalize:
        usage = "(write generalize: year, generalize: month or generalize: {bucket: N})"
        if argument in ("year", "month"):
            return Generalize(unit=argument)
        if isinstance(argument, dict):
            options = self.mapping(argument, path, ("bucket",))
            bucket = options.get("bucket")
            if isinstance(bucket, bool) or not isinstance(bucket, int | float) \
                    or not math.isfinite(bucket) or bucket <= 0:
                self.fail(_join(path, "bucket"), f"expected a number > 0, got {bucket!r}")
            return Generalize(bucket=bucket)
        self.fail(path, f"unknown generalization {argument!r} {usage}")

    def constant(self, argument: object, path: str) -> str | int | float | bool | None:
        if isinstance(argument, float) and not math.isfinite(argument):
            self.fail(path, "the constant must be a finite number or text")
        if isinstance(argument, str) and "\x00" in argument:
            self.fail(path, "the constant contains a NUL character (PostgreSQL text cannot hold it)")
        if argument is None or isinstance(argument, str | int | float | bool):
            return argument
        self.fail(path, f"expected one value (text, number, true/false or null), got {_type_name(argument)}")

    def elevations(self, value: object, roles: Mapping[str, object]) -> tuple[Elevation, ...]:
        if value is None:
            return ()
        if not isinstance(value, list):
            self.fail("elevations", f"expected a list, got {_type_name(value)}")
        built: list[Elevation] = []
        for index, item in enumerate(value):
            elevation = self.attempt(partial(self.elevation, item, _join("elevations", index), roles))
            if elevation is not None:
                built.append(elevation)
        return tuple(built)

    def elevation(self, value: object, path: str, roles: Mapping[str, object]) -> Elevation:
        spec = self.mapping(value, path, _ELEVATION_KEYS)
        for required in ("role", "users", "max_duration"):
            if required not in spec:
                self.error(_join(path, required), "missing (elevations need role, users and max_duration)")
        role = self.attempt(lambda: self.text(spec.get("role"), _join(path, "role")))
        if role and role not in roles:
            self.error(_join(path, "role"), f"no role named '{role}' (define it under roles:)")
        users = self.attempt(lambda: self.text_list(spec.get("users"), _join(path, "users")))
        seconds = self.attempt(lambda: self.duration(spec.get("max_duration"), _join(path, "max_duration")))
        approver_required = self.attempt(lambda: self.flag(
            spec.get("approver_required"), _join(path, "approver_required"), True))
        approvers = self.attempt(lambda: self.text_list(spec.get("approvers"), _join(path, "approvers")))
        if approver_required and not approvers and "approvers" in spec:
            self.error(_join(path, "approvers"),
                       "empty, but approver_required is true (list who may approve)")
        if not role or users is None or seconds is None:
            raise _Invalid
        return Elevation(
            role=role,
            users=users,
            max_duration_seconds=seconds,
            approver_required=approver_required is not False,
            approvers=approvers or (),
        )

    def duration(self, value: object, path: str) -> int:
        if value is None:
            raise _Invalid
        match = _DURATION.match(value) if isinstance(value, str) else None
        if match is None or not any(match.groups()):
            self.fail(path, f"expected a duration like 30m, 2h, 1h30m or 1d, got {value!r}")
        days, hours, minutes, seconds = (int(part or 0) for part in match.groups())
        total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
        if total <= 0:
            self.fail(path, "the duration must be longer than zero")
        return total
