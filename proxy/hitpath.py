"""The verdict-cache hit path in one step: a statement decided, audited and counted by one call.

`pgveil serve` stacks three layers per connection: the guard (GuardedConnection), the audit
(AuditedConnection) and the metrics (MeteredConnection), each with a synchronous FastPath that calls
the next. `HitPath` does what those three do together for the common case, in this one module,
which is compiled by mypyc at install (proxy/native.py): the guard's checks and the cache lookup
with literal extraction, the access record (the static parts prebuilt per cached verdict and per
connection; per statement only the sequence, time and request change; sealed with one hash and
written with one write(2) before the answer returns, as the default durability requires), the
completion record queued behind it, and the plain-integer counters Prometheus reads at scrape time.

It decides nothing on its own: whenever any of the layers would do more than the common case
(a cache miss, a refusal, a role with a fingerprint allow-list, a catalog check that is due, session
effects, a statement in another client encoding, strict audit durability, a PostgreSQL or stdout
audit sink, elevation events to write first, ...) it declines before changing anything, and the
layered FastPath of the outermost layer answers from scratch, as it did before this module existed.
`fast_path_of` (proxy/connection_policy.py) hands the relay a HitPath when the layers are the ones
it knows (each layer's own FastPath of the layer below is then a HitPath too: only what they
decline reaches the layered code). Every private attribute read here is the layers' own, and
each step mirrors the method its docstring names: keep them in step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
import os
import time
from bisect import bisect_left
from collections.abc import Coroutine
from datetime import UTC, datetime
from typing import Any

from proxy.audit.chain import ChainState
from proxy.audit.connection import _FRAGMENTS, AuditedConnection, now_iso, statement_fragment
from proxy.audit.file import JsonLinesFileSink
from proxy.audit.sink import AuditError, Unsealed, json_string
from proxy.connection_policy import INTERNAL_ERROR, Outcome
from proxy.enforcement import _CATALOG_CHECK_SECONDS, LONG_STATEMENT, NO_EFFECTS, GuardedConnection
from proxy.guard.cache import _NUMBER, CacheHit
from proxy.guard.positions import Splices
from proxy.guard.upstream_prepare import NAME_PREFIX
from proxy.guard.verdict import Allow, Refuse, Rewrite
from proxy.metrics import MeteredConnection
from proxy.prepared import SESSION_OBJECT_KEYWORDS, Prepared

Answer = Allow | Rewrite | Refuse | Coroutine[Any, Any, Any] | None

_DIGITS = b"0123456789"

log = logging.getLogger("pgveil.audit")


def combined_fast_path(policy: object) -> HitPath | None:
    """A HitPath for `policy` when it is the guard, alone or under the audit and/or the metrics
    layer as `pgveil serve` stacks them; None for anything else (the layered FastPath is used)."""
    metered: MeteredConnection | None = None
    audit: AuditedConnection | None = None
    inner: object = policy
    if type(inner) is MeteredConnection:
        metered = inner
        inner = inner.inner
    if type(inner) is AuditedConnection:
        audit = inner
        inner = inner.inner
    if type(inner) is not GuardedConnection:
        return None
    return HitPath(policy, inner, audit, metered)


class HitPath:
    """The FastPath of one connection's stacked layers (see the module's docstring)."""

    def __init__(self, layered: Any, guard: GuardedConnection, audit: AuditedConnection | None,
                 metered: MeteredConnection | None) -> None:
        self.layered = layered  # the outermost layer: its own FastPath answers whatever this declines
        self.guard = guard
        self.enforcement: Any = guard.enforcement
        self.audit = audit
        self.metered = metered
        self.metrics: Any = metered.metrics if metered is not None else None
        sink: Any = audit.sink if audit is not None else None
        # the audit file written here: the default (and `never`) durability, nothing to wait for
        self.file: Any = sink if type(sink) is JsonLinesFileSink and not sink.strict else None
        self.clock_is_now = audit is not None and audit.clock is now_iso
        self.timer_is_metrics = audit is not None and audit.timer is not None and audit.timer is self.metrics
        # the last statement fragment: (info, decision) it was built for, and its text
        self.fragment_info: object = None
        self.fragment_decision = ""
        self.fragment = ""

    # ---- FastPath ----------------------------------------------------------------------------

    def fast_query(self, sql: str) -> Answer:
        started = time.perf_counter()
        guard = self.guard
        try:
            decided = self._hit(sql)
        except Exception:
            return self._guard_raised("query", None, sql, started)
        if decided is None:
            return self.layered.fast_query(sql)  # type: ignore[no-any-return]
        try:
            role: Any = decided[0]
            verdict: Any = decided[1]
            self.enforcement.cache.hits += 1
            guard.prepared._calls += 1
            if type(verdict) is Rewrite and verdict.info.masks:
                verdict = guard._upstream_form(sql, verdict)
            guard._effects.append(NO_EFFECTS)  # last: _guard_raised queues the entry of a raise
        except Exception:
            return self._guard_raised("query", None, sql, started)
        return self._finish(verdict, role, "query", None, sql, started)

    def fast_parse(self, statement_name: str, sql: str, param_types: tuple[int, ...]) -> Answer:
        started = time.perf_counter()
        guard = self.guard
        if statement_name.startswith(NAME_PREFIX):
            return self.layered.fast_parse(statement_name, sql, param_types)  # type: ignore[no-any-return]
        try:
            decided = self._hit(sql)
        except Exception:
            return self._guard_raised("parse", statement_name, sql, started)
        if decided is None:
            return self.layered.fast_parse(statement_name, sql, param_types)  # type: ignore[no-any-return]
        try:
            role: Any = decided[0]
            verdict: Any = decided[1]
            self.enforcement.cache.hits += 1
            guard.prepared._calls += 1
            guard.prepared.define(("statement", statement_name),
                                  Prepared(sql, verdict.sql, verdict, guard._basis(role), (), False, ()))
            guard._effects.append(NO_EFFECTS)  # last: _guard_raised queues the entry of a raise
        except Exception:
            return self._guard_raised("parse", statement_name, sql, started)
        return self._finish(verdict, role, "parse", statement_name, sql, started)

    def fast_bind(self, statement_name: str) -> Answer:
        started = time.perf_counter()
        try:
            decided = self._bound(statement_name)
        except Exception:
            return self._guard_raised("bind", statement_name, None, started)
        if decided is None:
            return self.layered.fast_bind(statement_name)  # type: ignore[no-any-return]
        return self._finish(decided[1], decided[0], "bind", statement_name, None, started)

    def fast_complete(self, outcome: Outcome) -> bool:
        guard = self.guard
        if not guard.no_effects_ahead(outcome.verdicts):  # the request's queued session effects
            return False
        prepared: Any = guard.prepared
        calls = outcome.verdicts + outcome.closes
        if prepared._pending:
            prepared.complete(calls, ok=outcome.sqlstate is None)
        else:
            prepared._completed += calls
        audit = self.audit
        if audit is not None:
            self._completed(audit, outcome)
        metered = self.metered
        if metered is not None and outcome.verdicts and not metered._last_refused and outcome.answered:
            metrics = self.metrics
            _observe(metrics.upstream_seconds, outcome.upstream_seconds)
            sqlstate = outcome.sqlstate
            if sqlstate:
                errors: Any = metrics.statement_errors
                errors[(sqlstate[:2],)] += 1
        return True

    # ---- the guard ---------------------------------------------------------------------------

    def _role(self) -> object:
        """GuardedConnection._fast_role: the role when the hit path may decide for it, else None."""
        guard = self.guard
        enforcement = self.enforcement
        policy: Any = enforcement.state.policy
        role: Any = None
        active = enforcement.active_role
        if active is not None:
            elevated = active(guard.session.user)
            if elevated is not None and elevated in policy.roles:
                role = policy.roles[elevated]
        if role is None:
            login: Any = guard._login_role
            role = login[1] if login is not None and login[0] is policy else guard.role()
        if role is None or role.fingerprints != "off":
            return None
        known: Any = guard._masked_for
        if known is not None and known[0] is policy and known[1] is role:
            masked = bool(known[2])
        else:
            masked = guard._masked(role)
        if masked or self._judged(role):  # GuardedConnection._session_refusal's roles
            checked: Any = guard._startup_checked
            if ((checked is None or checked[0] is not policy or checked[1] is not role
                 or checked[2] is not None or guard._settings_problem is not None)
                    and guard._session_refusal(role) is not None):
                return None
        if self._judged(role) and not (
                time.monotonic() - enforcement._last_catalog_check < _CATALOG_CHECK_SECONDS
                and enforcement._ddl_caught_up >= enforcement._ddl_noted):
            return None
        return role

    def _judged(self, role: Any) -> bool:
        """GuardedConnection._judged_by_definitions, its memo read here."""
        guard = self.guard
        known: Any = guard._judged_for
        if known is not None and known[0] is self.enforcement.state.policy and known[1] is role:
            return bool(known[2])
        return guard._judged_by_definitions(role)

    def _bound(self, statement_name: str) -> tuple[object, object] | None:
        """GuardedConnection.fast_bind: the role and the stored verdict of a prepared statement still
        valid as it was prepared (counted as a call), else None with nothing changed."""
        guard = self.guard
        if guard.upstream._tickets:
            guard._check_upstream_statements()
        role: Any = self._role()
        if role is None:
            return None
        prepared: Any = guard.prepared
        key = ("statement", statement_name)
        entry: Any = prepared.entries.get(key) if not prepared._pending else prepared.current(key)
        if type(entry) is not Prepared:
            return None
        verdict: Any = entry.verdict
        basis: Any = entry.basis
        session: Any = guard.session
        settings: Any = session.settings
        if (type(verdict) is Refuse or entry.effects or entry.ddl or entry.events
                or basis[0] is not self.enforcement.state or basis[1] is not role
                or basis[2] != session.search_path
                or basis[3] != (tuple(sorted(settings.items())) if settings else ())
                or (self._judged(role) and verdict.info.reads_definitions)):
            return None
        prepared._calls += 1
        guard._effects.append(NO_EFFECTS)
        return role, verdict

    def _hit(self, sql: str) -> tuple[object, object] | None:
        """GuardedConnection._fast_hit without counting: the role and the verdict of a cache hit that
        needs nothing more, else None (nothing was changed: the layered path decides from scratch)."""
        guard = self.guard
        if len(sql) >= LONG_STATEMENT or (not sql.isascii() and guard._client_encoding() is not None):
            return None
        if guard.upstream._tickets:
            guard._check_upstream_statements()
        role: Any = self._role()
        if role is None:
            return None
        # the guard's context key (GuardedConnection.context_and_key), from its memo when current
        state = self.enforcement.state
        session: Any = guard.session
        settings: Any = session.settings
        settings_key = tuple(sorted(settings.items())) if settings else ()
        context: Any = guard._context
        key: Any
        if (context is not None and context[0][0] is state and context[0][1] is role
                and context[0][2] == session.search_path and context[0][3] == settings_key):
            key = context[2]
        else:
            key = guard.context_and_key(role)[1]
        found = _find(self.enforcement.cache, sql, key)
        if found is None:
            return None
        entry: Any = found[0]
        literals = found[1]
        verdict: Any = entry.verdict
        if (type(verdict) is Refuse or entry.effects or entry.hit.ddl
                or (self._judged(role) and verdict.info.reads_definitions)):
            return None
        lowered = sql.lower()
        for keyword in SESSION_OBJECT_KEYWORDS:
            if keyword in lowered:
                return None
        if literals is None:  # an exact entry
            return role, entry.hit.verdict
        return role, _new_verdict(entry, literals, sql)

    def _guard_raised(self, protocol: str, statement_name: str | None, sql: str | None,
                      started: float) -> Answer:
        """The guard raised: refused as internal-error, audited and counted (as the layers do)."""
        log.exception("the policy raised; refusing")
        self.guard._effects.append(NO_EFFECTS)  # a counted verdict: its (empty) effects entry
        return self._finish(INTERNAL_ERROR, None, protocol, statement_name, sql, started)

    # ---- the audit and the metrics -----------------------------------------------------------

    def _finish(self, verdict: Any, role: Any, protocol: str, statement_name: str | None, sql: str | None,
                started: float) -> Answer:
        """AuditedConnection.record_access, then MeteredConnection's count, of a decided verdict."""
        audit = self.audit
        answer: Any = verdict
        if audit is not None:
            if self.file is not None and role is not None and self._no_events(audit):
                answer = self._record(audit, verdict, role, protocol, statement_name, sql)
            else:
                answer = audit.record_access(verdict, protocol, statement_name=statement_name, sql=sql)
                if type(answer) is not Allow and type(answer) is not Rewrite and type(answer) is not Refuse:
                    metered = self.metered
                    return answer if metered is None else metered._count_later(answer, started)
        if self.metered is not None:
            self._count(answer, role, started)
        return answer  # type: ignore[no-any-return]

    def _no_events(self, audit: AuditedConnection) -> bool:
        """No elevation event is waiting to be written ahead of the access record."""
        events: Any = audit.events
        if events is None:
            return True
        taken = events.take_events()
        if not taken:
            return True
        events.return_events(taken)  # written by record_access, ahead of the record
        return False

    def _record(self, audit: AuditedConnection, verdict: Any, role: Any, protocol: str,
                statement_name: str | None, sql: str | None) -> Any:
        """record_access for the audit file in its default durability: the record is written (one
        write(2), with the completions queued behind it) before this returns."""
        audit.requests += 1
        request = audit.requests
        role_name: str | None = role.name
        version: str | None = self.enforcement.state.policy.version
        audit._unfinished.append((request, role_name, version))
        extra = ""
        if statement_name is not None:
            extra = ',"statement_name":' + json_string(statement_name)
        if sql is not None and audit.include_literals:
            extra += ',"sql":' + json_string(sql)
        now = _now() if self.clock_is_now else audit.clock()
        who: Any = audit._who_known
        if who is not None and who[0] == role_name and who[1] == version and who[2] is audit.client:
            members: str = who[3]
        else:
            members = audit._who_members(role_name, version)
        info = verdict.info
        decision: str = verdict.decision
        if info is self.fragment_info and decision == self.fragment_decision and type(verdict) is not Refuse:
            fragment = self.fragment
        else:
            known: Any = _FRAGMENTS.get(id(info))
            rule = verdict.rule if type(verdict) is Refuse else None
            if known is not None and known[0] is info and known[1] == decision and known[2] == rule:
                fragment = known[3]
            else:
                fragment = statement_fragment(verdict)
            if rule is None:
                self.fragment_info, self.fragment_decision, self.fragment = info, decision, fragment
        body = (f'"type":"access","time":"{now}",{members},"request":{request},"protocol":"{protocol}",'
                f'{fragment}{extra}')
        timer_is_metrics = self.timer_is_metrics
        timer: Any = audit.timer
        started = time.perf_counter() if timer is not None else 0.0
        try:
            _append(self.file, tuple.__new__(Unsealed, ("access", now, body)))
        except AuditError as exc:
            return audit._unaudited(verdict, exc)
        if timer is not None:
            seconds = time.perf_counter() - started
            if timer_is_metrics:
                series: Any = self.metrics.audit_write_seconds
                _observe(series[("access",)], seconds)
            else:
                timer.audit_written("access", seconds)
        return verdict

    def _count(self, verdict: Any, role: Any, started: float) -> None:
        """MeteredConnection._count: the statement, its refusal rule and findings, pgveil's time."""
        metrics = self.metrics
        metered: Any = self.metered
        audit = self.audit
        name: Any
        if audit is not None and audit._unfinished:
            name = audit._unfinished[-1][1]
        elif role is not None:
            name = role.name
        else:
            name = self.guard.role_name if hasattr(self.guard, "role_name") else None
            if name is None:
                current: Any = self.guard.role()
                name = current.name if current is not None else None
        _observe(metrics.pgveil_seconds, time.perf_counter() - started)
        info = verdict.info
        statements: Any = metrics.statements
        statements[(name or "unknown", info.kind, verdict.decision)] += 1
        refused = type(verdict) is Refuse
        if refused:
            refusals: Any = metrics.refusals
            refusals[(verdict.rule,)] += 1
        if info.findings:
            findings: Any = metrics.findings
            for finding in info.findings:
                findings[(finding,)] += 1
        metered._last_refused = refused

    def _completed(self, audit: AuditedConnection, outcome: Outcome) -> None:
        """AuditedConnection._completed for the usual request (one statement, written, answered);
        anything else is left to it."""
        unfinished = audit._unfinished
        file = self.file
        if (file is None or outcome.verdicts != 1 or not unfinished or audit._unwritten
                or not outcome.forwarded or not outcome.answered):
            audit._completed(outcome)
            return
        request, role_name, version = unfinished.popleft()
        now = _now() if self.clock_is_now else audit.clock()
        who: Any = audit._who_known
        if who is not None and who[0] == role_name and who[1] == version and who[2] is audit.client:
            members: str = who[3]
        else:
            members = audit._who_members(role_name, version)
        sqlstate = outcome.sqlstate
        rows = str(int(outcome.rows))  # (no format specs: mypyc makes those str.format calls)
        seconds = repr(round(outcome.upstream_seconds, 6))
        state = "null" if sqlstate is None else json_string(sqlstate)
        body = (f'"type":"completion","time":"{now}",{members},"request":{request},"rows":{rows},'
                f'"upstream_seconds":{seconds},"sqlstate":{state}')
        record = tuple.__new__(Unsealed, ("completion", now, body))
        if file._tidy is not None:
            file._behind.append(record)
        else:
            file.append_behind(record)


