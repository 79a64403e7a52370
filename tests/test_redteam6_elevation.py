"""Red team round 6: attacks on the elevation workflow (PGVEIL ELEVATE statements, the state store)
through one `pgveil serve` on real PostgreSQL with psycopg: other spellings of a login, SET ROLE,
the extended protocol, look-alike statements, writing the store directly, forged notifications,
decisions on closed requests, cursors and prepared statements that outlive a grant, and an SQL
injection through the answer's literals in a client encoding whose characters swallow a backslash.
docs/redteam.md, "Round 6: elevation workflow and DLP", says what held and what is by design."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from proxy.embedded import free_port
from proxy.policy.loader import parse_policy
from proxy.state import StateStore
from proxy.state.elevations import ElevationWorkflow
from proxy.state.store import StateError
from tests.conftest import Upstream
from tests.proxy_harness import ServeProcess, spawn_serve, wait_until

DATABASE = "rt6_elevation"
PASSWORD = "rt6-elev-pw-5521"
SVEN, SAM, KIM = "rt6_sven", "rt6_sam", "rt6_kim"
SAM_LOOKALIKES = ("RT6_SAM", "rt6_sam ", "rt6_s\u0430m")  # upper case, a trailing space, a Cyrillic a
SECRET = "kept-secret-rt6"
IVY = "rt6_ivy"  # sees every table unmasked, may only SELECT
LONG = "rt6_" + "l" * 59  # 63 bytes: the longest PostgreSQL name (NAMEDATALEN 64)
POLICY = f"""\
version: 1
settings: {{default_role: deny}}
roles:
  rt6_engineer:
    members: [{SVEN}, {KIM}, "RT6_SAM", "rt6_sam ", "rt6_s\\u0430m", "rt6_llll*"]
    statements: [select]
    tables: ["public.rt6_items"]
  rt6_reader:
    members: [{IVY}]
    statements: [select]
    tables: ["*"]
  rt6_security:
    members: [{SAM}]
    statements: [select]
    tables: ["public.rt6_items"]
  rt6_support:
    members: []
    statements: [select]
    tables: ["public.*"]
    max_rows_per_statement: 5
elevations:
  - role: rt6_support
    users: [{SVEN}, {KIM}, {IVY}]
    max_duration: 10m
    approver_required: true
    approvers: [{SAM}]
  - role: rt6_support
    users: [{LONG}]
    max_duration: 10m
    approver_required: true
    approvers: ["rt6_*"]
"""
CONFIG = """\
elevation:
  request_timeout: 10m
state:
  poll_interval_ms: 200
