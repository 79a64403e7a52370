"""The upstream schema as pgveil needs it: relations, columns, ancestry, view and function reads,
and the user-defined operators, casts and domain checks that run functions."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import pglast
from pglast import ast

from proxy.catalog_watch import change_marker
from proxy.guard.side_doors import is_side_door
from proxy.policy.model import Dataset, Policy

RelationKind = Literal["table", "view", "matview", "partitioned", "foreign", "sequence"]

SYSTEM_SCHEMAS = frozenset({"pg_catalog", "information_schema"})
PGVEIL_SCHEMA = "pgveil"
_RELKINDS: dict[str, RelationKind] = {
    "r": "table", "v": "view", "m": "matview", "p": "partitioned", "f": "foreign", "S": "sequence",
}
# Languages whose body pgveil can read as SQL text; any other body (C, internal, plpython...) is opaque.
_READABLE_LANGUAGES = frozenset({"sql", "plpgsql"})
_IDENTIFIER = re.compile(r'"((?:[^"]|"")+)"|([A-Za-z_\x80-\uffff][A-Za-z0-9_$\x80-\uffff]*)')
_DYNAMIC_SQL = re.compile(r"\bexecute\b", re.IGNORECASE)
# PL/pgSQL expression parse modes (pglast's PLpgSQL_expr.parseMode): a bare expression, an assignment.
_PLPGSQL_EXPRESSION_MODE = 2
_PLPGSQL_ASSIGN_MODES = frozenset({3, 4, 5})
_PLPGSQL_ASSIGN_TARGET = re.compile(r"^[^:=]*?(?::=|=)", re.DOTALL)

_RELATIONS_SQL = """
SELECT c.oid, n.nspname, c.relname, c.relkind::text,
  (SELECT pg_catalog.array_agg(COALESCE(a.attname::text, '*') ORDER BY k.ord)
   FROM pg_catalog.pg_partitioned_table pt
   CROSS JOIN LATERAL pg_catalog.unnest(pt.partattrs::pg_catalog.int2[]) WITH ORDINALITY AS k(attnum, ord)
   LEFT JOIN pg_catalog.pg_attribute a ON a.attrelid = pt.partrelid AND a.attnum = k.attnum
   WHERE pt.partrelid = c.oid) AS partition_key
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'v', 'm', 'p', 'f', 'S')
  AND n.nspname !~ '^pg_toast' AND n.nspname !~ '^pg_temp_'
ORDER BY n.nspname, c.relname
"""
_COLUMNS_SQL = """
WITH RECURSIVE domain_base(oid, base, typmod) AS (
    SELECT t.oid, t.typbasetype, t.typtypmod FROM pg_catalog.pg_type t WHERE t.typtype = 'd'
  UNION ALL
    SELECT d.oid, t.typbasetype, CASE WHEN d.typmod = -1 THEN t.typtypmod ELSE d.typmod END
    FROM domain_base d JOIN pg_catalog.pg_type t ON t.oid = d.base AND t.typtype = 'd'
)
SELECT a.attrelid, a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod), a.atttypid,
       COALESCE((SELECT pg_catalog.format_type(d.base, d.typmod) FROM domain_base d
                 JOIN pg_catalog.pg_type b ON b.oid = d.base AND b.typtype <> 'd'
                 WHERE d.oid = a.atttypid),
                pg_catalog.format_type(a.atttypid, a.atttypmod)),
       a.attnotnull
FROM pg_catalog.pg_attribute a
JOIN pg_catalog.pg_class c ON c.oid = a.attrelid
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'v', 'm', 'p', 'f', 'S')
  AND n.nspname !~ '^pg_toast' AND n.nspname !~ '^pg_temp_'
ORDER BY a.attrelid, a.attnum
"""


def _only(query: str, condition: str) -> str:
    """`query` with `condition` added to its WHERE (before its final ORDER BY)."""
    head, _, order = query.rpartition("ORDER BY")
    return f"{head}AND {condition}\nORDER BY{order}"


_SOME_RELATIONS_SQL = _only(_RELATIONS_SQL, "c.oid = ANY($1::pg_catalog.oid[])")
_SOME_COLUMNS_SQL = _only(_COLUMNS_SQL, "a.attrelid = ANY($1::pg_catalog.oid[])")
# What a relation's facts are read from: its pg_class row, its columns' pg_attribute rows and their
# types' pg_type rows (a column of another table's row type prints that table's name). Row versions:
# a changed row always has a new xmin.
_RELATION_SIGNATURES_SQL = """
SELECT c.oid, c.xmin::text || '/' || COALESCE(a.signature, '')
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN (SELECT a.attrelid,
                  pg_catalog.md5(pg_catalog.string_agg(a.attnum || ':' || a.xmin::text || ':'
                                                       || COALESCE(t.xmin::text, ''), ',' ORDER BY a.attnum))
                    AS signature
           FROM pg_catalog.pg_attribute a LEFT JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
           WHERE a.attnum > 0 GROUP BY a.attrelid) a ON a.attrelid = c.oid
WHERE c.relkind IN ('r', 'v', 'm', 'p', 'f', 'S')
  AND n.nspname !~ '^pg_toast' AND n.nspname !~ '^pg_temp_'
