"""The sans-I/O codec: every message round-trips, framing respects its limits, bad bytes are refused."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.wire import (
    MAX_STARTUP_PACKET,
    CancelRequest,
    ConnectionState,
    Event,
    GSSENCRequest,
    MessageScanner,
    Phase,
    ProtocolViolation,
    ReceiveBuffer,
    SSLRequest,
    StartupMessage,
    decode_authentication,
    decode_backend,
    decode_frontend,
    decode_startup_packet,
)
from proxy.wire import backend as be
from proxy.wire import frontend as fe

names = st.text(st.characters(exclude_characters="\x00", exclude_categories=("Cs",)), max_size=40)
raw = st.binary(max_size=64)
int16 = st.integers(-(2**15), 2**15 - 1)
int32 = st.integers(-(2**31), 2**31 - 1)
oid = st.integers(0, 2**32 - 1)
values = st.lists(st.one_of(st.none(), raw), max_size=6).map(tuple)
formats = st.lists(st.sampled_from([0, 1]), max_size=6).map(tuple)
fields = st.lists(st.tuples(st.sampled_from("SVCMDHPpqWstcdnFLR"), names), max_size=8).map(tuple)

FRONTEND = st.one_of(
    st.builds(fe.Query, names),
    st.builds(fe.Parse, names, names, st.lists(oid, max_size=6).map(tuple)),
    st.builds(fe.Bind, names, names, formats, values, formats),
    st.builds(fe.Describe, st.sampled_from("SP"), names),
    st.builds(fe.Execute, names, int32),
    st.builds(fe.Close, st.sampled_from("SP"), names),
    st.builds(fe.Sync),
    st.builds(fe.Flush),
    st.builds(fe.FunctionCall, oid, formats, values, st.sampled_from([0, 1])),
    st.builds(fe.CopyData, raw),
    st.builds(fe.CopyDone),
    st.builds(fe.CopyFail, names),
    st.builds(fe.Terminate),
    st.builds(fe.PasswordMessage, names),
)

BACKEND = st.one_of(
    st.builds(be.BackendKeyData, int32, st.binary(min_size=4, max_size=256)),
    st.builds(be.NegotiateProtocolVersion, st.integers(3 << 16, (3 << 16) + 5),
              st.lists(names, max_size=4).map(tuple)),
    st.builds(be.ParameterStatus, names, names),
    st.builds(be.ReadyForQuery, st.sampled_from("ITE")),
    st.builds(be.ErrorResponse, fields),
    st.builds(be.NoticeResponse, fields),
    st.builds(be.NotificationResponse, int32, names, names),
    st.builds(be.CommandComplete, names),
    st.builds(be.RowDescription, st.lists(
        st.builds(be.FieldDescription, names, oid, int16, oid, int16, int32, st.sampled_from([0, 1])),
        max_size=5).map(tuple)),
    st.builds(be.DataRow, values),
    st.builds(be.ParameterDescription, st.lists(oid, max_size=6).map(tuple)),
    st.builds(be.FunctionCallResponse, st.one_of(st.none(), raw)),
    st.builds(be.ParseComplete), st.builds(be.BindComplete), st.builds(be.CloseComplete),
    st.builds(be.NoData), st.builds(be.PortalSuspended), st.builds(be.EmptyQueryResponse),
    st.builds(be.CopyInResponse, st.sampled_from([0, 1]), formats),
    st.builds(be.CopyOutResponse, st.sampled_from([0, 1]), formats),
    st.builds(be.CopyBothResponse, st.sampled_from([0, 1]), formats),
    st.builds(fe.CopyData, raw),
    st.builds(fe.CopyDone),
)

AUTHENTICATION = st.one_of(
    st.builds(be.AuthenticationOk), st.builds(be.AuthenticationKerberosV5),
    st.builds(be.AuthenticationCleartextPassword),
    st.builds(be.AuthenticationMD5Password, st.binary(min_size=4, max_size=4)),
    st.builds(be.AuthenticationGSS), st.builds(be.AuthenticationGSSContinue, raw),
    st.builds(be.AuthenticationSSPI),
    st.builds(be.AuthenticationSASL, st.lists(names.filter(bool), min_size=1, max_size=3).map(tuple)),
    st.builds(be.AuthenticationSASLContinue, raw), st.builds(be.AuthenticationSASLFinal, raw),
)

STARTUP = st.one_of(
    st.builds(StartupMessage, st.sampled_from([3 << 16, (3 << 16) | 2]),
              st.lists(st.tuples(names.filter(bool), names), max_size=6).map(tuple)),
    st.builds(SSLRequest), st.builds(GSSENCRequest),
    st.builds(CancelRequest, int32, st.binary(min_size=4, max_size=256)),
)


def frames(data: bytes) -> list[tuple[int, bytes]]:
    buffer = ReceiveBuffer()
    buffer.feed(data)
    out = []
    while (message := buffer.next_message()) is not None:
        out.append(message)
    assert len(buffer) == 0
    return out


@given(FRONTEND)
def test_every_frontend_message_round_trips(message):
    [(tag, body)] = frames(message.encode())
    assert decode_frontend(tag, body) == message


@given(BACKEND)
def test_every_backend_message_round_trips(message):
    [(tag, body)] = frames(message.encode())
    assert decode_backend(tag, body) == message


@given(AUTHENTICATION)
def test_every_authentication_request_round_trips(message):
    [(tag, body)] = frames(message.encode())
    assert tag == ord("R")
    assert decode_authentication(body) == message


@given(names, st.one_of(st.none(), raw))
def test_sasl_initial_response_round_trips(mechanism, data):
    message = fe.SASLInitialResponse(mechanism, data)
    [(_, body)] = frames(message.encode())
    assert fe.SASLInitialResponse.decode(body) == message


@given(raw)
def test_sasl_and_gss_responses_round_trip(data):
    for cls in (fe.SASLResponse, fe.GSSResponse):
        [(_, body)] = frames(cls(data).encode())
        assert cls.decode(body) == cls(data)


@given(STARTUP)
def test_every_startup_packet_round_trips(packet):
    buffer = ReceiveBuffer()
    buffer.feed(packet.encode())
    assert decode_startup_packet(buffer.next_startup_packet()) == packet


@given(st.lists(st.one_of(FRONTEND), min_size=1, max_size=8), st.data())
def test_messages_split_at_any_byte_still_frame_in_order(messages, data):
    stream = b"".join(m.encode() for m in messages)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=5)))
    buffer = ReceiveBuffer()
    decoded = []
    last = 0
    for cut in [*cuts, len(stream)]:
        buffer.feed(stream[last:cut])
        last = cut
        while (message := buffer.next_message()) is not None:
            decoded.append(decode_frontend(*message))
    assert decoded == messages


@given(st.lists(st.one_of(FRONTEND), min_size=1, max_size=8), st.data())
def test_scanner_relays_every_byte_once_and_reports_only_watched_messages(messages, data):
    stream = b"".join(m.encode() for m in messages)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    scanner = MessageScanner(b"QPF", bytes(range(256)), 1 << 20)
    relayed = b""
    seen = []
    last = 0
    for cut in [*cuts, len(stream)]:
        emit, spans = scanner.feed(stream[last:cut])
        last = cut
        for tag, start, end in spans:
            seen.append(decode_frontend(tag, emit[start + 5 : end]))
        relayed += emit
    assert relayed == stream
    assert seen == [m for m in messages if type(m) in (fe.Query, fe.Parse, fe.FunctionCall)]
    assert not scanner.mid_message


def test_scanner_streams_a_large_unwatched_message_without_holding_it():
    scanner = MessageScanner(b"Q", bytes(range(256)), 1 << 30)
    big = fe.CopyData(b"x" * 100_000).encode()
    emit, spans = scanner.feed(big[:1000])
    assert emit == big[:1000] and spans == []
    assert scanner.mid_message
    emit, _ = scanner.feed(big[1000:])
    assert emit == big[1000:]
    assert not scanner.mid_message


def test_scanner_refuses_message_types_not_allowed():
    scanner = MessageScanner(b"Q", b"QS", 1024)
    with pytest.raises(ProtocolViolation, match="unexpected message type 'p'"):
        scanner.feed(fe.PasswordMessage("secret").encode())


def test_message_over_the_size_limit_is_refused_from_its_header():
    buffer = ReceiveBuffer(max_message_size=1000)
    buffer.feed(b"Q" + struct.pack("!I", 2000))
    with pytest.raises(ProtocolViolation, match="invalid message length 2000"):
        buffer.next_message()
    scanner = MessageScanner(b"", bytes(range(256)), 1000)
    with pytest.raises(ProtocolViolation):
        scanner.feed(b"d" + struct.pack("!I", 0xFFFFFFFF))


def test_message_length_below_four_is_refused():
    buffer = ReceiveBuffer()
    buffer.feed(b"S" + struct.pack("!I", 3))
    with pytest.raises(ProtocolViolation):
        buffer.next_message()


@pytest.mark.parametrize("length", [7, MAX_STARTUP_PACKET + 1, 2**31])
def test_startup_packet_length_outside_8_to_10000_is_refused(length):
    buffer = ReceiveBuffer()
    buffer.feed(struct.pack("!I", length) + b"\x00" * 8)
    with pytest.raises(ProtocolViolation, match="invalid startup packet length"):
        buffer.next_startup_packet()


def test_startup_packet_of_10000_bytes_is_accepted():
    value = "v" * (MAX_STARTUP_PACKET - 4 - 4 - len("options") - 3)
    packet = StartupMessage(3 << 16, (("options", value),)).encode()
    assert len(packet) == MAX_STARTUP_PACKET
    buffer = ReceiveBuffer()
    buffer.feed(packet)
    assert decode_startup_packet(buffer.next_startup_packet()).get("options") == value


def test_protocol_version_2_is_refused_as_unsupported():
    with pytest.raises(ProtocolViolation, match=r"unsupported frontend protocol 2\.0") as caught:
        decode_startup_packet(struct.pack("!I", 2 << 16) + b"user\x00x\x00\x00")
    assert caught.value.sqlstate == "0A000"


def test_cancel_request_carries_a_variable_length_key_in_protocol_3_2():
    packet = CancelRequest(4242, bytes(range(32))).encode()
    assert decode_startup_packet(packet[4:]) == CancelRequest(4242, bytes(range(32)))


def test_truncated_bodies_are_protocol_violations():
    with pytest.raises(ProtocolViolation):
        decode_frontend(ord("Q"), b"select 1")  # no terminating NUL
    with pytest.raises(ProtocolViolation):
        decode_frontend(ord("B"), b"\x00\x00\x00\x05")  # count promises more than there is
    with pytest.raises(ProtocolViolation):
        decode_backend(ord("D"), b"\x00\x01\x00\x00\x00\x09abc")
    with pytest.raises(ProtocolViolation):
        decode_frontend(ord("S"), b"junk")


def test_unknown_message_types_are_protocol_violations():
    with pytest.raises(ProtocolViolation, match="unknown frontend message type"):
        decode_frontend(ord("z"), b"")
    with pytest.raises(ProtocolViolation, match="unknown backend message type"):
        decode_backend(ord("z"), b"")


def test_command_complete_row_counts():
    assert be.CommandComplete("SELECT 5").rows == 5
    assert be.CommandComplete("INSERT 0 7").rows == 7
    assert be.CommandComplete("CREATE TABLE").rows == 0


def test_state_machine_follows_postgres_startup_rules():
    state = ConnectionState()
    state.handle(Event.SSL_DECLINED)
    state.handle(Event.GSSENC_DECLINED)
    assert state.phase is Phase.STARTUP_FINAL
    with pytest.raises(ProtocolViolation, match="SSLRequest answered N is not allowed"):
        state.handle(Event.SSL_DECLINED)
    state.handle(Event.STARTUP_MESSAGE)
    with pytest.raises(ProtocolViolation):
        state.handle(Event.READY_FOR_QUERY)  # before AuthenticationOk
    state.handle(Event.AUTHENTICATION_OK)
    state.handle(Event.READY_FOR_QUERY)
    assert state.phase is Phase.READY


def test_second_ssl_request_after_tls_is_refused():
    state = ConnectionState()
    state.handle(Event.SSL_ACCEPTED)
    assert not state.allows(Event.SSL_ACCEPTED)
    assert not state.allows(Event.GSSENC_DECLINED)


def test_an_empty_query_body_is_a_protocol_violation():
    with pytest.raises(ProtocolViolation):
        decode_frontend(ord("Q"), b"")
    with pytest.raises(ProtocolViolation):
        decode_frontend(ord("Q"), b"select 1\x00\x00")
