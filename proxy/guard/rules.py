"""The guard's own rules over an analysed statement: statement classes, table allow-list, side doors,
views and functions that read protected data, DDL and DML that would expose it."""

from __future__ import annotations

from collections.abc import Mapping

from pglast import ast

from proxy.catalog import PGVEIL_SCHEMA, SYSTEM_SCHEMAS, Relation, effective_dataset, effective_search_path
from proxy.guard.classify import ALWAYS_ALLOWED, required_classes
from proxy.guard.protected import relation_masks
from proxy.guard.side_doors import is_side_door
from proxy.guard.statement import GuardContext, GuardStatement
from proxy.guard.verdict import Refuse
from proxy.policy.model import Role

VALUE_EXPOSING_CATALOGS = frozenset({
    "pg_stats", "pg_stats_ext", "pg_stats_ext_exprs", "pg_statistic", "pg_statistic_ext_data",
    "pg_stat_statements", "pg_stat_statements_info", "pg_authid",
    "pg_shadow", "pg_user_mapping", "pg_user_mappings", "pg_largeobject", "pg_largeobject_metadata",
})
"""Relations (any schema: extensions install where they like) that expose data values or secrets.
`pg_statistic_ext` only defines extended statistics (psql's \\d reads it); their values live in
`pg_statistic_ext_data`."""


def statement_class_allowed(statement: GuardStatement, context: GuardContext) -> Refuse | None:
    for statement_class in sorted(required_classes(statement)):
        if statement_class in ALWAYS_ALLOWED or context.role.may_run(statement_class):
            continue
        return Refuse(
            "statement-class",
            f"role {context.role.name} may not run {statement_class} statements; "
            "ask for a role whose 'statements' include it",
        )
    return None


def table_allow_list(statement: GuardStatement, context: GuardContext) -> Refuse | None:
    for ref in statement.relations:
        if ref.cte:
            continue
        if ref.qualified is None:
            if ref.position == "other" or context.role.may_touch("*"):
                continue
            return Refuse(
                "table-not-allowed",
                f"relation {'.'.join(ref.parts)} is unknown to pgveil and role {context.role.name} "
                "may only use the tables its policy lists",
            )
        assert ref.relation is not None
        if ref.relation.schema in SYSTEM_SCHEMAS or ref.relation.schema == PGVEIL_SCHEMA:
            continue
        if not context.role.may_touch(ref.qualified):
            return Refuse(
                "table-not-allowed",
                f"role {context.role.name} may not use {ref.qualified}; "
                "ask for it to be added to the role's 'tables'",
            )
    return None


def policy_out_of_date(statement: GuardStatement, context: GuardContext) -> Refuse | None:
    """A column the policy protects for this role but PostgreSQL no longer has (renamed or dropped
    outside pgveil): a renamed column would be shown under its new name unprotected, so the
    relation (or a view over it) is refused to this role until the policy follows."""
    if not context.masked:
        return None
    seen: set[str] = set()
    for ref in statement.relations:
        relation = ref.relation
        if ref.cte or relation is None or relation.schema in SYSTEM_SCHEMAS:
            continue
        reads = [relation]
        if relation.kind in ("view", "matview"):
            reads += [base for name in sorted(context.catalog.base_relations(relation))
                      if (base := context.catalog.relations.get(name)) is not None]
        for read in reads:
            if read.qualified_name in seen:
                continue
            seen.add(read.qualified_name)
            missing = _protected_but_missing(read, context)
            if missing is not None:
                return Refuse(
                    "policy-out-of-date",
                    f"the policy protects column {missing} of {read.qualified_name} for role "
                    f"{context.role.name}, but PostgreSQL has no such column (renamed or dropped outside "
                    "pgveil?); update the policy to the table's columns (`pgveil check --upstream` lists "
                    "them) and reload it",
                )
    return None


def _protected_but_missing(relation: Relation, context: GuardContext) -> str | None:
    dataset = effective_dataset(context.policy, relation)
    if dataset is None:
        return None
    for name, column_policy in sorted(dataset.columns.items()):
        if relation.column(name) is None and not context.role.sees_unmasked(column_policy):
            return name
    return None


