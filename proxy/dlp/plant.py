"""Planting honeytokens: plausible fake rows for a table, each with an unguessable marker in one column."""

from __future__ import annotations

import datetime
import random
import secrets
import string
import uuid
from dataclasses import dataclass
from typing import Any

import asyncpg

from proxy.discovery.detectors import ColumnFacts, classify

TEXT_TYPES = ("text", "character varying", "character", "citext", "varchar", "char", "name")
MARKER_RANDOM_HEX = 16  # 64 random bits in every marker
_INTEGERS = ("smallint", "integer", "bigint")

_FIRST = ("Avery", "Jordan", "Morgan", "Riley", "Casey", "Quinn", "Rowan", "Emerson", "Harper", "Sasha")
_LAST = ("Lindqvist", "Okafor", "Marchetti", "Brennan", "Takahashi", "Novak", "Delacroix", "Haugen")
_STREETS = ("Elm Street", "Harbour Road", "Mill Lane", "Station Avenue", "Church Walk")
_CITIES = ("Brookhaven", "Westford", "Ashby", "Millbrook", "Fairview")
_WORDS = ("follow-up", "renewal", "invoice", "shipment", "callback", "review", "upgrade")
_PHRASES = ("Lovely staff, will come back", "Slow service but worth the wait", "Asked for a callback",
            "Great value for the price", "Delivery arrived late again", "Please update my address")


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type_sql: str
    not_null: bool
    has_default: bool  # a DEFAULT, identity or generated column: left to PostgreSQL
    max_length: int | None  # varchar(n) / char(n)
    unique: bool
    references: tuple[str, str] | None  # (qualified table, column) of a single-column foreign key
    comment: str = ""


@dataclass(frozen=True, slots=True)
class Planted:
    table: str
    column: str
    markers: list[str]


class PlantError(RuntimeError):
    """The table cannot get honeytokens as asked (one line saying why and what to do)."""


_COLUMNS = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod) AS type_sql, a.attnotnull,
       (a.atthasdef OR a.attidentity <> '' OR a.attgenerated <> '') AS has_default,
       CASE WHEN a.atttypmod > 4 AND a.atttypid IN ('varchar'::regtype, 'bpchar'::regtype)
            THEN a.atttypmod - 4 END AS max_length,
       EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conrelid = a.attrelid AND c.contype IN ('p', 'u')
               AND c.conkey = ARRAY[a.attnum]) AS is_unique,
       (SELECT format('%s.%s', quote_ident(fn.nspname), quote_ident(ft.relname)) || '|' || fa.attname
          FROM pg_constraint c JOIN pg_class ft ON ft.oid = c.confrelid
          JOIN pg_namespace fn ON fn.oid = ft.relnamespace
          JOIN pg_attribute fa ON fa.attrelid = c.confrelid AND fa.attnum = c.confkey[1]
         WHERE c.conrelid = a.attrelid AND c.contype = 'f' AND c.conkey = ARRAY[a.attnum] LIMIT 1) AS ref,
       coalesce(col_description(a.attrelid, a.attnum), '') AS comment
  FROM pg_attribute a
 WHERE a.attrelid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped
 ORDER BY a.attnum
