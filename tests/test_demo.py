"""The demo: its data set (deterministic, loads into a real PostgreSQL), its policy, `pgveil catalog`,
and `pgveil demo` run as a user runs it."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from proxy.commands.demo import RoleView, render_side_by_side
from proxy.demo import DEMO_LOGINS, POLICY_PATH, load_dataset
from proxy.embedded import free_port
from proxy.policy.loader import load_policy
from proxy.policy.model import Constant, Email, Generalize, Hash, Partial, Policy, Redact
from tests.conftest import Upstream
from tests.proxy_harness import wait_until

ROOT = Path(__file__).resolve().parent.parent

EXPECTED_ROWS = {
    "public.users": 1000,
    "public.user_demographics": 1000,
    "public.identity_verifications": 591,
    "public.restaurants": 120,
    "public.menu_items": 960,
    "public.reviews": 3000,
    "public.review_photos": 1205,
    "analytics.review_sentiment": 3000,
    "analytics.review_sentiment_demographics": 3000,
    "analytics.restaurant_scorecard": 120,
    "mock.users": 50,
    "mock.restaurants": 10,
    "mock.reviews": 200,
}


@pytest.fixture(scope="module")
def demo_database(upstream: Upstream) -> Iterator[str]:
    """The demo data set loaded into its own database of the test PostgreSQL; yields its name."""
    name = f"ship_demo_{uuid.uuid4().hex[:8]}"
    asyncio.run(load_dataset(upstream.dsn(), name))
    yield name
    upstream.execute(f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture
def policy(monkeypatch: pytest.MonkeyPatch) -> Policy:
    monkeypatch.setenv("PGVEIL_HASH_KEY", "test-hash-key-0123456789abcdef")
    return load_policy(ROOT / "policies" / "reviews.yaml")


def fetch(upstream: Upstream, database: str, sql: str) -> list[tuple[object, ...]]:
    with psycopg.connect(upstream.dsn(dbname=database), autocommit=True) as conn:
        conn.execute("SET TimeZone = 'UTC'")
        conn.execute("SET DateStyle = 'ISO, YMD'")
        return conn.execute(sql.encode()).fetchall()  # type: ignore[call-overload, no-any-return]


def pgveil(*args: str, hash_key: bool = True) -> subprocess.CompletedProcess[str]:
    env = {name: value for name, value in os.environ.items() if name != "PGVEIL_HASH_KEY"}
    if hash_key:
        env["PGVEIL_HASH_KEY"] = "test-hash-key-0123456789abcdef"
    return subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env=env)


# --- the data set ----------------------------------------------------------------------------------

def test_demo_data_set_has_the_expected_row_counts(upstream: Upstream, demo_database: str) -> None:
    counts = " UNION ALL ".join(f"SELECT '{name}', count(*) FROM {name}" for name in EXPECTED_ROWS)
    assert dict(fetch(upstream, demo_database, counts)) == EXPECTED_ROWS


def test_demo_data_set_is_the_same_on_every_load(upstream: Upstream, demo_database: str) -> None:
    digests = fetch(upstream, demo_database, """
        SELECT (SELECT md5(string_agg(u::text, '|' ORDER BY id)) FROM public.users AS u),
               (SELECT md5(string_agg(v::text, '|' ORDER BY review_id))
                  FROM analytics.review_sentiment_demographics AS v)""")
    assert digests == [("30c741604b43b6e6f50bb734ef57cfde", "8a851f15f42020e04c0a3220636ccdd6")]


def test_the_derived_marketing_dataset_joins_reviews_demographics_and_model_output(
        upstream: Upstream, demo_database: str) -> None:
    rows = fetch(upstream, demo_database, """
        SELECT v.review_id, v.user_id, v.sentiment, v.birth_year, v.gender, v.location
        FROM analytics.review_sentiment_demographics AS v
        JOIN public.reviews AS r ON r.id = v.review_id
        JOIN public.user_demographics AS d ON d.user_id = r.user_id
        JOIN analytics.review_sentiment AS s ON s.review_id = r.id
        WHERE v.user_id = r.user_id AND v.sentiment = s.sentiment AND v.gender = d.gender
          AND v.location = d.city AND v.birth_year = extract(year FROM d.birth_date)""")
    assert len(rows) == EXPECTED_ROWS["analytics.review_sentiment_demographics"]


def test_every_demo_login_logs_in_with_its_password(upstream: Upstream, demo_database: str) -> None:
    for login in DEMO_LOGINS:
        dsn = upstream.dsn(user=login.login, password=login.password, dbname=demo_database)
        with psycopg.connect(dsn) as conn:
            assert conn.execute("SELECT count(*) FROM public.restaurants").fetchone() == (120,)


def test_every_table_view_and_column_of_the_data_set_is_in_the_policy(
        upstream: Upstream, demo_database: str, policy: Policy) -> None:
    live = fetch(upstream, demo_database, """
        SELECT table_schema || '.' || table_name, column_name FROM information_schema.columns
        WHERE table_schema IN ('public', 'analytics', 'mock') ORDER BY 1, ordinal_position""")
    unlisted = [f"{relation}.{column}" for relation, column in live
                if not str(relation).startswith("mock.")
                and (str(relation) not in policy.datasets
                     or str(column) not in policy.datasets[str(relation)].columns)]
    assert unlisted == []
    assert set(policy.datasets) <= {str(relation) for relation, _ in live}


def test_pgveil_check_finds_the_policy_valid_against_the_data_set_without_warnings(
        upstream: Upstream, demo_database: str) -> None:
    result = pgveil("check", "--policy", "policies/reviews.yaml",
                    "--upstream", upstream.dsn(dbname=demo_database))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "warning" not in result.stdout + result.stderr


# --- the policy ------------------------------------------------------------------------------------

def test_policies_reviews_yaml_is_the_packaged_demo_policy() -> None:
    assert (ROOT / "policies" / "reviews.yaml").resolve() == POLICY_PATH


def test_reviews_policy_maps_each_demo_login_to_its_article_role(policy: Policy) -> None:
    for login in DEMO_LOGINS:
        role = policy.role_for_user(login.login)
        assert role is not None and role.name == login.role
    assert policy.role_for_user("somebody_else") is None  # default deny


def test_reviews_policy_uses_every_protection_kind_and_rule(policy: Policy) -> None:
    columns = [c for dataset in policy.datasets.values() for c in dataset.columns.values()]
    protections = {c.protection for c in columns}
    assert {Email(), Hash(), Redact(), Generalize(unit="year"), Generalize(unit="month"),
            Generalize(bucket=5)} <= protections
    assert any(isinstance(p, Partial) for p in protections)
    assert any(isinstance(p, Constant) for p in protections)
    assert any(not c.joinable for c in columns)
    assert any(c.quasi_identifier for c in columns)
    roles = policy.roles
    assert roles["data_scientist"].row_filters
    assert roles["marketing_analyst"].max_quasi_identifiers is not None
    assert roles["product_manager"].max_quasi_identifiers is not None
    elevation = next(e for e in policy.elevations if "sven_engineer" in e.users)
    assert elevation.max_duration_seconds == 30 * 60 and elevation.approver_required
    assert "analytics.review_sentiment_demographics" in policy.datasets


# --- pgveil catalog --------------------------------------------------------------------------------

def test_catalog_prints_the_dataset_registry_in_the_articles_shape() -> None:
    result = pgveil("catalog", "--policy", "policies/reviews.yaml", hash_key=False)  # never hashes
    assert result.returncode == 0, result.stderr
    registry = json.loads(result.stdout)
    entry = next(d for d in registry if d["name"] == "analytics.review_sentiment_demographics")
    assert set(entry) == {"name", "registrationTime", "registeredBy", "description", "version",
                          "originatingSource", "schema"}
    assert entry["registeredBy"] == "Service Account - ML Pipeline"
    columns = {c["name"]: c for c in entry["schema"]}
    assert list(columns) == ["review_id", "user_id", "sentiment", "birth_year", "gender", "location"]
    assert {"name", "description", "mode", "type", "originatingSource", "sensitivity",
            "protection"} <= set(columns["birth_year"])
    assert columns["birth_year"]["protection"] == "generalize(bucket=5)"
    assert columns["birth_year"]["originatingSource"] == "public.user_demographics.birth_date"
    assert columns["user_id"]["protection"] == "hash" and columns["user_id"]["joinable"] is False
    assert columns["review_id"]["type"] is None  # no --upstream: types unknown


def test_catalog_takes_column_types_from_the_live_schema(upstream: Upstream, demo_database: str) -> None:
    result = pgveil("catalog", "--policy", "policies/reviews.yaml",
                    "--upstream", upstream.dsn(dbname=demo_database))
    assert result.returncode == 0, result.stderr
    users = next(d for d in json.loads(result.stdout) if d["name"] == "public.users")
    types = {c["name"]: (c["type"], c["mode"]) for c in users["schema"]}
    assert types["created_at"] == ("timestamp with time zone", "REQUIRED")
    assert types["phone"] == ("text", "NULLABLE")
    assert {c["name"]: c["protection"] for c in users["schema"]}["phone"] == \
        "partial(keep_first=0, keep_last=4, mask_char='#')"


def test_catalog_reports_an_invalid_policy_and_exits_1(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("version: 1\nroles:\n  analyst:\n    reveal: [secret]\n")
    result = pgveil("catalog", "--policy", str(broken))
    assert result.returncode == 1
    assert result.stdout == ""
    assert "roles.analyst.reveal" in result.stderr and "secret" in result.stderr


# --- pgveil demo -----------------------------------------------------------------------------------

def test_side_by_side_shows_each_roles_values_and_puts_a_refusal_in_its_column() -> None:
    views = {
        "data_scientist": RoleView(("id", "email"), (("1", "j***@example.com"),)),
        "security_engineer": RoleView(("id", "email"), (("1", "jane.doe@example.com"),)),
        "executive": RoleView(error="pgveil: table-not-allowed: public.users is not in role executive"),
    }
    text = render_side_by_side(views, width=200)
    header, _, first, second, *rest = text.splitlines()
    assert header.split() == ["data_scientist", "security_engineer", "executive"]
    assert first.split()[:3] == ["id", "1", "1"]
    assert second.split()[:3] == ["email", "j***@example.com", "jane.doe@example.com"]
    assert "pgveil:" in first and "executive" in " ".join([first, second, *rest])


def test_side_by_side_splits_roles_into_blocks_that_fit_the_terminal() -> None:
    views = {f"role_{n}": RoleView(("id",), (("1",),)) for n in range(6)}
    blocks = render_side_by_side(views, width=80).split("\n\n")
    assert len(blocks) == 2  # 3 roles of 24 characters per 80-column block
    assert all(max(len(line) for line in block.splitlines()) <= 80 for block in blocks)


def test_demo_refuses_a_port_that_is_taken() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = pgveil("demo", "--port", str(taken.getsockname()[1]))
    assert result.returncode == 1
    assert "is taken" in result.stderr and "--port" in result.stderr


class DemoProcess:
    """`pgveil demo` as a child process, its output read line by line as it comes."""

    def __init__(self, port: int) -> None:
        env = {name: value for name, value in os.environ.items()
               if name not in ("PGVEIL_HASH_KEY", "PGVEIL_GRANT_KEY")}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "proxy", "demo", "--port", str(port)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def read_until(self, text: str, timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no {text!r} within {timeout} s; output so far:\n{''.join(self.output)}")
            if line is None:
                pytest.fail(f"demo ended before {text!r}; output:\n{''.join(self.output)}")
            self.output.append(line)
            if text in line:
                return "".join(self.output)

    def stop(self, stop_signal: signal.Signals = signal.SIGINT) -> int:
        if self.process.poll() is None:
            self.process.send_signal(stop_signal)
        try:
            return self.process.wait(60)
        finally:
            while (line := self.lines.get(timeout=10)) is not None:
                self.output.append(line)


def accepts_connections(host: str, port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(2)
        return probe.connect_ex((host, port)) == 0


@pytest.fixture(scope="module")
def running_demo() -> Iterator[tuple[DemoProcess, str, int]]:
    port = free_port()
    demo = DemoProcess(port)
    try:
        output = demo.read_until("Press Ctrl-C")
        yield demo, output, port
    finally:
        demo.stop()


def printed_dsns(output: str) -> dict[str, str]:
    """role -> connection string, from the lines `  <role>  postgresql://...`."""
    return dict(re.findall(r"^  (\w+)\s+(postgresql://\S+)$", output, flags=re.MULTILINE))


def test_demo_prints_a_connection_string_for_every_demo_role(
        running_demo: tuple[DemoProcess, str, int]) -> None:
    _, output, port = running_demo
    dsns = printed_dsns(output)
    assert set(dsns) == {login.role for login in DEMO_LOGINS}
    assert all(f"@127.0.0.1:{port}/reviews" in dsn for dsn in dsns.values())


def test_demo_masks_the_data_scientists_view_and_shows_the_security_engineer_raw_data(
        running_demo: tuple[DemoProcess, str, int]) -> None:
    dsns = printed_dsns(running_demo[1])
    query = "SELECT full_name, email, phone, password_hash FROM users WHERE id = 1"
    with psycopg.connect(dsns["data_scientist"], autocommit=True) as conn:
        masked = conn.execute(query).fetchone()
    with psycopg.connect(dsns["security_engineer"], autocommit=True) as conn:
        raw = conn.execute(query).fetchone()
    assert raw == ("Olivia Garcia", "olivia.garcia1@example.net", "+1 555 0138 9555", raw[3])
    assert str(raw[3]).startswith("$2b$12$")
    assert masked == ("O************", "o***@example.net", "############9555", None)


def test_demo_refuses_tables_outside_a_role_and_the_connection_stays_usable(
        running_demo: tuple[DemoProcess, str, int]) -> None:
    dsns = printed_dsns(running_demo[1])
    with psycopg.connect(dsns["executive"], autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match=r"^pgveil: "):
            conn.execute("SELECT email FROM users")
        count = conn.execute("SELECT count(*) FROM analytics.restaurant_scorecard").fetchone()
    assert count == (120,)


def test_demo_side_by_side_shows_masked_and_raw_values_and_refusals(
        running_demo: tuple[DemoProcess, str, int]) -> None:
    output = running_demo[1]
    assert "o***@example.net" in output  # data scientist
    assert "olivia.garcia1@exampl…" in output  # security engineer (truncated to its column)
    assert "pgveil:" in output  # roles that may not read users see their refusal


def test_sven_asks_and_sam_approves_in_their_own_sessions_as_the_demo_prints(
        running_demo: tuple[DemoProcess, str, int]) -> None:
    output = running_demo[1]
    sven_dsn, sam_dsn = re.findall(r"^  psql '(postgresql://\S+)'$", output, flags=re.MULTILINE)
    asked, approved = re.findall(r"reviews=> (PGVEIL ELEVATE (?:REQUEST|APPROVE) .*);$", output,
                                 flags=re.MULTILINE)
    query = "SELECT email FROM users WHERE id = 1"
    with psycopg.connect(sven_dsn, autocommit=True) as sven:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="table-not-allowed"):
            sven.execute(query)
        request_id = sven.execute(asked).fetchone()[0]  # type: ignore[index]
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="own request"):
            sven.execute(f"PGVEIL ELEVATE APPROVE {request_id}")
        with psycopg.connect(sam_dsn, autocommit=True) as sam:
            sam.execute(approved.replace("APPROVE 1", f"APPROVE {request_id}"))
            wait_until(lambda: not refused(sven, query), "the approval to reach sven's session", timeout=10)
            assert sven.execute(query).fetchone() == ("o***@example.net",)  # production, still masked
            sam.execute(f"PGVEIL ELEVATE REVOKE {request_id}")
            wait_until(lambda: refused(sven, query), "the revocation", timeout=10)


def refused(connection: psycopg.Connection[Any], query: str) -> bool:
    try:
        connection.execute(query)
    except psycopg.errors.InsufficientPrivilege:
        return True
    return False


def test_software_engineer_reaches_production_only_through_the_printed_elevation(
        running_demo: tuple[DemoProcess, str, int]) -> None:
    output = running_demo[1]
    dsn = printed_dsns(output)["software_engineer"]
    query = "SELECT email FROM users WHERE id = 1"
    with psycopg.connect(dsn, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="table-not-allowed"):
            conn.execute(query)
        grant_key = re.search(r"PGVEIL_GRANT_KEY=(\S+) pgveil elevate", output)
        grants = re.search(r"--grants (\S+)", output)
        assert grant_key is not None and grants is not None
        env = dict(os.environ, PGVEIL_GRANT_KEY=grant_key.group(1))
        elevate = subprocess.run(
            [sys.executable, "-m", "proxy", "elevate", "--user", "sven_engineer",
             "--role", "production_support", "--for", "30m", "--reason", "test: elevation",
             "--approver", "sam_security", "--policy", str(POLICY_PATH), "--grants", grants.group(1)],
            capture_output=True, text=True, env=env, timeout=60)
        assert elevate.returncode == 0, elevate.stderr
        assert conn.execute(query).fetchone() == ("o***@example.net",)  # production, still masked


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_stops_the_demo_and_everything_it_started(stop_signal: signal.Signals) -> None:
    port = free_port()
    demo = DemoProcess(port)
    output = demo.read_until("Press Ctrl-C")
    direct = re.search(r"postgresql://postgres@127\.0\.0\.1:(\d+)/reviews", output)
    assert direct is not None
    postgres_port = int(direct.group(1))
    assert accepts_connections("127.0.0.1", port) and accepts_connections("127.0.0.1", postgres_port)
    audit_log = Path(re.search(r"audit log: (\S+)", output).group(1))  # type: ignore[union-attr]
    assert demo.stop(stop_signal) == 0
    assert "pgveil demo stopped." in "".join(demo.output)
    assert not accepts_connections("127.0.0.1", port)
    assert not accepts_connections("127.0.0.1", postgres_port)
    assert not audit_log.parent.exists()  # its working directory is gone too


def test_demo_runs_discovery_and_names_what_the_policy_leaves_out(
        running_demo: tuple[DemoProcess, str, int]) -> None:
    _, output, _ = running_demo
    summary = re.search(r"(\d+) columns look sensitive; the demo policy classifies (\d+) of them at least as "
                        r"high, and leaves (\d+) out:", output)
    assert summary is not None, output
    found, covered, left_out = (int(group) for group in summary.groups())
    assert covered >= 9 and left_out == 4 and found == covered + left_out
    for column in ("mock.users.email", "mock.users.password_hash", "mock.users.phone", "public.reviews.body"):
        assert f"    {column}: looks like " in output
