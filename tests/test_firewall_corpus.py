"""The injection rules against public payload collections and against benign SQL from real tools."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import psycopg
import pytest
from asyncpg import introspection
from pglast.parser import ParseError

from proxy.firewall.injection import screen_injection
from proxy.firewall.statement import SubmittedSql
from proxy.policy.model import Role
from tests.conftest import Upstream

CORPUS = Path(__file__).parent / "corpus"
PAYLOADS = json.loads((CORPUS / "injection_payloads.json").read_text())

APPLICATION = Role(name="fw_shop_app", members=("fw_shop",), application=True, injection="enforce")
ANALYST = Role(name="fw_analyst", members=("fw_alice",), injection="enforce")
# A role an application logs in as without being marked `application: true` (issue 13: probes in
# sort keys, server values and FROM-less UNION branches went through for it).
UNMARKED_APPLICATION = Role(name="fw_shop_unmarked", members=("fw_shop2",), injection="enforce")
CONTEXTS = {"string", "number", "like", "order_by", "limit", "offset"}

# Payloads that PostgreSQL accepts but that no rule should refuse, and why.
EXPLAINED_MISSES = {
    # MySQL's `#` comment is bitwise XOR in PostgreSQL: `5323=5323 # qZxv` compares 5323 with
    # 5323 XOR a column "qzxv" that does not exist, so PostgreSQL fails the statement (42703).
    "mysql-hash-comment": re.compile(r" # qZxv AND active$"),
    # `ORDER BY 1` is sqlmap's first column-count probe and also ordinary SQL: it returns the rows
    # the application would return anyway. The next probes (`ORDER BY 10--`) are refused.
    "order-by-position": re.compile(r"ORDER BY 1 LIMIT 20$"),
}


def benign_entries(path: Path) -> list[tuple[str, str]]:
    """(label, sql) per entry: an entry is the SQL after a `-- label` line, up to the next such line."""
    entries: list[tuple[str, str]] = []
    label, lines = "", []
    for line in path.read_text().splitlines():
        if line.startswith("-- "):
            if any(text.strip() for text in lines):
                entries.append((label, "\n".join(lines).strip()))
            label, lines = line[3:], []
        else:
            lines.append(line)
    if any(text.strip() for text in lines):
        entries.append((label, "\n".join(lines).strip()))
    return entries


BENIGN = [
    (f"{path.stem}: {label}", sql)
    for path in sorted((CORPUS / "benign").glob("*.sql"))
    for label, sql in benign_entries(path)
] + [
    ("asyncpg: type introspection", introspection.INTRO_LOOKUP_TYPES),
    ("asyncpg: type introspection (PostgreSQL < 14)", introspection.INTRO_LOOKUP_TYPES_13),
]
DRIVER_STATEMENTS = [(label, sql) for label, sql in BENIGN
                     if label.startswith(("drivers", "asyncpg", "pgbench"))]


def explained_miss(sql: str) -> str | None:
    return next((reason for reason, pattern in EXPLAINED_MISSES.items() if pattern.search(sql)), None)


def test_payload_corpus_covers_six_injection_contexts_and_every_sqlmap_technique() -> None:
    valid = [entry for entry in PAYLOADS if entry["valid"]]
    assert set(Counter(entry["context"] for entry in valid)) == CONTEXTS
    assert {entry["family"] for entry in valid} >= {
        "boolean_blind", "error_based", "inline_query", "stacked_queries", "time_blind", "union_query",
        "classic", "context_probe",
    }
    assert len(valid) > 800


def test_hand_written_probes_are_placed_in_every_context() -> None:
    probes = Counter(entry["context"] for entry in PAYLOADS
                     if entry["valid"] and entry["family"] == "context_probe")
    assert set(probes) == CONTEXTS
    assert min(probes.values()) >= 7


@pytest.mark.parametrize("role", [APPLICATION, UNMARKED_APPLICATION], ids=["application", "unmarked"])
def test_every_valid_payload_is_refused_in_enforce_mode(role: Role) -> None:
    let_through = []
    for entry in PAYLOADS:
        if not entry["valid"]:
            continue
        screening = screen_injection(SubmittedSql.parse(entry["sql"]), role)
        if screening.refusal is None and explained_miss(entry["sql"]) is None:
            let_through.append(entry["sql"])
    assert let_through == []


def test_payloads_postgresql_cannot_parse_are_syntax_errors_before_any_rule() -> None:
    for entry in PAYLOADS:
        if entry["valid"]:
            continue
        with pytest.raises(ParseError):
            SubmittedSql.parse(entry["sql"])


def test_explained_misses_fail_in_postgresql_or_return_what_the_application_would(upstream: Upstream) -> None:
    upstream.execute(
        "CREATE SCHEMA IF NOT EXISTS fw_corpus;"
        "CREATE TABLE IF NOT EXISTS fw_corpus.shop_products (id int, name text, price numeric, active bool);"
    )
    misses = [entry["sql"] for entry in PAYLOADS if entry["valid"] and explained_miss(entry["sql"])
              and screen_injection(SubmittedSql.parse(entry["sql"]), APPLICATION).refusal is None]
    assert misses
    with psycopg.connect(upstream.dsn(), autocommit=True) as connection:
        connection.execute("SET search_path = fw_corpus")
        for sql in misses:
            if explained_miss(sql) == "mysql-hash-comment":
                with pytest.raises(psycopg.errors.UndefinedColumn):
                    connection.execute(sql.encode())
            else:
                connection.execute(sql.encode())


def test_analyst_roles_run_the_benign_corpus_untouched() -> None:
    alerting = Role(name="fw_analyst_alert", injection="alert")
    flagged = {}
    for label, sql in BENIGN:
        findings = screen_injection(SubmittedSql.parse(sql), alerting).findings
        if findings:
            flagged[label] = findings
    assert flagged == {}
    assert len(BENIGN) > 80


def test_application_roles_run_the_statements_drivers_send_on_their_own() -> None:
    alerting = Role(name="fw_app_alert", application=True, injection="alert")
    flagged = {label: screen_injection(SubmittedSql.parse(sql), alerting).findings
               for label, sql in DRIVER_STATEMENTS}
    assert {label: findings for label, findings in flagged.items() if findings} == {}
