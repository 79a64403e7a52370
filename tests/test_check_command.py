"""`pgveil check`: valid and invalid policies, alone and against a live schema."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.cli import main
from proxy.embedded import free_port
from proxy.policy.schema_check import looks_sensitive
from tests.conftest import Upstream

REPO = Path(__file__).resolve().parent.parent
DATABASE = "check_command"
KEY = "check-command-test-key-0123456789"

SCHEMA = """
CREATE SCHEMA app;
CREATE TABLE app.customers (id integer PRIMARY KEY, email text, ssn text, birth_date date,
                            age integer, region text, phone_number text);
CREATE TABLE app.orders (id integer, customer_id integer, amount numeric(10,2), card_number text)
    PARTITION BY RANGE (id);
CREATE TABLE app.orders_1 PARTITION OF app.orders FOR VALUES FROM (0) TO (1000);
CREATE VIEW app.customer_emails AS SELECT id, email FROM app.customers;
CREATE TABLE app.audit_trail (id integer, happened_at timestamp);
"""

GOOD = """
version: 1
roles:
  analyst:
    members: [alice]
    tables: ["app.*"]
    row_filters:
      app.customers: "region = 'eu'"
datasets:
  app.customers:
    columns:
      email: {sensitivity: confidential, protection: email}
      ssn: {sensitivity: restricted, protection: hash}
      birth_date: {sensitivity: confidential, protection: {generalize: year}}
      phone_number: {sensitivity: confidential, protection: {partial: {keep_last: 2}}}
  app.orders:
    columns:
      card_number: {sensitivity: restricted, protection: {partial: {keep_last: 4}}}
  app.customer_emails:
    columns:
      email: {sensitivity: confidential, protection: email}
"""


@pytest.fixture(scope="module")
def check_dsn(upstream: Upstream) -> Iterator[str]:
    upstream.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
    upstream.execute(f"CREATE DATABASE {DATABASE}")
    upstream.execute(SCHEMA, dbname=DATABASE)
    yield upstream.dsn(dbname=DATABASE)
    upstream.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")


@pytest.fixture(autouse=True)
def hash_key_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGVEIL_HASH_KEY", KEY)


def check(tmp_path: Path, capsys: pytest.CaptureFixture[str], policy: str,
          upstream: str | None = None) -> tuple[int, list[str]]:
    path = tmp_path / "policy.yaml"
    path.write_text(policy)
    status = main(["check", "--policy", str(path), *(["--upstream", upstream] if upstream else [])])
    lines = capsys.readouterr().out.splitlines()
    return status, [line.replace(f"{path}: ", "", 1) for line in lines]


def test_a_valid_policy_passes_without_an_upstream(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    status, lines = check(tmp_path, capsys, GOOD)
    assert status == 0
    assert len(lines) == 1 and lines[0].startswith("valid (1 roles, 3 datasets, version ")


def test_an_invalid_policy_lists_every_problem_and_exits_1(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    status, lines = check(tmp_path, capsys, GOOD.replace("tables:", "tabels:").replace("year", "decade"))
    assert status == 1
    assert lines[0].startswith("roles.analyst.tabels: unknown key 'tabels'")
    assert lines[1].startswith("datasets.app.customers.columns.birth_date.protection.generalize: "
                               "unknown generalization 'decade'")
    assert lines[2] == "invalid (2 problems)"


def test_a_policy_that_matches_the_schema_is_valid_against_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], check_dsn: str) -> None:
    status, lines = check(tmp_path, capsys, GOOD, check_dsn)
    assert status == 0, lines
    assert lines[-1].startswith("valid against the upstream (1 roles, 3 datasets")
    warnings = [line for line in lines if ": warning: " in line]
    assert warnings == [] and len(lines) == 1


def test_missing_tables_columns_and_misfit_protections_are_errors(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], check_dsn: str) -> None:
    policy = GOOD + """
  app.nowhere:
    columns:
      x: {sensitivity: public}
  app.audit_trail:
    columns:
      happened: {sensitivity: internal}
      id: {sensitivity: confidential, protection: {generalize: month}}
      happened_at: {sensitivity: confidential, protection: email}
