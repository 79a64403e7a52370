"""`pgveil catalog`: print the policy's dataset registry (metadata, sensitivity, protection) as JSON."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Any

from proxy.policy.model import (
    ColumnPolicy,
    Constant,
    Dataset,
    Email,
    Generalize,
    Hash,
    Partial,
    Policy,
    Protection,
    Redact,
)

DESCRIPTION = """\
Print the dataset registry of a policy as JSON: for each dataset its name, registration time,
who registered it, description, version and originating source, and for each column its name,
description, mode, type, originating source, sensitivity and protection (what a role that may
not see the column unmasked gets instead), plus whether it is a quasi-identifier and joinable.

Column types come from the live schema when --upstream is given (and mode becomes REQUIRED for
NOT NULL columns); without it "type" is null. Columns that exist upstream but are not listed in
the policy are included with the defaults that apply to them (internal, redacted when masked).

With --access-from (an audit log file, a directory of logs, or the postgresql:// DSN of a table
sink) every dataset and column also gets "access": when it was last read, how many statements
read it and how many rows those returned, by role and by login (for columns also how many read it
unmasked), within --since/--until/--window (default: the whole trail). The audit chain is not
checked (pgveil audit verify does that)."""

EPILOG = """\
examples:
  pgveil catalog --policy policies/reviews.yaml
  pgveil catalog --policy policies/reviews.yaml --upstream postgresql://postgres@127.0.0.1:5432/reviews
  pgveil catalog --policy policies/reviews.yaml | jq '.[] | select(.name == "public.users")'
  pgveil catalog --policy policies/reviews.yaml --access-from /var/log/pgveil/audit.jsonl --window 30d"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", required=True, metavar="FILE", help="policy file (format v1)")
    parser.add_argument("--upstream", metavar="DSN",
                        help="PostgreSQL to read column types and NOT NULL from (optional)")
    from proxy.commands.audit_report import add_window_arguments

    parser.add_argument("--access-from", metavar="SOURCE", action="append",
                        help="audit log file, directory of logs or postgresql:// DSN of a table sink: "
                             "add who read each dataset and column (repeatable)")
    parser.add_argument("--access-table", default="pgveil_audit", metavar="TABLE",
                        help="table of a PostgreSQL audit sink (default %(default)s)")
    add_window_arguments(parser)


@dataclass(frozen=True, slots=True)
class LiveColumn:
    """A column as the upstream catalog describes it."""

    name: str
    type_sql: str
    not_null: bool


