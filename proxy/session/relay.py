"""The relay phase of a session: bytes both ways, with Query/Parse/Bind/FunctionCall put to the policy first.

Only a few message types are ever decoded. From the client: Query, Parse and FunctionCall (for
the policy), the two names in a Bind and a Close (prepared statements re-executed and closed),
Sync, Terminate, CopyDone and CopyFail (request boundaries). From PostgreSQL:
CommandComplete (rows), ErrorResponse (SQLSTATE, refusal markers), ReadyForQuery (request end),
CopyInResponse, and the severity of a NoticeResponse (those below NOTICE reach only roles that see
everything). Everything else passes through as raw bytes, even split across reads.

A refused message is replaced by one that fails at parse time with a unique marker
(`Query("pgveil_refused_...")`, `Parse(name, "pgveil_refused_...")`), and PostgreSQL's
ErrorResponse naming that marker is replaced by the refusal (a refused Bind becomes a Bind of a
statement named with the marker, which PostgreSQL does not have). So the protocol stays in step
exactly as PostgreSQL keeps it: skip-until-Sync, implicit-transaction rollback, the 'E'
transaction status and pipelining all come from PostgreSQL itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Final

from proxy.connection_policy import (
    INTERNAL_ERROR,
    REPORTED_SETTINGS,
    ConnectionPolicy,
    FastPath,
    Outcome,
    PassThrough,
    fast_path_of,
)
from proxy.guard.positions import Splices
from proxy.guard.verdict import Allow, Refuse, Rewrite, UpstreamTicket, Verdict
from proxy.session.eager import after, resume_later
from proxy.session.endpoint import Endpoint
from proxy.session.observer import RelayObserver
from proxy.wire import (
    BACKEND_TAGS,
    FRONTEND_TAGS,
    POSTGRES_MAX_MESSAGE_SIZE,
    ErrorResponse,
    FunctionCall,
    MessageScanner,
    Parse,
    ProtocolViolation,
    Query,
    Terminate,
    rows_in_command_tag,
)
from proxy.wire.backend import ParameterStatus
from proxy.wire.codec import ENCODING, ERRORS, text
from proxy.wire.frontend import Bind

log = logging.getLogger("pgveil.session")

# Type bytes (Final: compiled code reads them as constants). From the client:
_Q: Final = 0x51  # Query
_P: Final = 0x50  # Parse
_F: Final = 0x46  # FunctionCall
_S: Final = 0x53  # Sync
_X: Final = 0x58  # Terminate
_COPY_DONE: Final = 0x63
_COPY_FAIL: Final = 0x66
_B: Final = 0x42  # Bind
_CLOSE: Final = 0x43
_EXECUTE: Final = 0x45
# From PostgreSQL:
_COMPLETE: Final = 0x43  # CommandComplete
_ERROR: Final = 0x45  # ErrorResponse
_READY: Final = 0x5A  # ReadyForQuery
_COPY_IN: Final = 0x47  # CopyInResponse
_PARSE_COMPLETE: Final = 0x31
_PARAMETER_STATUS: Final = 0x53
_NOTICE: Final = 0x4E  # NoticeResponse: those below NOTICE reach only roles that see everything
# Counted and bounded for row budgets (docs/dlp.md), only on connections that have a DataGuard:
_DATA_ROW: Final = 0x44
_COPY_DATA: Final = 0x64
_SUSPENDED: Final = 0x73  # PortalSuspended: a chunk of a portal ends (Execute with a row limit)
_EMPTY: Final = 0x49  # EmptyQueryResponse
_NO_RESULT: Final = -2  # _allowance while no result is being counted
_PROGRESS_ROWS: Final = 1024  # a long result's rows go to the hour ledger in batches of this many
# Execute too: it runs a statement before any Sync (a Flush asks for the results), so a request
# is running from then on (a client that goes away then gets its statement cancelled).
_CLIENT_WATCHED = b"QPFSXcfE"
_CLIENT_WATCHED_PREPARED = b"QPFSXcfEBC"  # and prepared statements' re-executions and closes
_CLIENT_ALLOWED = bytes(t for t in FRONTEND_TAGS if t != ord("p"))
_UPSTREAM_WATCHED = b"CEZG1N"  # ParseComplete: which Parse of a request an error position is in
_UPSTREAM_WATCHED_SETTINGS = b"CEZG1NS"  # and ParameterStatus, for policies that follow settings
_UPSTREAM_WATCHED_TRANSPARENT = b"EZG"  # no policy, no on_complete: row counts are not needed
_UPSTREAM_COUNTED = b"sI"  # and, with a row budget, the ends of results ...
_ROWS = b"Dd"  # ... and the rows, counted by the scanner (reported once the quota is spent)
_TERMINATE = Terminate().encode()
_BUDGET_SQLSTATE: Final = "54000"  # proxy.dlp.guard.BUDGET_SQLSTATE
# Client bytes held while a verdict is awaited before the client is no longer read (flow control
# without two epoll changes per audited statement).
_BACKLOG_LIMIT = 64 * 1024

@dataclass(frozen=True, slots=True)
class BoundStatement:
    """The names in a Bind message (the rest of it is never decoded)."""

    portal: str
    statement: str

    @classmethod
    def decode(cls, body: bytes) -> BoundStatement:
        end = body.find(b"\x00")
        statement_end = body.find(b"\x00", end + 1) if end >= 0 else -1
        if statement_end < 0:
            raise ProtocolViolation("Bind message: missing statement name")
        return cls(text(body[:end]), text(body[end + 1 : statement_end]))


def closed_statement(body: bytes) -> str | None:
    """The statement name of a Close message ('S'), None for a portal's Close."""
    end = body.find(b"\x00", 1)
    if not body or end < 0:
        raise ProtocolViolation("Close message: missing name")
    return text(body[1:end]) if body[0] == 0x53 else None


Guarded = Query | Parse | FunctionCall | BoundStatement
"""The client messages the policy sees before they are forwarded."""