def catalog_side_doors(statement: GuardStatement, context: GuardContext) -> Refuse | None:
    """Catalogs that hold data values of every table (statistics, query texts, large objects) or
    secrets: refused for masked roles and for roles limited to some tables."""
    masked = context.masked
    if not masked and not tables_restricted(context):
        return None
    why = "has masked data" if masked else "may only use the tables its policy lists"
    for ref in statement.relations:
        name = ref.relation.name if ref.relation is not None else ref.parts[-1]
        if not ref.cte and name in VALUE_EXPOSING_CATALOGS:
            return Refuse(
                "value-exposing-catalog",
                f"{name} exposes data values or secrets and role {context.role.name} {why}; "
                "query the tables themselves",
            )
    return None


PARTITION_BOUND_FUNCTIONS = frozenset({"pg_get_partition_constraintdef"})
"""Functions that print a partition's bounds (the values of its partition key)."""


def partition_bounds(statement: GuardStatement, context: GuardContext) -> Refuse | None:
    """A partition's bounds (`pg_class.relpartbound`, `pg_get_partition_constraintdef`) are raw
    values of its partition key: with a table partitioned by a column masked for the role, a
    partition's rows read next to its bounds give each row's raw value. Refused for such roles when
    the statement names relpartbound, calls the function, or reads `pg_class` whole or with `*`."""
    if not context.masked or not _reads_partition_bounds(statement):
        return None
    for relation in context.catalog.relations.values():
        if not relation.partition_key:
            continue
        masks = relation_masks(context.policy, context.role, relation).masks
        if masks and any(column == "*" or column in masks for column in relation.partition_key):
            return Refuse(
                "partition-bounds",
                f"{relation.qualified_name} is partitioned by data masked for role {context.role.name}, "
                "so partition bounds hold raw values; name the pg_class columns you need, "
                "without relpartbound",
            )
    return None


def _reads_partition_bounds(statement: GuardStatement) -> bool:
    if any(function.parts[-1] in PARTITION_BOUND_FUNCTIONS for function in statement.functions):
        return True
    class_names = {
        name
        for ref in statement.relations
        if not ref.cte and ref.parts[-1] == "pg_class"
        and (ref.relation is None or ref.relation.schema == "pg_catalog")
        for name in (ref.parts[-1], ref.node.alias.aliasname if ref.node.alias else None)
        if name is not None
    }
    for column_ref in statement.column_refs:
        fields = column_ref.fields or ()
        if not fields:
            continue
        names = [(field.sval or "").lower() for field in fields if isinstance(field, ast.String)]
        if names and names[-1] == "relpartbound":
            return True
        if class_names and (
            isinstance(fields[-1], ast.A_Star) or (len(names) == len(fields) == 1 and names[0] in class_names)
        ):
            return True
    return False


def pgveil_schema(statement: GuardStatement, context: GuardContext) -> Refuse | None:
    if not context.masked:
        return None
    touches = any(
        (ref.relation is not None and ref.relation.schema == PGVEIL_SCHEMA)
        or (len(ref.parts) > 1 and ref.parts[-2] == PGVEIL_SCHEMA)
        for ref in statement.relations
    ) or any(function.schema == PGVEIL_SCHEMA for function in statement.functions)
    if touches or PGVEIL_SCHEMA in statement.schemas_named:
        return Refuse(
            "pgveil-schema",
            "schema pgveil holds pgveil's masking functions and is not for direct use; "
            "select the columns and pgveil masks them",
        )
    return None


def tables_restricted(context: GuardContext) -> bool:
    """The role's `tables` do not allow every relation: see `role_is_restricted`."""
    return role_is_restricted(context.role)


def role_is_restricted(role: Role) -> bool:
    """The role's `tables` do not allow every relation (`*`, `*.*`): what a statement reads
    indirectly (function bodies, SQL given as text) must stay inside them too, so its verdicts
    depend on the catalog's function definitions as a masked role's do."""
    return not any(pattern in ("*", "*.*") for pattern in role.tables)


def function_side_doors(statement: GuardStatement, context: GuardContext) -> Refuse | None:
    """Functions that run SQL given as text or read whole tables, schemas, files or large objects
    read what neither masking nor the table allow-list sees: refused for masked roles and for roles
    limited to some tables."""
    masked = context.masked
    if not masked and not tables_restricted(context):
        return None
    bypassed = "masking" if masked else "the table allow-list"
    for function in statement.functions:
        name = function.name
        if is_side_door(name):
            return Refuse(
                "side-door-function",
                f"{name}() runs SQL text or reads whole tables, files or large objects, which "
                f"would bypass {bypassed} for role {context.role.name}; query the tables directly",
            )
    return None