"""
# What every relation's facts may also depend on: schema names, and the types that are not a
# relation's own row type (or its array): domains (and their base types), enums, composite types,
# ranges. Then the built-in function and operator names (their own signature).
_SHAPE_SIGNATURE_SQL = """
WITH temporary AS (SELECT oid FROM pg_catalog.pg_namespace WHERE nspname ~ '^pg_(toast_)?temp_'),
own_row_types AS (
    SELECT t.oid FROM pg_catalog.pg_type t JOIN pg_catalog.pg_class c ON c.oid = t.typrelid
    WHERE c.relkind <> 'c')
SELECT
  (SELECT pg_catalog.md5(pg_catalog.string_agg(n.oid || ':' || n.xmin::text, ',' ORDER BY n.oid))
   FROM pg_catalog.pg_namespace n WHERE n.oid NOT IN (SELECT oid FROM temporary))
  || '/' ||
  (SELECT pg_catalog.md5(pg_catalog.string_agg(t.oid || ':' || t.xmin::text, ',' ORDER BY t.oid))
   FROM pg_catalog.pg_type t
   WHERE t.typnamespace NOT IN (SELECT oid FROM temporary)
     AND t.oid NOT IN (SELECT oid FROM own_row_types) AND t.typelem NOT IN (SELECT oid FROM own_row_types)),
  (SELECT pg_catalog.count(*) || ':' || pg_catalog.sum(p.xmin::text::bigint) FROM pg_catalog.pg_proc p
   WHERE p.pronamespace IN ('pg_catalog'::pg_catalog.regnamespace,
                            'information_schema'::pg_catalog.regnamespace))
  || '/' ||
  (SELECT pg_catalog.count(*) || ':' || pg_catalog.sum(o.xmin::text::bigint) FROM pg_catalog.pg_operator o
   WHERE o.oprnamespace = 'pg_catalog'::pg_catalog.regnamespace)
"""
_INHERITS_SQL = "SELECT inhrelid, inhparent FROM pg_catalog.pg_inherits ORDER BY inhrelid, inhseqno"
_VIEW_READS_SQL = """
SELECT DISTINCT r.ev_class, d.refclassid = 'pg_catalog.pg_proc'::regclass AS is_function, d.refobjid
FROM pg_catalog.pg_rewrite r
JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_rewrite'::regclass AND d.objid = r.oid
WHERE (d.refclassid = 'pg_catalog.pg_class'::regclass AND d.refobjid <> r.ev_class)
   OR d.refclassid = 'pg_catalog.pg_proc'::regclass
ORDER BY 1, 2, 3
"""
_FUNCTIONS_SQL = """
SELECT p.oid, n.nspname, p.proname, l.lanname, p.prosecdef,
       CASE WHEN p.prosqlbody IS NOT NULL THEN pg_catalog.pg_get_function_sqlbody(p.oid)
            ELSE p.prosrc END AS body,
       ARRAY(SELECT d.refobjid FROM pg_catalog.pg_depend d
             WHERE d.classid = 'pg_catalog.pg_proc'::regclass AND d.objid = p.oid
               AND d.refclassid = 'pg_catalog.pg_class'::regclass) AS depends_on,
       ARRAY(SELECT d.refobjid FROM pg_catalog.pg_depend d
             WHERE d.classid = 'pg_catalog.pg_proc'::regclass AND d.objid = p.oid
               AND d.refclassid = 'pg_catalog.pg_proc'::regclass) AS calls,
       CASE WHEN l.lanname = 'plpgsql' THEN pg_catalog.pg_get_functiondef(p.oid) END AS definition
FROM pg_catalog.pg_proc p
JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
JOIN pg_catalog.pg_language l ON l.oid = p.prolang
WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgveil')
  AND n.nspname !~ '^pg_toast' AND n.nspname !~ '^pg_temp_'
ORDER BY n.nspname, p.proname, p.oid
"""
_BUILTIN_FUNCTIONS_SQL = """
SELECT DISTINCT n.nspname || '.' || p.proname
FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
WHERE n.nspname IN ('pg_catalog', 'information_schema')
"""
_BUILTIN_OPERATORS_SQL = """
SELECT DISTINCT o.oprname FROM pg_catalog.pg_operator o
WHERE o.oprnamespace = 'pg_catalog'::pg_catalog.regnamespace
"""
# User-defined operators, casts and domain checks, each with the user functions it runs.
_OPERATORS_SQL = """
SELECT n.nspname, o.oprname, fn.nspname || '.' || f.proname
FROM pg_catalog.pg_operator o
JOIN pg_catalog.pg_namespace n ON n.oid = o.oprnamespace
JOIN pg_catalog.pg_proc f ON f.oid = o.oprcode
JOIN pg_catalog.pg_namespace fn ON fn.oid = f.pronamespace
WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgveil')
  AND fn.nspname NOT IN ('pg_catalog', 'information_schema')
