"""Red team, round 5: PostgreSQL's diagnostics (plan dumps, LOG/DEBUG notices) must not carry raw
values to a login with masked data, whatever route turns them on, on PostgreSQL 18 and 15.

The attack (issue 13 §1): a masked login turns on `client_min_messages = debug5` (or `log`) and
`debug_print_plan`, then SELECTs a hashed column; on PostgreSQL 18 the custom plans of a
SQL-language masking function held the raw value as a plan constant, sent to the client as LOG
messages. Every byte pgveil sends the client is captured by a TCP tap and searched for each raw
value: as text, as hex, and inside the plan trees' `:constvalue N [ b1 b2 ... ]` byte lists
(decoded, pretty-printed line breaks and all), together with the hash key.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import re
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import psycopg
import pytest

from proxy.guard.settings import diagnostic_refusal, setting_refusal
from proxy.session.relay import notice_is_diagnostic
from proxy.upstream_setup import hmac_pads
from proxy.wire import ErrorResponse, NoticeResponse
from tests.conftest import Upstream
from tests.guard_setup import HASH_KEY
from tests.proxy_harness import RunningProxy, running_proxy, wait_until

DATABASE = "diag_test"
PASSWORD = "diag-pw-13"
MASKED, SEER = "dg_masked", "dg_seer"

SCHEMA = """
CREATE SCHEMA dg;
CREATE TABLE dg.people (
    id integer PRIMARY KEY, ssn text, account integer, full_name text, email text, birth_date date,
    born_month date, salary numeric(10,2), note text, secret text, code text
);
INSERT INTO dg.people VALUES
 (1, 'SSN-CANARY-5501', 918273645, 'Zed Quokkafeld', 'quokkamail7731@leak.example', '1987-06-23',
     '1983-09-17', 123457.89, 'NOTE-CANARY-77', 'SECRET-CANARY-88', 'CODE-CANARY-99');
INSERT INTO dg.people
SELECT g, 'ssn-' || g, g, 'name ' || g, 'user' || g || '@example.com', date '2001-01-01' + g,
       date '2002-01-01' + g, g * 10, 'note ' || g, 'secret ' || g, 'code ' || g
FROM generate_series(2, 9) AS g;
"""

POLICY = """
version: 1
settings:
  default_role: deny
  hash_key_env: PGVEIL_HASH_KEY
roles:
  masked:
    members: [dg_masked]
    statements: [select]
    tables: ["dg.*"]
    reveal: [public]
  seer:
    members: [dg_seer]
    statements: [all]
    tables: ["*"]
    reveal: [public, internal, confidential, restricted]
datasets:
  dg.people:
    columns:
      id:         {sensitivity: public}
      ssn:        {sensitivity: restricted, protection: hash}
      account:    {sensitivity: restricted, protection: hash}
      full_name:  {sensitivity: confidential, protection: {partial: {keep_first: 1}}}
      email:      {sensitivity: confidential, protection: email}
      birth_date: {sensitivity: confidential, protection: {generalize: year}}
      born_month: {sensitivity: confidential, protection: {generalize: month}}
      salary:     {sensitivity: confidential, protection: {generalize: {bucket: 1000}}}
      note:       {sensitivity: confidential, protection: redact}
      secret:     {sensitivity: confidential}
      code:       {sensitivity: confidential, protection: {constant: "x"}}