def unlisted_functions(statement: GuardStatement, context: GuardContext) -> Refuse | None:
    """User-defined functions whose bodies read protected relations (or cannot be read) run with
    raw data inside; a masked role may call them only when the policy lists them as datasets.

    A call is also: functional notation (`row.f`, `(row).f` is `f(row)`), a user-defined operator
    (its function), a cast to or from a type with a user-defined cast function, and a value of a
    domain whose CHECK calls user functions. pgveil does not pick the overload PostgreSQL would,
    so every candidate counts. A function name the catalog does not know is refused (the catalog
    is refreshed first when PostgreSQL's definitions changed, see Enforcement).

    A role limited to some tables (see `tables_restricted`), masked or not, may likewise call only
    functions whose bodies can be read and read only relations inside its `tables` (a view it may
    use counts as allowed, as in a FROM clause), unless the policy lists them as datasets."""
    masked = context.masked
    restricted = tables_restricted(context)
    if not masked and not restricted:
        return None
    why_refused = "has masked data" if masked else "may only use the tables its policy lists"
    catalog = context.catalog
    path = effective_search_path(context.search_path, context.user)
    candidates: list[tuple[str, str]] = []  # (qualified function, how the statement reaches it)
    for function in statement.functions:
        found = _user_functions(function.parts, path, catalog.functions)
        if not found and not _builtin(function.parts, path, catalog.builtin_functions):
            statement.reads_definitions = True
            return Refuse(
                "unknown-function",
                f"function {'.'.join(function.parts)} is not in pgveil's catalog of the database and role "
                f"{context.role.name} {why_refused}; call an existing function",
            )
        candidates.extend((name, "") for name in found)
    function_names = {info.name for info in catalog.functions.values()}
    selections = [fields[-1] for fields in _column_fields(statement) if len(fields) >= 2]
    for name in (*selections, *statement.field_selections):  # functional notation: row.f is f(row)
        if name in function_names:
            candidates.extend((found, "") for found in _user_functions((name,), path, catalog.functions))
    candidates.extend(_code_behind_operators(statement, context))
    candidates.extend(_code_behind_types(statement, context))
    copies_in = isinstance(statement.node, ast.CopyStmt) and statement.node.is_from
    for ref in statement.relations:  # a write runs the table's defaults and CHECKs
        if ref.qualified is not None and (ref.position == "target" or (ref.position == "copy" and copies_in)):
            candidates.extend((function, f"a default or CHECK of {ref.qualified}")
                              for function in catalog.write_code.get(ref.qualified, ()))
    statement.reads_definitions = statement.reads_definitions or bool(candidates)
    for qualified, reached in dict.fromkeys(candidates):
        if qualified in context.policy.datasets or qualified not in catalog.functions:
            continue
        info = catalog.functions[qualified]
        via = f" (run by {reached})" if reached else ""
        if info.opaque_body and reached and info.language in _COMPILED_LANGUAGES and not info.reads:
            continue  # an extension type's operator, cast or check in C: see _COMPILED_LANGUAGES
        if info.opaque_body:
            return Refuse(
                "unlisted-function",
                f"{qualified}(){via} has a body pgveil cannot analyse and role {context.role.name} "
                f"{why_refused}; list the function under 'datasets' once it is reviewed",
            )
        for read in _read_relations(info.reads, context) if masked else ():
            relation = catalog.relations.get(read)
            if relation is not None and relation_masks(context.policy, context.role, relation).protected:
                return Refuse(
                    "unlisted-function",
                    f"{qualified}(){via} reads {read}, which has data masked for role {context.role.name}; "
                    "list the function under 'datasets' once it is reviewed",
                )
        for read in info.reads if restricted else ():  # a view the role may use is as good as read directly
            if not _may_read_indirectly(read, context):
                return Refuse(
                    "table-not-allowed",
                    f"{qualified}(){via} reads {read} and role {context.role.name} may not use {read}; "
                    "ask for it to be added to the role's 'tables', or list the function under "
                    "'datasets' once it is reviewed",
                )
    return None


_COMPILED_LANGUAGES = frozenset({"c", "internal"})
"""Operators, casts and domain checks implemented in C are how extensions (citext, PostGIS, hstore,
...) make their types work; only a superuser can install them. Reached implicitly (not called by
name) they do not count as opaque, or every statement over such a column would be refused; called
by name they are judged like any other function."""