ORDER BY 1, 2, 3
"""
_CASTS_SQL = """
SELECT sn.nspname || '.' || st.typname, tn.nspname || '.' || tt.typname, fn.nspname || '.' || f.proname
FROM pg_catalog.pg_cast c
JOIN pg_catalog.pg_proc f ON f.oid = c.castfunc
JOIN pg_catalog.pg_namespace fn ON fn.oid = f.pronamespace
JOIN pg_catalog.pg_type st ON st.oid = c.castsource
JOIN pg_catalog.pg_namespace sn ON sn.oid = st.typnamespace
JOIN pg_catalog.pg_type tt ON tt.oid = c.casttarget
JOIN pg_catalog.pg_namespace tn ON tn.oid = tt.typnamespace
WHERE fn.nspname NOT IN ('pg_catalog', 'information_schema')
ORDER BY 1, 2, 3
"""
_DOMAINS_SQL = """
SELECT t.oid, n.nspname || '.' || t.typname, t.typbasetype,
       ARRAY(SELECT DISTINCT fn.nspname || '.' || f.proname
             FROM pg_catalog.pg_constraint c
             JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_constraint'::regclass
                  AND d.objid = c.oid AND d.refclassid = 'pg_catalog.pg_proc'::regclass
             JOIN pg_catalog.pg_proc f ON f.oid = d.refobjid
             JOIN pg_catalog.pg_namespace fn ON fn.oid = f.pronamespace
             WHERE c.contypid = t.oid AND fn.nspname NOT IN ('pg_catalog', 'information_schema'))
FROM pg_catalog.pg_type t JOIN pg_catalog.pg_namespace n ON n.oid = t.typnamespace
WHERE t.typtype = 'd' AND n.nspname NOT IN ('pg_catalog', 'information_schema')
ORDER BY 1
"""
# User functions that column defaults (generated columns included) and table CHECKs call: a write
# runs them, and their results or errors reach the writer.
_WRITE_CODE_SQL = """
SELECT DISTINCT COALESCE(ad.adrelid, co.conrelid), fn.nspname || '.' || f.proname
FROM pg_catalog.pg_depend d
LEFT JOIN pg_catalog.pg_attrdef ad ON d.classid = 'pg_catalog.pg_attrdef'::regclass AND ad.oid = d.objid
LEFT JOIN pg_catalog.pg_constraint co ON d.classid = 'pg_catalog.pg_constraint'::regclass
     AND co.oid = d.objid AND co.conrelid <> 0
JOIN pg_catalog.pg_proc f ON f.oid = d.refobjid
JOIN pg_catalog.pg_namespace fn ON fn.oid = f.pronamespace
WHERE d.refclassid = 'pg_catalog.pg_proc'::regclass AND (ad.oid IS NOT NULL OR co.oid IS NOT NULL)
  AND fn.nspname NOT IN ('pg_catalog', 'information_schema')
ORDER BY 1, 2
"""
_ROLE_SETTINGS_SQL = """
SELECT COALESCE(d.datname, ''), COALESCE(r.rolname, ''), s.setconfig
FROM pg_catalog.pg_db_role_setting s
LEFT JOIN pg_catalog.pg_database d ON d.oid = s.setdatabase
LEFT JOIN pg_catalog.pg_roles r ON r.oid = s.setrole
ORDER BY 1, 2
"""
_SERVER_SEARCH_PATH_SQL = """
SELECT setting, source, boot_val, pg_catalog.current_database()
FROM pg_catalog.pg_settings WHERE name = 'search_path'
"""
_FILE_SEARCH_PATH_SQL = """
SELECT setting FROM pg_catalog.pg_file_settings
WHERE name = 'search_path' AND applied ORDER BY seqno DESC LIMIT 1
"""
# Sources of pg_settings.setting that are the catalog connection's own, not the server default.
_SESSION_SOURCES = frozenset({"database", "user", "database user", "client", "session"})


class CatalogError(RuntimeError):
    """The upstream catalog could not be read (pgveil then refuses what depends on it)."""


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type_sql: str  # format_type(): 'text', 'character varying(100)', 'numeric(10,2)', ...
    type_oid: int
    base_type_sql: str = ""  # for a domain: format_type of its underlying base type
    not_null: bool = False  # NOT NULL constraint (the firewall reads `col IS NOT NULL` as always true)

    @property
    def mask_type_sql(self) -> str:
        """The type to give mask_expression(): a domain's base type (masked values need not
        satisfy the domain's constraints, and redacting a NOT NULL domain must not fail)."""
        return self.base_type_sql or self.type_sql


@dataclass(frozen=True, slots=True)
class Relation:
    schema: str
    name: str
    kind: RelationKind
    columns: tuple[Column, ...]  # attnum order, no dropped or system columns
    parents: tuple[str, ...] = ()  # inheritance/partition ancestors, nearest first
    depends_on: tuple[str, ...] = ()  # views and matviews: the relations their query reads
    oid: int = 0
    calls: tuple[str, ...] = ()  # views and matviews: user functions their query calls
    partition_key: tuple[str, ...] = ()  # partitioned tables: key columns ('*' for an expression)

    @property
    def qualified_name(self) -> str:
        return f"{self.schema}.{self.name}"

    def column(self, name: str) -> Column | None:
        return next((column for column in self.columns if column.name == name), None)


