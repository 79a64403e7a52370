"""Reads the catalog and a bounded random sample of each table, one table at a time, read-only."""

from __future__ import annotations

from dataclasses import dataclass, field

import asyncpg

from proxy.discovery.detectors import ColumnFacts, Finding, classify

VALUE_PREFIX = 512  # characters of each sampled value the detectors see (bounds memory)

_CATALOG_SQL = """
SELECT c.oid, n.nspname, c.relname, c.reltuples::float8,
       pg_catalog.has_table_privilege(c.oid, 'SELECT') AS readable,
       a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod),
       coalesce(pg_catalog.col_description(c.oid, a.attnum), ''), a.attnum
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
WHERE c.relkind IN ('r', 'p', 'm') AND NOT c.relispartition
  AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgveil')
  AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%'
  AND ($1::text[] IS NULL OR n.nspname = ANY($1::text[]))
ORDER BY n.nspname, c.relname, a.attnum
"""

_FOREIGN_KEYS_SQL = """
SELECT con.conrelid, ca.attname, rn.nspname || '.' || rc.relname, ra.attname
FROM pg_catalog.pg_constraint con
JOIN pg_catalog.pg_class rc ON rc.oid = con.confrelid
JOIN pg_catalog.pg_namespace rn ON rn.oid = rc.relnamespace
JOIN pg_catalog.pg_attribute ca ON ca.attrelid = con.conrelid AND ca.attnum = con.conkey[1]
JOIN pg_catalog.pg_attribute ra ON ra.attrelid = con.confrelid AND ra.attnum = con.confkey[1]
WHERE con.contype = 'f' AND pg_catalog.cardinality(con.conkey) = 1
"""

_PARENTS_SQL = """
SELECT i.inhrelid, pn.nspname || '.' || pc.relname, i.inhparent
FROM pg_catalog.pg_inherits i
JOIN pg_catalog.pg_class pc ON pc.oid = i.inhparent
JOIN pg_catalog.pg_namespace pn ON pn.oid = pc.relnamespace
ORDER BY i.inhrelid, i.inhseqno
"""


@dataclass
class Column:
    facts: ColumnFacts
    findings: list[Finding] = field(default_factory=list)
    references: str = ""  # 'schema.table.column' of a single-column foreign key, if any


@dataclass
class Table:
    oid: int
    schema: str
    name: str
    reltuples: float
    readable: bool
    columns: list[Column] = field(default_factory=list)
    sampled_rows: int = 0
    problem: str = ""  # why it was not sampled ('' if it was)
    ancestors: list[str] = field(default_factory=list)  # inheritance parents, nearest first

    @property
    def qualified_name(self) -> str:
        return f"{self.schema}.{self.name}"


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


SYSTEM_ABOVE_ROWS = 100_000  # estimated rows above which whole pages are sampled (SYSTEM), not rows


def sample_sql(table: Table, sample_rows: int) -> str:
    """SELECT of every column as (a bounded prefix of its) text, from a random sample, at most N rows.

    The percentage aims at 1.2 N rows from the planner's estimate, so the LIMIT rarely cuts the
    sample short (a cut keeps the rows from the start of the table). BERNOULLI picks rows but reads
    every page; above SYSTEM_ABOVE_ROWS rows SYSTEM reads only the sampled pages. A never-analysed
    table (reltuples <= 0) is read at 100 % up to the LIMIT: its first N rows."""
    percent = min(100.0, 100.0 * 1.2 * sample_rows / table.reltuples) if table.reltuples > 0 else 100.0
    method = "SYSTEM" if table.reltuples > SYSTEM_ABOVE_ROWS else "BERNOULLI"
    columns = ", ".join(f"pg_catalog.left({quote_ident(c.facts.name)}::pg_catalog.text, {VALUE_PREFIX})"
                        for c in table.columns)
    return (f"SELECT {columns} FROM {quote_ident(table.schema)}.{quote_ident(table.name)} "
            f"TABLESAMPLE {method} ({percent:.6f}) LIMIT {int(sample_rows)}")


async def read_catalog(conn: asyncpg.Connection, schemas: list[str] | None) -> list[Table]:
    tables: dict[int, Table] = {}
    for row in await conn.fetch(_CATALOG_SQL, schemas or None):
        oid = int(row[0])
        table = tables.get(oid)
        if table is None:
            table = tables[oid] = Table(oid, row[1], row[2], float(row[3]), bool(row[4]))
        table.columns.append(Column(ColumnFacts(row[2], row[5], row[6], row[7])))
    references = {(int(r[0]), r[1]): f"{r[2]}.{r[3]}" for r in await conn.fetch(_FOREIGN_KEYS_SQL)}
    for table in tables.values():
        for column in table.columns:
            column.references = references.get((table.oid, column.facts.name), "")
    parents: dict[int, list[tuple[str, int]]] = {}
    for row in await conn.fetch(_PARENTS_SQL):
        parents.setdefault(int(row[0]), []).append((row[1], int(row[2])))
    for table in tables.values():
        pending, seen = [table.oid], {table.oid}
        while pending:  # breadth first: nearest ancestors first, as the policy resolves them
            for name, oid in parents.get(pending.pop(0), []):
                if oid not in seen:
                    seen.add(oid)
                    table.ancestors.append(name)
                    pending.append(oid)
    return list(tables.values())


async def sample_table(conn: asyncpg.Connection, table: Table, sample_rows: int,
                       timeout_ms: int) -> list[list[str]]:
    """Each column's sampled non-NULL values (as text). Errors name the SQLSTATE only, never a value."""
    async with conn.transaction(readonly=True):
        await conn.execute(f"SET LOCAL statement_timeout = {int(timeout_ms)}")
        await conn.execute("SET LOCAL lock_timeout = 1000")
        rows = await conn.fetch(sample_sql(table, sample_rows))
    table.sampled_rows = len(rows)
    return [[row[i] for row in rows if row[i] is not None] for i in range(len(table.columns))]


async def discover(dsn: str, schemas: list[str] | None, sample_rows: int,
                   timeout_ms: int = 10_000) -> list[Table]:
    """Catalog, then one table at a time: sample, classify, drop the sample."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SET application_name = 'pgveil discover'")
        tables = await read_catalog(conn, schemas)
        for table in tables:
            samples: list[list[str]] = [[] for _ in table.columns]
            if not table.readable:
                table.problem = "no SELECT privilege: classified by names only"
            elif sample_rows > 0:
                try:
                    samples = await sample_table(conn, table, sample_rows, timeout_ms)
                except asyncpg.PostgresError as exc:
                    # The message may quote data (a cast error); only the SQLSTATE and class go out.
                    table.problem = (f"sampling failed (SQLSTATE {exc.sqlstate}, {type(exc).__name__}): "
                                     "classified by names only")
            for column, values in zip(table.columns, samples, strict=True):
                column.findings = classify(column.facts, values)
            del samples
        _inherit_through_foreign_keys(tables)
        return tables
    finally:
        await conn.close()


def _inherit_through_foreign_keys(tables: list[Table]) -> None:
    """A column that references a classified column holds the same values: give it the same finding."""
    by_name = {f"{t.qualified_name}.{c.facts.name}": c for t in tables for c in t.columns}
    for table in tables:
        for column in table.columns:
            target = by_name.get(column.references)
            if column.findings or target is None or not target.findings:
                continue
            best = target.findings[0]
            column.findings = [Finding(best.kind, round(best.confidence * 0.9, 2), best.sensitivity,
                                       best.quasi_identifier, best.identifier,
                                       (f"foreign key to {column.references}, classified {best.kind}",),
                                       0, 0)]
