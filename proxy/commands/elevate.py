"""`pgveil elevate`: grant a user a time-limited role, checked against the policy, into the grants file."""

from __future__ import annotations

import argparse
import os
import sys

from proxy.elevation import GRANT_KEY_ENV

DESCRIPTION = ("Grant a time-limited elevation to a role the policy's `elevations:` allow. The signed "
               "grant is appended to the grants file the proxy watches; the proxy audits the grant, "
               "its first use and its expiry, and after expiry the user's next statement runs under "
               "the base role again.")
EPILOG = f"""examples:
  export {GRANT_KEY_ENV}=...   # the same secret the proxy is started with
  pgveil elevate --user sven_engineer --role production_support --for 30m \\
      --reason "INC-1234 refund stuck" --approver sam_security \\
      --policy policies/reviews.yaml --grants /var/lib/pgveil/grants.jsonl

exit status: 0 when granted, 1 when the policy does not allow it, 2 on a usage problem."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--user", required=True, help="PostgreSQL login to elevate")
    parser.add_argument("--role", required=True, help="policy role to assume")
    parser.add_argument("--for", dest="duration", required=True, metavar="DURATION",
                        help="how long, e.g. 30m, 1h, 1h30m (at most the policy's max_duration)")
    parser.add_argument("--reason", required=True, help="why (recorded in the grant and the audit log)")
    parser.add_argument("--approver", help="who approved it (required when the policy says so)")
    parser.add_argument("--policy", required=True, metavar="FILE", help="policy file the proxy runs")
    parser.add_argument("--grants", required=True, metavar="FILE", help="grants file the proxy watches")
    parser.add_argument("--key-env", default=GRANT_KEY_ENV, metavar="NAME",
                        help=f"environment variable with the grant signing key (default {GRANT_KEY_ENV})")


def run(args: argparse.Namespace) -> int:
    from proxy.elevation import GrantError, append_grant, create_grant, iso, parse_duration
    from proxy.policy.loader import PolicyError, load_policy

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