@dataclass(frozen=True, slots=True)
class FunctionInfo:
    """A user-defined function (all overloads of one schema.name merged, conservatively).

    `reads` lists user relations the body mentions, directly or through the user functions it
    calls (transitively): pg_depend for SQL-standard bodies (BEGIN ATOMIC); for other bodies the
    relations and functions of the body parsed with pglast (PL/pgSQL: every embedded query) plus
    a search of the body text for relation and function names, so it may list too many, never
    knowingly too few. Views stay views here: the guard follows them to their base relations.
    `opaque_body` is true when pgveil cannot tell what it reads: non-SQL languages (C, internal,
    plpython, ...), a body pglast cannot parse, dynamic SQL (PL/pgSQL EXECUTE), a call to a
    side-door function that runs SQL text or reads whole tables (`ts_stat`, `query_to_xml`,
    `lo_get`, ...), or a call to such a function. `calls` are the user functions the body names."""

    schema: str
    name: str
    language: str  # of every overload, or "mixed" (then opaque_body is true)
    security_definer: bool
    reads: tuple[str, ...]
    opaque_body: bool
    overloads: int = 1
    calls: tuple[str, ...] = ()

    @property
    def qualified_name(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def reads_relations(self) -> bool:
        return bool(self.reads) or self.opaque_body


@dataclass(frozen=True, eq=False)
class CatalogSnapshot:
    """One consistent read of the upstream catalog; equal `generation` means equal content."""

    database: str
    relations: dict[str, Relation]
    functions: dict[str, FunctionInfo]
    role_settings: dict[tuple[str, str], dict[str, str]]  # (database|'', role|'') -> settings
    server_search_path: tuple[str, ...]
    generation: str
    # What runs user functions without a call in the SQL text (each value: qualified functions).
    operators: dict[tuple[str, str], tuple[str, ...]] = field(default_factory=dict)  # (schema, symbol)
    casts: dict[str, tuple[str, ...]] = field(default_factory=dict)  # schema.type: its user types
    domains: dict[str, tuple[str, ...]] = field(default_factory=dict)  # schema.domain: its checks' calls
    write_code: dict[str, tuple[str, ...]] = field(default_factory=dict)  # schema.table: defaults', checks'
    builtin_functions: frozenset[str] | None = None  # schema.name in pg_catalog/information_schema
    builtin_operators: frozenset[str] = frozenset()  # operator symbols pg_catalog defines
    change_marker: str = ""  # catalog_watch.change_marker() read with this snapshot
    _by_parts: dict[tuple[str, str], Relation] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self._by_parts:
            self._by_parts.update(
                ((relation.schema, relation.name), relation) for relation in self.relations.values())

    def __hash__(self) -> int:
        return hash(self.generation)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CatalogSnapshot) and other.generation == self.generation

    def resolve(self, parts: tuple[str, ...], search_path: Sequence[str],
                user: str | None = None) -> Relation | None:
        """The relation a (possibly qualified) name means, with PostgreSQL's lookup rules.

        `parts` are identifiers as PostgreSQL folded them. pg_catalog is searched first unless
        the path lists it; `$user` means `user` (skipped without one); pg_temp is skipped (pgveil
        never resolves to temporary tables). A three-part name ignores its database part: the
        caller checks it is the current database."""
        if len(parts) == 3:
            parts = parts[1:]
        if len(parts) == 2:
            return self._by_parts.get((parts[0], parts[1]))
        if len(parts) != 1:
            return None
        for schema in effective_search_path(search_path, user):
            relation = self._by_parts.get((schema, parts[0]))
            if relation is not None:
                return relation
        return None

    def default_search_path(self, user: str, database: str) -> tuple[str, ...]:
        """search_path a new session of `user` in `database` starts with, `$user` expanded.

        Precedence as in PostgreSQL: ALTER ROLE ... IN DATABASE, then ALTER ROLE, then
        ALTER DATABASE, then the server's configuration."""
        for key in ((database, user), ("", user), (database, "")):
            value = self.role_settings.get(key, {}).get("search_path")
            if value is not None:
                return tuple(user if entry == "$user" else entry for entry in parse_search_path(value))
        return tuple(user if entry == "$user" else entry for entry in self.server_search_path)

    def ancestors(self, relation: Relation) -> tuple[Relation, ...]:
        return tuple(self.relations[name] for name in relation.parents if name in self.relations)

    def base_relations(self, relation: Relation) -> frozenset[str]:
        """Every relation a view or matview may read: through other views and through the user
        functions their queries call, transitively. A call to a function whose body pgveil cannot
        read (FunctionInfo.opaque_body) means it may read anything: every user relation."""
        seen: set[str] = set()
        pending = list(relation.depends_on)
        calls = list(relation.calls)
        while pending or calls:
            for called in calls:
                function = self.functions.get(called)
                if function is None:
                    continue
                if function.opaque_body:
                    return frozenset(seen | {r.qualified_name for r in self.user_relations()})
                pending.extend(function.reads)
            calls = []
            while pending:
                name = pending.pop()
                if name in seen:
                    continue
                seen.add(name)
                read = self.relations.get(name)
                if read is not None:
                    pending.extend(read.depends_on)
                    calls.extend(read.calls)
        return frozenset(seen)

    def user_relations(self) -> Iterable[Relation]:
        """Relations outside pg_catalog, information_schema and pgveil's own schema."""
        return (relation for relation in self.relations.values()
                if relation.schema not in SYSTEM_SCHEMAS and relation.schema != PGVEIL_SCHEMA)


def effective_search_path(search_path: Sequence[str], user: str | None) -> tuple[str, ...]:
    schemas: list[str] = []
    for entry in search_path:
        if entry == "$user":
            if user is not None:
                schemas.append(user)
        elif entry != "pg_temp" and not entry.startswith("pg_temp_"):
            schemas.append(entry)
    if "pg_catalog" not in schemas:
        schemas.insert(0, "pg_catalog")
    return tuple(schemas)