_COVERED = object()
"""_ask's answer for a Bind of a statement Parsed (and so decided) earlier in the same request."""



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
        self.parses = 0  # Parse messages forwarded in it
        self.parses_done = 0  # ParseComplete messages PostgreSQL sent for them
        # (index of the Parse, or 0 for a Query; where its rewrite spliced the client's text)
        self.splices: list[tuple[int, Splices]] | None = None
        # pgveil's upstream statement the request PREPAREs (its CommandComplete is not the client's)
        # or EXECUTEs
        self.prepares: UpstreamTicket | None = None
        self.dlp: Any = None  # the results it will produce, for a DataGuard (proxy/dlp/guard.py)

    def rewritten(self, index: int, verdict: Verdict) -> None:
        """Statement `index` of the request is forwarded as `verdict`'s rewrite of the client's text."""
        if isinstance(verdict, Rewrite) and verdict.splices is not None:
            if self.splices is None:
                self.splices = []
            self.splices.append((index, verdict.splices))

    def splices_of_error(self) -> Splices | None:
        """The splices of the statement an ErrorResponse now is about: in the extended protocol the
        Parse after those PostgreSQL completed (a statement fails at its Parse when its text has
        an error position), in a Query its one text."""
        if self.splices is not None:
            for index, splices in self.splices:
                if index == self.parses_done:
                    return splices
        return None


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


_SHOWN_SEVERITIES: Final = (b"NOTICE", b"WARNING", b"INFO")


def notice_is_diagnostic(body: bytes) -> bool:
    """True for a NoticeResponse body below NOTICE severity (LOG, DEBUG1-5: plan, parse and rewrite
    dumps, statistics, ...) or whose severity is not one of NOTICE, WARNING, INFO. Reads the
    non-localized severity ('V'), or 'S' from a server that sends no 'V'."""
    localized = b""
    pos = 0
    n = len(body)
    while pos < n and body[pos] != 0:
        end = body.find(b"\x00", pos + 1)
        if end < 0:
            break
        code = body[pos]
        if code == 0x56:  # 'V'
            return body[pos + 1 : end] not in _SHOWN_SEVERITIES
        if code == 0x53:  # 'S'
            localized = body[pos + 1 : end]
        pos = end + 1
    return localized not in _SHOWN_SEVERITIES