"""


@dataclass
class Served:
    upstream: Upstream
    directory: Path
    process: ServeProcess

    def dsn(self, login: str) -> str:
        return self.process.dsn(login, PASSWORD, DATABASE)

    def audit(self) -> list[dict[str, Any]]:
        path = self.directory / "audit.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _quoted(login: str) -> str:
    return '"' + login.replace('"', '""') + '"'


@pytest.fixture(scope="module")
def served(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    upstream.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
    upstream.execute(f"CREATE DATABASE {DATABASE}")
    logins = (SVEN, SAM, KIM, LONG, IVY, *SAM_LOOKALIKES)
    for login in logins:
        upstream.execute(f"DROP ROLE IF EXISTS {_quoted(login)}; "
                         f"CREATE ROLE {_quoted(login)} LOGIN PASSWORD '{PASSWORD}'")
    upstream.execute(f"GRANT {SAM} TO {SVEN}")  # sven may SET ROLE to the approver's role
    everyone = ", ".join(_quoted(login) for login in logins)
    upstream.execute("CREATE TABLE rt6_items (id int); INSERT INTO rt6_items VALUES (1);"
                     f"CREATE TABLE rt6_secrets (secret text); INSERT INTO rt6_secrets VALUES ('{SECRET}');"
                     "CREATE TABLE rt6_many AS SELECT generate_series(1, 50) AS n;"
                     f"GRANT SELECT ON rt6_items, rt6_secrets, rt6_many TO {everyone};"
                     f"GRANT UPDATE ON rt6_items TO {IVY}", dbname=DATABASE)
    directory = tmp_path_factory.mktemp("rt6_elevation")
    policy, config = directory / "policy.yaml", directory / "pgveil.yaml"
    policy.write_text(POLICY)
    config.write_text(CONFIG)
    with spawn_serve("--upstream", upstream.dsn(dbname=DATABASE), "--policy", str(policy),
                     "--config", str(config), "--listen", "127.0.0.1:0",
                     "--audit-log", str(directory / "audit.jsonl"), "--metrics", f"127.0.0.1:{free_port()}",
                     "--state-dsn", "upstream") as process:
        yield Served(upstream, directory, process)
        process.terminate()
        process.wait(30)


def connect(served: Served, login: str, **options: Any) -> psycopg.Connection[Any]:
    options.setdefault("prepare_threshold", None)
    options.setdefault("autocommit", True)
    # keywords, not a URL: a login with a space or a non-ASCII letter reaches PostgreSQL as it is
    connection = psycopg.connect(host=served.process.host, port=served.process.port, user=login,
                                 password=PASSWORD, dbname=DATABASE, **options)
    assert connection.execute("SELECT session_user").fetchone() == (login,)
    return connection


def sees_secret(connection: psycopg.Connection[Any]) -> bool:
    try:
        return connection.execute("SELECT secret FROM rt6_secrets").fetchall() == [(SECRET,)]
    except psycopg.errors.InsufficientPrivilege:
        return False


def ask(served: Served, login: str = SVEN, duration: str = "5m", reason: str = "INC-6") -> int:
    with connect(served, login) as connection:
        sql = f"PGVEIL ELEVATE REQUEST rt6_support FOR {duration} REASON '{reason}'"
        row = connection.execute(sql).fetchone()
    assert row is not None and row[3] == "pending"
    return int(row[0])


def state_of(served: Served, request_id: int) -> str:
    with psycopg.connect(served.upstream.dsn(dbname=DATABASE)) as connection:
        row = connection.execute("SELECT state FROM pgveil_state.elevation_requests WHERE id = %s",
                                 (request_id,)).fetchone()
    assert row is not None
    return str(row[0])


def refused_steps(served: Served, request_id: int) -> list[dict[str, Any]]:
    return [event for event in served.audit() if event.get("type") == "elevation"
            and event.get("request_id") == request_id and event.get("result") == "refused"]


# -- who approves ---------------------------------------------------------------------------------

@pytest.mark.parametrize("lookalike", SAM_LOOKALIKES)
def test_a_login_spelled_like_the_approver_is_not_the_approver(served: Served, lookalike: str) -> None:
    """PostgreSQL logins are case-, space- and code-point-exact, and so is the approvers: match."""
    request_id = ask(served)
    with connect(served, lookalike) as other:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="may not approve"):
            other.execute(f"PGVEIL ELEVATE APPROVE {request_id}")
    assert state_of(served, request_id) == "pending"
    refused = refused_steps(served, request_id)
    assert refused and refused[-1]["actor"] == lookalike and refused[-1]["event"] == "approve"
    assert "may not approve" in refused[-1]["problem"]


def test_set_role_to_the_approver_does_not_make_the_requester_an_approver(served: Served) -> None:
    """pgveil takes the session's login (PostgreSQL authenticated it), never current_user."""
    request_id = ask(served)
    with connect(served, SVEN) as sven:
        try:
            sven.execute(f"SET ROLE {SAM}")
        except psycopg.errors.InsufficientPrivilege:
            pass  # pgveil may refuse the SET ROLE itself; the approval below must fail either way
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="own request"):
            sven.execute(f"PGVEIL ELEVATE APPROVE {request_id} REASON 'as sam'")
    with connect(served, SVEN, options=f"-c role={SAM}") as sven:  # the role set at startup
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="own request"):
            sven.execute(f"PGVEIL ELEVATE APPROVE {request_id}")
    assert state_of(served, request_id) == "pending"
    assert refused_steps(served, request_id)[-1]["actor"] == SVEN