def effective_dataset(policy: Policy, relation: Relation) -> Dataset | None:
    """The policy entry that governs a relation: its own, else its nearest listed ancestor's.

    Partitions and inheritance children are governed by their parent's protections; the
    returned Dataset's `name` says which entry applies."""
    own = policy.datasets.get(relation.qualified_name)
    if own is not None:
        return own
    for ancestor in relation.parents:
        dataset = policy.datasets.get(ancestor)
        if dataset is not None:
            return dataset
    return None


def parse_search_path(value: str) -> tuple[str, ...]:
    """Split a search_path setting like PostgreSQL: unquoted names fold to lower case."""
    entries: list[str] = []
    for match in re.finditer(r'\s*(?:"((?:[^"]|"")*)"|([^,]+?))\s*(?:,|$)', value):
        quoted, plain = match.groups()
        if quoted is not None:
            entries.append(quoted.replace('""', '"'))
        elif plain:
            entries.append(plain.strip().lower())
    return tuple(entries)


async def load_catalog(dsn: str, timeout: float = 10.0, database: str | None = None) -> CatalogSnapshot:
    """Read the upstream catalog through one asyncpg connection; raise CatalogError on failure.

    The catalog is per database: `database` overrides the DSN's (clients may connect to others)."""
    reader = CatalogReader(dsn, timeout, database)
    try:
        return await reader.read()
    finally:
        await reader.close()


