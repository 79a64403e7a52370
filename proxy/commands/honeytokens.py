"""`pgveil honeytokens`: plant fake rows with unguessable markers; list and clear honeytoken lockouts."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import sys

DESCRIPTION = """\
Honeytokens are rows no legitimate query reads (docs/dlp.md). pgveil searches everything
PostgreSQL sends a client (results in text or binary format, COPY output, errors, notices) for
their marker values; a hit is an audit record, a metric and an error-level log line, and with
action terminate the session ends before the row reaches the client and the login is locked out.

  plant     insert --count plausible fake rows into --dataset (values that fit each column's type
            and the classification `pgveil discover` gives it by name; foreign keys point at
            existing rows), each with an unguessable marker (64 random bits) in one text column;
            print the policy snippet with the markers, once.
  lockouts  list the logins locked out now.
  clear     end the lockout of LOGIN now."""

EPILOG = """\
examples:
  pgveil honeytokens plant --upstream $DSN --dataset public.customers --count 3 \\
      --action terminate >> policy.yaml
  pgveil honeytokens lockouts --policy policy.yaml
  pgveil honeytokens clear mallory --policy policy.yaml"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action_name", metavar="ACTION", required=True)
    plant = sub.add_parser("plant", help="insert fake rows with markers; print the policy snippet")
    plant.add_argument("--upstream", required=True, metavar="DSN", help="PostgreSQL to plant into (INSERT)")
    plant.add_argument("--dataset", required=True, metavar="SCHEMA.TABLE", help="the table")
    plant.add_argument("--count", type=int, default=1, metavar="N", help="fake rows (default 1)")
    plant.add_argument("--column", metavar="NAME", help="the text column for the markers (default: "
                       "the first text column discover does not find sensitive)")
    plant.add_argument("--action", choices=("alert", "terminate"), default="alert",
                       help="the action in the printed snippet (default alert)")
    plant.add_argument("--name", metavar="PREFIX", help="honeytoken names PREFIX-1, PREFIX-2, ... "
                       "(default: the table's name)")
    for name, text in (("lockouts", "list the logins locked out now"), ("clear", "end a login's lockout")):
        command = sub.add_parser(name, help=text)
        if name == "clear":
            command.add_argument("login", metavar="LOGIN")
        where = command.add_mutually_exclusive_group(required=True)
        where.add_argument("--policy", metavar="FILE", help="the policy pgveil serves (lockouts are kept "
                           "beside it, in FILE's name with .lockouts)")
        where.add_argument("--lockouts", metavar="DIR", help="the lockout directory (as "
                           "PGVEIL_HONEYTOKEN_LOCKOUTS gives pgveil serve)")
        where.add_argument("--state-dsn", metavar="DSN", help="the state store pgveil serve "
                           "--state-dsn uses (lockouts of every replica)")
        command.add_argument("--schema", default="pgveil_state", help="the state store's schema "
                             "(default pgveil_state)")


def _book(args: argparse.Namespace) -> object:
    from proxy.dlp.guard import LOCKOUT_DIR_ENV
    from proxy.dlp.honeytokens import LockoutBook, default_lockout_dir

    directory = args.lockouts or os.environ.get(LOCKOUT_DIR_ENV) or default_lockout_dir(args.policy)
    return LockoutBook(directory)


def run(args: argparse.Namespace) -> int:
    from proxy.dlp.honeytokens import LockoutBook

    if args.action_name == "plant":
        return _plant(args)
    if args.state_dsn:
        return asyncio.run(_in_store(args))
    book = _book(args)
    assert isinstance(book, LockoutBook)
    if args.action_name == "clear":
        if book.clear(args.login):
            print(f"lockout of {args.login} cleared")
            return 0
        print(f"{args.login} is not locked out", file=sys.stderr)
        return 1
    _print(list(book.entries()))
    return 0


def _print(entries: list[object]) -> None:
    from proxy.dlp.honeytokens import Lockout

    if not entries:
        print("no login is locked out")
    for entry in entries:
        assert isinstance(entry, Lockout)
        until = datetime.datetime.fromtimestamp(entry.until, datetime.UTC).isoformat(timespec="seconds")
        print(f"{entry.login}\tuntil {until}\thoneytoken {entry.token}")


async def _in_store(args: argparse.Namespace) -> int:
    from proxy.dlp.shared_lockouts import clear_lockout, read_lockouts
    from proxy.state import StateError, StateStore

    try:
        store = StateStore(args.state_dsn, args.schema)
        await store.open(watch=False)
    except StateError as exc:
        print(f"pgveil honeytokens: {exc}", file=sys.stderr)
        return 2
    try:
        if args.action_name == "clear":
            if await clear_lockout(store, args.login):
                print(f"lockout of {args.login} cleared (every replica, within a second)")
                return 0
            print(f"{args.login} is not locked out", file=sys.stderr)
            return 1
        _print(list(await read_lockouts(store)))
        return 0
    except StateError as exc:
        print(f"pgveil honeytokens: {exc}", file=sys.stderr)
        return 2
    finally:
        await store.close()


def _plant(args: argparse.Namespace) -> int:
    from proxy.dlp.plant import PlantError, plant, policy_snippet

    if args.count < 1 or args.count > 1000:
        print("pgveil honeytokens plant: --count must be between 1 and 1000", file=sys.stderr)
        return 2
    try:
        planted = asyncio.run(plant(args.upstream, args.dataset, args.count, args.column))
    except PlantError as exc:
        print(f"pgveil honeytokens plant: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"pgveil honeytokens plant: cannot connect: {exc}", file=sys.stderr)
        return 2
    prefix = args.name or planted.table.rsplit(".", 1)[-1]
    sys.stdout.write(policy_snippet(planted, args.action, prefix))
    return 0