"""

# The raw values of row 1, one per protection, as text ...
TEXT_CANARIES = ("SSN-CANARY-5501", "918273645", "Quokkafeld", "quokkamail7731", "1987-06-23", "1983-09-17",
                 "123457.89", "NOTE-CANARY-77", "SECRET-CANARY-88", "CODE-CANARY-99")


def _days(value: datetime.date) -> bytes:
    return struct.pack("<i", (value - datetime.date(2000, 1, 1)).days)


# ... and as PostgreSQL holds them in a plan constant: int4 and date are the Datum's first bytes,
# numeric 123457.89 is the base-10000 digits 12, 3457, 8900; text is inside the varlena.
BINARY_CANARIES = {
    "account 918273645": struct.pack("<i", 918273645),
    "birth_date 1987-06-23": _days(datetime.date(1987, 6, 23)),
    "born_month 1983-09-17": _days(datetime.date(1983, 9, 17)),
    "salary 123457.89": struct.pack("<hhh", 12, 3457, 8900),
}
READS = (
    "SELECT * FROM dg.people ORDER BY id",
    "SELECT ssn, account, count(*) FROM dg.people GROUP BY ssn, account",
    "SELECT id FROM dg.people WHERE ssn = 'nope' OR email LIKE 'q%' OR salary > 100",
)
OPTIONS = "-c client_min_messages=debug5 -c debug_print_plan=on -c debug_print_parse=on"
TURN_ON = ("client_min_messages = debug5", "debug_print_plan = on", "debug_print_rewritten = on")


# ---- what the client received ---------------------------------------------------------------------

def plan_constants(text: str) -> list[bytes]:
    """The bytes of every `:constvalue N [ b1 b2 ... ]` in PostgreSQL's node dumps. With
    debug_pretty_print (the default) lines break after 78 characters, even inside a number, and
    go on at the indentation of the line the constant began on: that much is cut again."""
    constants = []
    for match in re.finditer(r":constvalue \d+ \[", text):
        line_start = text.rfind("\n", 0, match.start()) + 1
        indent = match.start() - line_start
        end = text.find("]", match.end())
        if end < 0:
            continue
        raw = text[match.end() : end]
        raw = re.sub("\n" + " " * indent, "", raw).replace("\n", " ")
        constants.append(bytes(int(number) & 0xFF for number in raw.split()))
    return constants


def leaks(received: bytes) -> list[str]:
    """Every raw value (and the hash key) found in what the client received."""
    text = received.decode("latin-1")
    constants = plan_constants(text)
    found = []
    inner, outer = hmac_pads(HASH_KEY.encode())
    secrets = {"hash key inner pad": inner, "hash key outer pad": outer}
    for canary in TEXT_CANARIES:
        raw = canary.encode()
        if raw in received or raw.hex() in text or raw.hex().upper() in text:
            found.append(f"{canary} in the bytes")
        if any(raw in constant for constant in constants):
            found.append(f"{canary} in a plan constant")
    for name, raw in {**BINARY_CANARIES, **secrets}.items():
        if any(raw in constant for constant in constants):
            found.append(f"{name} in a plan constant")
    for name, raw in secrets.items():
        if raw in received or raw.hex() in text:
            found.append(f"{name} in the bytes")
    return found


def backend_messages(received: bytes) -> Iterator[tuple[int, bytes]]:
    """(type byte, body) of each message in a captured server-to-client stream (no TLS)."""
    pos = 0
    while pos + 5 <= len(received):
        tag = received[pos]
        (length,) = struct.unpack("!I", received[pos + 1 : pos + 5])
        yield tag, received[pos + 5 : pos + 1 + length]
        pos += 1 + length


def diagnostics_received(received: bytes) -> list[str]:
    """The severities of the notices below NOTICE the client got."""
    found = []
    for tag, body in backend_messages(received):
        if tag == ord("N") and notice_is_diagnostic(body):
            fields = dict(NoticeResponse.decode(body).fields)
            found.append(fields.get("V") or fields.get("S") or "?")
    return found


def errors_received(received: bytes) -> list[str]:
    return [f"{e.get('C')} {e.get('M')}" for e in (ErrorResponse.decode(body) for tag, body in
                                                  backend_messages(received) if tag == ord("E"))]


class Tap:
    """A TCP relay between a client and pgveil that keeps every byte pgveil sends the client."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._received = bytearray()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            for source, sink, keep in ((client, upstream, False), (upstream, client, True)):
                thread = threading.Thread(target=self._pump, args=(source, sink, keep), daemon=True)
                thread.start()
                self._threads.append(thread)

    def _pump(self, source: socket.socket, sink: socket.socket, keep: bool) -> None:
        try:
            while data := source.recv(65536):
                if keep:  # recorded before it is passed on: what the client got is all here
                    with self._lock:
                        self._received += data
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (sink, source):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def received_so_far(self) -> bytes:
        with self._lock:
            return bytes(self._received)

    def received(self) -> bytes:
        for thread in self._threads:
            thread.join(10)
        with self._lock:
            return bytes(self._received)

    def close(self) -> None:
        self.listener.close()