def run(args: argparse.Namespace) -> int:
    from proxy.policy.loader import PolicyError, load_policy

    try:
        policy = load_policy(args.policy, require_hash_key=False)  # the catalog never hashes
    except PolicyError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return 1
    live: dict[str, list[LiveColumn]] | None = None
    if args.upstream:
        import asyncio

        import asyncpg

        try:
            live = asyncio.run(read_live_columns(args.upstream, list(policy.datasets)))
        except (OSError, ValueError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            print(f"pgveil catalog: cannot read the schema from the upstream: {exc}", file=sys.stderr)
            return 1
    entries = registry(policy, live)
    if args.access_from:
        failed = add_access(entries, args)
        if failed:
            return failed
    elif args.since or args.until or args.window:
        print("pgveil catalog: --since, --until and --window need --access-from", file=sys.stderr)
        return 2
    json.dump(entries, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def add_access(entries: list[dict[str, Any]], args: argparse.Namespace) -> int:
    """Give each dataset and column entry its `access` from the audit trail; 0, or the exit status."""
    from proxy.audit.access import usage_json
    from proxy.commands.audit_report import NOT_CHECKED, read_summary, window_of

    try:
        window = window_of(args)
    except ValueError as exc:
        print(f"pgveil catalog: {exc}", file=sys.stderr)
        return 2
    try:
        summary, sources = read_summary(args.access_from, args.access_table, window)
    except (OSError, ValueError) as exc:
        print(f"pgveil catalog: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # asyncpg's errors: the table sink could not be read
        if type(exc).__module__.startswith("asyncpg"):
            print(f"pgveil catalog: cannot read audit table {args.access_table}: {exc}", file=sys.stderr)
            return 1
        raise
    for entry in entries:
        entry["access"] = usage_json(summary.datasets.get(entry["name"]))
        for column in entry["schema"]:
            column["access"] = usage_json(summary.columns.get(f"{entry['name']}.{column['name']}"),
                                          columns=True)
    read = ", ".join(f"{source.name} ({source.lines:,} lines)" for source in sources)
    print(f"pgveil catalog: access from {read}, window {window.text()}; {NOT_CHECKED}", file=sys.stderr)
    listed = {entry["name"] for entry in entries}
    unlisted = sorted(name for name, usage in summary.datasets.items()
                      if name not in listed and usage.total.statements)
    if unlisted:
        shown = ", ".join(unlisted[:10]) + (f" and {len(unlisted) - 10} more" if len(unlisted) > 10 else "")
        print(f"pgveil catalog: read in the window but not in the registry: {shown}", file=sys.stderr)
    return 0


def registry(policy: Policy, live: dict[str, list[LiveColumn]] | None = None) -> list[dict[str, Any]]:
    """The registry in the article's shape, one entry per dataset in policy order."""
    return [_dataset_entry(dataset, None if live is None else live.get(name, []))
            for name, dataset in policy.datasets.items()]


def _dataset_entry(dataset: Dataset, live: list[LiveColumn] | None) -> dict[str, Any]:
    columns: list[dict[str, Any]] = []
    if live:
        live_names = {column.name for column in live}
        columns = [_column_entry(column.name, dataset.column(column.name), column) for column in live]
        columns.extend(_column_entry(name, policy, None)
                       for name, policy in dataset.columns.items() if name not in live_names)
    else:
        columns = [_column_entry(name, policy, None) for name, policy in dataset.columns.items()]
    return {
        "name": dataset.name,
        "registrationTime": dataset.registered_at,
        "registeredBy": dataset.registered_by,
        "description": dataset.description,
        "version": dataset.version,
        "originatingSource": dataset.originating_source,
        "schema": columns,
    }


def _column_entry(name: str, column: ColumnPolicy, live: LiveColumn | None) -> dict[str, Any]:
    return {
        "name": name,
        "description": column.description,
        "mode": "REQUIRED" if live is not None and live.not_null else column.mode,
        "type": live.type_sql if live is not None else None,
        "originatingSource": column.originating_source,
        "sensitivity": column.sensitivity.name.lower(),
        "protection": describe_protection(column.effective_protection),
        "quasiIdentifier": column.quasi_identifier,
        "joinable": column.joinable,
    }


def describe_protection(protection: Protection) -> str:
    """One readable string per protection, e.g. `partial(keep_first=1, keep_last=0, mask_char='*')`."""
    match protection:
        case Partial(keep_first, keep_last, mask_char):
            return f"partial(keep_first={keep_first}, keep_last={keep_last}, mask_char={mask_char!r})"
        case Email():
            return "email"
        case Hash():
            return "hash"
        case Generalize(unit=unit, bucket=bucket) if unit is not None:
            return f"generalize({unit})"
        case Generalize(bucket=bucket):
            size = int(bucket) if bucket is not None and float(bucket).is_integer() else bucket
            return f"generalize(bucket={size})"
        case Redact():
            return "redact"
        case Constant(value):
            return f"constant({value!r})"
    raise AssertionError(f"unknown protection {protection!r}")


async def read_live_columns(dsn: str, dataset_names: list[str]) -> dict[str, list[LiveColumn]]:
    """Columns (attnum order) with their SQL type and NOT NULL flag, for each listed relation."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            """
            SELECT n.nspname || '.' || c.relname AS relation, a.attname,
                   format_type(a.atttypid, a.atttypmod) AS type_sql, a.attnotnull
            FROM pg_catalog.pg_attribute AS a
            JOIN pg_catalog.pg_class AS c ON c.oid = a.attrelid
            JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace
            WHERE a.attnum > 0 AND NOT a.attisdropped
              AND n.nspname || '.' || c.relname = ANY($1::text[])
            ORDER BY relation, a.attnum
            """,
            dataset_names,
        )
    finally:
        await conn.close()
    live: dict[str, list[LiveColumn]] = {}
    for row in rows:
        live.setdefault(row["relation"], []).append(
            LiveColumn(row["attname"], row["type_sql"], row["attnotnull"]))
    return live