# ---- the verdict cache's lookup ---------------------------------------------------------------------

def cache_lookup(cache: Any, sql: str, context_key: object) -> Any:
    """proxy.guard.cache.VerdictCache.lookup, compiled (VerdictCache uses it when it is): the
    CacheHit of `sql` under `context_key`, counted as a hit, or None, counted as a miss."""
    found = _find(cache, sql, context_key)
    if found is None:
        cache.misses += 1
        return None
    cache.hits += 1
    entry: Any = found[0]
    literals = found[1]
    if literals is None or (entry.template is None and type(entry.verdict) is not Allow):
        return entry.hit  # an exact entry, or a refusal
    return tuple.__new__(CacheHit, (_new_verdict(entry, literals, sql), entry.effects, entry.hit.ddl))


def _find(cache: Any, sql: str, context_key: object) -> tuple[Any, list[str] | None] | None:
    """The cache entry `sql` matches under `context_key` and its literals (None: an exact entry),
    as VerdictCache.lookup finds it (exact entries first, then the first shape of its bucket)."""
    if cache._exact:
        entry = cache._exact.get((context_key, sql))
        if entry is not None:
            return entry, None
    bucket = "'".join(sql.split("'")[::2]).encode("utf-8", "surrogatepass").translate(None, _DIGITS)
    for candidate in cache._shapes.get((context_key, bucket), ()):
        literals = _extract(candidate.skeleton, candidate.kinds, sql)
        if literals is not None:
            return candidate, literals
    return None