# ---- the world --------------------------------------------------------------------------------------

class _Database:
    """The upstream with the diagnostics test database as pgveil's default database."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.superuser = upstream.superuser
        self.superpassword = upstream.superpassword

    def dsn(self, user: str | None = None, password: str | None = None, dbname: str = DATABASE) -> str:
        return self.upstream.dsn(user, password, dbname)


@dataclass
class World:
    upstream: Upstream
    proxy: RunningProxy
    version: int
    outcomes: list[str] = field(default_factory=list)

    def super_sql(self, sql: str) -> None:
        self.upstream.execute(sql, dbname=DATABASE)


@pytest.fixture(scope="module")
def world(upstream_any: Upstream, tmp_path_factory: pytest.TempPathFactory,
          monkeypatch_module: pytest.MonkeyPatch) -> Iterator[World]:
    monkeypatch_module.setenv("PGVEIL_HASH_KEY", HASH_KEY)
    upstream = upstream_any
    upstream.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
    for login in (MASKED, SEER):
        upstream.execute(f"DROP ROLE IF EXISTS {login}")
        upstream.execute(f"CREATE ROLE {login} LOGIN PASSWORD '{PASSWORD}'")
    upstream.execute(f"CREATE DATABASE {DATABASE}")
    upstream.execute(SCHEMA, dbname=DATABASE)
    upstream.execute(f"GRANT USAGE ON SCHEMA dg TO {MASKED}, {SEER}; "
                     f"GRANT SELECT ON ALL TABLES IN SCHEMA dg TO {MASKED}, {SEER}", dbname=DATABASE)
    policy = tmp_path_factory.mktemp("diagnostics") / "policy.yaml"
    policy.write_text(POLICY)
    with psycopg.connect(upstream.dsn()) as conn:
        version = int(conn.info.server_version) // 10000
    with running_proxy(_Database(upstream), policy_path=str(policy)) as proxy:
        yield World(upstream, proxy, version)


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as patch:
        yield patch


# ---- the routes that turn diagnostics on, and the clients ---------------------------------------------

@dataclass(frozen=True)
class Route:
    """How diagnostics are turned on: superuser SQL run directly beforehand (and its undoing),
    startup options, statements the masked login sends first, and the reads it then sends."""

    before: tuple[str, ...] = ()
    after: tuple[str, ...] = ()
    options: str | None = None
    statements: tuple[str, ...] = ()
    reads: tuple[str, ...] = READS
    refused_at_login: bool = False


def _server_default(target: str) -> Route:
    return Route(before=tuple(f"ALTER {target} SET {setting}" for setting in TURN_ON),
                 after=(f"ALTER {target} RESET ALL",), refused_at_login=True)


ROUTES = {
    "set": Route(statements=tuple(f"SET {setting}" for setting in TURN_ON)),
    "set_config": Route(statements=("SELECT pg_catalog.set_config('client_min_messages', 'debug5', false), "
                                    "set_config('debug_print_plan', 'on', false)",)),
    "set_config_in_the_read": Route(reads=(
        "SELECT set_config('client_min_messages', 'log', false), "
        "set_config('debug_print_plan', 'on', false), p.* FROM dg.people p", *READS)),
    "startup_options": Route(options=OPTIONS, refused_at_login=True),
    "alter_role": _server_default(f"ROLE {MASKED}"),
    "alter_database": _server_default(f"DATABASE {DATABASE}"),
    "alter_role_in_database": _server_default(f"ROLE {MASKED} IN DATABASE {DATABASE}"),
}


def _psycopg(port: int, login: str, route: Route, prepare: bool) -> list[str]:
    """Run the route's statements and reads; what happened, one line each."""
    happened = []
    kwargs: dict[str, Any] = {"options": route.options} if route.options else {}
    try:
        conn = psycopg.connect(host="127.0.0.1", port=port, user=login, password=PASSWORD, dbname=DATABASE,
                               sslmode="disable", autocommit=True, **kwargs)
    except psycopg.Error as exc:
        return [f"login refused: {exc.sqlstate} {exc}"]
    with conn:
        for sql in (*route.statements, *route.reads):
            if prepare:
                try:
                    cursor = conn.execute(sql.encode(), prepare=True)  # type: ignore[call-overload]
                    rows = cursor.fetchall() if cursor.description is not None else []
                    happened.append(f"ok {len(rows)} rows")
                except psycopg.Error as exc:
                    happened.append(f"error {exc.sqlstate} {exc}")
            else:  # the simple query protocol
                result = conn.pgconn.exec_(sql.encode())
                message = result.error_message.decode(errors="replace")
                happened.append(f"error {message}" if message else f"ok {result.ntuples} rows")
    return happened


