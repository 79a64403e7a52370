"""Protocol versions and startup parameters pass through pgveil as PostgreSQL negotiates them."""

from __future__ import annotations

import pytest

from proxy.wire import PROTOCOL_3_2
from proxy.wire.backend import BackendKeyData, NegotiateProtocolVersion, ParameterStatus
from tests.proxy_harness import RawClient, running_proxy


@pytest.fixture(scope="module")
def proxy(upstream):
    with running_proxy(upstream) as running:
        yield running


def key_of(messages: list[object]) -> BackendKeyData:
    [key] = [m for m in messages if isinstance(m, BackendKeyData)]
    return key


@pytest.mark.parametrize(("minor", "key_length"), [(0, 4), (2, 32)])
def test_cancel_key_has_the_length_of_the_negotiated_protocol(upstream, proxy, minor, key_length):
    with RawClient.connect(upstream.host, upstream.port, protocol=(3 << 16) | minor) as direct:
        direct_key = key_of(direct.startup_messages)
    with RawClient.connect(proxy.host, proxy.port, protocol=(3 << 16) | minor) as relayed:
        relayed_key = key_of(relayed.startup_messages)
    assert len(relayed_key.secret_key) == len(direct_key.secret_key) == key_length


def test_a_newer_protocol_than_3_2_is_negotiated_down_to_3_2(upstream, proxy):
    with RawClient.connect(proxy.host, proxy.port, protocol=(3 << 16) | 9) as client:
        first = client.startup_messages[0]
        assert first == NegotiateProtocolVersion(PROTOCOL_3_2, ())
        assert len(key_of(client.startup_messages).secret_key) == 32


def test_unknown_protocol_options_are_reported_by_postgres_through_pgveil(upstream, proxy):
    options = {"_pq_.relay_unknown_option": "1"}
    with RawClient.connect(upstream.host, upstream.port, protocol=(3 << 16) | 2, **options) as direct:
        expected = direct.startup_messages[0]
    with RawClient.connect(proxy.host, proxy.port, protocol=(3 << 16) | 2, **options) as relayed:
        assert relayed.startup_messages[0] == expected
    assert expected == NegotiateProtocolVersion(PROTOCOL_3_2, ("_pq_.relay_unknown_option",))


def test_parameter_status_at_startup_is_what_postgres_sends(upstream, proxy):
    def statuses(host: str, port: int) -> dict[str, str]:
        with RawClient.connect(host, port, application_name="relay_startup", DateStyle="German") as client:
            return {m.name: m.value for m in client.startup_messages if isinstance(m, ParameterStatus)}

    relayed = statuses(proxy.host, proxy.port)
    assert relayed == statuses(upstream.host, upstream.port)
    assert relayed["application_name"] == "relay_startup" and relayed["DateStyle"].startswith("German")


def test_a_database_that_does_not_exist_is_postgres_own_fatal(upstream, proxy):
    def fatal(host: str, port: int) -> tuple[str | None, str | None]:
        with RawClient.connect(host, port, database="relay_no_such_db") as client:
            error = client.startup_messages[-1]
        return error.get("C"), error.get("M")

    assert fatal(proxy.host, proxy.port) == fatal(upstream.host, upstream.port) == (
        "3D000", 'database "relay_no_such_db" does not exist')