def test_self_approval_over_the_extended_protocol_and_with_a_parameter(served: Served) -> None:
    request_id = ask(served)
    with connect(served, SVEN, prepare_threshold=0) as sven:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="own request"):
            sven.execute(f"PGVEIL ELEVATE APPROVE {request_id}")
    with connect(served, SAM) as sam:  # a parameter is no request number: the statement is refused
        with pytest.raises(psycopg.errors.SyntaxError, match="request number"):
            sam.execute("PGVEIL ELEVATE APPROVE %s", (request_id,))
    assert state_of(served, request_id) == "pending"


@pytest.mark.parametrize("template", [
    "SELECT 1; PGVEIL ELEVATE APPROVE {id}",
    "SELECT 'PGVEIL ELEVATE APPROVE {id}'",
    "SELECT E'\\nPGVEIL ELEVATE APPROVE {id}'",
    "SELECT $x$PGVEIL ELEVATE APPROVE {id}$x$",
    "/* PGVEIL ELEVATE APPROVE {id} */ SELECT 1",
    "-- PGVEIL ELEVATE APPROVE {id}\nSELECT 1",
    "U&\"PGVEIL\" ELEVATE APPROVE {id}",
    "\ufeffPGVEIL ELEVATE APPROVE {id}",
    "\u00a0PGVEIL ELEVATE APPROVE {id}",
    "PGVEIL\u00a0ELEVATE APPROVE {id}",
    "PGVEIL ELEVATE APPROVE {id}; SELECT 1",
    "PGVEIL ELEVATE APPROVE {id}0",
    "PGVEIL ELEVATE APPROVE 0{id} REASON 'x' 'y'",
])
def test_look_alike_approvals_by_the_approver_change_nothing(served: Served, template: str) -> None:
    """Only a message that is the statement alone is one; everything else goes to PostgreSQL (and
    fails there) or is refused. Sent by the real approver, so a mistaken match would approve."""
    request_id = ask(served)
    sql = template.format(id=request_id)
    with connect(served, SAM) as sam:
        sam.pgconn.exec_(sql.encode("utf-8"))
        assert sam.execute("SELECT count(*) FROM rt6_items").fetchone() == (1,)
    assert state_of(served, request_id) == "pending"


# -- the store ------------------------------------------------------------------------------------