def _asyncpg(port: int, login: str, route: Route) -> list[str]:
    async def run() -> list[str]:
        settings = {"options": route.options} if route.options else {}
        try:
            conn = await asyncpg.connect(host="127.0.0.1", port=port, user=login, password=PASSWORD,
                                         database=DATABASE, ssl=False, server_settings=settings)
        except asyncpg.PostgresError as exc:
            return [f"login refused: {exc.sqlstate} {exc}"]
        happened = []
        try:
            for sql in (*route.statements, *route.reads):
                try:
                    happened.append(f"ok {len(await conn.fetch(sql))} rows")
                except asyncpg.PostgresError as exc:
                    happened.append(f"error {exc.sqlstate} {exc}")
        finally:
            await conn.close()
        return happened

    return asyncio.run(run())


CLIENTS: dict[str, Callable[[int, str, Route], list[str]]] = {
    "simple": lambda port, login, route: _psycopg(port, login, route, prepare=False),
    "extended": lambda port, login, route: _psycopg(port, login, route, prepare=True),
    "asyncpg": _asyncpg,
}


def run_through_tap(world: World, login: str, route: Route, client: str) -> tuple[list[str], bytes]:
    tap = Tap(world.proxy.port)
    try:
        for sql in route.before:
            world.super_sql(sql)
        happened = CLIENTS[client](tap.port, login, route)
    finally:
        tap.close()
        for sql in route.after:
            world.super_sql(sql)
    return happened, tap.received()


# ---- the tests ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("client", sorted(CLIENTS))
@pytest.mark.parametrize("route", sorted(ROUTES))
def test_diagnostics_never_carry_raw_values_to_a_masked_login(world: World, route: str, client: str) -> None:
    chosen = ROUTES[route]
    happened, received = run_through_tap(world, MASKED, chosen, client)
    assert leaks(received) == [], (route, client, happened)
    assert diagnostics_received(received) == [], (route, client, happened)
    if chosen.refused_at_login:
        assert happened[0].startswith("login refused"), happened
        assert errors_received(received)[0].startswith("28000 pgveil: session-setting"), happened
        return
    # the reads ran and were masked; the routes pgveil sees were refused, not silently ignored
    assert any(line.startswith("ok") and not line.startswith("ok 0") for line in happened), happened
    refused = [line for line in happened if "pgveil: session-setting" in line]
    assert refused, happened