def _new_verdict(entry: Any, literals: list[str], sql: str) -> Any:
    """A shape entry's verdict for `sql` (its literals put back into the cached rewrite); the
    entry's verdict must be an Allow or a Rewrite."""
    verdict: Any = entry.verdict
    pieces: Any = entry.template
    if pieces is None:
        return _allow(sql, verdict.info)
    if len(literals) == 1:
        text = pieces[0] + literals[0] + pieces[1]
    else:
        parts = [pieces[0]]
        for index in range(len(literals)):
            parts.append(literals[index])
            parts.append(pieces[index + 1])
        text = "".join(parts)
    return _rewrite(text, verdict.info, entry.layout, literals)


# ---- shared pieces --------------------------------------------------------------------------------

def _extract(skeleton: tuple[str, ...], kinds: str, sql: str) -> list[str] | None:
    """proxy.guard.cache._Entry.extract: the literals of `sql` when it is the skeleton with other
    literals of the same kinds, else None."""
    first = skeleton[0]
    if not sql.startswith(first):
        return None
    position = len(first)
    literals: list[str] = []
    if len(kinds) != len(skeleton) - 1:
        raise ValueError("a verdict-cache entry whose literals do not fit its skeleton")
    for index in range(len(kinds)):
        piece = skeleton[index + 1]
        if kinds[index] == "s":
            if sql[position : position + 1] != "'":
                return None
            end = sql.find("'", position + 1)
            while end != -1 and sql[end + 1 : end + 2] == "'":
                end = sql.find("'", end + 2)
            if end == -1:
                return None
            end += 1
            literal = sql[position:end]
            if "\\" in literal:
                return None
        else:
            match = _NUMBER.match(sql, position)
            if match is None:
                return None
            end = match.end()
            literal = match.group()
        if not sql.startswith(piece, end):
            return None
        literals.append(literal)
        position = end + len(piece)
    return literals if position == len(sql) else None


