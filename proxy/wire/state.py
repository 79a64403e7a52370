"""The life of a client connection up to relaying, as an explicit transition table."""

from __future__ import annotations

from enum import Enum

from proxy.wire.errors import ProtocolViolation


class Phase(Enum):
    STARTUP = "waiting for the startup packet"
    STARTUP_AFTER_SSL = "waiting for the startup packet (TLS declined)"
    STARTUP_AFTER_GSSENC = "waiting for the startup packet (GSS encryption declined)"
    STARTUP_FINAL = "waiting for the startup packet (encryption settled)"
    AUTHENTICATING = "authenticating"
    SETTLING = "receiving session parameters"
    READY = "relaying"
    CLOSED = "closed"


class Event(Enum):
    SSL_ACCEPTED = "SSLRequest answered S"
    SSL_DECLINED = "SSLRequest answered N"
    GSSENC_DECLINED = "GSSENCRequest answered N"
    STARTUP_MESSAGE = "StartupMessage"
    CANCEL_REQUEST = "CancelRequest"
    AUTHENTICATION_OK = "AuthenticationOk"
    READY_FOR_QUERY = "ReadyForQuery"
    CLOSE = "close"


_STARTUP_PHASES = (Phase.STARTUP, Phase.STARTUP_AFTER_SSL, Phase.STARTUP_AFTER_GSSENC, Phase.STARTUP_FINAL)

TRANSITIONS: dict[tuple[Phase, Event], Phase] = {
    (Phase.STARTUP, Event.SSL_ACCEPTED): Phase.STARTUP_FINAL,
    (Phase.STARTUP, Event.SSL_DECLINED): Phase.STARTUP_AFTER_SSL,
    (Phase.STARTUP, Event.GSSENC_DECLINED): Phase.STARTUP_AFTER_GSSENC,
    (Phase.STARTUP_AFTER_SSL, Event.GSSENC_DECLINED): Phase.STARTUP_FINAL,
    (Phase.STARTUP_AFTER_GSSENC, Event.SSL_ACCEPTED): Phase.STARTUP_FINAL,
    (Phase.STARTUP_AFTER_GSSENC, Event.SSL_DECLINED): Phase.STARTUP_FINAL,
    **{(phase, Event.STARTUP_MESSAGE): Phase.AUTHENTICATING for phase in _STARTUP_PHASES},
    **{(phase, Event.CANCEL_REQUEST): Phase.CLOSED for phase in _STARTUP_PHASES},
    (Phase.AUTHENTICATING, Event.AUTHENTICATION_OK): Phase.SETTLING,
    (Phase.SETTLING, Event.READY_FOR_QUERY): Phase.READY,
    **{(phase, Event.CLOSE): Phase.CLOSED for phase in Phase},
}


class ConnectionState:
    """Where one client connection stands; an event not allowed in that phase is a violation."""

    __slots__ = ("phase",)

    def __init__(self) -> None:
        self.phase = Phase.STARTUP

    def allows(self, event: Event) -> bool:
        return (self.phase, event) in TRANSITIONS

    def handle(self, event: Event) -> Phase:
        try:
            self.phase = TRANSITIONS[(self.phase, event)]
        except KeyError:
            raise ProtocolViolation(f"{event.value} is not allowed while {self.phase.value}") from None
        return self.phase