def test_server_wide_diagnostics_are_hidden_from_a_masked_login(world: World) -> None:
    """ALTER SYSTEM (postgresql.conf alike) is out of pgveil's sight: the relay itself keeps every
    notice below NOTICE from the masked login, while a login that sees everything still gets them."""
    world.super_sql("ALTER SYSTEM SET client_min_messages = debug5")
    world.super_sql("ALTER SYSTEM SET debug_print_plan = on")
    try:
        world.super_sql("SELECT pg_reload_conf()")

        def applied() -> bool:
            with psycopg.connect(world.upstream.dsn(dbname=DATABASE)) as conn:
                return conn.execute("SHOW debug_print_plan").fetchone() == ("on",)

        wait_until(applied, "the server-wide settings to apply")
        for client in sorted(CLIENTS):
            happened, received = run_through_tap(world, MASKED, Route(), client)
            assert all(line.startswith("ok") for line in happened), happened
            assert leaks(received) == [] and diagnostics_received(received) == [], (client, happened)
        happened, received = run_through_tap(world, SEER, Route(reads=READS[:1]), "simple")
        assert happened == ["ok 9 rows"]
        assert "LOG" in diagnostics_received(received)
    finally:
        world.super_sql("ALTER SYSTEM RESET client_min_messages")
        world.super_sql("ALTER SYSTEM RESET debug_print_plan")
        world.super_sql("SELECT pg_reload_conf()")


def test_a_login_that_sees_everything_still_gets_the_diagnostics_it_asks_for(world: World) -> None:
    route = Route(statements=tuple(f"SET {setting}" for setting in TURN_ON), reads=READS[:1])
    happened, received = run_through_tap(world, SEER, route, "simple")
    assert all(line.startswith("ok") for line in happened), happened
    assert "LOG" in diagnostics_received(received) and "DEBUG" in diagnostics_received(received)


@pytest.mark.parametrize("statement", [
    f"ALTER ROLE {MASKED} SET client_min_messages = debug5",
    f"ALTER USER {MASKED} SET debug_print_plan TO on",
    f"ALTER ROLE {MASKED} IN DATABASE {DATABASE} SET client_min_messages = 'log'",
    "ALTER ROLE ALL SET debug_print_parse = true",
    f"ALTER DATABASE {DATABASE} SET client_min_messages TO debug1",
    f"ALTER ROLE {MASKED} SET client_min_messages FROM CURRENT",
    "ALTER SYSTEM SET trace_sort = on",
    f"ALTER ROLE {MASKED} SET auto_explain.log_level = notice",
    "CREATE FUNCTION dg.noisy() RETURNS int LANGUAGE sql SET work_mem = '1MB' "
    "SET client_min_messages = debug5 AS 'SELECT 1'",
    "ALTER FUNCTION dg.noisy() SET debug_print_plan = on",
    "ALTER ROUTINE dg.noisy() SET client_min_messages FROM CURRENT",
])
def test_no_role_may_make_a_diagnostic_setting_a_server_default(world: World, statement: str) -> None:
    happened, _ = run_through_tap(world, SEER, Route(statements=(statement,), reads=()), "simple")
    assert len(happened) == 1 and "pgveil: session-setting" in happened[0], happened


def test_quiet_values_of_diagnostic_settings_stay_allowed(world: World) -> None:
    statements = ("SET client_min_messages = warning", "SET debug_print_plan = off",
                  "RESET client_min_messages", "SELECT set_config('client_min_messages', 'notice', false)",
                  "SET client_min_messages TO DEFAULT")
    happened, _ = run_through_tap(world, MASKED, Route(statements=statements, reads=READS[:1]), "simple")
    assert all(line.startswith("ok") for line in happened), happened


