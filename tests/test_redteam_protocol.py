"""Red team: hand-made protocol messages from a masked login through pgveil (things drivers do not
send: named Parse then Bind/Execute, Describe of portals, FunctionCall, several statements in one
Query, messages in odd orders, NUL bytes, invalid UTF-8, pipelines that mix refused and allowed
statements). Every test asserts that no canary value is in any byte the client received."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import socket
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

from proxy.wire import (
    AuthenticationOk,
    AuthenticationSASL,
    AuthenticationSASLContinue,
    AuthenticationSASLFinal,
    FunctionCall,
    Parse,
    Query,
    SASLInitialResponse,
    SASLResponse,
    StartupMessage,
)
from proxy.wire.codec import frame
from proxy.wire.frontend import Bind, Close, CopyData, Describe, Execute, Flush, Sync
from tests import guard_setup
from tests.guard_setup import DATABASE, PASSWORD, POLICY, GuardWorld, leaked_canaries
from tests.guard_setup import GuardDatabase as _GuardDatabase
from tests.proxy_harness import RawClient, RunningProxy, running_proxy

world = guard_setup.world  # the shared guard database with canary values


class MaskedClient(RawClient):
    """The harness's protocol client, logging in with SCRAM-SHA-256 (as the masked logins must);
    it then sends exactly the messages a test gives it."""

    def __init__(self, host: str, port: int, user: str, password: str = PASSWORD) -> None:
        super().__init__(socket.create_connection((host, port), timeout=20))
        self.sock.sendall(StartupMessage(3 << 16, (("user", user), ("database", DATABASE))).encode())
        self._scram(password)
        self.startup = self.until_ready()

    def _scram(self, password: str) -> None:
        offer = self.receive()
        assert isinstance(offer, AuthenticationSASL), offer
        nonce = base64.b64encode(os.urandom(18)).decode()
        first_bare = f"n=,r={nonce}"
        self.send(SASLInitialResponse("SCRAM-SHA-256", f"n,,{first_bare}".encode()))
        server_first_message = self.receive()
        assert isinstance(server_first_message, AuthenticationSASLContinue), server_first_message
        server_first = server_first_message.data.decode()
        fields = dict(part.split("=", 1) for part in server_first.split(","))
        salt, iterations = base64.b64decode(fields["s"]), int(fields["i"])
        salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
        client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
        final_bare = f"c=biws,r={fields['r']}"
        auth_message = f"{first_bare},{server_first},{final_bare}".encode()
        signature = hmac.new(hashlib.sha256(client_key).digest(), auth_message, hashlib.sha256).digest()
        proof = base64.b64encode(bytes(a ^ b for a, b in zip(client_key, signature, strict=True))).decode()
        self.send(SASLResponse(f"{final_bare},p={proof}".encode()))
        assert isinstance(self.receive(), AuthenticationSASLFinal)
        assert isinstance(self.receive(), AuthenticationOk)


def everything(messages: list[Any]) -> str:
    """Every field of every message, as text, for canary searches."""
    return "\n".join(repr(message) for message in messages)


@pytest.fixture(scope="module")
def proxy(world: GuardWorld) -> Iterator[RunningProxy]:
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "policy.yaml")
        with open(path, "w") as handle:
            handle.write(POLICY)
        with running_proxy(_GuardDatabase(world), path) as running:
            yield running


@pytest.fixture
def client(proxy: RunningProxy) -> Iterator[MaskedClient]:
    masked = MaskedClient(proxy.host, proxy.port, "gv_analyst")
    try:
        yield masked
    finally:
        masked.close()


def _usable(client: MaskedClient) -> None:
    client.send(Query("select email from gv.people where id = 1"))
    messages = client.until_ready()
    assert "q***@leak.example" in everything(messages)


def test_named_parse_then_bind_execute_sees_masked_values(client: MaskedClient) -> None:
    client.send(Parse("rt_named", "select * from gv.people where id = $1"),
                Bind("", "rt_named", (), (b"1",)), Describe("P", ""), Execute(""),
                Bind("", "rt_named", (), (b"1",), (1,)), Execute(""), Sync())
    text = everything(client.until_ready())
    assert "q***@leak.example" in text
    assert leaked_canaries(text) == []


def test_refused_parse_leaves_no_statement_to_bind_even_under_a_reused_name(client: MaskedClient) -> None:
    client.send(Parse("rt_reused", "select id from gv.orders"), Sync())
    client.until_ready()
    client.send(Close("S", "rt_reused"), Parse("rt_reused", "select pgveil.mask_hash('x') || "
                                            "(select ssn from gv.people limit 1) from gv.people"),
                Bind("", "rt_reused", (), ()), Execute(""), Sync())
    text = everything(client.until_ready())
    assert "pgveil:" in text
    assert leaked_canaries(text) == []
    _usable(client)


def test_pipeline_mixing_refused_and_allowed_statements_runs_nothing_after_the_refusal(
    client: MaskedClient,
) -> None:
    client.send(Parse("", "select query_to_xml('select ssn from gv.people', true, true, '')"),
                Bind("", "", (), ()), Execute(""),
                Parse("", "select ssn from gv.people"), Bind("", "", (), ()), Execute(""), Sync(),
                Query("select 1; select (select string_agg(ssn, ',') from gv.people); "
                      "select table_to_xml('gv.people', true, true, '')"))
    text = everything(client.until_ready() + client.until_ready())
    assert "side-door-function" in text
    assert leaked_canaries(text) == []


def test_declared_cursor_executed_as_a_protocol_portal_is_masked(client: MaskedClient) -> None:
    client.send(Query("begin; declare rt_portal cursor for select * from gv.people order by id"))
    client.until_ready()
    client.send(Describe("P", "rt_portal"), Execute("rt_portal", 2), Execute("rt_portal", 0), Flush(), Sync(),
                Query("commit"))
    text = everything(client.until_ready() + client.until_ready())
    assert "q***@leak.example" in text
    assert leaked_canaries(text) == []


def test_function_call_message_is_refused_and_the_connection_stays_usable(client: MaskedClient) -> None:
    # 3826 is pg_catalog.pg_read_file(text) on PostgreSQL 18; any OID is refused for a masked role
    for oid in (3826, 1598):
        client.send(FunctionCall(oid, (0,), (b"postgresql.auto.conf",), 0))
        messages = client.until_ready()
        assert "function-call-message" in everything(messages)
    _usable(client)


def test_copy_data_outside_copy_mode_carries_no_statement(client: MaskedClient) -> None:
    client.send(CopyData(b"select ssn from gv.people"), Sync())
    text = everything(client.until_ready())
    assert leaked_canaries(text) == []
    _usable(client)


def test_query_with_a_nul_byte_inside_is_not_read_as_two_statements(proxy: RunningProxy) -> None:
    client = MaskedClient(proxy.host, proxy.port, "gv_analyst")
    try:
        client.send(frame(b"Q", b"select 1\x00select ssn from gv.people\x00"))
        try:
            messages = client.until_ready()
        except (EOFError, ConnectionResetError):
            messages = []
        assert leaked_canaries(everything(messages)) == []
    finally:
        client.close()


def test_query_with_invalid_utf8_is_refused_without_data(client: MaskedClient) -> None:
    for body in (b"select ssn from gv.people -- \xff\x00", b"select '\xc3' , ssn from gv.people\x00",
                 b"select E'\xe4\xb8\\' , (select ssn from gv.people limit 1) -- '\x00"):
        client.send(frame(b"Q", body))
        text = everything(client.until_ready())
        assert leaked_canaries(text) == [], body
    _usable(client)


def test_a_query_split_into_single_bytes_is_judged_whole(client: MaskedClient) -> None:
    for byte in Query("select ssn, email from gv.people where id = 1").encode():
        client.sock.sendall(bytes([byte]))
    text = everything(client.until_ready())
    assert "q***@leak.example" in text
    assert leaked_canaries(text) == []


def test_parse_with_parameter_types_cannot_reach_raw_values(client: MaskedClient) -> None:
    # 25 text, 2205 regclass, 24 regproc: a parameter is a value, never a name PostgreSQL looks up
    client.send(Parse("", "select $1::regclass, count(*) from gv.people where ssn = $2", (2205, 25)),
                Bind("", "", (), (b"gv.people", b"914-27-6380")), Execute(""),
                Parse("", "select set_config($1, $2, false)", (25, 25)),
                Bind("", "", (), (b"search_path", b"gv")), Execute(""), Sync())
    text = everything(client.until_ready())
    assert "session-setting" in text
    client.send(Query("show search_path"))
    assert '"$user", public' in everything(client.until_ready())
    client.send(Query("select leak_ssn(1)"))
    assert leaked_canaries(everything(client.until_ready())) == []