"""
    status, lines = check(tmp_path, capsys, policy, check_dsn)
    assert status == 1
    assert "datasets.app.nowhere: no table or view app.nowhere in the upstream database 'check_command' " \
           "(create it, or fix the name)" in lines
    assert "datasets.app.audit_trail.columns.happened: no column 'happened' in app.audit_trail " \
           "(its columns: id, happened_at)" in lines
    assert any(line.startswith("datasets.app.audit_trail.columns.id.protection: does not fit type integer: "
                               "'generalize: month' needs a date or timestamp column") for line in lines)
    assert any(line.startswith("datasets.app.audit_trail.columns.happened_at.protection: does not fit type "
                               "timestamp without time zone: 'email' needs a text column") for line in lines)
    assert lines[-1] == "invalid (4 problems)"


def test_a_row_filter_that_does_not_plan_on_its_table_is_an_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], check_dsn: str) -> None:
    status, lines = check(tmp_path, capsys, GOOD.replace("region = 'eu'", "regoin = 'eu'"), check_dsn)
    assert status == 1
    assert any(line.startswith("roles.analyst.row_filters.app.customers: the row filter does not work on "
                               "app.customers: column \"regoin\" does not exist") for line in lines), lines


def test_unlisted_sensitive_columns_unmatched_patterns_and_views_are_warnings(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], check_dsn: str) -> None:
    policy = GOOD.replace('tables: ["app.*"]', 'tables: ["app.*", "sales.*"]').split("  app.orders:")[0]
    status, lines = check(tmp_path, capsys, policy, check_dsn)
    assert status == 0, lines
    warnings = [line for line in lines if ": warning: " in line]
    assert "roles.analyst.tables[1]: warning: 'sales.*' matches no table or view in the upstream" in warnings
    assert "datasets.app.orders: warning: column card_number of app.orders looks sensitive but has no " \
           "policy entry (list it under datasets: with a sensitivity and protection)" in warnings
    assert not any("app.orders_1" in line for line in warnings)  # partitions: warned once, on the parent
    assert any(line.startswith("datasets.app.customer_emails: warning: view app.customer_emails reads "
                               "protected app.customers but is not listed") for line in warnings)
    assert "datasets.app.customer_emails: warning: column email of app.customer_emails looks sensitive " \
           "but has no policy entry (list it under datasets: with a sensitivity and protection)" in warnings
    assert lines[-1].endswith("; 4 warnings)")


def test_an_unreachable_upstream_fails_the_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, lines = check(tmp_path, capsys, GOOD, f"postgresql://postgres@127.0.0.1:{free_port()}/postgres")
    assert status == 1
    assert lines[0].startswith("cannot check against the upstream: cannot connect to the upstream")


@pytest.mark.parametrize(("name", "sensitive"), [
    ("ssn", True), ("customer_ssn", True), ("email_address", True), ("phone", True),
    ("password_hash", True), ("api_token", True), ("iban", True), ("card_number", True),
    ("birth_date", True), ("dob", True), ("home_address", True), ("salary", True), ("passport_no", True),
    ("id", False), ("created_at", False), ("amount", False), ("adobe_id", False), ("status", False),
])
def test_sensitive_looking_column_names(name: str, sensitive: bool) -> None:
    assert looks_sensitive(name) is sensitive


def test_the_installed_command_runs_and_documents_itself() -> None:
    env = dict(os.environ, PGVEIL_HASH_KEY=KEY)
    command = [sys.executable, "-m", "proxy", "check"]
    ok = subprocess.run([*command, "--policy", str(REPO / "policies" / "example.yaml")],
                        env=env, capture_output=True, text=True, check=False)
    assert ok.returncode == 0 and "valid (2 roles, 1 datasets" in ok.stdout
    helped = subprocess.run([*command, "--help"], capture_output=True, text=True, check=False)
    assert helped.returncode == 0 and "examples:" in helped.stdout and "--upstream" in helped.stdout


def test_entries_that_never_apply_are_warnings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = """
version: 1
roles:
  analyst:
    members: [alice, "bi_*"]
    tables: ["app.*"]
    row_filters:
      sales.orders: "region = 'eu'"
  auditor:
    members: ["bi_*"]
    tables: ["*"]
    reveal: [public, internal]