def test_the_masking_functions_leave_no_value_in_plans_straight_on_postgresql(world: World) -> None:
    """Layer 3 alone, as a superuser straight on PostgreSQL: debug_print_plan and auto_explain's
    nested statements (with their parameters on 16+) show no value pgveil.mask_hash hashes."""
    received = []
    with psycopg.connect(world.upstream.dsn(dbname=DATABASE), autocommit=True) as conn:
        conn.add_notice_handler(
            lambda diag: received.append(f"{diag.message_primary}\n{diag.message_detail}"))
        conn.execute("LOAD 'auto_explain'")
        conn.execute("SET client_min_messages = debug5")
        conn.execute("SET debug_print_plan = on")
        conn.execute("SET plan_cache_mode = force_custom_plan")  # any client may set it
        conn.execute("SET auto_explain.log_min_duration = 0")
        conn.execute("SET auto_explain.log_nested_statements = on")
        conn.execute("SET auto_explain.log_verbose = on")
        conn.execute("SET auto_explain.log_level = notice")
        if world.version >= 16:
            conn.execute("SET auto_explain.log_parameter_max_length = -1")
        for _ in range(2):
            rows = conn.execute("SELECT pgveil.mask_hash(ssn), pgveil.mask_hash(account::text) "
                                "FROM dg.people ORDER BY id").fetchall()
            assert len(rows) == 9
    text = "\n".join(received)
    assert ":constvalue" in text and "Query Text" in text  # the diagnostics were really on
    assert leaks(text.encode("latin-1", "replace")) == []


# ---- the pieces ------------------------------------------------------------------------------------

def _notice(**fields: str) -> bytes:
    return b"".join(code.encode() + value.encode() + b"\x00" for code, value in fields.items()) + b"\x00"


def test_notice_severity_is_read_from_the_non_localized_field() -> None:
    assert notice_is_diagnostic(_notice(S="LOG", V="LOG", C="00000", M="plan:"))
    assert notice_is_diagnostic(_notice(S="DEBUG", V="DEBUG", M="x"))
    assert not notice_is_diagnostic(_notice(S="HINWEIS", V="NOTICE", M="x"))
    assert not notice_is_diagnostic(_notice(S="WARNING", V="WARNING", M="x"))
    assert not notice_is_diagnostic(_notice(S="INFO", V="INFO", M="x"))
    assert notice_is_diagnostic(_notice(S="NOTICE", V="LOG", M="x"))  # 'V' wins over a localized 'S'
    assert not notice_is_diagnostic(_notice(S="NOTICE", M="x"))  # servers without 'V'
    assert notice_is_diagnostic(_notice(S="PROTOKOLL", M="x"))  # unknown: hidden
    assert notice_is_diagnostic(_notice(M="no severity at all"))
    assert notice_is_diagnostic(b"")


@pytest.mark.parametrize(("name", "value", "refused"), [
    ("client_min_messages", "debug5", True), ("client_min_messages", "LOG", True),
    ("client_min_messages", "debug", True), ("client_min_messages", "'notice'", False),
    ("client_min_messages", "warning", False), ("client_min_messages", "error", False),
    ("debug_print_plan", "on", True), ("debug_print_plan", "1", True), ("debug_print_plan", "off", False),
    ("Debug_Print_Parse", "yes", True), ("debug_print_rewritten", "true", True),
    ("debug_print_raw_parse", "on", True), ("log_statement_stats", "on", True), ("trace_sort", "on", True),
    ("trace_notify", "off", False), ("auto_explain.log_level", "notice", True),
    ("plpgsql.print_strict_params", "on", True),
    ("debug_pretty_print", "on", False), ("work_mem", "64MB", False), ("log_min_messages", "debug5", False),
])
def test_diagnostic_settings(name: str, value: str, refused: bool) -> None:
    assert (diagnostic_refusal(name, [value], "role r has masked data") is not None) == refused
    assert (setting_refusal(name, [value], "r") is not None) == refused


