"""`pgveil check`: validate a policy file, and with --upstream, against the live schema."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Validate a policy file: every key of policy format v1, row filters, protections and roles;
warn about entries that never apply (a member pattern an earlier role already claims, a row
filter on a table the role may not read, a protection every role reveals).

A missing or too short hash key (the secret `hash` protections need, from the environment
variable settings.hash_key_env names) is a warning: the policy file is valid whatever the
environment, so CI can check it without the secret. With --require-secrets it is an error
(a deploy-time check); `pgveil serve` always refuses to start without it.

With --upstream, also check it against the live schema: every dataset and column exists, each
protection fits its column's type, each row filter plans on its table; and warn about table
patterns that match nothing, views over protected data that the policy does not list, and
columns whose names look sensitive but have no policy entry.

Prints one line per problem (`FILE: PATH: what is wrong (what to do)`; warnings say
`warning:`), then a summary. Exit status: 0 valid (warnings allowed), 1 invalid."""

EPILOG = """\
examples:
  pgveil check --policy policies/reviews.yaml          # in CI, no secrets needed
  pgveil check --require-secrets --policy policies/reviews.yaml   # at deploy, PGVEIL_HASH_KEY set
  pgveil check --policy policies/reviews.yaml --upstream postgresql://pgveil@db:5432/reviews
  pgveil check --policy policies/example.yaml || echo "policy rejected"
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", required=True, metavar="FILE", help="policy YAML file")
    parser.add_argument("--upstream", metavar="DSN",
                        help="PostgreSQL to check the policy against (its credentials read the catalog)")
    parser.add_argument("--require-secrets", action="store_true",
                        help="fail when a secret the policy needs (the hash key) is missing or too short, "
                             "as `serve` would; without it that is a warning")


def run(args: argparse.Namespace) -> int:
    import asyncio

    from proxy.catalog import CatalogError, load_catalog
    from proxy.policy.loader import PolicyError, load_policy, missing_secret
    from proxy.policy.schema_check import (
        Finding,
        check_policy_against_catalog,
        check_row_filters,
        lint_policy,
    )

    source = args.policy
    try:
        policy = load_policy(source, require_hash_key=False)
    except PolicyError as exc:
        for line in exc.errors:
            print(line)
        print(f"{source}: invalid ({len(exc.errors)} problem{'s' * (len(exc.errors) != 1)})")
        return 1
    findings: list[Finding] = lint_policy(policy)
    secret_problem = missing_secret(policy)
    if secret_problem:
        findings.append(Finding("settings.hash_key_env", secret_problem,
                                "error" if args.require_secrets else "warning"))
    if args.upstream:
        try:
            catalog = asyncio.run(load_catalog(args.upstream))
            findings += check_policy_against_catalog(policy, catalog)
            findings += asyncio.run(check_row_filters(args.upstream, policy, catalog))
        except (CatalogError, OSError) as exc:
            print(f"{source}: cannot check against the upstream: {exc} (check --upstream and that "
                  "PostgreSQL is running)")
            return 1
    errors = [finding for finding in findings if finding.severity == "error"]
    warnings = [finding for finding in findings if finding.severity == "warning"]
    for finding in errors:
        print(f"{source}: {finding.path}: {finding.message}")
    for finding in warnings:
        print(f"{source}: {finding.path}: warning: {finding.message}")
    noted = f"; {len(warnings)} warning{'s' * (len(warnings) != 1)}" if warnings else ""
    if errors:
        print(f"{source}: invalid ({len(errors)} problem{'s' * (len(errors) != 1)}{noted})")
        return 1
    against = " against the upstream" if args.upstream else ""
    print(f"{source}: valid{against} ({len(policy.roles)} roles, {len(policy.datasets)} datasets, "
          f"version {policy.version}{noted})")
    return 0