# Verdicts of a hit, made without running the dataclasses' and Splices' __init__ in the interpreter
# (one Python frame each) when their fields are the ones known here; else by their constructors.
_new = object.__new__
_set = object.__setattr__
_KNOWN_FIELDS = (tuple(field.name for field in dataclasses.fields(Allow)) == ("sql", "info")
                 and tuple(field.name for field in dataclasses.fields(Rewrite))
                 == ("sql", "info", "splices", "prepares")
                 and Splices.__slots__ == ("_layout", "_literals", "_spans"))


def _allow(sql: str, info: object) -> Allow:
    """Allow(sql, info)."""
    if not _KNOWN_FIELDS:
        return Allow(sql, info)  # type: ignore[arg-type]
    verdict: Allow = _new(Allow)
    _set(verdict, "sql", sql)
    _set(verdict, "info", info)
    return verdict


def _rewrite(text: str, info: object, layout: tuple[tuple[int, int, int, int], ...],
             literals: list[str]) -> Rewrite:
    """Rewrite(text, info, Splices(layout=layout, literals=literals))."""
    if not _KNOWN_FIELDS or not layout:
        return Rewrite(text, info, Splices(layout=layout, literals=literals))  # type: ignore[arg-type]
    splices: Any = _new(Splices)
    splices._spans = None
    splices._layout = layout
    splices._literals = tuple(literals)
    verdict: Rewrite = _new(Rewrite)
    _set(verdict, "sql", text)
    _set(verdict, "info", info)
    _set(verdict, "splices", splices)
    _set(verdict, "prepares", None)
    return verdict


