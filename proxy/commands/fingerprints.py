"""`pgveil fingerprints list | approve ID | revoke ID`: review the query fingerprint allow-lists."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.firewall.fingerprints import FingerprintStore

DESCRIPTION = """Review the statement shapes (pglast fingerprints) that roles with `fingerprints: learn`
recorded, and those refused as `pending` under `fingerprints: enforce`. An approved fingerprint is
allowed; a revoked one is refused even in learn mode. The store is the file beside the policy
(--policy, or --file) or, for a fleet of replicas, a PostgreSQL table (--dsn, --table) or the
fingerprints table of pgveil's state store (--state-dsn)."""
EPILOG = """examples:
  pgveil fingerprints list --policy policies/reviews.yaml      # reads policies/reviews.fingerprints.json
  pgveil fingerprints list --policy policies/reviews.yaml --status pending --role app
  pgveil fingerprints approve 28550ea0fc43bed7 --policy policies/reviews.yaml
  pgveil fingerprints revoke 28550ea0fc43bed7 --role app --dsn postgresql://pgveil@db/pgveil
  pgveil fingerprints list --json --dsn postgresql://pgveil@db/pgveil --table public.pgveil_fingerprints

exit status: 0 on success, 1 when approve/revoke matched no fingerprint, 2 on a usage error."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="show recorded fingerprints")
    listing.add_argument("--status", choices=("approved", "pending", "revoked"), help="only this status")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    approve = actions.add_parser("approve", help="allow a fingerprint")
    revoke = actions.add_parser("revoke", help="refuse a fingerprint, even in learn mode")
    for action in (approve, revoke):
        action.add_argument("fingerprint", metavar="ID", help="the fingerprint (hex) as `list` shows it")
    for action in (listing, approve, revoke):
        action.add_argument("--role", help="only this role's entry (default: every role's)")
        where = action.add_mutually_exclusive_group(required=True)
        where.add_argument("--policy", metavar="FILE",
                           help="the store is the .fingerprints.json file beside this policy")
        where.add_argument("--file", metavar="PATH", help="the store is this JSON file")
        where.add_argument("--dsn", metavar="DSN", help="the store is a table in this PostgreSQL database")
        where.add_argument("--state-dsn", metavar="DSN",
                           help="the store is pgveil's state store (serve's `state: {fingerprints: true}`); "
                                "password from PGVEIL_STATE_PASSWORD")
        action.add_argument("--schema", default="pgveil_state", help="state schema (with --state-dsn)")
        action.add_argument("--table", default="public.pgveil_fingerprints",
                            help="table of a PostgreSQL store (default %(default)s)")


def run(args: argparse.Namespace) -> int:
    import asyncio

    return asyncio.run(_run(args))


async def _run(args: argparse.Namespace) -> int:
    from proxy.firewall.fingerprints import FileFingerprintStore, PostgresFingerprintStore, default_store_path

    store: FingerprintStore
    if args.state_dsn:
        from proxy.state import StateError, StateStore
        from proxy.state.fingerprints import StateFingerprintStore

        state = StateStore(args.state_dsn, args.schema)
        try:
            await state.open(watch=False)
        except StateError as exc:
            print(f"pgveil fingerprints: {exc}", file=sys.stderr)
            return 2
        try:
            return await _act(args, StateFingerprintStore(state))
        finally:
            await state.close()
    if args.dsn:
        store = PostgresFingerprintStore(args.dsn, args.table)
    else:
        store = FileFingerprintStore(args.file or default_store_path(args.policy))
    return await _act(args, store)


async def _act(args: argparse.Namespace, store: FingerprintStore) -> int:
    from proxy.firewall.fingerprints import Status

    if args.action == "list":
        entries = [entry for entry in await store.load()
                   if args.role in (None, entry.role) and args.status in (None, entry.status)]
        if args.json:
            print(json.dumps([asdict(entry) for entry in entries], indent=1))
            return 0
        print(f"{'ID':<18} {'ROLE':<16} {'STATUS':<9} {'FIRST SEEN':<26} EXAMPLE")
        for entry in entries:
            example = " ".join(entry.example.split())
            print(f"{entry.fingerprint:<18} {entry.role:<16} {entry.status:<9} {entry.first_seen:<26} "
                  f"{example}")
        return 0
    status: Status = "approved" if args.action == "approve" else "revoked"
    changed = await store.set_status(args.fingerprint, status, args.role)
    known = [entry for entry in await store.load()
             if entry.fingerprint == args.fingerprint and args.role in (None, entry.role)]
    if not known:
        print(f"pgveil fingerprints: no fingerprint {args.fingerprint}"
              + (f" for role {args.role}" if args.role else ""), file=sys.stderr)
        return 1
    print(f"{args.fingerprint}: {status} for {', '.join(sorted(entry.role for entry in known))}"
          + ("" if changed else " (no change)"))
    return 0