def test_the_store_cannot_be_written_through_pgveil_even_when_elevated(served: Served) -> None:
    request_id = ask(served, reason="store writes")
    with connect(served, SVEN) as sven:
        for sql in (
            "INSERT INTO pgveil_state.elevation_requests (login, role, seconds, reason, state, decide_by, "
            f"decided_by, granted_at, expires_at) VALUES ('{SVEN}', 'rt6_support', 600, 'x', 'approved', "
            f"now(), '{SAM}', now(), now() + interval '1 hour')",
            f"UPDATE pgveil_state.elevation_requests SET state = 'approved' WHERE id = {request_id}",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                sven.execute(sql)
        # notifications pass (statements: [select] does not cover NOTIFY's effect): harmless, a re-read
        sven.execute("NOTIFY pgveil_state_changes, 'elevations'")
        sven.execute("SELECT pg_notify('pgveil_state_changes', 'elevations')")
        assert not sees_secret(sven)
    assert state_of(served, request_id) == "pending"


def test_a_forged_notification_straight_to_postgresql_grants_nothing(served: Served) -> None:
    """Anyone who can reach PostgreSQL can NOTIFY on the store's channel: a notification only makes
    the replicas re-read the store, whose tables they cannot write."""
    request_id = ask(served, reason="forged notify")
    direct = psycopg.connect(served.upstream.dsn(SVEN, PASSWORD, DATABASE), autocommit=True)
    with direct, connect(served, SVEN) as sven:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            direct.execute(f"UPDATE pgveil_state.elevation_requests SET state = 'approved', "
                           f"expires_at = now() + interval '1h' WHERE id = {request_id}")
        for payload in ("elevations", "", "x" * 7000):
            direct.execute("SELECT pg_notify('pgveil_state_changes', %s)", (payload,))
        assert not sees_secret(sven)
    assert state_of(served, request_id) == "pending"


def test_a_reason_with_quotes_is_stored_as_text_not_run(served: Served) -> None:
    reason = "x'); UPDATE pgveil_state.elevation_requests SET state = 'approved'; --"
    request_id = ask(served, reason=reason.replace("'", "''"))
    with connect(served, SAM) as sam:
        listed = {row[0]: row for row in sam.execute("PGVEIL ELEVATE LIST").fetchall()}
    assert listed[request_id][5] == reason and listed[request_id][3] == "pending"


def test_the_answer_is_not_sql_in_an_encoding_that_swallows_a_backslash(served: Served) -> None:
    """In SJIS with backslash_quote on (both allowed for a role that sees every table unmasked,
    here one limited to SELECT) the UTF-8 bytes E3 81 81 5C read as two characters, the second
    swallowing the backslash pgveil doubled in its E'' literal: a reason ending in ぁ\\' closed
    the literal in pgveil's answer, and the rest of the reason ran as SQL no policy had checked
    (here an UPDATE by a select-only role). The answer's literals are now plain ASCII (non-ASCII
    characters as \\u escapes), the same bytes in every encoding."""
    injected = "ぁ\\')) AS v; UPDATE rt6_items SET id = 99; --"
    sql = f"PGVEIL ELEVATE REQUEST rt6_support FOR 5m REASON '{injected.replace(chr(39), chr(39) * 2)}'"
    with connect(served, IVY, client_encoding="SJIS") as ivy:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            ivy.execute("UPDATE rt6_items SET id = 99")  # statements: [select]
        # PostgreSQL's own guard against \\' in client-only encodings; pgveil lets this role turn it off
        ivy.execute("SET backslash_quote = on")
        result = ivy.pgconn.exec_(sql.encode("utf-8"))
        assert result.status == psycopg.pq.ExecStatus.TUPLES_OK, result.error_message
        assert result.ntuples == 1 and result.nfields == 11
        assert result.get_value(0, 5) == injected.encode("shift_jis")  # the reason, as SJIS text
    with psycopg.connect(served.upstream.dsn(dbname=DATABASE)) as owner:
        assert owner.execute("SELECT id FROM rt6_items").fetchall() == [(1,)]
    with connect(served, IVY) as ivy:  # and read back in UTF8
        listed = [row for row in ivy.execute("PGVEIL ELEVATE LIST").fetchall() if row[5] == injected]
    assert listed and listed[0][3] == "pending"


# -- decisions on closed requests, and what outlives a grant ---------------------------------------

def test_closed_requests_cannot_be_approved_and_longer_or_other_roles_cannot_be_asked(served: Served) -> None:
    denied, revoked = ask(served, reason="to deny"), ask(served, reason="to revoke")
    with connect(served, SAM) as sam:
        sam.execute(f"PGVEIL ELEVATE DENY {denied} REASON 'no'")
        sam.execute(f"PGVEIL ELEVATE REVOKE {revoked}")
        for request_id, state in ((denied, "denied"), (revoked, "revoked")):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match=f"is {state}, not pending"):
                sam.execute(f"PGVEIL ELEVATE APPROVE {request_id}")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="no elevation request"):
            sam.execute("PGVEIL ELEVATE APPROVE 999999999")
    with connect(served, SVEN) as sven:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="longer than"):
            sven.execute("PGVEIL ELEVATE REQUEST rt6_support FOR 11m REASON 'long'")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="no entry under elevations"):
            sven.execute("PGVEIL ELEVATE REQUEST rt6_security FOR 1m REASON 'other role'")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="no role named"):
            sven.execute('PGVEIL ELEVATE REQUEST "RT6_SUPPORT" FOR 1m REASON \'case\'')
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="reason is required"):
            sven.execute("PGVEIL ELEVATE REQUEST rt6_support FOR 1m REASON '   '")
    with connect(served, KIM) as kim:  # another requester may not revoke sven's request
        pending = ask(served, reason="kim revokes")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="only rt6_sven or an approver"):
            kim.execute(f"PGVEIL ELEVATE REVOKE {pending}")
    assert state_of(served, pending) == "pending"
    events = [(e["event"], e["result"], e["actor"]) for e in served.audit()
              if e.get("type") == "elevation" and e.get("request_id") in (denied, revoked, pending)]
    assert ("approve", "refused", SAM) in events and ("revoke", "refused", KIM) in events


