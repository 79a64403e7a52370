"""`pgveil serve`: run the proxy in front of one PostgreSQL."""

from __future__ import annotations

import argparse
import sys
from typing import Any

DESCRIPTION = """\
Run pgveil: a PostgreSQL wire-protocol proxy. Clients connect to --listen exactly as they would
to PostgreSQL and authenticate as themselves; every statement is checked against --policy
before it is forwarded to --upstream. Without --policy every statement is relayed unchanged.

Settings come from --config FILE (YAML, same names with underscores), overridden by PGVEIL_*
environment variables (e.g. PGVEIL_UPSTREAM), overridden by flags.
SIGTERM drains (no new connections, open ones finish their current statement); SIGHUP reloads."""

EPILOG = """\
examples:
  pgveil serve --upstream postgresql://db.internal:5432/app --policy policies/reviews.yaml
  pgveil serve --upstream 'host=127.0.0.1 port=5432 sslmode=require' --listen 0.0.0.0:6432 \\
               --tls-cert server.crt --tls-key server.key --workers 2
  PGVEIL_UPSTREAM=postgresql://127.0.0.1:5432/postgres pgveil serve --config pgveil.yaml"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--upstream", metavar="DSN", help="where PostgreSQL is (URI or key=value)")
    parser.add_argument("--policy", metavar="FILE", help="policy YAML (omit to relay unchanged)")
    parser.add_argument("--listen", metavar="HOST:PORT", help="address to accept clients on (127.0.0.1:6432)")
    parser.add_argument("--metrics", metavar="HOST:PORT", help="serve /metrics, /healthz, /readyz here")
    parser.add_argument("--audit-log", metavar="PATH", help="append audit records to this file")
    parser.add_argument("--workers", metavar="N", type=int, help="worker processes sharing the port (1)")
    parser.add_argument("--tls-cert", metavar="F", help="certificate for TLS with clients")
    parser.add_argument("--tls-key", metavar="F", help="private key for --tls-cert")
    parser.add_argument("--config", metavar="FILE", help="YAML file with the same settings")
    parser.add_argument("--max-message-size", metavar="BYTES", type=int,
                        help="largest client message accepted (64 MiB)")
    parser.add_argument("--max-statement-size", metavar="CHARS", type=int,
                        help="longest SQL statement the guard judges; longer ones are refused (1 MiB)")
    parser.add_argument("--max-connections", metavar="N", type=int,
                        help="client connections each worker process serves at once; "
                             "more are refused with SQLSTATE 53300 (500)")
    parser.add_argument("--max-logins-per-address", metavar="N", type=int,
                        help="connections from one client address logging in at once (each holds a "
                             "PostgreSQL connection); more wait in line; 0: no limit (32)")
    parser.add_argument("--max-queued-logins-per-address", metavar="N", type=int,
                        help="logins from one client address that wait (holding no PostgreSQL "
                             "connection, at most --startup-timeout) for one of its "
                             "--max-logins-per-address places; more are refused with SQLSTATE 53300 (1000)")
    parser.add_argument("--startup-timeout", metavar="SECONDS", type=float,
                        help="time a client has to start up and authenticate (10)")
    parser.add_argument("--drain-timeout", metavar="SECONDS", type=float,
                        help="on SIGTERM, how long open statements may take before they are cut (30)")
    parser.add_argument("--state-dsn", metavar="DSN",
                        help="PostgreSQL state store shared by replicas (elevation workflow): a DSN, or "
                             "'upstream' for the --upstream database; password from PGVEIL_STATE_PASSWORD")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="(info)")


def run(args: argparse.Namespace) -> int:
    from proxy.config import SettingsError, load_settings
    from proxy.server import configure_logging, serve

    flags = {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "command"}
    try:
        settings = load_settings(flags).validate()
    except SettingsError as exc:
        print(f"pgveil serve: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    return serve(settings, policy_runtime)


async def policy_runtime(settings: Any, worker_index: int) -> Any:
    """Build, inside each serving process, what pgveil serve plugs into the proxy: the guard
    (with --policy), audit, metrics, elevation and SIGHUP reload (proxy.operations.serve_hooks).
    Without --policy, audit or metrics, statements are relayed untouched."""
    from proxy.operations import serve_hooks

    return await serve_hooks(settings, worker_index)
