"""`pgveil audit verify PATH`: check an audit log's integrity chain."""

from __future__ import annotations

import argparse
import os
import sys

DESCRIPTION = ("Audit log tools. `verify` checks the hash chain of a JSON-lines audit log; `report` "
               "summarises who read what over a window.")
EPILOG = """examples:
  pgveil audit verify /var/log/pgveil/audit.jsonl      # the file and its rotations (.1, .2, ...)
  pgveil audit verify /var/log/pgveil/                 # every *.jsonl log in a directory
  PGVEIL_AUDIT_KEY=... pgveil audit verify --key-env PGVEIL_AUDIT_KEY audit.jsonl
  pgveil audit verify postgresql://auditor@audit-db/audit --table pgveil_audit   # the table sink

  pgveil audit report /var/log/pgveil/audit.jsonl --window 7d --policy policy.yaml
  pgveil audit report /var/log/pgveil/ --since 2026-12-01 --until 2026-12-08 --format json
  pgveil audit report postgresql://auditor@audit-db/audit --table pgveil_audit --window 24h

exit status (verify): 0 when the chain is intact, 1 with one "file:line: what is wrong" per problem.
exit status (report): 0, 1 when a source cannot be read, 2 for a malformed window."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    verify = actions.add_parser("verify", help="check the integrity chain of an audit log")
    verify.add_argument("path", metavar="PATH",
                        help="audit log file (its rotations are included), directory, or the "
                             "postgresql:// DSN of a table sink")
    verify.add_argument("--table", default="pgveil_audit",
                        help="table of a PostgreSQL sink (default %(default)s)")
    verify.add_argument("--key-env", metavar="NAME",
                        help="environment variable holding the HMAC key the log was written with")
    from proxy.commands.audit_report import REPORT_HELP, add_report_arguments

    report = actions.add_parser("report", help="who read what over a window (text or JSON)",
                                description=REPORT_HELP)
    add_report_arguments(report)


def run(args: argparse.Namespace) -> int:
    if args.action == "report":
        from proxy.commands.audit_report import run_report

        return run_report(args)
    from proxy.audit.verify import verify

    key = None
    if args.key_env:
        value = os.environ.get(args.key_env)
        if not value:
            print(f"pgveil audit verify: environment variable {args.key_env} is not set", file=sys.stderr)
            return 2
        key = value.encode()
    if args.path.startswith(("postgresql://", "postgres://")):
        import asyncio

        from proxy.audit.postgres import verify_table

        problems = asyncio.run(verify_table(args.path, args.table, key=key))
        name = args.table  # never echo a DSN: it may hold a password
    else:
        problems = verify(args.path, key=key)
        name = args.path
    for problem in problems:
        print(problem)
    if not problems:
        print(f"{name}: audit chain intact")
    return 1 if problems else 0