class CatalogReader:
    """Reads the upstream catalog through a connection it keeps, and again after DDL: then only
    the relations whose catalog rows changed are read anew.

    Each read takes, in one repeatable-read snapshot, a signature of every relation (its pg_class
    row version and those of its columns and of their types) and one of what every relation's
    facts may also depend on (schemas, and types other than relations' own row types: a renamed
    type or schema changes how columns print). Relations whose signature is unchanged keep the rows
    read before (a changed row always has a new row version, xmin); when the second signature
    moved, every relation is read. What is small or links relations together (inheritance, view
    and function reads, functions, operators, casts, domains, column defaults' code, role
    settings) is read in full every time, the built-in function and operator names only when
    theirs changed. `generation` is a digest of all of it, so equal catalogs read by one reader
    keep their verdict-cache entries."""

    def __init__(self, dsn: str, timeout: float = 10.0, database: str | None = None) -> None:
        self.dsn = dsn
        self.timeout = timeout
        self.database = database
        self.relations_read = 0
        """How many relations the last read fetched anew (the others were unchanged)."""
        self._connection: Any = None
        self._shape: str | None = None
        self._relations: dict[int, tuple[str, Any]] = {}  # oid: signature, relation row
        self._built: dict[int, Relation] = {}  # oid: the relation as the last read built it
        self._reading = asyncio.Lock()  # one read at a time on the one connection
        self._builtins: tuple[str, list[Any], list[Any]] | None = None  # signature, functions, operators

    async def read(self) -> CatalogSnapshot:
        async with self._reading:
            return await self._read_locked()

    async def _read_locked(self) -> CatalogSnapshot:
        import asyncpg

        if self._connection is None or self._connection.is_closed():
            try:
                self._connection = await asyncpg.connect(self.dsn, timeout=self.timeout,
                                                         database=self.database)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                raise CatalogError(f"cannot connect to the upstream to read its catalog: {exc}") from exc
        try:
            return await self._read(self._connection)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            self._drop_connection()
            raise CatalogError(f"cannot read the upstream catalog: {exc}") from exc
        except BaseException:
            self._drop_connection()
            raise

    async def _read(self, connection: Any) -> CatalogSnapshot:
        async with connection.transaction(isolation="repeatable_read", readonly=True):
            search_path_row = await connection.fetchrow(_SERVER_SEARCH_PATH_SQL)
            server_search_path = await _server_search_path(connection, search_path_row)
            # format_type() leaves out the schema of types visible on the search_path; with only
            # pg_catalog on it, every other type is schema-qualified, whatever the client's path.
            await connection.execute("SET LOCAL search_path = pg_catalog")
            shape, builtins_signature = await connection.fetchrow(_SHAPE_SIGNATURE_SQL)
            signatures: dict[int, str] = dict(await connection.fetch(_RELATION_SIGNATURES_SQL))
            known = self._relations if shape == self._shape else {}
            stale = [oid for oid, signature in signatures.items()
                     if oid not in known or known[oid][0] != signature]
            fetched: dict[int, tuple[str, Any]] = {}
            column_rows: list[Any] = []
            if stale:
                everything = len(stale) == len(signatures)
                relation_rows = await (connection.fetch(_RELATIONS_SQL) if everything
                                       else connection.fetch(_SOME_RELATIONS_SQL, stale))
                column_rows = await (connection.fetch(_COLUMNS_SQL) if everything
                                     else connection.fetch(_SOME_COLUMNS_SQL, stale))
                fetched = {row[0]: (signatures.get(row[0], ""), row) for row in relation_rows}
            relations = {oid: fetched.get(oid) or known[oid] for oid in signatures
                         if oid in fetched or oid in known}
            builtins = self._builtins
            if builtins is None or builtins[0] != builtins_signature:
                builtins = (builtins_signature, list(await connection.fetch(_BUILTIN_FUNCTIONS_SQL)),
                            list(await connection.fetch(_BUILTIN_OPERATORS_SQL)))
            linked = [await connection.fetch(query) for query in (
                _INHERITS_SQL, _VIEW_READS_SQL, _FUNCTIONS_SQL, _ROLE_SETTINGS_SQL, _OPERATORS_SQL,
                _CASTS_SQL, _DOMAINS_SQL, _WRITE_CODE_SQL)]
            marker = await change_marker(connection)
        inherits, view_reads, functions, role_settings, operators, casts, domains, write_code = linked
        digest = hashlib.sha256()
        for part in (search_path_row[3], server_search_path, shape, builtins_signature,
                     sorted((oid, entry[0]) for oid, entry in relations.items()), linked):
            digest.update(repr(part).encode("utf-8"))
        ordered = sorted(relations.values(), key=lambda entry: (entry[1][1], entry[1][2]))
        snapshot = build_snapshot(
            database=search_path_row[3],
            relation_rows=[entry[1] for entry in ordered],
            column_rows=column_rows,
            inherit_rows=inherits,
            view_read_rows=view_reads,
            function_rows=functions,
            role_setting_rows=role_settings,
            server_search_path=server_search_path,
            builtin_function_rows=builtins[1],
            builtin_operator_rows=builtins[2],
            operator_rows=operators,
            cast_rows=casts,
            domain_rows=domains,
            write_code_rows=write_code,
            change_marker=marker,
            generation="r" + digest.hexdigest()[:15],
            reuse={oid: built for oid, built in self._built.items() if oid in known and oid not in fetched},
        )
        self._shape, self._relations, self._builtins = shape, relations, builtins
        self._built = {relation.oid: relation for relation in snapshot.relations.values()}
        self.relations_read = len(fetched)
        return snapshot

    def _drop_connection(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None and not connection.is_closed():
            connection.terminate()

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None and not connection.is_closed():
            await connection.close()


async def _server_search_path(connection: Any, row: Any) -> tuple[str, ...]:
    setting, source, boot_value = row[0], row[1], row[2]
    if source not in _SESSION_SOURCES:
        return parse_search_path(setting)
    try:  # pg_file_settings needs superuser; the compiled-in default is the fallback
        async with connection.transaction():
            from_file = await connection.fetchval(_FILE_SEARCH_PATH_SQL)
    except Exception:  # any failure means: not readable, use the compiled-in default
        from_file = None
    return parse_search_path(from_file if from_file is not None else boot_value)


_NOTHING_TO_REUSE: Mapping[int, Relation] = {}


def build_snapshot(
    *,
    database: str,
    relation_rows: Sequence[Sequence[Any]],
    column_rows: Sequence[Sequence[Any]],
    inherit_rows: Sequence[Sequence[Any]],
    view_read_rows: Sequence[Sequence[Any]],
    function_rows: Sequence[Sequence[Any]],
    role_setting_rows: Sequence[Sequence[Any]],
    server_search_path: tuple[str, ...],
    builtin_function_rows: Sequence[Sequence[Any]] | None = None,
    builtin_operator_rows: Sequence[Sequence[Any]] = (),
    operator_rows: Sequence[Sequence[Any]] = (),
    cast_rows: Sequence[Sequence[Any]] = (),
    domain_rows: Sequence[Sequence[Any]] = (),
    write_code_rows: Sequence[Sequence[Any]] = (),
    change_marker: str = "",
    generation: str | None = None,
    reuse: Mapping[int, Relation] = _NOTHING_TO_REUSE,
) -> CatalogSnapshot:
    """Assemble a snapshot from catalog query rows (in the column order of the queries above);
    `generation` None: a digest of the content. `reuse`: relations (by oid) whose rows and columns
    are known unchanged, with no column rows given: kept as they are where what links them to
    others (ancestors, view reads and calls) is the same too."""
    names: dict[int, str] = {row[0]: f"{row[1]}.{row[2]}" for row in relation_rows}
    columns_of: dict[int, list[Column]] = {}
    for relid, name, type_sql, type_oid, base_type_sql, not_null in column_rows:
        columns_of.setdefault(relid, []).append(
            Column(name, type_sql, type_oid, "" if base_type_sql == type_sql else base_type_sql,
                   bool(not_null)))
    direct_parents: dict[int, list[int]] = {}
    for child, parent in inherit_rows:
        if child in names and parent in names:
            direct_parents.setdefault(child, []).append(parent)
    function_names = {row[0]: f"{row[1]}.{row[2]}" for row in function_rows}
    reads_of: dict[int, list[str]] = {}
    calls_of: dict[int, list[str]] = {}
    for view, is_function, read in view_read_rows:
        if view in names and is_function and read in function_names:
            calls_of.setdefault(view, []).append(function_names[read])
        elif view in names and not is_function and read in names:
            reads_of.setdefault(view, []).append(names[read])

    relations: dict[str, Relation] = {}
    for row in relation_rows:
        oid, schema, name, relkind = row[:4]
        parents = tuple(names[parent] for parent in _ancestors(oid, direct_parents))
        depends_on = tuple(reads_of.get(oid, ()))
        calls = tuple(dict.fromkeys(calls_of.get(oid, ())))
        old = reuse.get(oid)
        if old is not None and old.parents == parents and old.depends_on == depends_on and old.calls == calls:
            relations[f"{schema}.{name}"] = old
            continue
        relations[f"{schema}.{name}"] = Relation(
            schema=schema,
            name=name,
            kind=_RELKINDS[relkind],
            columns=old.columns if old is not None else tuple(columns_of.get(oid, ())),
            parents=parents,
            depends_on=depends_on,
            oid=oid,
            calls=calls,
            partition_key=tuple(row[4] or ()) if len(row) > 4 else (),
        )
    user_relations_by_name: dict[str, list[str]] = {}
    for relation in relations.values():
        if relation.schema not in SYSTEM_SCHEMAS and relation.schema != PGVEIL_SCHEMA:
            user_relations_by_name.setdefault(relation.name, []).append(relation.qualified_name)
    functions = _functions(function_rows, names, function_names, user_relations_by_name)
    role_settings: dict[tuple[str, str], dict[str, str]] = {}
    for database_name, role_name, config in role_setting_rows:
        settings = dict(entry.split("=", 1) for entry in config or () if "=" in entry)
        role_settings[(database_name, role_name)] = settings
    operators: dict[tuple[str, str], tuple[str, ...]] = {}
    for schema, symbol, function in operator_rows:
        operators[(schema, symbol)] = (*operators.get((schema, symbol), ()), function)
    casts: dict[str, tuple[str, ...]] = {}
    for source, target, function in cast_rows:
        # keyed by the cast's user-defined types: a cast from a user type to text must not make
        # every ::text suspect; a cast between two built-in types is keyed by both
        user_types = [t for t in (source, target) if t.split(".", 1)[0] not in SYSTEM_SCHEMAS]
        for type_name in user_types or (source, target):
            casts[type_name] = (*casts.get(type_name, ()), function)
    domains = _domains(domain_rows)
    write_code: dict[str, tuple[str, ...]] = {}
    for relid, function in write_code_rows:
        if relid in names:
            write_code[names[relid]] = (*write_code.get(names[relid], ()), function)

    if generation is None:
        digest = hashlib.sha256()
        for part in (database, relations, functions, role_settings, server_search_path, operators, casts,
                     domains, write_code):
            digest.update(repr(part).encode("utf-8"))
        generation = digest.hexdigest()[:16]
    return CatalogSnapshot(
        database=database,
        relations=relations,
        functions=functions,
        role_settings=role_settings,
        server_search_path=server_search_path,
        generation=generation,
        operators=operators,
        casts=casts,
        domains=domains,
        write_code=write_code,
        builtin_functions=None if builtin_function_rows is None else frozenset(
            row[0] for row in builtin_function_rows),
        builtin_operators=frozenset(row[0] for row in builtin_operator_rows),
        change_marker=change_marker,
    )


def _domains(rows: Sequence[Sequence[Any]]) -> dict[str, tuple[str, ...]]:
    """schema.domain -> the user functions its CHECK constraints and those of its base domains call."""
    by_oid = {row[0]: (row[1], row[2], tuple(row[3] or ())) for row in rows}
    domains: dict[str, tuple[str, ...]] = {}
    for oid, (name, _base, _calls) in by_oid.items():
        calls: list[str] = []
        seen: set[int] = set()
        current: int | None = oid
        while current is not None and current in by_oid and current not in seen:
            seen.add(current)
            calls.extend(by_oid[current][2])
            current = by_oid[current][1]
        domains[name] = tuple(dict.fromkeys(calls))
    return domains


def _ancestors(oid: int, direct_parents: Mapping[int, list[int]]) -> list[int]:
    """Breadth-first: parents, then grandparents; each once."""
    found: list[int] = []
    frontier = list(direct_parents.get(oid, ()))
    while frontier:
        following: list[int] = []
        for parent in frontier:
            if parent not in found and parent != oid:
                found.append(parent)
                following.extend(direct_parents.get(parent, ()))
        frontier = following
    return found


def _functions(rows: Sequence[Sequence[Any]], names: Mapping[int, str], function_names: Mapping[int, str],
               user_relations_by_name: Mapping[str, list[str]]) -> dict[str, FunctionInfo]:
    by_simple_name: dict[str, list[str]] = {}
    for qualified in dict.fromkeys(function_names.values()):
        by_simple_name.setdefault(qualified.split(".", 1)[1], []).append(qualified)
    direct: dict[str, FunctionInfo] = {}
    relation_names = frozenset(names.values())
    for _oid, schema, name, language, security_definer, body, depends_on, calls, *definition in rows:
        reads = {names[relid] for relid in depends_on or () if relid in names}
        called = {function_names[oid] for oid in calls or () if oid in function_names}
        opaque = language not in _READABLE_LANGUAGES or (
            language == "plpgsql" and _DYNAMIC_SQL.search(body or "") is not None)
        if language in _READABLE_LANGUAGES:
            for identifier in _identifiers(body or ""):
                reads.update(user_relations_by_name.get(identifier, ()))
                called.update(by_simple_name.get(identifier, ()))
            parsed = _body_names(language, body or "", definition[0] if definition else None)
            if parsed is None:
                opaque = True
            else:
                relation_parts, function_parts = parsed
                for parts in relation_parts:
                    reads.update(_named(parts, relation_names, user_relations_by_name))
                for parts in function_parts:
                    if is_side_door(parts[-1]):
                        opaque = True
                    called.update(_named(parts, frozenset(function_names.values()), by_simple_name))
        key = f"{schema}.{name}"
        called.discard(key)
        previous = direct.get(key)
        if previous is not None:
            reads.update(previous.reads)
            called.update(previous.calls)
            security_definer = previous.security_definer or security_definer
            opaque = previous.opaque_body or opaque or previous.language != language
            language = previous.language if previous.language == language else "mixed"
        direct[key] = FunctionInfo(
            schema=schema,
            name=name,
            language=language,
            security_definer=security_definer,
            reads=tuple(sorted(reads)),
            opaque_body=opaque,
            overloads=1 if previous is None else previous.overloads + 1,
            calls=tuple(sorted(called)),
        )
    return {key: _with_callees(info, direct) for key, info in direct.items()}


def _with_callees(function: FunctionInfo, functions: Mapping[str, FunctionInfo]) -> FunctionInfo:
    """`function` with the reads and opacity of every user function it calls, transitively."""
    reads = set(function.reads)
    opaque = function.opaque_body
    seen = {function.qualified_name}
    pending = list(function.calls)
    while pending:
        name = pending.pop()
        if name in seen or name not in functions:
            continue
        seen.add(name)
        callee = functions[name]
        reads.update(callee.reads)
        opaque = opaque or callee.opaque_body
        pending.extend(callee.calls)
    return FunctionInfo(function.schema, function.name, function.language, function.security_definer,
                        tuple(sorted(reads)), opaque, function.overloads, function.calls)


def _named(parts: tuple[str, ...], qualified_names: frozenset[str],
           by_simple_name: Mapping[str, list[str]]) -> set[str]:
    """The user objects a name in a body may mean: exactly when qualified, else any of that name."""
    if len(parts) >= 2:
        qualified = f"{parts[-2]}.{parts[-1]}"
        return {qualified} if qualified in qualified_names else set()
    return set(by_simple_name.get(parts[-1], ())) if parts else set()


@functools.lru_cache(maxsize=16384)  # a refresh parses only the bodies that changed
def _body_names(language: str, body: str, definition: str | None
                ) -> tuple[tuple[tuple[str, ...], ...], tuple[tuple[str, ...], ...]] | None:
    """(relation names, function names) a SQL or PL/pgSQL body uses, as pglast parses them; None
    when pgveil cannot tell: the body does not parse, or PL/pgSQL runs dynamic SQL."""
    queries: list[str] = []
    try:
        if language == "sql":
            if body.strip():
                queries.append(body)
        else:
            if definition is None:
                return None
            if not _plpgsql_queries(pglast.parse_plpgsql(definition), queries):
                return None
        relation_parts: list[tuple[str, ...]] = []
        function_parts: list[tuple[str, ...]] = []
        for query in queries:
            for node in _walk(pglast.parse_sql(query)):
                if isinstance(node, ast.RangeVar):
                    relation_parts.append(tuple(p for p in (node.schemaname, node.relname) if p))
                elif isinstance(node, ast.FuncCall):
                    function_parts.append(tuple(n.sval or "" for n in node.funcname or ()
                                                if isinstance(n, ast.String)))
    except Exception:  # any parser failure (pglast.parser.ParseError, odd trees) means: opaque
        return None
    return tuple(relation_parts), tuple(function_parts)


def _plpgsql_queries(tree: Any, queries: list[str]) -> bool:
    """Collect the SQL of every PLpgSQL_expr in a parse_plpgsql tree (as parseable statements);
    False when the body runs dynamic SQL (EXECUTE, RETURN QUERY EXECUTE, FOR ... IN EXECUTE, OPEN
    ... FOR EXECUTE)."""
    if isinstance(tree, list):
        return all(_plpgsql_queries(item, queries) for item in tree)
    if not isinstance(tree, dict):
        return True
    for key, value in tree.items():
        if key.startswith("PLpgSQL_stmt_dyn") or key == "dynquery":
            return False
        if key == "PLpgSQL_expr" and isinstance(value, dict):
            query = str(value.get("query", ""))
            mode = value.get("parseMode", 0)
            if mode == _PLPGSQL_EXPRESSION_MODE:
                query = "SELECT " + query
            elif mode in _PLPGSQL_ASSIGN_MODES:
                query = "SELECT " + _PLPGSQL_ASSIGN_TARGET.sub("", query, count=1)
            queries.append(query)
        elif not _plpgsql_queries(value, queries):
            return False
    return True


def _walk(node: Any) -> Iterable[ast.Node]:
    if isinstance(node, tuple | list):
        for item in node:
            yield from _walk(item)
        return
    if not isinstance(node, ast.Node):
        return
    yield node
    for slot in getattr(type(node), "__slots__", ()):
        child = getattr(node, slot, None)
        if child is not None and not isinstance(child, str | int | float | bool):
            yield from _walk(child)


def _identifiers(body: str) -> set[str]:
    """Identifiers in SQL text as PostgreSQL would fold them (quoted kept, unquoted lowered)."""
    found: set[str] = set()
    for quoted, plain in _IDENTIFIER.findall(body):
        found.add(quoted.replace('""', '"') if quoted else plain.lower())
    return found