def _observe(series: Any, value: float) -> None:
    """proxy.metrics.Buckets.observe."""
    counts: list[int] = series.counts
    counts[bisect_left(series.bounds, value)] += 1
    series.total += value


_second: list[tuple[int, str]] = [(-1, "")]


def _now() -> str:
    """proxy.audit.connection.now_iso (UTC now, microseconds; date and time formatted once a second)."""
    now = time.time_ns() // 1000
    second = now // 1_000_000
    last = _second[0]
    if last[0] != second:
        last = (second, datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S."))
        _second[0] = last
    return f"{last[1]}{str(now - second * 1_000_000 + 1_000_000)[1:]}+00:00"


def seal(body: str, seq: int, last_hash: str, key: bytes | None, algorithm: str) -> tuple[bytes, str]:
    """proxy.audit.chain.HashChain.seal_body: the sealed line (UTF-8, with its newline) of record
    number `seq` after a record whose hash is `last_hash`, and its own hash; one encode, one hash."""
    if body:
        text = f'{{"seq":{seq},{body},"prev":"{last_hash}","chain":"{algorithm}"}}'
    else:
        text = f'{{"seq":{seq},"prev":"{last_hash}","chain":"{algorithm}"}}'
    sealed = text.encode("utf-8", "backslashreplace")
    digest = hmac.digest(key, sealed, "sha256").hex() if key else hashlib.sha256(sealed).hexdigest()
    return sealed[:-1] + b',"hash":"' + digest.encode() + b'"}\n', digest


def _append(sink: Any, record: Unsealed) -> None:
    """JsonLinesFileSink.append for the default durability (nothing to wait for): the record, and
    the completions queued behind it first, sealed and written with one write(2). A write that
    would rotate the file, a file not open, a broken sink: left to the sink itself."""
    broken = sink._broken
    if broken:
        raise AuditError(broken)
    behind: Any = sink._behind
    records: list[Any] = [*behind, record] if behind else [record]
    fd = sink._fd
    if fd is None:
        _append_by_sink(sink, records)
        return
    chain: Any = sink.chain
    state: Any = chain.state
    seq: int = state[0]
    last_hash: str = state[1]
    key: bytes | None = chain.key
    algorithm: str = chain.algorithm
    if len(records) == 1:
        seq += 1
        data, last_hash = seal(record.body, seq, last_hash, key, algorithm)
    else:
        lines: list[bytes] = []
        for item in records:
            seq += 1
            line, last_hash = seal(item.body, seq, last_hash, key, algorithm)
            lines.append(line)
        data = b"".join(lines)
    limit = sink.max_bytes
    before: int = sink._size
    if sink._rotatable and limit is not None and before + len(data) > limit:
        _append_by_sink(sink, records)
        return
    if behind:
        sink._behind = []
    try:
        written = os.write(fd, data)
        if written < len(data):
            sink._write_rest(fd, data, written, before)
    except OSError as exc:
        if behind:
            sink._log_lost_behind()
        raise AuditError(sink._write_failure(exc)) from exc
    sink._size = before + len(data)
    chain.state = tuple.__new__(ChainState, (seq, last_hash))
    sink._unsynced = True
    if sink._tidy is None or (sink._sync_due is None and sink._syncing is None
                              and sink.fsync_interval is not None):
        sink._schedule()


def _append_by_sink(sink: Any, records: list[Any]) -> None:
    if sink._behind:
        sink._behind = []
    try:
        sink._write(records)
    except AuditError:
        if len(records) > 1:
            sink._log_lost_behind()
        raise
