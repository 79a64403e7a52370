"""`pgveil explain`: the guard's decision, rule and rewritten SQL for one statement, not executed."""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = """\
Show what pgveil would do with one statement for a role: allow, rewrite (with the masked SQL that
would be sent) or refuse (with the rule and why). Nothing is executed.

The guard resolves every relation against the live schema, so explain reads the catalog of
--upstream (column lists, types, views, functions; it needs only the DSN's credentials). Without
--upstream it uses $PGVEIL_UPSTREAM."""

EPILOG = """\
examples:
  pgveil explain --policy policies/reviews.yaml --user dana_scientist \\
      --upstream postgresql://postgres@127.0.0.1:5432/reviews "SELECT email FROM users"
  pgveil explain --policy p.yaml --role analyst --upstream $DSN "COPY users TO STDOUT\""""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", metavar="FILE", required=True, help="policy YAML")
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--role", metavar="R", help="judge as this policy role")
    who.add_argument("--user", metavar="U", help="judge as this login (its role is chosen as at startup)")
    parser.add_argument("--upstream", metavar="DSN", help="PostgreSQL whose schema is used (needed)")
    parser.add_argument("sql", metavar="SQL", help="the statement(s), as a client would send them")


def run(args: argparse.Namespace) -> int:
    import asyncio
    import os

    from proxy.catalog import CatalogError, load_catalog
    from proxy.guard.pipeline import guard
    from proxy.guard.statement import GuardContext
    from proxy.guard.verdict import Refuse, Rewrite
    from proxy.policy.loader import PolicyError, load_policy

    try:
        policy = load_policy(args.policy, require_hash_key=False)
    except PolicyError as exc:
        print(f"pgveil explain: {exc}", file=sys.stderr)
        return 2
    upstream = args.upstream or os.environ.get("PGVEIL_UPSTREAM")
    if not upstream:
        print("pgveil explain: needs the live schema: pass --upstream DSN (or set PGVEIL_UPSTREAM)",
              file=sys.stderr)
        return 2
    if args.role is not None:
        role = policy.roles.get(args.role)
        user = args.role
        if role is None:
            print(f"pgveil explain: no role {args.role!r} in {args.policy} "
                  f"(roles: {', '.join(policy.roles)})", file=sys.stderr)
            return 2
    else:
        user = args.user
        role = policy.role_for_user(user)
        if role is None:
            print(f"decision: refuse\nrule: no-role\nwhy: no role for user {user} (default_role: deny)")
            return 0
    try:
        catalog = asyncio.run(load_catalog(upstream))
    except CatalogError as exc:
        print(f"pgveil explain: {exc}", file=sys.stderr)
        return 2
    context = GuardContext(policy=policy, role=role, catalog=catalog, user=user,
                           search_path=catalog.default_search_path(user, catalog.database))
    verdict = guard(args.sql, context)
    print(f"decision: {verdict.decision}")
    print(f"role: {role.name}")
    if isinstance(verdict, Refuse):
        print(f"rule: {verdict.rule}")
        print(f"why: {verdict.message}")
        print(f"sqlstate: {verdict.sqlstate}")
        return 0
    info = verdict.info
    print(f"statement class: {info.kind}")
    print(f"relations: {', '.join(info.relations) or '-'}")
    print(f"masks: {', '.join(info.masks) or '-'}")
    if info.findings:
        print(f"findings: {', '.join(info.findings)}")
    label = "rewritten SQL" if isinstance(verdict, Rewrite) else "SQL (unchanged)"
    print(f"{label}:\n{verdict.sql}")
    return 0