def test_plan_constants_are_decoded_across_pretty_printed_line_breaks() -> None:
    dump = ("      {CONST \n      :consttype 25 \n      :constvalue 14 [ 56 0 0 0 67 65 78 65 82 89 45 5\n"
            "      7 49 52 ]\n      }\n   :constvalue 4 [ -1 0 0 0 0 0 0 0 ]")
    assert plan_constants(dump) == [b"8\x00\x00\x00CANARY-914", b"\xff" + bytes(7)]


# ---- neighbours: EXPLAIN ------------------------------------------------------------------------------

def _explain_options(version: int) -> list[str]:
    options = ["VERBOSE", "ANALYZE, VERBOSE, BUFFERS, WAL, SETTINGS", "FORMAT JSON, VERBOSE", "FORMAT XML",
               "FORMAT YAML, ANALYZE"]
    if version >= 17:
        options += ["ANALYZE, MEMORY, SERIALIZE TEXT", "ANALYZE, SERIALIZE BINARY, VERBOSE"]
    return options


def test_explain_of_masked_statements_shows_no_raw_value_in_any_option(world: World) -> None:
    options = _explain_options(world.version)
    reads = tuple(f"EXPLAIN ({option}) {read}" for option in options for read in READS)
    for client in ("simple", "extended"):
        happened, received = run_through_tap(world, MASKED, Route(reads=reads), client)
        assert all(line.startswith("ok") for line in happened), happened
        assert leaks(received) == [], (client, happened)
    if world.version >= 16:  # a statement with parameters, planned without their values
        happened, received = run_through_tap(world, MASKED, Route(reads=(
            "EXPLAIN (GENERIC_PLAN, VERBOSE) SELECT * FROM dg.people WHERE id = $1",)), "simple")
        assert happened[0].startswith("ok"), happened
        assert leaks(received) == []


@pytest.mark.parametrize(("column", "right", "wrong"), [
    ("ssn", "'SSN-CANARY-5501'", "'SSN-CANARY-5502'"),
    ("account", "'918273645'", "'918273646'"),
    ("full_name", "'Zed Quokkafeld'", "'Zed Quokkafelt'"),
    ("email", "'quokkamail7731@leak.example'", "'quokkamail7732@leak.example'"),
    ("birth_date", "'1987-06-23'", "'1987-06-24'"),
    ("salary", "123457.89", "123457.88"),
])
def test_explain_analyze_answers_a_right_and_a_wrong_guess_alike(world: World, column: str, right: str,
                                                                 wrong: str) -> None:
    """Estimates and `Rows Removed by Filter` describe the masked value, so EXPLAIN is no oracle."""
    outputs = []
    for guess in (right, wrong):
        sql = (f"EXPLAIN (ANALYZE, TIMING OFF, SUMMARY OFF, COSTS ON) "
               f"SELECT id FROM dg.people WHERE {column} = {guess}")
        with psycopg.connect(world.proxy.dsn(MASKED, PASSWORD, DATABASE), autocommit=True) as conn:
            rows = conn.execute(sql.encode()).fetchall()  # type: ignore[call-overload]
        plan = "\n".join(row[0] for row in rows)
        outputs.append(plan.replace(guess, "<guess>").replace(guess.strip("'"), "<guess>"))
    assert outputs[0] == outputs[1]
    assert "Rows Removed by Filter: 9" in outputs[0]