"""


def _reference(text: str | None) -> tuple[str, str] | None:
    if not text:
        return None
    table, _, column = text.partition("|")
    return table, column


def _kind(table: str, column: Column) -> str:
    facts = ColumnFacts(table.rsplit(".", 1)[-1], column.name, column.type_sql, column.comment)
    findings = classify(facts, [])
    return findings[0].kind if findings else ""


def _luhn_complete(prefix: str) -> str:
    total = 0
    for index, char in enumerate(reversed(prefix + "0")):
        digit = int(char)
        if index % 2 == 1:
            digit = digit * 2 - 9 if digit > 4 else digit * 2
        total += digit
    return prefix + str((10 - total % 10) % 10)


def _iban(rng: random.Random) -> str:
    bban = "".join(rng.choice(string.digits) for _ in range(18))
    number = int("".join(str(int(char, 36)) for char in bban + "DE00"))
    return f"DE{98 - number % 97:02d}{bban}"


def plausible_text(kind: str, rng: random.Random) -> str:
    """A fake value of a column's classification (discover's detectors, by name)."""
    first, last = rng.choice(_FIRST), rng.choice(_LAST)
    if kind == "email":
        return f"{first.lower()}.{last.lower()}{rng.randint(10, 99)}@example.net"
    if kind == "person_name":
        return f"{first} {last}"
    if kind == "phone":
        return f"+1 555 01{rng.randint(10, 99)}"
    if kind == "postal_address":
        return f"{rng.randint(2, 220)} {rng.choice(_STREETS)}, {rng.choice(_CITIES)}"
    if kind == "postal_code":
        return f"{rng.randint(10000, 99999)}"
    if kind == "payment_card":
        return _luhn_complete("4" + "".join(rng.choice(string.digits) for _ in range(14)))
    if kind == "iban":
        return _iban(rng)
    if kind == "us_ssn":
        return f"{rng.randint(100, 665):03d}-{rng.randint(10, 99):02d}-{rng.randint(1000, 9999):04d}"
    if kind == "ip_address":
        return f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
    if kind == "gender":
        return rng.choice(("female", "male"))
    if kind == "secret":
        return "$2b$12$" + "".join(rng.choice(string.ascii_letters + string.digits + "./") for _ in range(53))
    if kind == "free_text":
        return f"{rng.choice(_WORDS).capitalize()} requested by {first} {last}"
    return f"{rng.choice(_WORDS)} {rng.randint(100, 999)}"


def marker_value(kind: str, max_length: int | None) -> str:
    """An unguessable value (64 random bits) that still looks like the column's data."""
    token = secrets.token_hex(MARKER_RANDOM_HEX // 2)
    if kind == "email":
        value = f"{secrets.choice(_FIRST).lower()}.{token}@example.net"
    elif kind in ("person_name", "postal_address"):
        value = f"{secrets.choice(_FIRST)} {secrets.choice(_LAST)}-{token}"
    elif kind in ("", "free_text"):
        value = f"{secrets.choice(_PHRASES)} (ref {token})"
    else:
        value = f"REF-{token.upper()}"
    if max_length is not None and len(value) > max_length:
        value = f"R{token}"
        if len(value) > max_length:
            raise PlantError(f"a marker needs {len(value)} characters and the column holds {max_length}; "
                             "choose a wider text column with --column")
    return value


def _fake(column: Column, kind: str, rng: random.Random, index: int, next_ids: dict[str, int]) -> Any:
    """A plausible value for a column that is not the marker column (None: NULL)."""
    type_sql = column.type_sql
    if type_sql in _INTEGERS or (type_sql.startswith("numeric") and column.unique):
        if column.unique:
            return next_ids[column.name] + index
        return rng.randint(1, 500)
    if type_sql.startswith(("numeric", "double precision", "real", "money")):
        return round(rng.uniform(10, 1000), 2)
    if type_sql == "boolean":
        return False
    if type_sql == "uuid":
        return uuid.uuid4()
    if type_sql.startswith(("date", "timestamp")):
        years = (20, 70) if kind == "date_of_birth" else (0, 3)
        day = datetime.date.today() - datetime.timedelta(days=rng.randint(years[0] * 365, years[1] * 365 + 1))
        if type_sql == "date":
            return day
        moment = datetime.datetime.combine(day, datetime.time(rng.randint(8, 18), rng.randint(0, 59)))
        return moment.replace(tzinfo=datetime.UTC) if "with time zone" in type_sql else moment
    if type_sql.startswith(("json", "jsonb")):
        return "{}"
    if type_sql == "bytea":
        return secrets.token_bytes(16)
    if type_sql.startswith(TEXT_TYPES):
        value = plausible_text(kind, rng)
        if column.unique:
            value = f"{value} {secrets.token_hex(3)}"
        if column.max_length is not None:
            value = value[: column.max_length]
        return value
    return None


async def plant(dsn: str, dataset: str, count: int, column_name: str | None = None) -> Planted:
    """Insert `count` fake rows into `dataset` (schema.table) in one transaction; each gets a
    distinct marker in the marker column (`column_name`, else the first text column that discover
    does not classify as sensitive, else the first text column)."""
    conn = await asyncpg.connect(dsn)
    try:
        try:
            named = await conn.fetchrow(
                "SELECT format('%I.%I', n.nspname, c.relname) AS quoted, "
                "n.nspname || '.' || c.relname AS plain FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1::regclass",
                dataset)
        except asyncpg.PostgresError as exc:
            raise PlantError(f"{dataset}: {exc}") from None
        assert named is not None
        table, plain_name = str(named["quoted"]), str(named["plain"])
        rows = await conn.fetch(_COLUMNS, dataset)
        columns = [Column(r["attname"], r["type_sql"], r["attnotnull"], r["has_default"], r["max_length"],
                          r["is_unique"], _reference(r["ref"]),
                          r["comment"]) for r in rows]
        kinds = {column.name: _kind(plain_name, column) for column in columns}
        texts = [c for c in columns if c.type_sql.startswith(TEXT_TYPES) and not c.has_default
                 and c.references is None]
        if column_name is not None:
            chosen = [c for c in columns if c.name == column_name]
            if not chosen:
                raise PlantError(f"{table} has no column {column_name}")
            if not chosen[0].type_sql.startswith(TEXT_TYPES):
                raise PlantError(f"{table}.{column_name} is {chosen[0].type_sql}: "
                                 "a marker goes in a text column")
            marker_column = chosen[0]
        else:
            plain = [c for c in texts if kinds[c.name] in ("", "free_text", "gender")]
            if not texts:
                raise PlantError(f"{table} has no text column to hold a marker (name one with --column)")
            marker_column = (plain or texts)[0]
        next_ids: dict[str, int] = {}
        for column in columns:
            if column.unique and column.type_sql in _INTEGERS and not column.has_default:
                quoted = '"' + column.name.replace('"', '""') + '"'
                next_ids[column.name] = int(await conn.fetchval(
                    f"SELECT coalesce(max({quoted}), 0) + 1 FROM {table}"))
        references: dict[str, Any] = {}
        for column in columns:
            if column.references is not None and column.name != marker_column.name:
                ref_table, ref_column = column.references
                quoted = '"' + ref_column.replace('"', '""') + '"'
                references[column.name] = await conn.fetchval(
                    f"SELECT {quoted} FROM {ref_table} ORDER BY random() LIMIT 1")
        # Numbers, dates and flags come from randomly chosen existing rows (they satisfy the table's
        # CHECK constraints and look like the rest); text is always made up, so no real name or
        # address is copied into a fake row. Dates of birth are made up too.
        borrowed = [c for c in columns if c.name != marker_column.name and c.references is None
                    and not c.unique and not c.has_default and not c.type_sql.startswith(TEXT_TYPES)
                    and kinds[c.name] != "date_of_birth"]
        samples: list[Any] = []
        if borrowed:
            names_sql = ", ".join('"' + c.name.replace('"', '""') + '"' for c in borrowed)
            samples = list(await conn.fetch(f"SELECT {names_sql} FROM {table} ORDER BY random() LIMIT $1",
                                            count))
        rng = random.Random(secrets.randbits(64))
        markers: list[str] = []
        inserted = [c for c in columns if not c.has_default or c.name == marker_column.name]
        names = ", ".join('"' + c.name.replace('"', '""') + '"' for c in inserted)
        placeholders = ", ".join(f"${i + 1}" for i in range(len(inserted)))
        statement = f"INSERT INTO {table} ({names}) VALUES ({placeholders})"
        async with conn.transaction():
            for index in range(count):
                marker = marker_value(kinds[marker_column.name], marker_column.max_length)
                markers.append(marker)
                values = []
                for column in inserted:
                    if column.name == marker_column.name:
                        values.append(marker)
                    elif column.name in references:
                        values.append(references[column.name])
                    elif samples and column in borrowed:
                        values.append(samples[index % len(samples)][column.name])
                    else:
                        values.append(_fake(column, kinds[column.name], rng, index, next_ids))
                try:
                    await conn.execute(statement, *values)
                except asyncpg.PostgresError as exc:
                    raise PlantError(f"cannot insert a fake row into {table}: {exc}") from None
        return Planted(plain_name, marker_column.name, markers)
    finally:
        await conn.close()


def policy_snippet(planted: Planted, action: str, prefix: str) -> str:
    """The `honeytokens:` entries for the planted rows (YAML, ready to paste)."""
    lines = [f"# pgveil honeytokens plant: {len(planted.markers)} fake row(s) in {planted.table}, markers "
             f"in column {planted.column}.", "# The values are printed only now: keep them as secret as "
             "the data (or move each to an environment variable with value_env).", "honeytokens:"]
    for index, marker in enumerate(planted.markers, 1):
        lines += [f"  - name: {prefix}-{index}", f"    table: {planted.table}",
                  f"    column: {planted.column}", f'    value: "{marker}"', f"    action: {action}"]
    return "\n".join(lines) + "\n"