def test_cursors_and_prepared_statements_of_a_grant_do_not_outlive_it(served: Served) -> None:
    request_id = ask(served, reason="cursor after revoke")
    with connect(served, SAM) as sam:
        sam.execute(f"PGVEIL ELEVATE APPROVE {request_id}")
    with connect(served, SVEN) as sven, connect(served, SVEN, autocommit=False) as open_tx:
        open_tx.commit()
        wait_until(lambda: sees_secret(sven), "the grant", timeout=5)
        sven.execute("DECLARE held CURSOR WITH HOLD FOR SELECT secret FROM rt6_secrets")
        sven.execute("PREPARE peek AS SELECT secret FROM rt6_secrets")
        assert sven.execute("EXECUTE peek").fetchall() == [(SECRET,)]
        wait_until(lambda: sees_secret(open_tx), "the grant", timeout=5)
        open_tx.execute("DECLARE inside CURSOR FOR SELECT secret FROM rt6_secrets")
        with connect(served, SAM) as sam:
            sam.execute(f"PGVEIL ELEVATE REVOKE {request_id} REASON 'done'")
        wait_until(lambda: not sees_secret(sven), "the revocation", timeout=5)
        for sql in ("FETCH ALL FROM held", "EXECUTE peek"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                sven.execute(sql).fetchall()
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            open_tx.execute("FETCH ALL FROM inside").fetchall()
        open_tx.rollback()


def test_a_state_schema_created_by_another_login_is_not_used(upstream: Upstream) -> None:
    """A login with CREATE on the database creates schema pgveil_state before pgveil first runs
    (and lets anyone create in it). pgveil's migration ran inside it; as its owner she could then
    drop the tables and re-create them with an approved grant of her own making, which every
    replica honoured (decided_by names a valid approver). The store now refuses to use a schema
    or table that belongs to another login than its own (or a superuser)."""
    database, mallory = "rt6_store_trap", "rt6_mallory"
    upstream.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
    upstream.execute(f"CREATE DATABASE {database}")
    upstream.execute(f"DROP ROLE IF EXISTS {mallory}; CREATE ROLE {mallory} LOGIN PASSWORD '{PASSWORD}'; "
                     f"GRANT CREATE ON DATABASE {database} TO {mallory}")
    mallory_dsn = upstream.dsn(mallory, PASSWORD, database)
    with psycopg.connect(mallory_dsn, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA pgveil_state; GRANT ALL ON SCHEMA pgveil_state TO PUBLIC")

    async def open_and_forge() -> str | None:
        store = StateStore(upstream.dsn(dbname=database))
        try:
            await store.open(watch=False)
        except StateError as exc:
            return str(exc)
        try:
            with psycopg.connect(mallory_dsn, autocommit=True) as conn:  # the schema's owner forges
                conn.execute("DROP TABLE pgveil_state.elevation_requests CASCADE")
                conn.execute("CREATE TABLE pgveil_state.elevation_requests AS SELECT 1::bigint AS id, "
                             f"'{SVEN}'::text AS login, 'rt6_support'::text AS role, 'forged'::text AS reason, "
                             f"'approved'::text AS state, '{SAM}'::text AS decided_by, 600 AS seconds, "
                             "now() AS granted_at, now() + interval '10 minutes' AS expires_at")
            workflow = ElevationWorkflow(store, lambda: parse_policy(POLICY))
            await workflow.reload()
            return f"opened; forged grant in force: {workflow.active_role(SVEN)}"
        finally:
            await store.close()

    outcome = asyncio.run(open_and_forge())
    assert outcome is not None and "belong to another login" in outcome and "schema pgveil_state" in outcome, outcome


def test_a_grant_read_before_the_store_went_away_ends_at_its_expiry(served: Served) -> None:
    """While the store cannot be reached a replica keeps the grants it last read: each only until
    its own expires_at by the replica's clock (a revocation meanwhile waits for the store)."""
    async def run() -> tuple[str | None, str | None, str | None]:
        store = StateStore(served.upstream.dsn(dbname=DATABASE))
        await store.open(watch=False)
        workflow = ElevationWorkflow(store, lambda: parse_policy(POLICY))
        try:
            asked = await workflow.request(SVEN, "rt6_support", "1m", "outage test")
            request_id = int(str(asked.rows[0][0]))
            await workflow.decide(SAM, "approve", request_id, "ok")
            await workflow.reload()
            grant = next(g for g in workflow._by_login[SVEN] if g.id == request_id)
            await workflow.decide(SAM, "revoke", request_id, "cleanup")
        finally:
            await store.close()  # from here on the store is gone for this workflow
        before = workflow.active_role(SVEN, now=grant.expires_at - 1)
        after = workflow.active_role(SVEN, now=grant.expires_at + 1)
        again = workflow.active_role(SVEN, now=grant.expires_at - 1)  # an ended grant stays ended
        return before, after, again

    before, after, again = asyncio.run(run())
    assert before == "rt6_support" and after is None and again is None


def test_the_elevated_roles_row_budget_binds_a_connection_opened_before_the_grant(served: Served) -> None:
    """The elevated role may read every table but at most 5 rows a statement. A connection opened
    under the base role (no budget, no honeytokens: the relay had no DataGuard) and kept open
    across the approval read all 50 rows; one opened after the approval was cut at 5. A
    connection now counts rows when an elevations: entry lets its login assume a role with a
    budget."""
    with connect(served, SVEN) as before:
        request_id = ask(served, reason="budget of the elevated role")
        with connect(served, SAM) as sam:
            sam.execute(f"PGVEIL ELEVATE APPROVE {request_id}")
        try:
            wait_until(lambda: sees_secret(before), "the grant", timeout=5)
            with connect(served, SVEN) as after, pytest.raises(psycopg.Error, match="row-budget"):
                after.execute("SELECT n FROM rt6_many").fetchall()
            with pytest.raises(psycopg.Error, match="row-budget"):
                before.execute("SELECT n FROM rt6_many").fetchall()
            assert len(before.execute("SELECT n FROM rt6_many LIMIT 5").fetchall()) == 5
        finally:
            with connect(served, SAM) as sam:
                sam.execute(f"PGVEIL ELEVATE REVOKE {request_id}")


def test_a_login_name_longer_than_postgresql_keeps_is_not_another_login(served: Served) -> None:
    """PostgreSQL cuts a startup user name to 63 bytes, so `LONG + "x"` logs in as LONG. pgveil
    took the uncut name as the login: LONG approved its own request as `LONG + "x"` (another
    name for the approvers pattern rt6_*), and a lockout of LONG would not have matched it."""
    with connect(served, LONG) as long_login:
        row = long_login.execute("PGVEIL ELEVATE REQUEST rt6_support FOR 1m REASON 'long'").fetchone()
    assert row is not None
    request_id = int(row[0])
    try:
        other = psycopg.connect(host=served.process.host, port=served.process.port, user=LONG + "x",
                                password=PASSWORD, dbname=DATABASE, autocommit=True)
    except psycopg.OperationalError:
        pass  # refused at startup: as safe
    else:
        with other:
            assert other.execute("SELECT session_user").fetchone() == (LONG,)
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="own request"):
                other.execute(f"PGVEIL ELEVATE APPROVE {request_id}")
    assert state_of(served, request_id) == "pending"


def test_a_malformed_pgveil_statement_is_audited(served: Served) -> None:
    """A statement that starts with PGVEIL but is not one (42601) still leaves an access record of
    kind elevation and a completion with its SQLSTATE: forged or mistyped steps are on the trail."""
    with connect(served, SAM) as sam, pytest.raises(psycopg.errors.SyntaxError):
        sam.execute("PGVEIL ELEVATE APPROVE 12 REASON 'a' 'b'")

    def audited() -> bool:
        records = [r for r in served.audit() if r.get("login") == SAM]
        kinds = {(r.get("connection_id"), r.get("request")) for r in records
                 if r.get("type") == "access" and r.get("statement_kind") == "elevation"}
        return any((r.get("connection_id"), r.get("request")) in kinds and r.get("sqlstate") == "42601"
                   for r in records if r.get("type") == "completion")

    wait_until(audited, "the audit records", timeout=5)
