"""`pgveil audit report` and the access side of `pgveil catalog`: read an audit trail over a window
and print who read what (text tables or JSON)."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported when a report runs, so `pgveil --help` stays fast
    from proxy.audit.access import AccessSummary
    from proxy.audit.records import Source, Window
    from proxy.policy.model import Policy, Sensitivity

SENSITIVITIES = ("public", "internal", "confidential", "restricted")

NOT_CHECKED = "the integrity chain was not checked: run `pgveil audit verify` on the same source for that"

REPORT_HELP = """\
Summarise an audit trail over a window, for a person: top readers of sensitive columns (how many
statements, how many of them unmasked, rows), refusals by rule, row-budget breaches, honeytoken
hits and elevations. Reads the log one record at a time; it does not check the chain (say
`pgveil audit verify` for that)."""


def add_window_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--since", metavar="TIME",
                        help="first moment of the window (ISO 8601, UTC unless it says: 2026-12-01, "
                             "2026-12-01T09:00:00Z)")
    parser.add_argument("--until", metavar="TIME", help="end of the window (not included)")
    parser.add_argument("--window", metavar="SPAN",
                        help="the window's length (90m, 24h, 7d, 2w): ending at --until, else now")


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="audit log file (its rotations are included), directory of logs, - for "
                             "standard input, or the postgresql:// DSN of a table sink")
    parser.add_argument("--table", default="pgveil_audit",
                        help="table of a PostgreSQL sink (default %(default)s)")
    add_window_arguments(parser)
    parser.add_argument("--policy", metavar="FILE",
                        help="policy whose column sensitivities say which columns are sensitive "
                             "(without it: every column some statement in the window had masked)")
    parser.add_argument("--min-sensitivity", default="confidential",
                        choices=SENSITIVITIES,
                        help="with --policy, the lowest sensitivity reported (default %(default)s)")
    parser.add_argument("--top", type=int, default=10, metavar="N",
                        help="readers, logins and relations listed per section (default %(default)s)")
    parser.add_argument("--format", choices=["text", "json"], default="text")


def read_summary(sources: Iterable[str], table: str, window: Window) -> tuple[AccessSummary, list[Source]]:
    """Fold every record of the sources (file logs, directories or table-sink DSNs) into a summary."""
    import asyncio

    from proxy.audit.access import AccessSummary
    from proxy.audit.records import Source, is_dsn, log_records

    summary = AccessSummary(window)
    read: list[Source] = []
    for path in sources:
        if is_dsn(path):
            source = Source(table)  # never echo a DSN: it may hold a password
            read.append(source)
            asyncio.run(_read_table(summary, path, table, window, source))
        else:
            source = Source(path)
            read.append(source)
            summary.add_all(log_records(path, window, source))
    return summary, read


async def _read_table(summary: AccessSummary, dsn: str, table: str, window: Window, source: Source) -> None:
    from proxy.audit.records import table_records

    async for chain, record in table_records(dsn, table, window, source):
        summary.add(chain, record)


def window_of(args: argparse.Namespace) -> Window:
    from proxy.audit.records import parse_window

    return parse_window(args.since, args.until, args.window)


def column_sensitivity(policy: Policy) -> Callable[[str], Sensitivity | None]:
    """The policy's sensitivity of a `schema.table.column` (None when its table is not a dataset)."""
    def sensitivity(column: str) -> Sensitivity | None:
        relation, _, name = column.rpartition(".")
        dataset = policy.datasets.get(relation)
        return None if dataset is None else dataset.column(name).sensitivity
    return sensitivity


def run_report(args: argparse.Namespace) -> int:
    from proxy.policy.model import Sensitivity

    try:
        window = window_of(args)
    except ValueError as exc:
        print(f"pgveil audit report: {exc}", file=sys.stderr)
        return 2
    basis: str
    sensitive: Callable[[str], bool]
    if args.policy:
        from proxy.policy.loader import PolicyError, load_policy

        try:
            policy = load_policy(args.policy, require_hash_key=False)
        except PolicyError as exc:
            for line in exc.errors:
                print(line, file=sys.stderr)
            return 1
        level = Sensitivity[args.min_sensitivity.upper()]
        of = column_sensitivity(policy)

        def by_policy(column: str) -> bool:
            found = of(column)
            return found is not None and found >= level
        sensitive = by_policy
        basis = f"{args.min_sensitivity} and above in {args.policy}"
    try:
        summary, sources = read_summary(args.paths, args.table, window)
    except (OSError, ValueError) as exc:
        print(f"pgveil audit report: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # asyncpg's errors: the table sink could not be read
        if type(exc).__module__.startswith("asyncpg"):
            print(f"pgveil audit report: cannot read audit table {args.table}: {exc}", file=sys.stderr)
            return 1
        raise
    if not args.policy:
        masked = summary.masked_columns
        sensitive = masked.__contains__
        basis = "every column masked for some statement in the window; --policy gives sensitivities"
    report = build_report(summary, sources, sensitive, basis, max(args.top, 1))
    if args.format == "json":
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render_text(report))
    return 0


