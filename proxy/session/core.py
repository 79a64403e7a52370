"""A relayed session's request bookkeeping, and its whole relay when no policy is set, in code mypyc compiles.

`Relay` (proxy/session/relay.py) is a subclass of `RelayCore`: the state both share lives here,
and so do the two paths a session without a policy runs for every chunk, which then never
execute Python bytecode. Like proxy/wire/scanner.py, `pip install` compiles this file with
mypyc (into proxy.session._core_native) and relay.py uses that copy only if it was built from
this exact file; plain Python runs the same code.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Final

from mypy_extensions import mypyc_attr

from proxy.wire.errors import ProtocolViolation

_Q: Final = 0x51  # Query
_P: Final = 0x50  # Parse
_F: Final = 0x46  # FunctionCall
_S: Final = 0x53  # Sync
_X: Final = 0x58  # Terminate
_E: Final = 0x45  # Execute (from the client; ErrorResponse from PostgreSQL)
_ERROR: Final = 0x45
_READY: Final = 0x5A


class Request:
    """One unit PostgreSQL answers with one ReadyForQuery: a Query, a FunctionCall, or the
    extended-protocol messages up to a Sync."""

    def __init__(self, extended: bool, verdicts: int = 0, sent_at: float = 0.0) -> None:
        self.extended = extended
        self.verdicts = verdicts  # verdicts the policy gave for messages in it
        self.closes = 0  # Close messages of prepared statements in it (told to the policy)
        self.parsed: set[str] | None = None  # statements Parsed in it: their Binds are covered
        self.markers: list[bytes] | None = None
        self.rows = 0
        self.sqlstate: str | None = None
        self.sent_at = sent_at


PLAIN_SIMPLE: Final = Request(extended=False)
PLAIN_EXTENDED: Final = Request(extended=True)
"""The requests of sessions without a policy: nothing is recorded in them, so two shared ones do."""


def error_sqlstate(body: bytes) -> tuple[str | None, bool]:
    """(SQLSTATE, is fatal) of an ErrorResponse body, read without building the message."""
    sqlstate: str | None = None
    fatal = False
    pos = 0
    n = len(body)
    while pos < n and body[pos] != 0:
        end = body.find(b"\x00", pos + 1)
        if end < 0:
            break
        code = body[pos]
        if code == 0x43:  # 'C'
            sqlstate = body[pos + 1 : end].decode("ascii", "replace")
        elif code == 0x56 or (code == 0x53 and not fatal):  # 'V' (or 'S' from old servers)
            fatal = body[pos + 1 : end] in (b"FATAL", b"PANIC")
        pos = end + 1
    return sqlstate, fatal


@mypyc_attr(allow_interpreted_subclasses=True)
class RelayCore:
    """Where each request stands, and the relay of a session without a policy.

    Without a policy nothing is decoded or held: each chunk is framed (bad framing ends the
    session), the request boundaries are counted (for drain, and for cancelling a running
    statement when the client goes away), and the chunk is written on."""

    def __init__(self, client_scanner: Any, upstream_scanner: Any, traffic: Any, transparent: bool) -> None:
        self.finished = False
        self._client_scanner = client_scanner
        self._upstream_scanner = upstream_scanner
        self._traffic = traffic
        self._transparent = transparent
        self._requests: deque[Request] = deque()
        self._open_batch: Request | None = None
        self._blocked = False  # waiting for a verdict; client bytes wait
        self._client_copy = False  # the client is sending COPY data
        self._absorb_syncs = 0  # Syncs PostgreSQL will not answer (sent before COPY FROM STDIN began)
        self._draining = False
        self._upstream_sent_fatal = False
        self._client_transport: Any = None
        self._upstream_transport: Any = None

    # ---- what the subclass does ----------------------------------------------------------------

    def fail_client(self, exc: ProtocolViolation) -> None:
        raise NotImplementedError

    def finish(self, reason: str, client_error: Any = None) -> None:
        raise NotImplementedError

    def _upstream_broke(self, exc: ProtocolViolation) -> None:
        raise NotImplementedError

    def _drained(self) -> None:
        raise NotImplementedError

    # ---- without a policy ----------------------------------------------------------------------

    def plain_from_client(self, data: bytes) -> None:
        if self.finished:
            return
        try:
            emit, spans = self._client_scanner.feed(data)
        except ProtocolViolation as exc:
            self.fail_client(exc)
            return
        for tag, _start, end in spans:
            if tag == _Q or tag == _F:  # noqa: SIM109 (compiled: two int compares, no tuple)
                self._requests.append(PLAIN_SIMPLE)
            elif tag == _S:
                self._on_sync()
            elif tag == _P or tag == _E:  # noqa: SIM109 (compiled: two int compares, no tuple)
                # an Execute runs a statement before any Sync (Flush): the request is running
                if self._open_batch is None:
                    self._open_batch = PLAIN_EXTENDED
            elif tag == _X:
                emit = emit[:end]
                self._traffic.to_upstream += len(emit)
                self._write(self._upstream_transport, emit)
                self.finish("client terminated the session")
                return
            else:  # CopyDone, CopyFail
                self._client_copy = False
        if emit:
            self._traffic.to_upstream += len(emit)
            self._write(self._upstream_transport, emit)

    def plain_from_upstream(self, data: bytes) -> None:
        if self.finished:
            return
        try:
            emit, spans = self._upstream_scanner.feed(data)
        except ProtocolViolation as exc:
            self._upstream_broke(exc)
            return
        drained = False
        for tag, start, end in spans:
            if tag == _READY:
                self._client_copy = False
                if self._requests:
                    self._requests.popleft()
                if self._draining and self._idle():
                    drained = True
            elif tag == _ERROR:
                if error_sqlstate(emit[start + 5 : end])[1]:
                    self._upstream_sent_fatal = True
            else:  # CopyInResponse
                self._copy_in_started()
        if emit:
            self._traffic.to_client += len(emit)
            self._write(self._client_transport, emit)
        if drained:
            self._drained()

    @staticmethod
    def _write(transport: Any, data: bytes) -> None:
        if transport is not None and not transport.is_closing():
            transport.write(data)

    # ---- request boundaries ----------------------------------------------------------------------

    def _on_sync(self) -> None:
        if self._client_copy:
            return  # PostgreSQL ignores Sync during COPY FROM STDIN
        if self._absorb_syncs:
            self._absorb_syncs -= 1
            batch = self._open_batch
            if batch is not None and self._requests and not self._transparent:
                head = self._requests[-1]
                head.verdicts += batch.verdicts
                head.closes += batch.closes
                if batch.markers:
                    head.markers = [*(head.markers or ()), *batch.markers]
            self._open_batch = None
            return
        request = self._open_batch
        self._open_batch = None
        if request is None:
            request = PLAIN_EXTENDED if self._transparent else Request(extended=True, sent_at=self._now())
        self._requests.append(request)

    def _now(self) -> float:
        raise NotImplementedError

    def _copy_in_started(self) -> None:
        """CopyInResponse: the client sends COPY data now; Syncs it sent before in the same
        extended-protocol request are not answered by PostgreSQL."""
        self._client_copy = True
        request = self._current()
        if request is not None and request.extended:
            self._absorb_syncs += 1

    def _current(self) -> Request | None:
        if self._requests:
            return self._requests[0]
        return self._open_batch

    def _idle(self) -> bool:
        return not self._requests and self._open_batch is None and not self._blocked and not self._client_copy

    def _running(self) -> bool:
        return bool(self._requests) or self._open_batch is not None or self._blocked or self._client_copy
