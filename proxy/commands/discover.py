"""`pgveil discover`: find sensitive columns from names and sampled values; draft or gate a policy."""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = """\
Find the columns that hold sensitive data. Reads the catalog (names, types, comments, foreign
keys) and a bounded random sample of each table (TABLESAMPLE BERNOULLI, at most --sample rows,
one table at a time, in a read-only transaction with a statement_timeout), and runs detectors
that combine a column's name and its values: e-mail, phone, payment cards (Luhn), IBAN (mod 97),
US SSN, UK National Insurance numbers and Dutch BSNs, IP addresses, dates of birth, person
names, postal addresses and codes, free-text notes, secrets (password hashes, API keys, JWTs),
gender and age (quasi-identifiers).

Each finding has a confidence and its evidence as counts ("812 of 1,000 sampled values are
valid card numbers (Luhn)"). No sampled value is ever printed, logged or kept.

Without --policy it prints a draft `datasets:` section (policy format v1) to review and paste.
With --policy it prints only the columns the policy leaves unclassified or under-classified.

Exit status: 0 nothing at or above --fail-at was reported; 1 something was (with --policy the
default --fail-at is confidential; without --policy only an explicit --fail-at fails); 2 the
command could not run (bad policy, cannot connect)."""

EPILOG = """\
examples:
  pgveil discover --upstream postgresql://postgres@127.0.0.1:5432/reviews > draft.yaml
  pgveil discover --upstream $DSN --schema public --sample 500 --format json
  pgveil discover --upstream $DSN --policy policies/reviews.yaml --fail-at confidential   # CI gate"""

LEVELS = ("public", "internal", "confidential", "restricted")


def _positive_sample(text: str) -> int:
    value = int(text)
    if value < 0 or value > 1_000_000:
        raise argparse.ArgumentTypeError("must be between 0 and 1000000")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--upstream", required=True, metavar="DSN",
                        help="PostgreSQL to scan (its user needs SELECT on what it should sample)")
    parser.add_argument("--schema", action="append", metavar="S", default=None,
                        help="only this schema (repeatable; default: every non-system schema)")
    parser.add_argument("--sample", type=_positive_sample, default=1000, metavar="N",
                        help="at most N sampled rows per table (default 1000; 0: names only)")
    parser.add_argument("--policy", metavar="FILE",
                        help="report only what this policy leaves unclassified or under-classified")
    parser.add_argument("--format", choices=("yaml", "json"), default="yaml",
                        help="output format (default yaml)")
    parser.add_argument("--fail-at", choices=LEVELS, default=None, metavar="SENSITIVITY",
                        help="exit 1 when a reported column is at or above this sensitivity "
                             "(public, internal, confidential, restricted; default with --policy: "
                             "confidential)")
    parser.add_argument("--statement-timeout", type=int, default=10_000, metavar="MS",
                        help="statement_timeout of each sampling query in milliseconds (default 10000)")


def run(args: argparse.Namespace) -> int:
    import asyncio

    import asyncpg

    from proxy.discovery.report import at_or_above, to_json, to_yaml
    from proxy.discovery.sample import discover
    from proxy.policy.loader import PolicyError, load_policy
    from proxy.policy.model import Policy, Sensitivity

    policy: Policy | None = None
    if args.policy:
        try:
            policy = load_policy(args.policy, require_hash_key=False)
        except PolicyError as exc:
            for line in exc.errors:
                print(line, file=sys.stderr)
            return 2
    try:
        tables = asyncio.run(discover(args.upstream, args.schema, args.sample,
                                      max(1, args.statement_timeout)))
    except asyncpg.PostgresError as exc:
        print(f"pgveil discover: cannot read the upstream (SQLSTATE {exc.sqlstate}, "
              f"{type(exc).__name__})", file=sys.stderr)
        return 2
    except (OSError, ValueError, asyncpg.InterfaceError) as exc:
        print(f"pgveil discover: cannot connect to the upstream: {exc}", file=sys.stderr)
        return 2
    fail_at = args.fail_at or ("confidential" if policy is not None else None)
    columns = sum(len(t.columns) for t in tables)
    classified = sum(1 for t in tables for c in t.columns if c.findings)
    header = [
        f"pgveil discover: {len(tables)} tables, {columns} columns, at most {args.sample:,} sampled "
        f"rows per table; {classified} columns look sensitive",
        "Review before use: every entry is a suggestion; evidence is counts, never values.",
    ]
    if policy is not None:
        header.append(f"Only what {args.policy} leaves unclassified or under-classified is listed.")
    output = (to_json if args.format == "json" else to_yaml)(tables, policy, header)
    sys.stdout.write(output)
    for table in tables:
        if table.problem:
            print(f"pgveil discover: {table.qualified_name}: {table.problem}", file=sys.stderr)
    if fail_at is None:
        return 0
    failing = at_or_above(tables, policy, Sensitivity[fail_at.upper()])
    if failing:
        print(f"pgveil discover: {failing} column(s) at or above {fail_at} "
              f"{'not covered by the policy' if policy is not None else 'found'}", file=sys.stderr)
        return 1
    return 0