class Relay:
    """Relays one authenticated connection; `on_finished(reason)` is called once when it ends."""

    def __init__(
        self,
        *,
        client: Endpoint,
        upstream: Endpoint,
        policy: ConnectionPolicy,
        observer: RelayObserver,
        max_message_size: int,
        marker_prefix: str,
        cancel_upstream: Callable[[], Any],
        on_finished: Callable[[str], None],
        label: str,
    ) -> None:
        self._client = client
        self._upstream = upstream
        self._policy = policy
        self._observer = observer
        self._marker_prefix = marker_prefix
        self._cancel_upstream = cancel_upstream
        self._on_finished = on_finished
        self._label = label
        self._loop = asyncio.get_running_loop()
        self._markers: dict[bytes, Refuse] = {}
        self._marker_count = 0
        self._lane: asyncio.Future[Any] | None = None  # the policy call still running, if any
        # Client messages scanned while a verdict is awaited: (bytes, spans, protocol violation)
        self._backlog: deque[tuple[bytes, list[tuple[int, int, int]], ProtocolViolation | None]] = deque()
        self._backlog_bytes = 0  # past _BACKLOG_LIMIT the client is not read until the verdict
        self._upstream_full = False
        self._client_paused = False
        self._last_completion = 0.0
        self._settings_lost = False  # a ParameterStatus the policy could not take: end the session
        self.diagnostics_hidden = 0  # notices below NOTICE kept from the client (notice_is_diagnostic)
        # Without a policy nothing is decoded: only request boundaries are tracked (for drain
        # and for cancelling a running statement when the client goes away).
        transparent = type(policy) is PassThrough
        # Policies written before on_bind existed are still served (Binds pass unseen).
        self._prepared_hooks = not transparent and hasattr(policy, "on_bind")
        watched = _CLIENT_WATCHED_PREPARED if self._prepared_hooks else _CLIENT_WATCHED
        client_scanner = MessageScanner(watched, _CLIENT_ALLOWED, max_message_size)
        # Policies that follow the session's settings hear PostgreSQL's ParameterStatus reports.
        self._parameter_status: Callable[[str, str], None] | None = (
            None if transparent else getattr(policy, "on_parameter_status", None))
        # Its synchronous answers for the common case (a cached verdict), tried before the hooks.
        self._fast: FastPath | None = None if transparent else fast_path_of(policy)
        # Whether PostgreSQL's diagnostics (notices below NOTICE) may reach the client; a policy
        # that cannot say never lets them through.
        self._shows_diagnostics: Callable[[], bool] | None = (
            None if transparent else getattr(policy, "shows_diagnostics", None))
        # Row budgets and honeytokens (proxy/dlp): a guard only for connections that have either.
        guard_of = None if transparent else getattr(policy, "data_guard", None)
        guard: Any = guard_of() if guard_of is not None else None
        self._guard: Any = guard
        self._counting = guard is not None and guard.counts_rows is True
        self._tokens: Any = guard.pattern if guard is not None else None
        # a few honeytoken values: one bytes.find each per read (faster than the alternation)
        self._finds: Any = guard.forms if guard is not None and 0 < len(guard.forms) <= 8 else None
        self._allowance = _NO_RESULT  # rows the result being counted may still pass (-1: any)
        self._result_rows = 0  # rows of it passed so far
        self._swallowing = False  # after a row-budget breach: nothing but notices until ReadyForQuery
        self._breached = False  # a breach in the chunk being counted (its statement may need a cancel)
        # After a breach the statement is cancelled; what PostgreSQL sends from its ReadyForQuery on
        # waits until PostgreSQL has taken the cancel, so that it cannot hit the client's next one.
        self._cancelling: Any = None
        self._held: list[bytes] | None = None
        if transparent:
            watched = _UPSTREAM_WATCHED_TRANSPARENT
        else:
            watched = _UPSTREAM_WATCHED if self._parameter_status is None else _UPSTREAM_WATCHED_SETTINGS
        held = b""
        counted = b""
        if guard is not None:
            if self._counting:
                watched = watched + _UPSTREAM_COUNTED
                counted = _ROWS
            if self._tokens is not None:
                # every message whole: no byte of a row passes before the row is searched
                held = BACKEND_TAGS
        upstream_scanner = MessageScanner(watched, BACKEND_TAGS, POSTGRES_MAX_MESSAGE_SIZE, held, counted)
        self._counted_base = 0  # the scanner's count of unreported rows, as far as they are accounted
        self._progressed = 0  # rows of the open result the hour ledger has heard of
        self._client_scanner: Any = client_scanner
        self._upstream_scanner: Any = upstream_scanner
        self._traffic: Any = observer.traffic
        self._transparent = transparent
        self.finished = False
        self._requests: deque[Request] = deque()
        self._open_batch: Request | None = None
        self._blocked = False  # waiting for a verdict; client bytes wait in _backlog
        self._client_copy = False  # the client is sending COPY data
        self._absorb_syncs = 0  # Syncs PostgreSQL will not answer (sent before COPY FROM STDIN began)
        self._draining = False
        # The client's Terminate: seen (maybe still behind a verdict), then forwarded. From then on
        # pgveil relays PostgreSQL's answers until PostgreSQL closes, as PostgreSQL serves a client
        # that sent Terminate: what came before it runs even if the client is gone (no cancel).
        self._terminate_seen = False
        self._terminated = False
        self._client_done = False  # after its Terminate the client closed or sent end-of-file
        self._upstream_sent_fatal = False
        self._client_transport: Any = None
        self._upstream_transport: Any = None

    # ---- wiring ------------------------------------------------------------------------------

    def start(self, client_pending: bytes, upstream_pending: bytes) -> None:
        self._client_transport = self._client.transport
        self._upstream_transport = self._upstream.transport
        if self._transparent:  # nothing but framing and request boundaries, per chunk
            from_client, from_upstream = self.plain_from_client, self.plain_from_upstream
        else:
            from_client, from_upstream = self.from_client, self.from_upstream
        self._client.relay_to(from_client)
        self._upstream.relay_to(from_upstream)
        self._client.on_lost = self._client_lost
        self._upstream.on_lost = self._upstream_lost
        self._client.on_write_paused = self._client_write_paused
        self._upstream.on_write_paused = self._upstream_write_paused
        if upstream_pending:
            from_upstream(upstream_pending)
        if client_pending:
            from_client(client_pending)
        if self._client.lost:
            self._client_lost(None)
        elif self._upstream.lost:
            self._upstream_lost(None)

    # ---- client -> PostgreSQL ------------------------------------------------------------------

    def from_client(self, data: bytes) -> None:
        if self.finished:
            return
        try:
            emit, spans = self._client_scanner.feed(data)
        except ProtocolViolation as exc:
            if self._blocked:  # after what waits for its verdict, in order
                self._hold(b"", [], exc)
                return
            self.fail_client(exc)
            return
        if self._blocked:
            self._hold(emit, spans, None)
            return
        if not spans:
            if emit:
                self._traffic.to_upstream += len(emit)
                self._write(self._upstream_transport, emit)
            return
        self._process_client(emit, spans, 0, 0)

    def _process_client(self, emit: bytes, spans: list[tuple[int, int, int]], index: int, pos: int) -> None:
        """Forward emit[pos:], acting on the watched messages spans[index:]."""
        parts: list[bytes] = []
        count = len(spans)
        while index < count:
            tag, start, end = spans[index]
            index += 1
            if tag in (_Q, _P, _F, _B):
                try:
                    message, answer = self._ask(tag, emit[start + 5 : end])
                except ProtocolViolation as exc:
                    self._send_upstream(parts)
                    self.fail_client(exc)
                    return
                if tag == _B and self._guard is not None:
                    assert isinstance(message, BoundStatement)
                    self._guard.bind(message.portal, message.statement)
                if answer is _COVERED:
                    continue
                if isinstance(answer, asyncio.Future):
                    parts.append(emit[pos:start])
                    self._send_upstream(parts)
                    self._wait_for_verdict(answer, tag, message, emit, spans, index, start, end)
                    return
                replacement = self._apply(tag, message, answer)
                if replacement is not None:
                    parts.append(emit[pos:start])
                    parts.append(replacement)
                    pos = end
            elif tag == _CLOSE:
                try:
                    name = closed_statement(emit[start + 5 : end])
                except ProtocolViolation as exc:
                    self._send_upstream(parts)
                    self.fail_client(exc)
                    return
                if name is not None:
                    self._closed(name)
            elif tag == _S:
                self._on_sync()
            elif tag == _EXECUTE:
                batch = self._batch()
                if self._guard is not None:
                    self._guard.execute(emit[start + 5 : end], batch)
            elif tag == _X:
                parts.append(emit[pos:end])
                self._send_upstream(parts)
                self._forwarded_terminate()
                return
            else:  # CopyDone, CopyFail
                self._client_copy = False
        parts.append(emit[pos:])
        self._send_upstream(parts)

    def _hold(self, emit: bytes, spans: list[tuple[int, int, int]],
              violation: ProtocolViolation | None) -> None:
        """Keep scanned client bytes until the verdict awaited is in; what follows a Terminate (or a
        protocol violation) is not read any more (PostgreSQL would not read it either)."""
        self._backlog.append((emit, spans, violation))
        self._backlog_bytes += len(emit)
        if violation is not None:
            self._client.relay_to(_ignore)
        else:
            for tag, _start, _end in spans:
                if tag == _X:
                    self._saw_terminate()
                    break
        if self._backlog_bytes >= _BACKLOG_LIMIT:
            self._update_client_reading()

    def _send_upstream(self, parts: list[bytes]) -> None:
        data = b"".join(parts) if len(parts) != 1 else parts[0]
        parts.clear()
        if data:
            self._traffic.to_upstream += len(data)
            self._write(self._upstream_transport, data)

    def _ask(self, tag: int, body: bytes) -> tuple[Guarded, Any]:
        """The message and the policy's answer: a verdict, a future of one, for a Bind also None
        (nothing to decide) or _COVERED (its statement was Parsed, and decided, in this request)."""
        policy = self._policy
        message: Guarded
        if tag == _B:
            message = BoundStatement.decode(body)
            batch = self._open_batch
            if batch is not None and batch.parsed is not None and message.statement in batch.parsed:
                return message, _COVERED
            answer = self._fast_answer(message)
            return message, answer if answer is not None else self._call(policy.on_bind, message.statement)
        if tag == _Q:
            message = _query(body)
            answer = self._fast_answer(message)
            return message, answer if answer is not None else self._call(policy.on_query, message.sql)
        if tag == _P:
            message = Parse.decode(body)
            answer = self._fast_answer(message)
            if answer is not None:
                return message, answer
            return message, self._call(policy.on_parse, message.statement, message.sql, message.param_types)
        message = FunctionCall.decode(body)
        return message, self._call(policy.on_function_call, message.function_oid)

    def _fast_answer(self, message: Guarded) -> Any:
        """The policy's synchronous answer for a Query, a Parse or a Bind (FastPath) when no policy
        call is pending (answers keep their order): a verdict, a future of one (the rest of an
        answer that must wait), or None: ask the async hook."""
        fast = self._fast
        lane = self._lane
        if fast is None or (lane is not None and not lane.done()):
            return None
        try:
            if isinstance(message, Query):
                answer = fast.fast_query(message.sql)
            elif isinstance(message, BoundStatement):
                answer = fast.fast_bind(message.statement)
            elif isinstance(message, Parse):
                answer = fast.fast_parse(message.statement, message.sql, message.param_types)
            else:
                return None
        except Exception:
            log.exception("%s: the policy raised; refusing", self._label)
            return INTERNAL_ERROR
        if answer is None or isinstance(answer, (Allow, Rewrite, Refuse)):
            return answer
        return self._step(answer)

    def _call(self, method: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> Any:
        """Policy calls run one at a time, in order. An answer that is ready is returned as it is
        (no task, no future, no wrapper); one that is not is an asyncio.Future (never an answer)."""
        lane = self._lane
        if lane is not None and not lane.done():
            future: asyncio.Future[Any] = asyncio.ensure_future(after(lane, method, args))
            self._lane = future
            return future
        try:
            coroutine = method(*args)
        except (Exception, asyncio.CancelledError):
            log.exception("%s: the policy raised; refusing", self._label)
            return INTERNAL_ERROR
        return self._step(coroutine)

    def _step(self, coroutine: Any) -> Any:
        """Run a policy coroutine as far as it goes: its answer, or a future of it (the lane)."""
        try:
            yielded = coroutine.send(None)
        except StopIteration as stop:
            return stop.value
        except (Exception, asyncio.CancelledError):
            log.exception("%s: the policy raised; refusing", self._label)
            return INTERNAL_ERROR
        result = resume_later(coroutine, yielded)
        self._lane = result
        return result

    def _closed(self, name: str) -> None:
        batch = self._batch()
        batch.closes += 1
        if batch.parsed is not None:
            batch.parsed.discard(name)
        answer = self._call(self._policy.on_close_statement, name)
        if isinstance(answer, asyncio.Future):
            answer.add_done_callback(self._log_failure)

    def _batch(self) -> Request:
        request = self._open_batch
        if request is None:
            request = self._open_batch = Request(extended=True, sent_at=self._loop.time())
        return request

    def _wait_for_verdict(
        self, future: asyncio.Future[Any], tag: int, message: Guarded,
        emit: bytes, spans: list[tuple[int, int, int]], index: int, start: int, end: int,
    ) -> None:
        self._blocked = True  # reading goes on until the backlog is full: most clients wait anyway
        for later in range(index, len(spans)):
            if spans[later][0] == _X:  # the client's end-of-file or close now waits for its turn
                self._saw_terminate()
                break

        def resume(done: asyncio.Future[Any]) -> None:
            if done.cancelled() or done.exception() is not None:
                if not done.cancelled():
                    log.error("%s: the policy raised; refusing", self._label, exc_info=done.exception())
                answer: Any = INTERNAL_ERROR
            else:
                answer = done.result()  # checked by _apply: anything but a verdict is refused
            if self.finished:  # decided (and audited) but never sent: its completion says so
                self._never_forwarded(tag, answer)
                return
            replacement = self._apply(tag, message, answer)
            self._blocked = False
            self._send_upstream([replacement if replacement is not None else emit[start:end]])
            self._process_client(emit, spans, index, end)
            backlog = self._backlog
            while backlog and not self._blocked and not self.finished:
                held, held_spans, violation = backlog.popleft()
                self._backlog_bytes -= len(held)
                if violation is not None:
                    self.fail_client(violation)
                elif held_spans:
                    self._process_client(held, held_spans, 0, 0)
                else:
                    self._send_upstream([held])
            self._update_client_reading()

        future.add_done_callback(resume)

    def _checked(self, tag: int, answer: Any) -> Verdict | None:
        """The policy's answer if it is one (a verdict; for a Bind also None), else a refusal: an
        answer pgveil cannot act on must not pass the statement, nor stall the session."""
        if isinstance(answer, (Allow, Rewrite, Refuse)) or (answer is None and tag == _B):
            return answer
        log.error("%s: the policy answered %r, which is not a verdict; refusing", self._label, answer)
        return INTERNAL_ERROR

    def _apply(self, tag: int, message: Guarded, answer: Any) -> bytes | None:
        """Record the request and return what to forward instead of the message (None: as is)."""
        verdict = self._checked(tag, answer)
        if tag == _B:
            assert isinstance(message, BoundStatement)
            if verdict is None:
                return None
            request = self._batch()
            request.verdicts += 1
            if isinstance(verdict, Refuse):
                return Bind(message.portal, self._marker(request, verdict)).encode()
            return None
        assert verdict is not None
        if tag == _P:
            assert isinstance(message, Parse)
            request = self._batch()
            request.verdicts += 1
            if self._prepared_hooks:
                if request.parsed is None:
                    request.parsed = set()
                request.parsed.add(message.statement)
            request.parses += 1
            if self._guard is not None:
                self._guard.parse(message.statement, message.sql, verdict.info.fingerprint)
            if isinstance(verdict, Refuse):
                return Parse(message.statement, self._marker(request, verdict)).encode()
            if verdict.sql != message.sql:
                request.rewritten(request.parses - 1, verdict)
                return Parse(message.statement, verdict.sql, message.param_types).encode()
            return None
        request = Request(extended=False, verdicts=1, sent_at=self._loop.time())
        self._requests.append(request)
        if self._guard is not None and tag == _Q:
            assert isinstance(message, Query)
            self._guard.query(message.sql, verdict.info.fingerprint, request)
        if isinstance(verdict, Refuse):
            return Query(self._marker(request, verdict)).encode()
        if tag == _Q:
            assert isinstance(message, Query)
            if verdict.sql != message.sql:
                request.rewritten(0, verdict)
                if isinstance(verdict, Rewrite) and verdict.prepares is not None:
                    request.prepares = verdict.prepares
                return _query_message(verdict.sql)
        return None

    def _marker(self, request: Request, refusal: Refuse) -> str:
        self._marker_count += 1
        marker = f"{self._marker_prefix}_{self._marker_count}"
        key = marker.encode()
        self._markers[key] = refusal
        if request.markers is None:
            request.markers = []
        request.markers.append(key)
        return marker

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
            elif tag == _P or tag == _EXECUTE:  # noqa: SIM109 (compiled: two int compares, no tuple)
                # an Execute runs a statement before any Sync (Flush): the request is running
                if self._open_batch is None:
                    self._open_batch = PLAIN_EXTENDED
            elif tag == _X:
                emit = emit[:end]
                self._traffic.to_upstream += len(emit)
                self._write(self._upstream_transport, emit)
                self._forwarded_terminate()
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
                if (self._draining or self._client_done) and self._idle():
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

    # ---- PostgreSQL -> client ------------------------------------------------------------------

    def from_upstream(self, data: bytes) -> None:
        if self.finished:
            return
        try:
            emit, spans = self._upstream_scanner.feed(data)
        except ProtocolViolation as exc:
            self._upstream_broke(exc)
            return
        close_after = False
        tripped = False
        if self._guard is not None:
            if self._tokens is not None and emit:
                cut = self._honeytokens(emit)
                if cut >= 0:  # a `terminate` honeytoken: nothing from its message on reaches the client
                    tripped = True
                    emit = emit[:cut]
                    spans = [span for span in spans if span[2] <= cut]
            if self._counting:
                emit, spans = self._count_rows(emit, spans)
        if spans:
            emit, close_after = self._inspect(emit, spans)
            if self._settings_lost:
                self.finish("the policy could not follow a session setting", _settings_lost_error())
                return
        if self._held is not None:
            self._held.append(emit)
            emit = b""
        if emit:
            self._traffic.to_client += len(emit)
            self._write(self._client_transport, emit)
        if tripped:
            self._write(self._client_transport, self._guard.terminate_error())
            self.finish("a honeytoken was read")
            return
        if close_after:
            self._drained()

    # ---- row budgets and honeytokens (only with a DataGuard) ---------------------------------------

    def _honeytokens(self, emit: bytes) -> int:
        """Search the chunk (whole messages only) for honeytoken values, once: each hit is reported;
        the start of the message of the first `terminate` one is returned (-1: none)."""
        hits: list[tuple[int, int]] = []
        finds = self._finds
        if finds is not None:
            for token in finds:
                at = emit.find(token)
                while at >= 0:
                    hits.append((at, at + len(token)))
                    at = emit.find(token, at + 1)
            if not hits:
                return -1
            hits.sort()
        else:
            for found in self._tokens.finditer(emit):
                hits.append((found.start(), found.end()))
            if not hits:
                return -1
        n = len(emit)
        start = 0  # the message that holds the hit
        end = 0
        for at, stop in hits:
            while end <= at and end < n:
                start = end
                end = start + 1 + ((emit[start + 1] << 24) | (emit[start + 2] << 16)
                                   | (emit[start + 3] << 8) | emit[start + 4])
            # inside one message's body (across two messages it is not a value)
            if (stop <= end and at >= start + 5
                    and self._guard.honeytoken(emit[at:stop], emit[start], self._current())):
                return start
        return -1

    def _count_rows(self, emit: bytes, spans: list[tuple[int, int, int]],
                    ) -> tuple[bytes, list[tuple[int, int, int]]]:
        """Count the DataRow and CopyData messages of each result against its allowance; past it,
        the row is replaced by the row-budget error, the statement cancelled and everything up to
        ReadyForQuery swallowed (notices and settings reports still pass). Returns the bytes and
        the spans for `_inspect` (rows and result ends taken out).

        The scanner counts rows without reporting them while its quota lasts (rows the open result
        may still pass: no span, no call per row); `marks` say how many it had counted when it
        reached each span reported. Once the quota is spent it reports each row, and the limit
        is checked (and, for the hourly budget, extended) row by row."""
        guard = self._guard
        scanner: Any = self._upstream_scanner
        marks: list[int] = scanner.marks if spans else []
        base = self._counted_base
        index = 0
        kept: list[tuple[int, int, int]] = []
        parts: list[bytes] | None = None
        pos = 0  # emit[pos:] is not decided yet
        out = 0  # bytes decided so far (in parts, or all of emit[:pos] when parts is None)
        allowance = self._allowance
        rows = self._result_rows
        progressed = self._progressed
        swallowing = self._swallowing
        for tag, start, end in spans:
            mark = marks[index]
            index += 1
            if mark != base:  # rows the scanner counted before this message: the open result's
                if not swallowing:
                    if allowance == _NO_RESULT:
                        allowance = guard.result_start(self._current())
                        rows = 0
                    rows += mark - base
                base = mark
            if swallowing:
                if _passes_swallowed(tag, emit, start, end):
                    if parts is None:  # swallowing since the chunk began: nothing before is kept
                        parts = []
                    parts.append(emit[start:end])
                    kept.append((tag, out, out + end - start))
                    out += end - start
                    if tag == _READY:
                        swallowing = False
                        cancelling = self._cancelling
                        if cancelling is not None and not cancelling.done() and self._held is None:
                            self._held = []  # this chunk on: written once PostgreSQL took the cancel
                pos = end
                continue
            if tag == _DATA_ROW or tag == _COPY_DATA:  # noqa: SIM109 (compiled: two int compares)
                if allowance == _NO_RESULT:
                    allowance = guard.result_start(self._current())
                    rows = 0
                if allowance < 0 or rows < allowance:
                    rows += 1
                    continue
                allowance = guard.extend(rows)  # the hourly budget is set aside in steps
                if rows < allowance:
                    rows += 1
                    continue
                # past the budget: this row becomes the error, the rest of the request is swallowed
                error = guard.breach(rows)
                if parts is None:
                    parts = []
                parts.append(emit[pos:start])
                parts.append(error)
                out += start - pos + len(error)
                pos = end
                swallowing = True
                request = self._current()
                if request is not None:
                    request.rows += rows
                    request.sqlstate = _BUDGET_SQLSTATE
                guard.result_end(self._current(), rows, False)
                allowance = _NO_RESULT
                rows = 0
                progressed = 0
                self._breached = True
                continue
            if tag == _COMPLETE or tag == _ERROR or tag == _SUSPENDED or tag == _EMPTY:  # noqa: SIM109
                guard.result_end(self._current(), rows if allowance != _NO_RESULT else 0, tag == _SUSPENDED)
                allowance = _NO_RESULT
                rows = 0
                progressed = 0
                if tag == _SUSPENDED or tag == _EMPTY:  # noqa: SIM109
                    continue
            elif tag == _READY:
                allowance = _NO_RESULT
                rows = 0
                progressed = 0
                progressed = 0
            kept.append((tag, out + start - pos, out + end - pos))
        final: int = scanner.counted
        if final != base and not swallowing:
            if allowance == _NO_RESULT:
                allowance = guard.result_start(self._current())
                rows = 0
            rows += final - base
        self._counted_base = final
        if allowance != _NO_RESULT and rows - progressed >= _PROGRESS_ROWS:
            guard.progress(rows)  # a long result: the hour ledger hears of it as it goes
            progressed = rows
        self._progressed = progressed
        if spans or scanner.quota == 0:
            # rows the scanner may count without reporting from now on: what the open result has
            # left (set aside for it); none before a result has begun (its first row is reported,
            # so that its allowance is set aside before any of its rows passes); while no message is
            # reported the quota it counts down stays right
            quota = -1
            if not swallowing:
                if allowance == _NO_RESULT:
                    quota = 0
                elif allowance >= 0:
                    quota = allowance - rows if allowance > rows else 0
            scanner.quota = quota
        if self._breached:
            self._breached = False
            if swallowing:  # PostgreSQL is still at it: cancel the statement
                self._cancel_breached()
        self._allowance = allowance
        self._result_rows = rows
        self._swallowing = swallowing
        if parts is None:  # nothing cut; or swallowing since the chunk began and still: nothing kept
            return (b"", kept) if swallowing else (emit, kept)
        if not swallowing:
            parts.append(emit[pos:])
        return b"".join(parts), kept

    def _cancel_breached(self) -> None:
        cancelling = self._cancel_upstream()
        if isinstance(cancelling, asyncio.Future):
            self._cancelling = cancelling
            cancelling.add_done_callback(self._cancelled)

    def _cancelled(self, future: asyncio.Future[Any]) -> None:
        """PostgreSQL has taken the cancel of a breached statement: what waited for it goes out."""
        if self._cancelling is future:
            self._cancelling = None
        held = self._held
        self._held = None
        if held and not self.finished:
            data = b"".join(held)
            if data:
                self._traffic.to_client += len(data)
                self._write(self._client_transport, data)

    def _upstream_broke(self, exc: ProtocolViolation) -> None:
        log.warning("%s: PostgreSQL broke the protocol: %s", self._label, exc.reason)
        self._observer.upstream_error("protocol")
        self.finish(f"upstream protocol violation: {exc.reason}", _upstream_lost_error())

    def _now(self) -> float:
        return self._loop.time()

    def _drained(self) -> None:
        """Idle, and the session is to end: drained, or the client left after its Terminate."""
        if self._client_done:
            self.finish("client terminated the session")
        else:
            self.finish("drained", _shutdown_error())

    def _inspect(self, emit: bytes, spans: list[tuple[int, int, int]]) -> tuple[bytes, bool]:
        parts: list[bytes] | None = None
        pos = 0
        close_after = False
        hidden = 0
        for tag, start, end in spans:
            if tag == _COMPLETE:
                request = self._current()
                if request is not None:
                    ticket = request.prepares
                    if (ticket is not None and ticket.state == UpstreamTicket.PENDING
                            and emit[start + 5 : end] == b"PREPARE\x00"):
                        ticket.state = UpstreamTicket.READY
                        if parts is None:
                            parts = []
                        parts.append(emit[pos:start])
                        pos = end
                        continue
                    request.rows += rows_in_command_tag(emit[start + 5 : end])
            elif tag == _ERROR:
                body = emit[start + 5 : end]
                sqlstate, fatal = error_sqlstate(body)
                if self._markers:
                    for marker, refusal in self._markers.items():
                        if marker in body:
                            if parts is None:
                                parts = []
                            parts.append(emit[pos:start])
                            parts.append(refusal_error(refusal).encode())
                            pos = end
                            sqlstate = refusal.sqlstate
                            del self._markers[marker]
                            break
                request = self._current()
                if request is not None and request.splices is not None and pos != end:  # not a refusal
                    splices = request.splices_of_error()
                    translated = None if splices is None else position_in_client_text(body, splices)
                    if translated is not None:
                        if parts is None:
                            parts = []
                        parts.append(emit[pos:start])
                        parts.append(translated)
                        pos = end
                if request is not None and request.sqlstate is None:
                    request.sqlstate = sqlstate
                if fatal:
                    self._upstream_sent_fatal = True
            elif tag == _READY:
                self._client_copy = False
                if self._requests:
                    self._complete(self._requests.popleft())
                if (self._draining or self._client_done) and self._idle():
                    close_after = True
            elif tag == _PARAMETER_STATUS:
                self._reported(emit[start + 5 : end])
            elif tag == _PARSE_COMPLETE:
                request = self._current()
                if request is not None:
                    request.parses_done += 1
            elif tag == _NOTICE:
                if notice_is_diagnostic(emit[start + 5 : end]) and not self._diagnostics_shown():
                    if parts is None:
                        parts = []
                    parts.append(emit[pos:start])
                    pos = end
                    hidden += 1
            else:  # CopyInResponse
                self._copy_in_started()
        if hidden:
            self.diagnostics_hidden += hidden
            log.debug("%s: hid %d PostgreSQL message(s) below NOTICE from a role with masked data",
                      self._label, hidden)
        if parts is not None:
            parts.append(emit[pos:])
            emit = b"".join(parts)
        return emit, close_after

    def _diagnostics_shown(self) -> bool:
        """Whether a notice below NOTICE (it can hold raw values: plan trees with constants) may
        reach the client; asked as each one passes, since an elevation or a reload can change the
        role. No answer, or a failing one, hides it."""
        hook = self._shows_diagnostics
        if hook is None:
            return False
        try:
            return hook() is True
        except Exception:
            log.exception("%s: the policy could not say whether diagnostics may be shown; hiding them",
                          self._label)
            return False

    def _reported(self, body: bytes) -> None:
        """A ParameterStatus: the policy hears the settings it follows. One it cannot read or take
        would leave it judging statements under settings the session no longer has, so the
        session is ended after this chunk (fail closed; the client reconnects)."""
        hook = self._parameter_status
        if hook is None:
            return
        try:
            status = ParameterStatus.decode(body)
        except ProtocolViolation as exc:
            log.error("%s: unreadable ParameterStatus from PostgreSQL (%s); ending the session",
                      self._label, exc.reason)
            self._settings_lost = True
            return
        if status.name in REPORTED_SETTINGS:
            try:
                hook(status.name, status.value)
            except Exception:
                log.exception("%s: the policy could not take the report of %s; ending the session",
                              self._label, status.name)
                self._settings_lost = True

    def _complete(self, request: Request, answered: bool = True) -> None:
        if self._transparent:
            return
        ticket = request.prepares
        # its PREPARE failed (or the session ended first), or PostgreSQL no longer runs it as it was
        # prepared (a column's type changed: 0A000; deallocated: 26000): pgveil prepares it anew
        if ticket is not None and (ticket.state == UpstreamTicket.PENDING
                                   or request.sqlstate in ("0A000", "26000")):
            ticket.state = UpstreamTicket.FAILED
        if request.markers:
            for marker in request.markers:
                self._markers.pop(marker, None)
        now = self._loop.time()
        started = max(request.sent_at, self._last_completion)
        self._last_completion = now
        if not request.verdicts and not request.closes:
            return
        outcome = Outcome(rows=request.rows, sqlstate=request.sqlstate,
                          upstream_seconds=max(0.0, now - started), verdicts=request.verdicts,
                          closes=request.closes, answered=answered)
        fast = self._fast
        lane = self._lane
        if fast is not None and (lane is None or lane.done()):
            try:
                if fast.fast_complete(outcome):
                    return
            except Exception:
                log.exception("%s: on_complete raised", self._label)
                return
        answer = self._call(self._policy.on_complete, outcome)
        if isinstance(answer, asyncio.Future):
            answer.add_done_callback(self._log_failure)

    def _never_forwarded(self, tag: int, answer: Any) -> None:
        """The verdict of a message came after the session ended: it was decided (and audited)
        but never sent, and its completion says so."""
        verdict = self._checked(tag, answer)
        if verdict is None or self._transparent:
            return
        outcome = Outcome(rows=0, sqlstate=None, upstream_seconds=0.0, answered=False, forwarded=False)
        answer = self._call(self._policy.on_complete, outcome)
        if isinstance(answer, asyncio.Future):
            answer.add_done_callback(self._log_failure)

    def _log_failure(self, future: asyncio.Future[Any]) -> None:
        if not future.cancelled() and future.exception() is not None:
            log.error("%s: on_complete raised", self._label, exc_info=future.exception())

    # ---- flow control and the end ----------------------------------------------------------------

    def _update_client_reading(self) -> None:
        transport = self._client.transport
        if transport is None or self.finished:
            return
        pause = (self._blocked and self._backlog_bytes >= _BACKLOG_LIMIT) or self._upstream_full
        if pause != self._client_paused:
            self._client_paused = pause
            if pause:
                transport.pause_reading()
            else:
                transport.resume_reading()

    def _upstream_write_paused(self, paused: bool) -> None:
        self._upstream_full = paused
        self._update_client_reading()

    def _client_write_paused(self, paused: bool) -> None:
        transport = self._upstream.transport
        if transport is None or self.finished:
            return
        if paused:
            transport.pause_reading()
        else:
            transport.resume_reading()

    def drain(self) -> None:
        """Close at the end of the current request (now, if there is none)."""
        self._draining = True
        if self._idle() and not self.finished:
            self.finish("drained", _shutdown_error())

    def fail_client(self, exc: ProtocolViolation) -> None:
        log.warning("%s: client broke the protocol: %s", self._label, exc.reason)
        self.finish(f"client protocol violation: {exc.reason}",
                    ErrorResponse.build("FATAL", exc.sqlstate, f"pgveil: protocol: {exc.reason}"))

    def _client_lost(self, exc: Exception | None) -> None:
        if self.finished:
            return
        if self._terminate_seen:  # an orderly close: what it sent before its Terminate still runs
            self._client_left()
            return
        self.finish("client disconnected" + (" during a statement" if self._running() else ""))

    def _saw_terminate(self) -> None:
        """The client sent Terminate: nothing after it is read (PostgreSQL would not read it); its
        end-of-file or close no longer ends the session."""
        self._terminate_seen = True
        self._client.relay_to(_ignore)
        self._client.on_eof = self._client_eof

    def _forwarded_terminate(self) -> None:
        """Everything up to the client's Terminate is with PostgreSQL: relay its answers until it
        closes (or, once the client has left too, until nothing is outstanding)."""
        if not self._terminate_seen:
            self._saw_terminate()
        self._terminated = True
        if self._client_done and self._idle():
            self.finish("client terminated the session")

    def _client_eof(self) -> bool:
        self._client_left()
        return True  # keep the client's connection open for what PostgreSQL still answers

    def _client_left(self) -> None:
        """After its Terminate the client sent end-of-file or closed: PostgreSQL, straight, would
        still finish what came before the Terminate; so does pgveil, and it ends the session once
        nothing is outstanding."""
        if self._client_done:
            return
        self._client_done = True
        upstream = self._upstream.transport
        if self._client.lost and upstream is not None and not upstream.is_closing():
            upstream.resume_reading()  # its answers are dropped now: no full client buffer holds them up
        if self._terminated and self._idle():
            self.finish("client terminated the session")

    def _upstream_lost(self, exc: Exception | None) -> None:
        if self.finished:
            return
        if self._terminated:  # PostgreSQL ended the session the client's Terminate asked it to end
            self.finish("client terminated the session")
            return
        if self._upstream_sent_fatal:
            self.finish("PostgreSQL ended the session")
            return
        log.warning("%s: lost the connection to PostgreSQL", self._label)
        self._observer.upstream_error("lost")
        self.finish("upstream connection lost", _upstream_lost_error())

    def finish(self, reason: str, client_error: ErrorResponse | None = None) -> None:
        """End the session: tell the client why (when the stream allows), release the backend."""
        if self.finished:
            return
        running = self._running()
        self.finished = True  # a policy call still running (e.g. an audit write) is left to finish
        if client_error is not None and not self._client.lost and not self._upstream_scanner.mid_message:
            self._client.write(client_error.encode())
        if not self._upstream.lost:
            if running and not self._terminated:
                self._cancel_upstream()  # frees the backend now instead of when it next writes
            if not self._client_scanner.mid_message and not self._terminated:
                self._upstream.write(_TERMINATE)
            self._upstream.close()
        self._client.close()
        self._unanswered()
        self._on_finished(reason)

    def _unanswered(self) -> None:
        """Completions of the requests PostgreSQL had not answered when the session ended (a
        verdict still awaited gets its own when it comes: _never_forwarded)."""
        if self._transparent:
            return
        while self._requests:
            self._complete(self._requests.popleft(), answered=False)
        batch = self._open_batch
        self._open_batch = None
        if batch is not None and (batch.verdicts or batch.closes):
            self._complete(batch, answered=False)


def _passes_swallowed(tag: int, emit: bytes, start: int, end: int) -> bool:
    """What still reaches the client after a row-budget breach: ReadyForQuery, notices, settings
    reports, and a FATAL error."""
    if tag == _READY or tag == _NOTICE or tag == _PARAMETER_STATUS:  # noqa: SIM109
        return True
    return tag == _ERROR and error_sqlstate(emit[start + 5 : end])[1]


def refusal_error(refusal: Refuse) -> ErrorResponse:
    """The ErrorResponse a refusal becomes: pgveil's words, or PostgreSQL's own error (`native`) with
    the position PostgreSQL would give."""
    error = ErrorResponse.build("ERROR", refusal.sqlstate, refusal.text)
    if refusal.position:
        return ErrorResponse((*error.fields, ("P", str(refusal.position))))
    return error


def position_in_client_text(body: bytes, splices: Splices) -> bytes | None:
    """The ErrorResponse (whole message) with its position field ('P') moved from pgveil's rewrite
    back into the client's text; None when it has none or it stays. ('p'/'q', internal position
    and query, are about SQL that functions run, never pgveil's rewrite: left as they are.)"""
    pos = 0
    n = len(body)
    while pos < n and body[pos] != 0:
        end = body.find(b"\x00", pos + 1)
        if end < 0:
            return None
        if body[pos] == 0x50:  # 'P'
            try:
                position = int(body[pos + 1 : end])
            except ValueError:
                return None
            moved = splices.client_position(position)
            if moved == position:
                return None
            fields = body[:pos + 1] + str(moved).encode() + body[end:]
            return b"E" + (len(fields) + 4).to_bytes(4, "big") + fields
        pos = end + 1
    return None


def _query(body: bytes) -> Query:
    """Query.decode of a Query body; the usual one (one terminating NUL) decoded here, compiled."""
    if body and body.find(b"\x00") == len(body) - 1:
        return Query(body[:-1].decode(ENCODING, ERRORS))
    return Query.decode(body)


def _query_message(sql: str) -> bytes:
    """Query(sql).encode(), compiled (a rewritten statement on every cache hit)."""
    raw = sql.encode(ENCODING, ERRORS)
    if b"\x00" in raw:
        return Query(sql).encode()  # raises as encode does
    return b"Q" + (len(raw) + 5).to_bytes(4, "big") + raw + b"\x00"


def _ignore(data: bytes) -> None:
    """What the client sends after its Terminate (or after bytes that broke the protocol)."""


def _shutdown_error() -> ErrorResponse:
    return ErrorResponse.build("FATAL", "57P01", "pgveil: shutdown: pgveil is shutting down; reconnect")


def _settings_lost_error() -> ErrorResponse:
    return ErrorResponse.build(
        "FATAL", "XX000", "pgveil: internal-error: pgveil could not follow a change of a session setting, "
        "so it cannot judge this session's statements; reconnect (the pgveil log says why)")


def _upstream_lost_error() -> ErrorResponse:
    return ErrorResponse.build(
        "FATAL", "08006", "pgveil: upstream: the connection to PostgreSQL was lost; reconnect"
    )
