"""One client connection: encryption and startup, authentication passed through, then the relay."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from proxy.config import Settings, UpstreamTarget
from proxy.connection_policy import REPORTED_SETTINGS, ClientInfo, ConnectionPolicy, PassThrough
from proxy.native import compiled
from proxy.session import relay as _relay
from proxy.session.cancel import CancelKeys
from proxy.session.endpoint import ConnectionClosed, Endpoint
from proxy.session.logins import LoginLine
from proxy.session.observer import NullObserver, RelayObserver
from proxy.session.upstream import UpstreamUnavailable, connect, send_cancel, upstream_tls_context
from proxy.wire import (
    NEWEST_MINOR,
    PROTOCOL_3_2,
    AuthenticationOk,
    AuthenticationSASL,
    BackendKeyData,
    CancelRequest,
    ConnectionState,
    ErrorResponse,
    Event,
    GSSENCRequest,
    NegotiateProtocolVersion,
    ParameterStatus,
    Phase,
    ProtocolViolation,
    SSLRequest,
    StartupMessage,
    decode_authentication,
    decode_startup_packet,
)
from proxy.wire.codec import frame

if TYPE_CHECKING:
    from proxy.session.relay import Relay
else:  # the mypyc-compiled relay when it was built from relay.py as it is (proxy/native.py)
    Relay = compiled(_relay).Relay

log = logging.getLogger("pgveil.session")


class RateLimitedWarning:
    """A warning logged at most once a second, so a flood of refused clients cannot flood the log;
    the next one logged says how many were held back."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self._next_at = 0.0
        self._held = 0

    def warn(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now < self._next_at:
            self._held += 1
            return
        self._next_at = now + self.interval
        held, self._held = self._held, 0
        if held:
            message += " (%d more refused since the last line)"
            args = (*args, held)
        log.warning(message, *args)

PolicyFactory = Callable[[ClientInfo], ConnectionPolicy]
"""Builds the policy of one connection, once its ClientInfo is known (before on_startup)."""

SCRAM_PLUS = "SCRAM-SHA-256-PLUS"
PG_MAX_AUTH_TOKEN_LENGTH = 65_535
"""PostgreSQL's cap on a password/SASL message before authentication; pgveil holds every client
message to it until PostgreSQL sent AuthenticationOk (the startup packet to MAX_STARTUP_PACKET)."""
LINGER_SECONDS = 2.0
"""After a FATAL before relaying, how long pgveil drops what the client still sends before closing
(closing with unread bytes resets the connection, and the client may never read the FATAL)."""
_LONGEST_NAME = 63
"""Bytes of a user or database name PostgreSQL keeps (NAMEDATALEN 64 less one)."""
_FALSE_WORDS = {"false", "off", "no", "0"}


@dataclass
class SessionContext:
    """What every session of one server shares."""

    settings: Settings
    policy_factory: PolicyFactory = lambda client: PassThrough()
    observer: RelayObserver = field(default_factory=NullObserver)
    client_tls: ssl.SSLContext | None = None
    cancel_secret: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    target: UpstreamTarget = field(init=False)
    upstream_tls: ssl.SSLContext | None = field(init=False)
    cancel_keys: CancelKeys = field(init=False)
    marker_prefix: str = field(default_factory=lambda: f"pgveil_refused_{secrets.token_hex(6)}")
    sessions: set[Session] = field(default_factory=set)
    admitted: int = 0
    """Sessions past their startup packet (each holds, or is about to open, a PostgreSQL
    connection); at most settings.max_connections."""
    refusals: RateLimitedWarning = field(default_factory=RateLimitedWarning)
    """The log line of clients refused over a limit."""
    logins: LoginLine = field(init=False)
    """TCP sessions past their startup packet and not yet authenticated, by client host: at most
    settings.max_logins_per_address hold a PostgreSQL connection, the rest wait in line."""
    draining: bool = False
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def __post_init__(self) -> None:
        self.target = self.settings.upstream_target
        self.upstream_tls = upstream_tls_context(self.target)
        self.cancel_keys = CancelKeys(self.cancel_secret)
        self.logins = LoginLine(self.settings.max_logins_per_address,
                                self.settings.max_queued_logins_per_address)

    def next_id(self) -> int:
        return next(self._ids)


def client_tls_context(cert: str, key: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


class Session:
    """Drives one accepted client connection from its first byte to its close."""

    def __init__(self, context: SessionContext, client: Endpoint) -> None:
        self.context = context
        self.client = client
        self.connection_id = context.next_id()
        self.label = f"conn {self.connection_id} from {client.peer}"
        self.state = ConnectionState()
        self.upstream: Endpoint | None = None
        self.relay: Relay | None = None
        self.tls = False
        self.upstream_key: BackendKeyData | None = None
        self.done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._capped_minor = False
        self._linger = False  # a FATAL went to the client before relaying: close gently
        self._admitted = False  # counted in context.admitted
        self._logging_in: str | None = None  # the client host whose login place this session holds
        self._waited_for: str | None = None  # the client host in whose login line this session waits
        self._refused: str | None = None  # why startup ended without relaying, when pgveil said no
        # whoever can reach the port may send this much per message until authenticated
        client.buffer.max_message_size = min(PG_MAX_AUTH_TOKEN_LENGTH, context.settings.max_message_size)

    # ---- lifecycle -----------------------------------------------------------------------------

    async def run(self) -> None:
        context = self.context
        context.sessions.add(self)
        context.observer.connection_opened(self.connection_id)
        reason = "closed"
        try:
            try:
                async with asyncio.timeout(context.settings.startup_timeout):
                    started = await self._start()
            except TimeoutError:
                if self._waited_for is not None:
                    self._refuse_logins_waited_too_long(self._waited_for)
                    reason = self._refused or "startup timed out waiting in the login line"
                    return
                reason = f"startup timed out in phase '{self.state.phase.value}'"
                log.warning("%s: %s", self.label, reason)
                self._fatal("08P01", "pgveil: startup: timed out waiting for the client; reconnect")
                return
            if not started:
                if self._refused is not None:
                    reason = self._refused
                elif self.state.phase != Phase.CLOSED:
                    reason = "closed during startup"
                else:
                    reason = "cancel request"
                return
            reason = await self.done
        except ProtocolViolation as exc:
            reason = f"protocol violation: {exc.reason}"
            log.warning("%s: %s", self.label, reason)
            self._fatal(exc.sqlstate, f"pgveil: protocol: {exc.reason}")
        except ConnectionClosed:
            reason = f"peer closed the connection while {self.state.phase.value}"
            log.info("%s: %s", self.label, reason)
        except UpstreamUnavailable as exc:
            reason = f"upstream unavailable: {exc.reason}"
            log.warning("%s: %s", self.label, reason)
            context.observer.upstream_error(exc.kind)
            self._fatal("08006", f"pgveil: upstream: {exc.reason}; check that PostgreSQL is up and reachable")
        except Exception:
            reason = "internal error"
            log.exception("%s: internal error", self.label)
            self._fatal("XX000", "pgveil: internal error; the pgveil log says more")
        finally:
            self._logged_in()  # the next login in line need not wait for the linger
            try:
                if self._linger and not context.draining:
                    await self._drop_input_until_closed()
            finally:
                if self.relay is None or not self.relay.finished:
                    self._close_legs()
                if self._admitted:
                    self._admitted = False
                    context.admitted -= 1
                context.sessions.discard(self)
                context.observer.connection_closed(self.connection_id, reason)
                log.debug("%s: closed (%s)", self.label, reason)

    def drain(self) -> None:
        """Close after the current request; before relaying starts, close now."""
        if self.relay is not None:
            self.relay.drain()
        else:
            self._fatal("57P01", "pgveil: shutdown: pgveil is shutting down; reconnect")
            self._close_legs()
            if not self.done.done():
                self.done.set_result("drained during startup")

    def _fatal(self, sqlstate: str, message: str) -> None:
        if self.relay is None and not self.client.lost:
            self.client.write(ErrorResponse.build("FATAL", sqlstate, message).encode())
            self._linger = True

    async def _drop_input_until_closed(self) -> None:
        """Send end-of-file after the FATAL and drop what the client still sends until it closes
        (at most LINGER_SECONDS), so the FATAL is read rather than lost to a connection reset."""
        client = self.client
        transport = client.transport
        if transport is None or client.lost or transport.is_closing():
            return
        if self.upstream is not None:
            self.upstream.close()
        closed = asyncio.get_running_loop().create_future()

        def lost(exc: Exception | None) -> None:
            if not closed.done():
                closed.set_result(None)

        client.on_lost = lost
        client.relay = _drop
        client.buffer.take()
        client.resume_setup_reading()
        if transport.can_write_eof():
            transport.write_eof()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(LINGER_SECONDS):
                await closed

    def _close_legs(self) -> None:
        self.client.close()
        if self.upstream is not None:
            self.upstream.close()

    def _finished(self, reason: str) -> None:
        if not self.done.done():
            self.done.set_result(reason)

    # ---- startup ---------------------------------------------------------------------------------

    async def _start(self) -> bool:
        """Encryption negotiation, startup packet, authentication. False: nothing to relay."""
        startup = await self._read_startup()
        if startup is None:
            return False
        if not await self._admit():
            return False
        params = startup.as_dict()
        user = params.get("user")
        if not user:
            raise ProtocolViolation("no PostgreSQL user name specified in startup packet", "28000")
        for what, name in (("user", user), ("database", params.get("database") or "")):
            if len(name.encode("utf-8", "surrogateescape")) > _LONGEST_NAME:
                # PostgreSQL would cut it to 63 bytes and log the client in as the login so named,
                # which pgveil would take for another (its policy, lockouts, who approves)
                log.info("%s: refused a %s name longer than %d bytes", self.label, what, _LONGEST_NAME)
                self._fatal("28000", f"pgveil: startup: the {what} name is longer than {_LONGEST_NAME} "
                            f"bytes, the most PostgreSQL keeps of a name; connect with the exact {what} name")
                return False
        replication = params.get("replication")
        if replication is not None and replication.lower() not in _FALSE_WORDS:
            log.warning("%s: refused a replication connection", self.label)
            self._fatal("0A000", "pgveil: replication: replication connections are not relayed; "
                        "connect to PostgreSQL directly for replication")
            return False
        info = ClientInfo(
            connection_id=self.connection_id,
            address=self.client.peer,
            user=user,
            database=params.get("database") or user,
            application_name=params.get("application_name", ""),
            tls=self.tls,
        )
        self.label = f"conn {self.connection_id} {user}@{info.database} from {info.address}"
        policy = self.context.policy_factory(info)
        refusal = await policy.on_startup(params, info)
        if refusal is not None:
            log.info("%s: refused at startup: %s", self.label, refusal.text)
            self._fatal(refusal.sqlstate, refusal.text)
            return False
        context = self.context
        settings = context.settings
        self.upstream, _ = await connect(context.target, context.upstream_tls, settings.max_message_size)
        if startup.minor > NEWEST_MINOR:
            self._capped_minor = True
            startup = StartupMessage((3 << 16) | NEWEST_MINOR, startup.parameters)
        self.upstream.write(startup.encode())
        await self._authenticate()
        await self._settle(getattr(policy, "on_parameter_status", None),
                           getattr(policy, "shows_diagnostics", None))
        self._logged_in()
        self.relay = Relay(
            client=self.client,
            upstream=self.upstream,
            policy=policy,
            observer=context.observer,
            max_message_size=context.settings.max_message_size,
            marker_prefix=context.marker_prefix,
            cancel_upstream=self._cancel_running_statement,
            on_finished=self._finished,
            label=self.label,
        )
        self.relay.start(self.client.hand_over(), self.upstream.hand_over())
        if context.draining:
            self.relay.drain()
        return True

    async def _admit(self) -> bool:
        """Take one of the max_connections places and, for a TCP client, one of its address's
        max_logins_per_address login places, waiting in its address's line (holding no PostgreSQL
        connection) while they are all taken; or refuse the client (53300) with no PostgreSQL
        connection opened. Cancel requests never get here, so they are not counted."""
        if self._over_max_connections():
            return False
        host = self.client.host
        if host is not None and self.context.settings.max_logins_per_address:
            logins = self.context.logins
            turn = logins.enter(host)
            if turn is None:
                self._refuse_over_limit(
                    "too many logins from one address",
                    f"{logins.pending(host)} from {host} still logging in, --max-logins-per-address "
                    f"{logins.per_address} and --max-queued-logins-per-address {logins.queue_per_address}",
                    f"pgveil: too-many-logins: {logins.pending(host)} connections from {host} are still "
                    "logging in; try again later (raise --max-queued-logins-per-address)")
                return False
            waited = not turn.done()
            if waited:
                await self._wait_in_line(host, turn)
            self._logging_in = host
            if waited and self._over_max_connections():  # others took the places while it waited
                return False
        self.context.admitted += 1
        self._admitted = True
        return True

    def _over_max_connections(self) -> bool:
        context = self.context
        limit = context.settings.max_connections
        if context.admitted < limit:
            return False
        self._refuse_over_limit(
            "too many connections", f"{context.admitted} open, --max-connections {limit}",
            f"pgveil: too-many-connections: this pgveil process already serves {limit} client "
            "connections; try again later (raise --max-connections or use a pooler in front)")
        return True

    async def _wait_in_line(self, host: str, turn: asyncio.Future[None]) -> None:
        """Wait for a login place of `host`; the client leaving, the startup timeout or a drain
        ends the wait (raising) and gives up the place in line."""
        client = self.client
        left: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def lost(exc: Exception | None) -> None:
            if not left.done():
                left.set_result(None)

        client.on_lost = lost
        self._waited_for = host
        try:
            if not client.lost:
                await asyncio.wait((turn, left), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            self.context.logins.give_up(host, turn)
            raise
        finally:
            client.on_lost = None
            if not left.done():
                left.cancel()
        self._waited_for = None
        if not turn.done() or turn.cancelled():
            self.context.logins.give_up(host, turn)
            raise ConnectionClosed("client left while waiting to log in")

    def _refuse_logins_waited_too_long(self, host: str) -> None:
        settings = self.context.settings
        pending = self.context.logins.pending(host)
        self._refuse_over_limit(
            "too many logins from one address",
            f"waited --startup-timeout {settings.startup_timeout:g}s in line, {pending} from {host} "
            f"still logging in, --max-logins-per-address {settings.max_logins_per_address}",
            f"pgveil: too-many-logins: {pending} connections from {host} are still logging in; "
            f"waited {settings.startup_timeout:g}s for one to finish; try again later "
            "(raise --max-logins-per-address or --startup-timeout)")

    def _logged_in(self) -> None:
        """Authentication is over (or the session is): its login place goes to the next in line."""
        host = self._logging_in
        if host is None:
            return
        self._logging_in = None
        self.context.logins.leave(host)

    def _refuse_over_limit(self, reason: str, detail: str, message: str) -> None:
        self._refused = reason
        self.context.refusals.warn("%s: refused: %s (%s)", self.label, reason, detail)
        counted = getattr(self.context.observer, "connection_limited", None)
        if counted is not None:
            counted()
        self._fatal("53300", message)

    async def _read_startup(self) -> StartupMessage | None:
        client = self.client
        context = self.context
        while True:
            packet = decode_startup_packet(await client.read_startup_packet())
            if isinstance(packet, SSLRequest):
                if len(client.buffer):
                    # CVE-2021-23214: bytes sent before the TLS handshake could be injected by
                    # a man in the middle and would be read as if they came over TLS.
                    raise ProtocolViolation("received unencrypted data after SSL request")
                if context.client_tls is None:
                    self.state.handle(Event.SSL_DECLINED)
                    client.write(b"N")
                    continue
                self.state.handle(Event.SSL_ACCEPTED)
                client.write(b"S")
                await self._start_client_tls(context.client_tls)
            elif isinstance(packet, GSSENCRequest):
                if len(client.buffer):
                    raise ProtocolViolation("received unencrypted data after GSSAPI encryption request")
                self.state.handle(Event.GSSENC_DECLINED)
                client.write(b"N")
            elif isinstance(packet, CancelRequest):
                self.state.handle(Event.CANCEL_REQUEST)
                await self._forward_cancel(packet)
                return None
            else:
                self.state.handle(Event.STARTUP_MESSAGE)
                return packet

    async def _start_client_tls(self, tls: ssl.SSLContext) -> None:
        client = self.client
        assert client.transport is not None
        loop = asyncio.get_running_loop()
        try:
            transport = await loop.start_tls(client.transport, client, tls, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            raise ConnectionClosed(f"TLS handshake failed: {exc}") from None
        if transport is None:
            raise ConnectionClosed("TLS handshake failed")
        client.transport = transport
        self.tls = True

    async def _forward_cancel(self, request: CancelRequest) -> None:
        context = self.context
        key = context.cancel_keys.upstream_key(request.process_id, request.secret_key)
        try:
            await send_cancel(context.target, context.upstream_tls, request.process_id, key)
        except UpstreamUnavailable as exc:
            log.warning("%s: could not forward a cancel request: %s", self.label, exc.reason)
        self.client.close()

    def _cancel_running_statement(self) -> asyncio.Future[None] | None:
        """Send PostgreSQL a CancelRequest; the answer is done once PostgreSQL has taken it (closed
        the cancel connection), so the relay can hold what must wait for that (docs/dlp.md)."""
        key = self.upstream_key
        if key is None:
            return None
        context = self.context
        cancel = send_cancel(context.target, context.upstream_tls, key.process_id, key.secret_key)
        task = asyncio.ensure_future(cancel)
        task.add_done_callback(_ignore_result)
        return task

    # ---- authentication ----------------------------------------------------------------------------

    async def _authenticate(self) -> None:
        """Relay the authentication exchange until AuthenticationOk; PostgreSQL decides."""
        upstream = self.upstream
        client = self.client
        assert upstream is not None
        first = True
        while True:
            tag, body = await upstream.read_message()
            if first and self._capped_minor and tag != ord("v"):
                client.write(NegotiateProtocolVersion(PROTOCOL_3_2).encode())
            first = False
            if tag == ord("v"):
                npv = NegotiateProtocolVersion.decode(body)
                if self._capped_minor:
                    newest = min(npv.newest_version, PROTOCOL_3_2)
                    npv = NegotiateProtocolVersion(newest, npv.unrecognized_options)
                client.write(npv.encode())
                continue
            if tag == ord("E"):
                client.write(frame(b"E", body))
                raise ConnectionClosed("authentication failed")
            if tag != ord("R"):
                unexpected = f"PostgreSQL sent message {chr(tag)!r} during authentication"
                raise UpstreamUnavailable(unexpected, "protocol")
            request = decode_authentication(body)
            if isinstance(request, AuthenticationOk):
                client.write(frame(b"R", body))
                self.state.handle(Event.AUTHENTICATION_OK)
                client.buffer.max_message_size = self.context.settings.max_message_size
                return
            if isinstance(request, AuthenticationSASL):
                client.write(sasl_mechanisms_for_client(request).encode())
            else:
                client.write(frame(b"R", body))
            if request.CODE == 12:  # SASLFinal: no answer expected, AuthenticationOk follows
                continue
            try:
                answer_tag, answer = await client.read_message()
            except ProtocolViolation as exc:
                limit = client.buffer.max_message_size
                reason = f"{exc.reason}: at most {limit} bytes before authentication"
                raise ProtocolViolation(reason) from None
            if answer_tag != ord("p"):
                if answer_tag == ord("X"):
                    raise ConnectionClosed("client gave up during authentication")
                raise ProtocolViolation(
                    f"expected an authentication response, got message type {chr(answer_tag)!r}"
                )
            upstream.write(frame(b"p", answer))

    async def _settle(self, parameter_status: Callable[[str, str], None] | None = None,
                      shows_diagnostics: Callable[[], bool] | None = None) -> None:
        """After AuthenticationOk: ParameterStatus (the settings in REPORTED_SETTINGS told to
        `parameter_status`), BackendKeyData (ours), notices (those below NOTICE only where
        `shows_diagnostics()`, as in the relay), up to ReadyForQuery."""
        upstream = self.upstream
        assert upstream is not None
        out: list[bytes] = []
        while True:
            tag, body = await upstream.read_message()
            if tag == ord("K"):
                key = BackendKeyData.decode(body)
                self.upstream_key = key
                mine = self.context.cancel_keys.client_key(key.process_id, key.secret_key)
                out.append(BackendKeyData(key.process_id, mine).encode())
            elif tag == ord("E"):
                out.append(frame(b"E", body))
                self.client.write(b"".join(out))
                raise ConnectionClosed("PostgreSQL refused the session")
            elif tag == ord("S") and parameter_status is not None:
                status = ParameterStatus.decode(body)
                if status.name in REPORTED_SETTINGS:
                    parameter_status(status.name, status.value)
                out.append(frame(b"S", body))
            elif tag == ord("N") and _relay.notice_is_diagnostic(body) and not (
                    shows_diagnostics is not None and shows_diagnostics() is True):
                continue
            else:
                out.append(frame(bytes([tag]), body))
                if tag == ord("Z"):
                    self.state.handle(Event.READY_FOR_QUERY)
                    self.client.write(b"".join(out))
                    return


def sasl_mechanisms_for_client(request: AuthenticationSASL) -> AuthenticationSASL:
    """Drop SCRAM-SHA-256-PLUS: channel binding binds SCRAM to the TLS channel the client sees,
    which ends at pgveil, so PostgreSQL's check against its own channel could never pass."""
    return AuthenticationSASL(tuple(m for m in request.mechanisms if m != SCRAM_PLUS))


def _drop(data: bytes) -> None:
    """What a client sends after its FATAL."""


def _ignore_result(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.info("cancel request to PostgreSQL failed: %s", task.exception())
