"""`pgveil elevate`: the elevation workflow (request, approve, deny, revoke, list) and file grants."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from proxy.elevation import GRANT_KEY_ENV

DESCRIPTION = """\
The elevation workflow (docs/operations.md#privileged-elevation), as the PostgreSQL login you connect
with: through a pgveil replica (--dsn; the same as sending PGVEIL ELEVATE ... in psql, audited by
the replica) or directly on the state store (--state-dsn with --policy, for operators whose login
may write the store; recorded in the store's history).

  pgveil elevate request ROLE --for DURATION --reason WHY
  pgveil elevate approve ID [--reason WHY]
  pgveil elevate deny ID [--reason WHY]
  pgveil elevate revoke ID [--reason WHY]
  pgveil elevate list

Without an action: the single-replica file form. A grant is signed and appended to the grants
file the proxy watches; the proxy audits the grant, its first use and its expiry."""
EPILOG = f"""examples:
  pgveil elevate request production_support --for 30m --reason "INC-1234 refund stuck" \\
      --dsn postgresql://sven_engineer@pgveil:6432/reviews
  pgveil elevate approve 17 --dsn postgresql://sam_security@pgveil:6432/reviews
  pgveil elevate list --state-dsn postgresql://pgveil_state@db/app --policy policies/reviews.yaml

  export {GRANT_KEY_ENV}=...   # file form: the same secret the proxy is started with
  pgveil elevate --user sven_engineer --role production_support --for 30m \\
      --reason "INC-1234 refund stuck" --approver sam_security \\
      --policy policies/reviews.yaml --grants /var/lib/pgveil/grants.jsonl

exit status: 0 when done, 1 when the policy or the request's state does not allow it (or the store
cannot be reached), 2 on a usage problem."""

ACTIONS = ("request", "approve", "deny", "revoke", "list")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", nargs="?", choices=ACTIONS, help="workflow step (omit for the file form)")
    parser.add_argument("target", nargs="?", metavar="ROLE|ID", help="the role (request) or request id")
    parser.add_argument("--dsn", help="a pgveil replica to send the step through, as your own login")
    parser.add_argument("--state-dsn", metavar="DSN",
                        help="the state store itself (with --policy); password from PGVEIL_STATE_PASSWORD")
    parser.add_argument("--schema", default="pgveil_state", help="state schema (with --state-dsn)")
    parser.add_argument("--user", help="file form: PostgreSQL login to elevate")
    parser.add_argument("--role", help="file form: policy role to assume")
    parser.add_argument("--for", dest="duration", metavar="DURATION",
                        help="how long, e.g. 30m, 1h, 1h30m (at most the policy's max_duration)")
    parser.add_argument("--reason", help="why (recorded with the step and in the audit log)")
    parser.add_argument("--approver", help="file form: who approved it (required when the policy says so)")
    parser.add_argument("--policy", metavar="FILE", help="policy file the proxy runs")
    parser.add_argument("--grants", metavar="FILE", help="file form: grants file the proxy watches")
    parser.add_argument("--key-env", default=GRANT_KEY_ENV, metavar="NAME",
                        help="file form: environment variable with the grant signing key "
                             f"(default {GRANT_KEY_ENV})")


def run(args: argparse.Namespace) -> int:
    if args.action is None:
        return _file_grant(args)
    return _workflow(args)


def _file_grant(args: argparse.Namespace) -> int:
    from proxy.elevation import GrantError, append_grant, create_grant, iso, parse_duration
    from proxy.policy.loader import PolicyError, load_policy

    given = (("--user", args.user), ("--role", args.role), ("--for", args.duration),
             ("--reason", args.reason), ("--policy", args.policy), ("--grants", args.grants))
    missing = [flag for flag, value in given if not value]
    if missing:
        print(f"pgveil elevate: the file form needs {', '.join(missing)} (or give an action: "
              f"{' | '.join(ACTIONS)})", file=sys.stderr)
        return 2
    key = os.environ.get(args.key_env)
    if not key:
        print(f"pgveil elevate: set {args.key_env} to the grant key the proxy uses", file=sys.stderr)
        return 2
    try:
        policy = load_policy(args.policy, require_hash_key=False)
    except (PolicyError, OSError) as exc:
        print(f"pgveil elevate: {exc}", file=sys.stderr)
        return 2
    try:
        seconds = parse_duration(args.duration)
        grant = create_grant(policy, args.user, args.role, seconds, args.reason, args.approver)
        append_grant(args.grants, grant, key.encode())
    except GrantError as exc:
        print(f"pgveil elevate: refused: {exc}", file=sys.stderr)
        return 1
    print(f"granted {grant.id}: {grant.user} acts as {grant.role} until {iso(grant.expires_at)}")
    return 0


def _statement(args: argparse.Namespace) -> str | None:
    """The PGVEIL ELEVATE statement of the action, or None (after printing the usage problem)."""
    from proxy.elevation_statements import is_pgveil_statement, parse_statement

    def quoted(text: str) -> str:
        return "'" + text.replace("'", "''") + "'"

    reason = f" REASON {quoted(args.reason)}" if args.reason is not None else ""
    if args.action == "list":
        statement = "PGVEIL ELEVATE LIST"
    elif args.action == "request":
        if not args.target or not args.duration or args.reason is None:
            print("pgveil elevate request: give ROLE, --for DURATION and --reason WHY", file=sys.stderr)
            return None
        role = '"' + args.target.replace('"', '""') + '"'
        statement = f"PGVEIL ELEVATE REQUEST {role} FOR {quoted(args.duration)}{reason}"
    else:
        if not args.target or not args.target.isdigit():
            print(f"pgveil elevate {args.action}: give the request's number (pgveil elevate list)",
                  file=sys.stderr)
            return None
        statement = f"PGVEIL ELEVATE {args.action.upper()} {int(args.target)}{reason}"
    assert is_pgveil_statement(statement)
    parse_statement(statement)  # our own text: a mistake here is a bug
    return statement


def _workflow(args: argparse.Namespace) -> int:
    if bool(args.dsn) == bool(args.state_dsn):
        print("pgveil elevate: give --dsn (a pgveil replica) or --state-dsn with --policy (the store)",
              file=sys.stderr)
        return 2
    statement = _statement(args)
    if statement is None:
        return 2
    if args.dsn:
        return _through_pgveil(args.dsn, statement)
    if not args.policy:
        print("pgveil elevate: --state-dsn needs --policy (the policy the replicas run)", file=sys.stderr)
        return 2
    import asyncio

    return asyncio.run(_on_store(args, statement))


def _print_table(columns: list[str], rows: list[tuple[Any, ...]]) -> None:
    cells = [columns] + [["" if value is None else str(value) for value in row] for row in rows]
    widths = [max(len(line[index]) for line in cells) for index in range(len(columns))]
    for number, line in enumerate(cells):
        print(" | ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())
        if number == 0:
            print("-+-".join("-" * width for width in widths))


def _through_pgveil(dsn: str, statement: str) -> int:
    import psycopg

    try:
        with psycopg.connect(dsn, autocommit=True) as connection:
            cursor = connection.execute(statement.encode(), prepare=False)
            columns = [column.name for column in cursor.description or []]
            rows = cursor.fetchall()
    except psycopg.errors.InsufficientPrivilege as exc:
        print(f"pgveil elevate: refused: {exc}".rstrip(), file=sys.stderr)
        return 1
    except psycopg.Error as exc:
        print(f"pgveil elevate: {exc}".rstrip(), file=sys.stderr)
        return 1 if isinstance(exc, psycopg.errors.SyntaxError) else 2
    _print_table(columns, rows)
    return 0


async def _on_store(args: argparse.Namespace, statement: str) -> int:
    import asyncpg

    from proxy.elevation_statements import parse_statement
    from proxy.policy.loader import PolicyError, load_policy
    from proxy.state import StateError, StateStore, StateUnavailable
    from proxy.state.elevations import ElevationWorkflow, WorkflowRefused

    try:
        policy = load_policy(args.policy, require_hash_key=False)
    except (PolicyError, OSError) as exc:
        print(f"pgveil elevate: {exc}", file=sys.stderr)
        return 2
    try:
        store = StateStore(args.state_dsn, args.schema)
        await store.open(watch=False)
    except StateError as exc:
        print(f"pgveil elevate: {exc}", file=sys.stderr)
        return 1
    try:
        row = await store.fetchrow("SELECT session_user")
        actor = str(row[0]) if row is not None else ""
        workflow = ElevationWorkflow(store, lambda: policy)
        answer = await workflow.run(actor, parse_statement(statement), via="cli")
    except WorkflowRefused as exc:
        print(f"pgveil elevate: refused: {exc}", file=sys.stderr)
        return 1
    except (StateUnavailable, asyncpg.PostgresError) as exc:
        print(f"pgveil elevate: {exc}", file=sys.stderr)
        return 1
    finally:
        await store.close()
    _print_table([name for name, _ in answer.columns], list(answer.rows))
    print(answer.summary)
    return 0