def _may_read_indirectly(read: str, context: GuardContext) -> bool:
    """A relation (schema.name) a function body reads is inside the role's allow-list (system
    catalogs and pgveil's own schema are, as in `table_allow_list`)."""
    schema = read.partition(".")[0]
    return schema in SYSTEM_SCHEMAS or schema == PGVEIL_SCHEMA or context.role.may_touch(read)


def _user_functions(
    parts: tuple[str, ...], path: tuple[str, ...], functions: Mapping[str, object]
) -> list[str]:
    if len(parts) >= 2:
        key = f"{parts[-2]}.{parts[-1]}"
        return [key] if key in functions else []
    return [f"{schema}.{parts[0]}" for schema in path if f"{schema}.{parts[0]}" in functions]


def _column_fields(statement: GuardStatement) -> list[list[str]]:
    return [[f.sval or "" for f in column_ref.fields or () if isinstance(f, ast.String)]
            for column_ref in statement.column_refs]


def _read_relations(reads: tuple[str, ...], context: GuardContext) -> list[str]:
    """The relations a function body reads, with views followed to everything they read."""
    found = dict.fromkeys(reads)
    for read in reads:
        relation = context.catalog.relations.get(read)
        if relation is not None and relation.kind in ("view", "matview"):
            found.update(dict.fromkeys(sorted(context.catalog.base_relations(relation))))
    return list(found)


def _builtin(parts: tuple[str, ...], path: tuple[str, ...], builtins: frozenset[str] | None) -> bool:
    if builtins is None:  # a catalog built without the built-in names (tests): no unknown-function rule
        return True
    if len(parts) >= 2:
        return f"{parts[-2]}.{parts[-1]}" in builtins
    return any(f"{schema}.{parts[0]}" in builtins for schema in path)


def _code_behind_operators(statement: GuardStatement, context: GuardContext) -> list[tuple[str, str]]:
    """User functions the statement's operators may run. A qualified operator means that schema's;
    an unqualified one any schema's, except that a symbol pg_catalog also defines (`=`, `||`, ...)
    counts only with a function known to read relations: extensions overload those for their
    types with C functions, and refusing every `=` would make them unusable."""
    operators = context.catalog.operators
    if not operators:
        return []
    found: list[tuple[str, str]] = []
    for parts in statement.operator_names:
        symbol = parts[-1]
        schemas = [parts[-2]] if len(parts) >= 2 else [schema for schema, name in operators if name == symbol]
        for schema in schemas:
            for function in operators.get((schema, symbol), ()):
                info = context.catalog.functions.get(function)
                if (len(parts) < 2 and symbol in context.catalog.builtin_operators
                        and (info is None or not info.reads)):
                    continue
                found.append((function, f"operator {schema}.{symbol}"))
    return found


def _code_behind_types(statement: GuardStatement, context: GuardContext) -> list[tuple[str, str]]:
    """User functions run by user-defined casts to or from the types the statement names or its
    relations' columns have, and by the CHECKs of those types when they are domains."""
    catalog = context.catalog
    if not catalog.casts and not catalog.domains:
        return []
    type_names: set[str] = set()
    path = effective_search_path(context.search_path, context.user)
    for parts in statement.type_names:
        if len(parts) >= 2:
            type_names.add(f"{parts[-2]}.{parts[-1]}")
        elif parts:
            type_names.update(f"{schema}.{parts[0]}" for schema in path)
    for ref in statement.relations:
        if ref.relation is not None:
            type_names.update(column.type_sql for column in ref.relation.columns)
    found: list[tuple[str, str]] = []
    for type_name in sorted(type_names):
        found.extend((function, f"a cast of {type_name}") for function in catalog.casts.get(type_name, ()))
        found.extend((function, f"a CHECK of domain {type_name}")
                     for function in catalog.domains.get(type_name, ()))
    return found