def _top(counter: Counter[str], top: int) -> dict[str, int]:
    return dict(sorted(counter.items(), key=lambda item: (-item[1], item[0]))[:top])


def build_report(summary: AccessSummary, sources: list[Source], sensitive: Callable[[str], bool],
                 basis: str, top: int = 10) -> dict[str, Any]:
    """The report as JSON-able data (what `--format json` prints)."""
    counts = summary.counts
    readers = summary.readers(sensitive)
    return {
        "window": summary.window.describe(),
        "records": {"first": summary.first or None, "last": summary.last or None},
        "sources": [{"name": source.name, "files": source.files, "lines": source.lines,
                     "records": source.records, "unreadableLines": source.unreadable}
                    for source in sources],
        "chainChecked": False,
        "note": NOT_CHECKED,
        "totals": {
            "records": counts["records"],
            "statements": counts["access"],
            "served": counts["served"],
            "refused": counts["refused"] - counts["connections_refused"],
            "rows": counts["rows"],
            "connections": counts["connections"],
            "connectionsRefused": counts["connections_refused"],
            "budgetBreaches": counts["budget"],
            "honeytokenHits": counts["honeytoken"],
            "elevationEvents": counts["elevation"],
        },
        "sensitiveColumns": {"basis": basis,
                             "read": sorted({c for entry in readers for c in
                                             (column["column"] for column in entry["columns"])})},
        "topReaders": readers[:top],
        "refusals": [
            {"rule": rule, "count": refusals.count, "atConnect": refusals.at_connect,
             "last": refusals.last or None, "logins": _top(refusals.logins, top),
             "roles": _top(refusals.roles, top), "relations": _top(refusals.relations, top)}
            for rule, refusals in sorted(summary.refusals.items(), key=lambda item: (-item[1].count, item[0]))
        ],
        "budgetBreaches": [
            {"login": login, "role": role, "limit": limit, "limitValue": breaches.limit_value,
             "count": breaches.count, "maxRows": breaches.max_rows, "last": breaches.last or None,
             "fingerprints": _top(breaches.fingerprints, top)}
            for (login, role, limit), breaches in sorted(
                summary.budget.items(), key=lambda item: (-item[1].count, item[0]))
        ],
        "honeytokenHits": [
            {"token": token, "table": table, "action": action, "count": hits.count,
             "last": hits.last or None, "logins": _top(hits.logins, top), "roles": _top(hits.roles, top),
             "clients": _top(hits.clients, top), "fingerprints": _top(hits.fingerprints, top),
             "columns": _top(hits.columns, top)}
            for (token, table, action), hits in sorted(
                summary.honeytokens.items(), key=lambda item: (-item[1].count, item[0]))
        ],
        "elevations": [
            {"grant": grant, "login": elevation.login, "elevatedRole": elevation.elevated_role,
             "approver": elevation.approver, "reason": elevation.reason,
             "grantedAt": elevation.granted_at, "expiresAt": elevation.expires_at,
             "events": dict(sorted(elevation.events.items())), "last": elevation.last or None,
             "problems": elevation.problems}
            for grant, elevation in sorted(summary.elevations.items(), key=lambda item: item[1].last)
        ],
        "otherRecordTypes": dict(sorted(summary.other_types.items())),
    }


# ---- text ----------------------------------------------------------------------------------------

def _when(text: str | None) -> str:
    """`2026-12-08T02:33:34.043707+00:00` -> `2026-12-08 02:33:34Z`."""
    if not text:
        return "-"
    return f"{text[:10]} {text[11:19]}Z" if text.endswith("+00:00") and len(text) >= 19 else text