datasets:
  app.customers:
    columns:
      nickname: {sensitivity: internal, protection: {partial: {keep_first: 1}}}
      email: {sensitivity: confidential, protection: email}
"""
    status, lines = check(tmp_path, capsys, policy)
    assert status == 0
    assert lines[:3] == [
        "roles.analyst.row_filters.sales.orders: warning: role analyst may not read sales.orders "
        "(not in its tables:), so the filter never applies",
        "roles.auditor.members[0]: warning: 'bi_*' is already a member pattern of role analyst, which "
        "comes first: this entry never applies (a login gets the first role that matches)",
        "datasets.app.customers.columns.nickname.protection: warning: never applies: every role "
        "reveals sensitivity 'internal' (raise the column's sensitivity, or remove the level from "
        "some role's reveal:)",
    ]
    assert lines[3].endswith("; 3 warnings)")


def run_check(*args: str, key: str | None) -> subprocess.CompletedProcess[str]:
    """`pgveil check ARGS` as CI runs it: a real process, the hash key set or not."""
    env = {name: value for name, value in os.environ.items() if name != "PGVEIL_HASH_KEY"}
    if key is not None:
        env["PGVEIL_HASH_KEY"] = key
    return subprocess.run([sys.executable, "-m", "proxy", "check", *args],
                          env=env, capture_output=True, text=True, check=False, timeout=60)


@pytest.mark.parametrize("policy", ["example.yaml", "reviews.yaml"])
def test_a_missing_hash_key_is_a_warning_so_ci_can_check_without_secrets(policy: str) -> None:
    path = str(REPO / "policies" / policy)
    result = run_check("--policy", path, key=None)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == (f"{path}: settings.hash_key_env: warning: environment variable PGVEIL_HASH_KEY "
                        "is not set, and a column uses protection 'hash' (set PGVEIL_HASH_KEY to a secret "
                        "of at least 16 bytes)")
    assert lines[-1].startswith(f"{path}: valid (") and lines[-1].endswith("; 1 warning)")


def test_require_secrets_fails_on_a_missing_or_short_hash_key() -> None:
    path = str(REPO / "policies" / "reviews.yaml")
    missing = run_check("--require-secrets", "--policy", path, key=None)
    assert missing.returncode == 1
    assert missing.stdout.splitlines()[0].startswith(
        f"{path}: settings.hash_key_env: environment variable PGVEIL_HASH_KEY is not set")
    assert missing.stdout.splitlines()[-1] == f"{path}: invalid (1 problem)"
    short = run_check("--require-secrets", "--policy", path, key="short-secret")
    assert short.returncode == 1 and "is shorter than 16 bytes" in short.stdout
    assert run_check("--policy", path, key="short-secret").returncode == 0
    present = run_check("--require-secrets", "--policy", path, key=KEY)
    assert present.returncode == 0 and "warning" not in present.stdout


def test_require_secrets_is_harmless_for_a_policy_without_hash(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(GOOD.replace("protection: hash", "protection: redact"))
    result = run_check("--require-secrets", "--policy", str(path), key=None)
    assert result.returncode == 0 and "warning" not in result.stdout, result.stdout


def test_serve_still_refuses_to_start_without_the_hash_key() -> None:
    env = {name: value for name, value in os.environ.items() if name != "PGVEIL_HASH_KEY"}
    served = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--policy", str(REPO / "policies" / "reviews.yaml"),
         "--upstream", f"postgresql://postgres@127.0.0.1:{free_port()}/postgres", "--listen", "127.0.0.1:0"],
        env=env, capture_output=True, text=True, check=False, timeout=60)
    assert served.returncode != 0
    assert "environment variable PGVEIL_HASH_KEY is not set" in served.stderr