def unlisted_views(statement: GuardStatement, context: GuardContext) -> Refuse | None:
    """A view reads its base tables raw: masked roles may read it only when the policy lists it
    (its own column policies apply), and a listed view may not skip a base table's row filter."""
    if not context.masked:
        return None
    for ref in statement.relations:
        relation = ref.relation
        if relation is None or relation.kind not in ("view", "matview") or relation.schema in SYSTEM_SCHEMAS:
            continue
        statement.reads_definitions = True
        listed = ref.qualified in context.policy.datasets
        own_filter = relation_masks(context.policy, context.role, relation).row_filter
        for read in sorted(context.catalog.base_relations(relation)):
            base = context.catalog.relations.get(read)
            if base is None:
                continue
            masks = relation_masks(context.policy, context.role, base)
            if not listed and masks.protected:
                return Refuse(
                    "unlisted-view",
                    f"{ref.qualified} reads {read}, which has data masked for role {context.role.name}; "
                    "list the view under 'datasets' with its own column policies",
                )
            if masks.row_filter is not None and own_filter is None:
                return Refuse(
                    "view-skips-row-filter",
                    f"{ref.qualified} reads {read}, whose rows are filtered for role {context.role.name}; "
                    "give the view a row filter of its own for this role",
                )
    return None


def explain_over_row_filter(statement: GuardStatement, context: GuardContext) -> Refuse | None:
    """EXPLAIN shows planner estimates from the raw columns' statistics and, with ANALYZE, how
    many rows a row filter removed: both describe rows the role may not see."""
    if not context.masked or not isinstance(statement.node, ast.ExplainStmt):
        return None
    for ref in statement.relations:
        relation = ref.relation
        if relation is not None and relation_masks(context.policy, context.role, relation).row_filter:
            return Refuse(
                "explain-over-row-filter",
                f"EXPLAIN would describe rows of {ref.qualified} that role {context.role.name} may not see; "
                "run the query itself",
            )
    return None


def tablesample_on_protected(statement: GuardStatement, context: GuardContext) -> Refuse | None:
    for ref in statement.relations:
        if ref.position == "sample" and _protected(ref, context):
            return Refuse(
                "tablesample-on-masked-table",
                f"TABLESAMPLE cannot be applied to {ref.qualified}, which is masked for role "
                f"{context.role.name}; use ORDER BY random() LIMIT n",
            )
    return None


def ddl_over_protected_data(statement: GuardStatement, context: GuardContext) -> Refuse | None:
    if not context.masked or statement.statement_class not in ("ddl", "admin"):
        return None
    for ref in statement.relations:
        if _protected(ref, context):
            return Refuse(
                "ddl-over-protected-data",
                f"{statement.node_type} touches {ref.qualified}, which has data masked for role "
                f"{context.role.name}; such DDL could copy or expose raw values",
            )
    return None


def procedural_code(statement: GuardStatement, context: GuardContext) -> Refuse | None:
    """`DO` and code definitions (functions, triggers, rules, ...) run SQL pgveil does not see
    statement by statement: refused for masked roles and for roles limited to some tables."""
    masked = context.masked
    if not masked and not tables_restricted(context):
        return None
    node = statement.node
    if isinstance(node, ast.DoStmt | ast.CreateFunctionStmt | ast.CreateTrigStmt | ast.RuleStmt
                  | ast.CreateEventTrigStmt | ast.CreatePolicyStmt | ast.AlterFunctionStmt):
        why = "has masked data" if masked else "may only use the tables its policy lists"
        return Refuse(
            "procedural-code",
            f"{statement.node_type} runs or defines code pgveil cannot analyse, and role "
            f"{context.role.name} {why}",
        )
    return None


def write_to_masked_table(statement: GuardStatement, context: GuardContext) -> Refuse | None:
    """A DML target cannot be replaced by a masked derived table, and PostgreSQL's own errors about
    the target row (\"Failing row contains (...)\", duplicate and exclusion keys, foreign keys,
    trigger messages) carry its raw values: masked roles may not write to tables they see masked."""
    if not context.masked:
        return None
    copies_in = isinstance(statement.node, ast.CopyStmt) and statement.node.is_from
    for ref in statement.relations:
        written = ref.position == "target" or (ref.position == "copy" and copies_in)
        if written and _protected(ref, context):
            return Refuse(
                "write-to-masked-table",
                f"role {context.role.name} sees {ref.qualified} masked or filtered; PostgreSQL's errors "
                "about a written row can carry its raw values, so it cannot write to that table",
            )
    return None


def _protected(ref: object, context: GuardContext) -> bool:
    relation = getattr(ref, "relation", None)
    return relation is not None and relation_masks(context.policy, context.role, relation).protected