def _counted(counts: dict[str, int], limit: int = 3) -> str:
    items = list(counts.items())
    shown = ", ".join(f"{name} {count}" for name, count in items[:limit])
    return f"{shown}, +{len(items) - limit} more" if len(items) > limit else shown or "-"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    if not rows:
        return "  (none)\n"
    widths = [max(len(headers[i]), *(len(row[i]) for row in rows)) for i in range(len(headers))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip()
             for row in [headers, *rows]]
    return "".join(f"  {line}\n" for line in lines)


def render_text(report: dict[str, Any]) -> str:
    """The report as readable text tables."""
    totals = report["totals"]
    sources = ", ".join(f"{source['name']} ({source['files']} file{'s' if source['files'] != 1 else ''}, "
                        f"{source['lines']:,} lines)"
                        if source["files"] else f"{source['name']} ({source['lines']:,} lines)"
                        for source in report["sources"])
    window = report["window"]
    span = ("all records" if window["since"] is None and window["until"] is None else
            f"{_when(window['since']) if window['since'] else 'the first record'} to "
            f"{_when(window['until']) if window['until'] else 'the last record'}")
    out = [
        f"pgveil audit report: {sources}\n",
        f"window: {span} (records from {_when(report['records']['first'])} to "
        f"{_when(report['records']['last'])})\n",
        f"NOTE: {NOT_CHECKED}\n",
        f"statements: {totals['served']:,} served, {totals['refused']:,} refused; rows {totals['rows']:,}; "
        f"connections {totals['connections']:,} ({totals['connectionsRefused']:,} refused); "
        f"budget breaches {totals['budgetBreaches']:,}; honeytoken hits {totals['honeytokenHits']:,}; "
        f"elevation events {totals['elevationEvents']:,}\n",
    ]
    for source in report["sources"]:
        if source["unreadableLines"]:
            bad = source["unreadableLines"]
            out.append(f"WARNING: {source['name']}: {bad:,} {'line is' if bad == 1 else 'lines are'} not "
                       "JSON records (torn or edited): run `pgveil audit verify`\n")
    out.append(f"\nTop readers of sensitive columns ({report['sensitiveColumns']['basis']})\n")
    out.append(_table(
        ["LOGIN", "ROLE", "STATEMENTS", "UNMASKED", "ROWS", "LAST READ", "COLUMNS (statements, unmasked)"],
        [[entry["login"], entry["role"], f"{entry['statements']:,}", f"{entry['unmaskedStatements']:,}",
          f"{entry['rows']:,}", _when(entry["lastRead"]),
          ", ".join(f"{c['column']} ({c['statements']}, {c['unmasked']})" for c in entry["columns"])]
         for entry in report["topReaders"]]))
    out.append("\nRefusals by rule\n")
    out.append(_table(
        ["RULE", "COUNT", "LAST", "LOGINS", "RELATIONS"],
        [[entry["rule"], f"{entry['count']:,}" + (f" ({entry['atConnect']} at connect)" if entry["atConnect"]
                                                   else ""),
          _when(entry["last"]), _counted(entry["logins"]), _counted(entry["relations"])]
         for entry in report["refusals"]]))
    out.append("\nRow-budget breaches\n")
    out.append(_table(
        ["LOGIN", "ROLE", "LIMIT", "LIMIT VALUE", "BREACHES", "MAX ROWS", "LAST"],
        [[entry["login"], entry["role"], entry["limit"], str(entry["limitValue"]), f"{entry['count']:,}",
          f"{entry['maxRows']:,}", _when(entry["last"])] for entry in report["budgetBreaches"]]))
    out.append("\nHoneytoken hits\n")
    out.append(_table(
        ["TOKEN", "TABLE", "ACTION", "HITS", "LOGINS", "CLIENTS", "LAST"],
        [[entry["token"], entry["table"], entry["action"], f"{entry['count']:,}", _counted(entry["logins"]),
          _counted(entry["clients"]), _when(entry["last"])] for entry in report["honeytokenHits"]]))
    out.append("\nElevations\n")
    out.append(_table(
        ["GRANT", "LOGIN", "ELEVATED ROLE", "APPROVER", "REASON", "EVENTS", "LAST"],
        [[entry["grant"], entry["login"] or "-", entry["elevatedRole"] or "-", entry["approver"] or "-",
          entry["reason"] or "-", _counted(entry["events"], 5), _when(entry["last"])]
         for entry in report["elevations"]]))
    if report["otherRecordTypes"]:
        out.append("\nOther record types: " + _counted(report["otherRecordTypes"], 20) + "\n")
    return "".join(out)