def test_a_session_demoted_by_a_reload_gets_no_more_diagnostics(
        world: World, tmp_path_factory: pytest.TempPathFactory) -> None:
    """dg_seer turns diagnostics on while it sees everything; a reload masks it: the relay asks the
    policy at each notice, so the very next statement's diagnostics are hidden."""
    path = tmp_path_factory.mktemp("demoted") / "policy.yaml"
    path.write_text(POLICY)
    with running_proxy(_Database(world.upstream), policy_path=str(path)) as proxy:
        tap = Tap(proxy.port)
        try:
            with psycopg.connect(host="127.0.0.1", port=tap.port, user=SEER, password=PASSWORD,
                                 dbname=DATABASE, sslmode="disable", autocommit=True) as conn:
                for setting in TURN_ON:
                    conn.execute(f"SET {setting}".encode())  # type: ignore[call-overload]
                conn.execute(b"SELECT 1")
                before = len(tap.received_so_far())
                assert "LOG" in diagnostics_received(tap.received_so_far())
                path.write_text(POLICY.replace("members: [dg_seer]", "members: [nobody]")
                                .replace("members: [dg_masked]", "members: [dg_masked, dg_seer]"))
                proxy.run(proxy.server.reload())
                rows = conn.execute(READS[0].encode()).fetchall()  # type: ignore[call-overload]
                assert len(rows) == 9 and rows[0][1] != "SSN-CANARY-5501"  # masked now
        finally:
            tap.close()
        after = tap.received()[before:]
    assert diagnostics_received(after) == [] and leaks(after) == []


@pytest.mark.parametrize("statement", [
    f"ALTER ROLE {MASKED} SET client_min_messages = notice",
    f"ALTER ROLE {MASKED} RESET client_min_messages",
    f"ALTER DATABASE {DATABASE} SET work_mem = '8MB'",
    "CREATE FUNCTION dg.quiet() RETURNS int LANGUAGE sql SET work_mem = '1MB' AS 'SELECT 1'",
])
def test_quiet_server_defaults_are_left_to_postgresql(world: World, statement: str) -> None:
    """pgveil does not refuse them (PostgreSQL may, for want of a privilege)."""
    happened, _ = run_through_tap(world, SEER, Route(statements=(statement,), reads=()), "simple")
    assert len(happened) == 1 and "pgveil:" not in happened[0], happened


def test_diagnostic_settings_as_startup_parameters_refuse_the_masked_login(world: World) -> None:
    """Settings sent as startup parameters of their own (asyncpg's server_settings), not in options."""
    async def login() -> str:
        try:
            settings = {"client_min_messages": "debug5", "debug_print_plan": "on"}
            conn = await asyncpg.connect(host="127.0.0.1", port=tap.port, user=MASKED, password=PASSWORD,
                                         database=DATABASE, ssl=False, server_settings=settings)
        except asyncpg.PostgresError as exc:
            return f"login refused: {exc}"
        await conn.close()
        return "logged in"

    tap = Tap(world.proxy.port)
    try:
        outcome = asyncio.run(login())
    finally:
        tap.close()
    received = tap.received()
    assert outcome.startswith("login refused"), outcome
    assert errors_received(received)[0].startswith("28000 pgveil: session-setting: client_min_messages")
    assert leaks(received) == [] and diagnostics_received(received) == []


def test_the_audit_and_metrics_layers_pass_the_question_on(
        world: World, tmp_path_factory: pytest.TempPathFactory) -> None:
    """As deployed (audit log, metrics) the policy is MeteredConnection(AuditedConnection(guard)):
    the login that sees everything still gets its diagnostics, the masked one none."""
    directory = tmp_path_factory.mktemp("deployed")
    (directory / "policy.yaml").write_text(POLICY)
    with running_proxy(_Database(world.upstream), policy_path=str(directory / "policy.yaml"),
                       audit_log=str(directory / "audit.jsonl"), metrics="127.0.0.1:0") as proxy:
        deployed = World(world.upstream, proxy, world.version)
        route = Route(statements=tuple(f"SET {setting}" for setting in TURN_ON), reads=READS[:1])
        happened, received = run_through_tap(deployed, SEER, route, "simple")
        assert all(line.startswith("ok") for line in happened), happened
        assert "LOG" in diagnostics_received(received)
        happened, received = run_through_tap(deployed, MASKED, route, "extended")
        assert leaks(received) == [] and diagnostics_received(received) == [], happened
