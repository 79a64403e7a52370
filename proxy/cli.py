"""The `pgveil` command: parses the command line and hands off to one module per subcommand."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# name -> (module, one-line help). Each module defines add_arguments(parser) and run(args) -> int,
# and imports its heavy dependencies inside run() so `pgveil --help` stays fast.
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("proxy.commands.serve", "run the proxy"),
    "demo": ("proxy.commands.demo", "embedded PostgreSQL + demo data + proxy, no setup"),
    "check": ("proxy.commands.check", "validate a policy (against the live schema)"),
    "explain": ("proxy.commands.explain", "show decision, rule and rewritten SQL; no execution"),
    "catalog": ("proxy.commands.catalog", "print the dataset metadata registry as JSON"),
    "audit": ("proxy.commands.audit", "audit log tools (verify, report)"),
    "fingerprints": ("proxy.commands.fingerprints", "review learned query fingerprints"),
    "elevate": ("proxy.commands.elevate", "elevation workflow: request, approve, deny, revoke, list"),
    "discover": ("proxy.commands.discover", "find sensitive columns; draft or gate a policy"),
    "honeytokens": ("proxy.commands.honeytokens", "plant honeytoken rows; list and clear lockouts"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgveil",
        description="PostgreSQL proxy that enforces data-protection policy on every query.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue  # subcommand not built yet
        command = sub.add_parser(
            name,
            help=help_text,
            description=getattr(module, "DESCRIPTION", help_text),
            epilog=getattr(module, "EPILOG", None),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(command)
        command.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args._module.run(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
