"""The policy runtime `pgveil serve --policy` uses: policy + catalog + verdict cache, one
GuardedConnection per client, reload on SIGHUP and catalog refresh after DDL."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import deque
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from pglast import ast, parse_sql
from pglast.enums import DiscardMode, VariableSetKind

from proxy.analysis_pool import AnalysisPool, AnalysisTimedOut
from proxy.catalog import CatalogReader, CatalogSnapshot, load_catalog, parse_search_path
from proxy.catalog_watch import CatalogWatch
from proxy.config import DEFAULT_MAX_STATEMENT_SIZE
from proxy.connection_policy import ClientInfo, Outcome
from proxy.discovery.watch import UnclassifiedColumns
from proxy.dlp.guard import DataGuard, DlpRuntime, may_have_row_budget
from proxy.firewall.fingerprints import FingerprintKeeper
from proxy.guard.cache import CacheHit, VerdictCache
from proxy.guard.encodings import decode_statement, encode_statement
from proxy.guard.pipeline import Analysis, analyse
from proxy.guard.rules import role_is_restricted
from proxy.guard.settings import diagnostic_refusal, setting_refusal
from proxy.guard.statement import GuardContext, role_is_masked
from proxy.guard.upstream_prepare import NAME_PREFIX, UpstreamStatements, may_drop_statements, prepared_form
from proxy.guard.verdict import Allow, Refuse, Rewrite, Verdict
from proxy.policy.loader import hash_key, load_policy, policy_uses_hash
from proxy.policy.model import Policy, Role
from proxy.prepared import (
    SESSION_OBJECT_KEYWORDS,
    UNCERTAIN,
    Effects,
    Key,
    Prepared,
    SessionObjectEvent,
    StatementBook,
    session_object_events,
)
from proxy.upstream_setup import install_catalog_watch, install_masking_functions

log = logging.getLogger("pgveil.enforcement")
_T = TypeVar("_T")

_UNKNOWN_RELATION_REFRESH_SECONDS = 2.0
JUDGED_OFF_LOOP = 512
"""Cache misses this long or longer are analysed (and stored in the verdict cache) on an analysis
worker thread: analysis costs 4-7 microseconds per character of dense SQL, and some rules are
quadratic in the branches of an OR or a UNION (a 4 kB OR chain took seconds), so judging them on
the event loop would hold up every other connection of the process. Cache hits stay on the loop.
The VerdictCache is thus used from several threads: its operations must stay single dict/list
operations (atomic under the GIL), with no iteration over a dict."""
LONG_STATEMENT = 4096
"""Statements this long or longer are also looked up in the cache and scanned for PREPARE/DECLARE
on an analysis worker thread (both are linear in the text)."""
ANALYSIS_WORKERS = 2
"""Threads judging long statements; more would only take turns at the GIL with the event loop."""
ANALYSIS_DEADLINE = 10.0
"""Seconds an analysis thread may spend on one statement before it is interrupted and the
statement refused (too-complex), so no statement holds a thread for minutes."""
# How stale the catalog may get for verdicts that read no views or user code (tables only): a table
# replaced by a view, or a user function shadowing a built-in one, directly in PostgreSQL.
_CATALOG_CHECK_SECONDS = 1.0
# Startup parameters every driver sends that do not change how SQL is read or who runs it.
_HARMLESS_STARTUP = frozenset({
    "user", "database", "application_name", "fallback_application_name", "datestyle", "timezone",
    "extra_float_digits", "intervalstyle", "geqo", "lc_monetary", "lc_numeric", "lc_time",
    "statement_timeout", "lock_timeout", "idle_in_transaction_session_timeout", "bytea_output",
    "_pq_.protocol_managed_params",
})


class EnforcementError(RuntimeError):
    """The policy or the upstream catalog cannot be used (one line: what and how to fix it)."""


@dataclass(frozen=True, slots=True)
class _State:
    policy: Policy
    catalog: CatalogSnapshot


class Enforcement:
    """Shared by every connection of one serving process; swapped atomically on reload."""

    def __init__(self, policy_path: str, upstream_dsn: str, state: _State,
                 active_role: Callable[[str], str | None] | None = None,
                 max_statement_size: int = DEFAULT_MAX_STATEMENT_SIZE,
                 catalog_reader: CatalogReader | None = None) -> None:
        self.policy_path = policy_path
        self.max_statement_size = max_statement_size
        self.analysis = AnalysisPool(ANALYSIS_WORKERS)
        self.analysis_deadline = ANALYSIS_DEADLINE
        self.upstream_dsn = upstream_dsn
        self.state = state
        self.active_role = active_role
        # pgveil's own statements (PGVEIL ELEVATE ...): (login, sql) -> None for every other
        # statement, else the verdict to await; asked before the guard, only off the fast path
        self.intercept: Callable[[str, str], Coroutine[Any, Any, Verdict] | None] | None = None
        self.cache = VerdictCache()
        self.fingerprints = FingerprintKeeper.for_policy(policy_path)
        self._refreshing: asyncio.Task[None] | None = None
        self._last_refresh = time.monotonic()
        self.catalog_watch = CatalogWatch(upstream_dsn)
        self.catalog_reader = catalog_reader or CatalogReader(upstream_dsn)  # re-reads what changed
        self._last_catalog_check = time.monotonic()
        self._following: asyncio.Task[None] | None = None  # follow_ddl_soon's run
        self._ddl_noted = 0  # DDL statements follow_ddl_soon was told of
        self._ddl_caught_up = 0  # ... of which the catalog has been brought up to date after
        self.statements_waiting = 0  # statements waiting for DDL to be followed (ddl_followed)
        # Names-only discovery, run after each catalog read (never per statement): a gauge and log lines.
        self.unclassified = UnclassifiedColumns()
        self._discover_names()
        # Row budgets and honeytokens (docs/dlp.md): the hour ledger and the lockout book.
        self.dlp = DlpRuntime(policy_path)

    @classmethod
    async def create(cls, policy_path: str, upstream_dsn: str,
                     active_role: Callable[[str], str | None] | None = None,
                     max_statement_size: int = DEFAULT_MAX_STATEMENT_SIZE) -> Enforcement:
        """Load the policy, install the masking functions it needs, read the catalog."""
        reader = CatalogReader(upstream_dsn)
        try:
            state = await cls._load(policy_path, upstream_dsn, reader)
        except BaseException:
            await reader.close()
            raise
        return cls(policy_path, upstream_dsn, state, active_role, max_statement_size, reader)

    @staticmethod
    async def _load(policy_path: str, upstream_dsn: str, reader: CatalogReader | None = None) -> _State:
        from proxy.catalog import CatalogError
        from proxy.policy.loader import PolicyError

        try:
            policy = load_policy(policy_path)
            key = hash_key(policy) if policy_uses_hash(policy) else None
        except PolicyError as exc:
            raise EnforcementError(_one_line(exc, "run pgveil check --policy for all of them")) from None
        if key is not None:
            try:
                await install_masking_functions(upstream_dsn, key)
            except Exception as exc:  # asyncpg, OS and timeout errors alike: say what failed, in one line
                raise EnforcementError(
                    f"cannot install pgveil's masking functions upstream: {_one_line(exc)}") from None
        try:
            if not await install_catalog_watch(upstream_dsn):
                log.warning("the upstream login may not create event triggers: pgveil fingerprints the "
                            "catalogs before each statement of a masked role to see definitions change")
        except Exception as exc:  # without the trigger the fingerprint still sees every change
            log.warning("cannot install pgveil's catalog watch upstream: %s", _one_line(exc))
        try:
            catalog = await (load_catalog(upstream_dsn) if reader is None else reader.read())
        except CatalogError as exc:
            raise EnforcementError(_one_line(exc)) from None
        return _State(policy, catalog)

    @property
    def policy(self) -> Policy:
        return self.state.policy

    def connection_policy(self, client: ClientInfo | None = None) -> GuardedConnection:
        return GuardedConnection(self)

    async def reload(self) -> Policy:
        """Validate the policy file again; invalid -> raise and keep the old one; valid -> swap."""
        state = await self._load(self.policy_path, self.upstream_dsn, self.catalog_reader)
        self.state = state
        self.cache.clear()
        log.info("policy %s loaded from %s", state.policy.version, self.policy_path)
        asyncio.get_running_loop().call_soon(self._discover_names)
        return state.policy

    async def refresh_catalog(self) -> None:
        """Read the catalog again (after DDL); concurrent callers share one refresh."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self._refresh())
        await asyncio.shield(self._refreshing)

    async def _refresh(self) -> None:
        try:
            catalog = await self.catalog_reader.read()
        except Exception as exc:  # the old catalog stays; a stale catalog only ever refuses more
            log.warning("catalog refresh failed, keeping the previous one: %s", exc)
            return
        self._last_refresh = time.monotonic()
        self.state = _State(self.state.policy, catalog)
        asyncio.get_running_loop().call_soon(self._discover_names)  # after the waiting statements go on

    def _discover_names(self) -> None:
        """Count and log columns whose names look sensitive and that the policy leaves out."""
        try:
            self.unclassified.update(self.state.policy, self.state.catalog)
        except Exception:  # discovery is advice: it never stops serving
            log.exception("names-only discovery failed")

    async def fresh_catalog(self, required: bool = True) -> bool:
        """Refresh the catalog when PostgreSQL's definitions changed since it was read (functions,
        views, operators, casts, domains, role settings created or replaced there directly); False
        when pgveil cannot tell or cannot catch up (the caller refuses). Not `required` (a verdict
        that read no views or user code): only when the last check is older than a second, after
        DDL run through pgveil has been followed (follow_ddl_soon)."""
        if not required and time.monotonic() - self._last_catalog_check < _CATALOG_CHECK_SECONDS:
            if self._ddl_caught_up < self._ddl_noted:
                self.statements_waiting += 1
                try:
                    await self.ddl_followed()
                finally:
                    self.statements_waiting -= 1
            return True
        self._last_catalog_check = time.monotonic()
        for _ in range(3):
            try:
                marker = await self.catalog_watch.marker()
            except Exception as exc:  # asyncpg, OS and timeout errors alike
                log.warning("cannot tell whether the upstream catalog changed: %s", _one_line(exc))
                self._last_catalog_check = 0.0  # not checked: the next caller asks again
                return False
            if marker == self.state.catalog.change_marker:
                return True
            await self.refresh_catalog()
        return marker == self.state.catalog.change_marker

    def follow_ddl_soon(self) -> int:
        """Follow a DDL in the background (a session that need not wait for it ran it); DDL while
        a follow runs gets one more after it, not one each. Until it is done, statements that would
        rely on the last check (fresh_catalog not `required`) wait for it. Returns how many DDL
        were noted before this one (ddl_followed(upto) waits for those)."""
        before = self._ddl_noted
        self._ddl_noted += 1
        if self._following is None or self._following.done():
            self._following = asyncio.ensure_future(self._follow_ddl(self._ddl_noted))
        return before

    async def _follow_ddl(self, noted: int) -> None:
        """One marker probe and, when it moved, one catalog read that started after the probe
        (so after the DDL noted so far committed)."""
        try:
            self._last_catalog_check = time.monotonic()
            marker = await self.catalog_watch.marker()
            if marker != self.state.catalog.change_marker:
                earlier = self._refreshing is not None and not self._refreshing.done()
                await self.refresh_catalog()
                if earlier and self.state.catalog.change_marker != marker:
                    await self.refresh_catalog()  # the one joined had begun before the probe
                if self.state.catalog.change_marker != marker:  # newer DDL, or the read failed
                    self._last_catalog_check = 0.0  # the next statement that relies on it asks
        except Exception as exc:  # asyncpg, OS and timeout errors alike
            log.warning("cannot catch the catalog up after DDL: %s", _one_line(exc))
            self._last_catalog_check = 0.0  # not checked: the next statement that relies on it asks
        finally:
            self._ddl_caught_up = max(self._ddl_caught_up, noted)
            if self._ddl_noted > noted:
                self._following = asyncio.ensure_future(self._follow_ddl(self._ddl_noted))

    async def ddl_followed(self, upto: int | None = None) -> None:
        """Wait until the DDL noted so far (follow_ddl_soon), or the first `upto` of them, has been
        followed."""
        noted = self._ddl_noted if upto is None else upto
        while self._ddl_caught_up < noted and self._following is not None:
            following = self._following
            with contextlib.suppress(Exception):
                await asyncio.shield(following)
            if following is self._following:  # no follow after it: nothing more to wait for
                return

    async def close(self) -> None:
        """Close the catalog watch's connection (the serving process stops)."""
        for task in (self._following, self._refreshing):
            if task is not None:
                task.cancel()
        self.analysis.close()
        await self.catalog_watch.close()
        await self.catalog_reader.close()

    async def off_loop(self, work: Callable[[], _T], deadline: float | None = None) -> _T:
        """`work()` on an analysis thread, the event loop free meanwhile (AnalysisTimedOut past
        `deadline` seconds)."""
        return await self.analysis.run(work, deadline)

    def may_refresh_for_unknown_relation(self) -> bool:
        return time.monotonic() - self._last_refresh > _UNKNOWN_RELATION_REFRESH_SECONDS

    def catalog_checked_lately(self) -> bool:
        """`fresh_catalog(required=False)` would answer True without asking PostgreSQL."""
        return (time.monotonic() - self._last_catalog_check < _CATALOG_CHECK_SECONDS
                and self._ddl_caught_up >= self._ddl_noted)


@dataclass
class _Session:
    user: str = ""
    database: str = ""
    search_path: tuple[str, ...] | None = None  # None: the role's default from the catalog
    settings: dict[str, str] = field(default_factory=dict)
    # What PostgreSQL reported (ParameterStatus): it wins over pgveil's own tracking.
    reported: dict[str, str] = field(default_factory=dict)
    search_path_reported: bool = False  # PostgreSQL 18+ reports search_path; older servers do not
    role_set: bool = False  # a SET ROLE ran (not reported by PostgreSQL; pgveil's own tracking)
    effects_lost: bool = False  # completions outran the effects queue: SET ROLE/search_path unknown


class GuardedConnection:
    """One client connection: role selection at startup, the guard on every statement."""

    def __init__(self, enforcement: Enforcement) -> None:
        self.enforcement = enforcement
        self.session = _Session()
        # the session effects and DDL flag of the verdict being decided ...
        self._pending_effects: tuple[tuple[str, str], ...] = ()
        self._pending_ddl = False
        # ... queued once it is given: one entry per verdict the relay counts (Outcome.verdicts), in
        # order, taken by the completions (pipelined requests each keep theirs); NO_EFFECTS shared
        self._effects: deque[tuple[Effects, bool]] = deque()
        self._ddl_in_transaction = False
        self._context: tuple[tuple[object, ...], GuardContext, tuple[object, ...]] | None = None
        self._login_role: tuple[Policy, Role | None] | None = None
        self.prepared = StatementBook()
        self.upstream = UpstreamStatements()  # masked statements prepared on the upstream connection
        self._upstream_role: Role | None = None  # the role they were prepared for
        self._masked_for: tuple[Policy, Role, bool] | None = None
        self._judged_for: tuple[Policy, Role, bool] | None = None  # _judged_by_definitions, remembered
        # what keeps pgveil from judging SQL under the session's settings (None: nothing)
        self._settings_problem: tuple[str, str] | None = _UNCHECKED
        self._startup_params: dict[str, str] = {}
        # (policy, role, refusal): the startup rules of the masked role in force, checked again when a
        # reload or an elevation grant changes the role after the connection was opened
        self._startup_checked: tuple[Policy, Role, Refuse | None] | None = None

    # -- role and context -------------------------------------------------------------------
    def role(self) -> Role | None:
        policy = self.enforcement.policy
        active = self.enforcement.active_role
        if active is not None:
            elevated = active(self.session.user)
            if elevated is not None and elevated in policy.roles:
                return policy.roles[elevated]
        if self._login_role is None or self._login_role[0] is not policy:
            self._login_role = (policy, policy.role_for_user(self.session.user))
        return self._login_role[1]

    def context(self, role: Role) -> GuardContext:
        return self.context_and_key(role)[0]

    def context_and_key(self, role: Role) -> tuple[GuardContext, tuple[object, ...]]:
        """The guard context and verdict-cache key; rebuilt only when what they depend on changes."""
        state = self.enforcement.state
        settings = tuple(sorted(self.session.settings.items())) if self.session.settings else ()
        cached = self._context
        if (cached is not None and cached[0][0] is state and cached[0][1] is role
                and cached[0][2] == self.session.search_path and cached[0][3] == settings):
            return cached[1], cached[2]
        basis = (state, role, self.session.search_path, settings)
        search_path = self.session.search_path
        if search_path is None:
            search_path = state.catalog.default_search_path(self.session.user, self.session.database)
        context = GuardContext(
            policy=state.policy, role=role, catalog=state.catalog, user=self.session.user,
            search_path=search_path, settings=dict(self.session.settings),
        )
        key = (state.policy.version, role.name, context.user, search_path, settings, state.catalog.generation)
        self._context = (basis, context, key)
        return context, key

    # -- ConnectionPolicy -------------------------------------------------------------------
    async def on_startup(self, params: Mapping[str, str], client: ClientInfo) -> Refuse | None:
        self.session.user = params.get("user") or client.user
        self.session.database = params.get("database") or client.database or self.session.user
        role = self.role()
        if role is None:
            return Refuse(
                "no-role",
                f"no role for user {self.session.user} in the policy; ask for the login to be added "
                "to a role's members",
                sqlstate="28000",
            )
        self._startup_params = dict(params)
        if self.enforcement.policy.honeytokens:
            locked = self.enforcement.dlp.lockout_refusal(self.session.user)
            if locked is not None:
                return Refuse("honeytoken-lockout", locked, sqlstate="28000")
        if role_is_masked(self.enforcement.policy, role):
            # settings made with ALTER ROLE/DATABASE since the catalog was read count too
            await self.enforcement.fresh_catalog()
        refusal = self._startup_refusal(role)
        self._startup_checked = (self.enforcement.policy, role, refusal)
        return refusal

    def _startup_refusal(self, role: Role) -> Refuse | None:
        """Why a masked `role` may not run this connection as it was opened (database, startup
        settings, server-side settings); None for a role that is not masked."""
        params = self._startup_params
        if not role_is_masked(self.enforcement.policy, role):
            return None
        if self.session.database != self.enforcement.state.catalog.database:
            return Refuse(
                "wrong-database",
                f"pgveil guards database {self.enforcement.state.catalog.database}; role {role.name} "
                "has masked data and cannot connect to another database through it",
                sqlstate="28000",
            )
        for name, value in _startup_settings(params):
            if name in _HARMLESS_STARTUP:
                continue
            if name == "options":
                return Refuse("session-setting", f"startup option {value!r} is not a setting pgveil can "
                              "check; pass settings as -c name=value", sqlstate="28000")
            if name == "replication" and value.lower() not in ("false", "off", "0", "no"):
                return Refuse("session-setting", "replication connections stream raw data and role "
                              f"{role.name} has masked data", sqlstate="28000")
            refusal = setting_refusal(name, [value], role.name)
            if refusal is not None:
                return Refuse(refusal.rule, refusal.message, sqlstate="28000")
        return self._server_side_settings(role)

    def _server_side_settings(self, role: Role) -> Refuse | None:
        """ALTER ROLE/DATABASE ... SET of a client_encoding whose multibyte characters can swallow
        an ASCII byte (SJIS, BIG5, GBK, ...) would make PostgreSQL read the text differently; of a
        diagnostic setting (client_min_messages below notice, debug_print_plan, ...) would have
        PostgreSQL send the session plan trees holding raw values."""
        user, database = self.session.user, self.session.database
        role_settings = self.enforcement.state.catalog.role_settings
        for key in ((database, user), ("", user), (database, ""), ("", "")):
            for name, setting in role_settings.get(key, {}).items():
                diagnostic = diagnostic_refusal(
                    name, [setting], f"role {role.name} has masked data",
                    f"the server sets it for this login: ALTER ROLE/DATABASE ... RESET {name} there")
                if diagnostic is not None:
                    return replace(diagnostic, sqlstate="28000")
            value = role_settings.get(key, {}).get("client_encoding")
            if value is not None and setting_refusal("client_encoding", [value], role.name) is not None:
                return Refuse("session-setting", f"the server sets client_encoding {value} for this login; "
                              f"role {role.name} has masked data and pgveil cannot read SQL in {value} "
                              "exactly as PostgreSQL does", sqlstate="28000")
        return None

    def on_parameter_status(self, name: str, value: str) -> None:
        """PostgreSQL's report of a session setting: search_path is the one statements are resolved
        with; the others are checked before every statement of a masked role (`_session_refusal`)."""
        if name == "search_path":
            user = self.session.user
            self.session.search_path = tuple(user if entry == "$user" else entry
                                             for entry in parse_search_path(value))
            self.session.search_path_reported = True
        else:
            self.session.reported[name] = value
            self._settings_problem = _UNCHECKED

    def data_guard(self) -> DataGuard | None:
        """The relay's row budgets and honeytoken search for this connection (docs/dlp.md); None
        when the policy has no honeytokens and the login no row budget, not even by an elevation,
        so the relay does nothing more than without this feature. Asked once, when the relay
        starts."""
        policy = self.enforcement.policy
        if not policy.honeytokens and not may_have_row_budget(policy, self.role(), self.session.user):
            return None
        return DataGuard(self.enforcement.dlp, policy, self.role, self.session.user,
                         policy.settings.honeytoken_lockout_seconds)

    def shows_diagnostics(self) -> bool:
        """PostgreSQL's notices below NOTICE (plan trees hold values as constants) reach only a role
        that sees every column unmasked and every table; asked per notice, so an elevation or a
        reload applies at once."""
        role = self.role()
        return role is not None and not self._judged_by_definitions(role)

    def _masked(self, role: Role) -> bool:
        """role_is_masked for the policy in force, remembered per (policy, role): asked on every
        statement and every re-execution."""
        policy = self.enforcement.policy
        known = self._masked_for
        if known is None or known[0] is not policy or known[1] is not role:
            known = self._masked_for = (policy, role, role_is_masked(policy, role))
        return known[2]

    def _judged_by_definitions(self, role: Role) -> bool:
        """The role's verdicts depend on function and view definitions PostgreSQL can change under
        pgveil (masked roles, and roles limited to some tables): the catalog must be current.
        Remembered per (policy, role), as `_masked` is."""
        policy = self.enforcement.policy
        known = self._judged_for
        if known is None or known[0] is not policy or known[1] is not role:
            known = self._judged_for = (policy, role, self._masked(role) or role_is_restricted(role))
        return known[2]

    def _session_refusal(self, role: Role, sql: str | None = None) -> Refuse | None:
        """The refusal while the session runs with settings under which pgveil cannot judge a masked
        role's SQL (as PostgreSQL reported them); `sql` that only SETs/RESETs settings in plain ASCII
        may still go to the guard, so the session can be put right. Roles limited to some tables
        are held to the same session settings: a string PostgreSQL reads differently from pgveil
        hides a table from the allow-list as it hides a column from masking (for them only the
        settings that change how SQL is read count: who the session runs as changes no table)."""
        if not self._masked(role):
            if not role_is_restricted(role):
                return None
            # memos the hit path reads: no startup refusal for a role that is not masked, and the
            # settings problem (None: nothing to refuse, without working it out per statement)
            self._startup_checked = (self.enforcement.policy, role, None)
            if self._settings_problem is _UNCHECKED:
                self._settings_problem = self._unreadable_settings()
            if self._settings_problem is None:
                return None
            reading = self._reading_problem()
            if reading is None and self.session.effects_lost:  # search_path unknown: tables too
                reading = ("pgveil lost track of the session's SET ROLE and search_path in a pipeline",
                           "RESET ALL")
            if reading is None or (sql is not None and _only_settings(sql)):
                return None
            return Refuse("session-setting", f"{reading[0]}, and role {role.name} is limited to some "
                          f"tables; {reading[1]} first")
        checked = self._startup_checked
        if checked is None or checked[0] is not self.enforcement.policy or checked[1] is not role:
            checked = self._startup_checked = (self.enforcement.policy, role, self._startup_refusal(role))
        if checked[2] is not None:  # opened under another role (elevation, reload): reconnect
            return Refuse(checked[2].rule, f"{checked[2].message}; the connection was opened under another "
                          "role, reconnect")
        if self._settings_problem is _UNCHECKED:
            self._settings_problem = self._unreadable_settings()
        problem = self._settings_problem
        if problem is None:
            return None
        if sql is not None and _only_settings(sql):
            return None
        return Refuse("session-setting", f"{problem[0]}, and role {role.name} has masked data; "
                      f"{problem[1]} first")

    def _reading_problem(self) -> tuple[str, str] | None:
        """(what is wrong, what to run) when the session's settings make PostgreSQL read SQL text
        differently from pgveil."""
        reported = self.session.reported
        encoding = reported.get("client_encoding")
        if encoding is not None and setting_refusal("client_encoding", [encoding], "") is not None:
            return (f"the session's client_encoding is {encoding}, which pgveil cannot read exactly as "
                    "PostgreSQL does", "RESET client_encoding or SET client_encoding = 'UTF8'")
        if reported.get("standard_conforming_strings", "on").lower() != "on":
            return ("the session's standard_conforming_strings is off and pgveil reads strings as "
                    "PostgreSQL does with it on", "RESET standard_conforming_strings")
        return None

    def _unreadable_settings(self) -> tuple[str, str] | None:
        """(what is wrong, what to run) when the session's settings keep pgveil from judging SQL."""
        reported = self.session.reported
        problem = self._reading_problem()
        if problem is not None:
            pass
        elif reported.get("session_authorization", self.session.user) != self.session.user:
            problem = (f"the session runs as {reported['session_authorization']}, not as the login "
                       f"{self.session.user}", "RESET SESSION AUTHORIZATION")
        elif self.session.role_set:
            problem = ("the session changed its role with SET ROLE", "RESET ROLE")
        elif self.session.effects_lost:
            problem = ("pgveil lost track of the session's SET ROLE and search_path in a pipeline",
                       "RESET ALL")
        elif reported.get("is_superuser", "off").lower() == "on":
            problem = (f"the session runs as a PostgreSQL superuser (login {self.session.user})",
                       "connect with a login that is not a superuser")
        return problem

    async def on_query(self, sql: str) -> Verdict:
        return await self._counted(self._on_query(sql))

    async def on_parse(self, statement_name: str, sql: str, param_types: tuple[int, ...]) -> Verdict:
        return await self._counted(self._on_parse(statement_name, sql, param_types))

    async def on_bind(self, statement_name: str) -> Verdict:
        return await self._counted(self._on_bind(statement_name))

    async def on_function_call(self, function_oid: int) -> Verdict:
        return await self._counted(self._on_function_call(function_oid))

    async def _counted(self, deciding: Coroutine[Any, Any, Verdict]) -> Verdict:
        """A verdict the relay counts (Outcome.verdicts), its session effects queued for its request's
        completion: exactly one entry per verdict, a refusal's (and a raising hook's) empty."""
        self._pending_effects, self._pending_ddl = (), False
        try:
            verdict = await deciding
        except BaseException:
            self._effects.append(NO_EFFECTS)
            raise
        effects, ddl = self._pending_effects, self._pending_ddl
        if (effects or ddl) and not isinstance(verdict, Refuse):
            self._pending_effects, self._pending_ddl = (), False
            self._effects.append((effects, ddl))
        else:
            self._effects.append(NO_EFFECTS)
        return verdict

    async def _on_query(self, sql: str) -> Verdict:
        self.prepared.call()
        intercept = self.enforcement.intercept
        if intercept is not None:
            own = intercept(self.session.user, sql)
            if own is not None:
                self._pending_effects, self._pending_ddl = (), False
                return await own
        self._check_upstream_statements()
        text = self._in_session_encoding(sql)
        if isinstance(text, Refuse):
            return text
        if may_drop_statements(text):
            self.upstream.forget_all(deallocated=True)
        verdict = await self._judge(text)
        verdict = (await self._with_session_objects(text, verdict, self._pending_effects, self._pending_ddl,
                                                    keep=False))[0]
        self._check_upstream_statements()  # the role may have changed while it was judged
        return self._upstream_form(sql, verdict) if text is sql else self._for_client(verdict, sql)

    async def _on_parse(self, statement_name: str, sql: str, param_types: tuple[int, ...]) -> Verdict:
        self.prepared.call()
        self._check_upstream_statements()
        text = self._in_session_encoding(sql)
        if isinstance(text, Refuse):
            self.prepared.define(("statement", statement_name), None)
            return text
        if statement_name.lower().startswith(NAME_PREFIX):
            self.prepared.define(("statement", statement_name), None)
            return _reserved_name(statement_name)
        intercept = self.enforcement.intercept
        own = intercept(self.session.user, sql) if intercept is not None else None
        if own is not None:  # a re-execution (Bind) gives its answer again, as prepared
            self._pending_effects, self._pending_ddl = (), False
            verdict = await own
            self.prepared.define(("statement", statement_name), None if isinstance(verdict, Refuse) else
                                 Prepared(sql, verdict.sql, verdict, self._basis(self.role())))
            return verdict
        if may_drop_statements(text):
            self.upstream.forget_all(deallocated=True)
        verdict = await self._judge(text)
        checked, entry = await self._with_session_objects(
            text, verdict, self._pending_effects, self._pending_ddl, keep=True)
        self.prepared.define(("statement", statement_name), entry)
        self._check_upstream_statements()  # the role may have changed while it was judged
        return checked if text is sql else self._for_client(checked, sql)

    # -- client encodings -----------------------------------------------------------------------
    def _client_encoding(self) -> str | None:
        """The session's client_encoding (as PostgreSQL reported it) when it is not UTF8 (None)."""
        encoding = self.session.reported.get("client_encoding")
        return None if encoding is None or encoding in ("UTF8", "SQL_ASCII") else encoding

    def _in_session_encoding(self, sql: str) -> str | Refuse:
        """The statement as PostgreSQL will read it: the relay's text (its bytes read as UTF8) read in
        the session's client encoding instead, or PostgreSQL's error for bytes it would reject (in a
        UTF8 session the gate gives it). The same `sql` object when nothing changes."""
        encoding = self._client_encoding()
        if encoding is None or sql.isascii():
            return sql
        text = decode_statement(sql, encoding)
        if isinstance(text, Refuse):
            self._pending_effects, self._pending_ddl = (), False
        return text

    def _for_client(self, verdict: Verdict, sql: str) -> Verdict:
        """A verdict judged on the decoded text, as the relay must act on it: an Allow forwards the
        client's bytes as they came, a Rewrite is encoded back into the client encoding."""
        if isinstance(verdict, Refuse):
            return verdict
        if isinstance(verdict, Allow):
            return Allow(sql, verdict.info)
        encoding = self._client_encoding()
        assert encoding is not None
        encoded = encode_statement(verdict.sql, encoding)
        if isinstance(encoded, Refuse):
            self._pending_effects, self._pending_ddl = (), False
            return replace(encoded, info=verdict.info)
        return replace(verdict, sql=encoded)

    async def _on_bind(self, statement_name: str) -> Verdict:
        """A Bind of a statement prepared by an earlier request: its stored verdict while nothing it
        depended on changed, else its SQL decided again (refused when the outcome differs)."""
        self.prepared.call()
        self._check_upstream_statements()
        key: Key = ("statement", statement_name)
        refusal, entry = await self._still_valid(key)
        if refusal is not None:
            self._pending_effects, self._pending_ddl = (), False
            return refusal
        assert entry is not None
        role = self.role()
        refusal = self._session_refusal(role) if role is not None else None
        if refusal is not None:
            self._pending_effects, self._pending_ddl = (), False
            return replace(refusal, info=entry.verdict.info)
        if role is not None and role.fingerprints != "off" and not isinstance(entry.verdict, Refuse):
            # an approval withdrawn since the Parse applies to its re-executions too
            screened = await self.enforcement.fingerprints.screen(role, entry.verdict.info)
            if screened is not None:
                self._pending_effects, self._pending_ddl = (), False
                return Refuse(screened.rule, screened.message, info=entry.verdict.info)
        self._pending_effects, self._pending_ddl = entry.effects, entry.ddl
        if entry.events:
            refusal = await self._session_object_events(entry.events, entry)
            if refusal is not None:
                self._pending_effects, self._pending_ddl = (), False
                return refusal
        self._check_upstream_statements()  # the role may have changed while it was checked
        return entry.verdict

    async def on_close_statement(self, statement_name: str) -> None:
        self.prepared.call()
        if statement_name.startswith(NAME_PREFIX):
            self.upstream.forget_all()
        self.prepared.forget("statement", statement_name)

    async def _on_function_call(self, function_oid: int) -> Verdict:
        self.prepared.call()
        self._check_upstream_statements()
        role = self.role()
        if role is None or role_is_masked(self.enforcement.policy, role) or role_is_restricted(role):
            return Refuse("function-call-message", "the fast-path FunctionCall message cannot be checked; "
                          "call the function in a SELECT")
        return Allow("")

    async def on_complete(self, outcome: Outcome) -> None:
        self.prepared.complete(outcome.verdicts + outcome.closes, ok=outcome.sqlstate is None)
        if outcome.verdicts == 0:  # only Close messages
            return
        pending = self._effects
        if len(pending) < outcome.verdicts:
            await self._effects_lost(outcome.verdicts - len(pending))
            return
        decided = [pending.popleft() for _ in range(outcome.verdicts)]
        if outcome.sqlstate is not None:
            return
        follow = reset_role = set_path = False
        for effects, ddl in decided:  # in the order the request's statements ran
            for name, value in effects:
                if name == "search_path":
                    set_path = True
                    if not self.session.search_path_reported:  # PostgreSQL's report wins
                        self.session.search_path = parse_search_path(value) if value else None
                elif name == "role":
                    reset_role = value == ""
                    self.session.role_set = not reset_role
                    self._settings_problem = _UNCHECKED
                elif name == "commit" and self._ddl_in_transaction:
                    self._ddl_in_transaction = False
                    follow = True
            if ddl:
                self._ddl_in_transaction = follow = True
        if self.session.effects_lost and reset_role and set_path:  # RESET ALL: both known again
            self.session.effects_lost = False
            self._settings_problem = _UNCHECKED
        if follow:
            await self._follow_ddl()

    async def _effects_lost(self, missing: int) -> None:
        """A completion covers more verdicts than have effects queued (a pgveil bug: a counted verdict
        queued nothing): which of the session's SET ROLE, search_path and DDL ran is unknown, so the
        session fails closed: refused for masked and table-limited roles (`session-setting`) until
        RESET ALL, and the catalog followed as after DDL."""
        log.error("%d pipelined verdicts had no session effects queued; the session is refused for "
                  "masked roles until RESET ALL", missing)
        self._effects.clear()
        self.session.effects_lost = True
        self._settings_problem = _UNCHECKED
        await self._follow_ddl()

    async def _follow_ddl(self) -> None:
        """After this session's DDL (or the commit of a transaction with DDL): the catalog catches
        up with PostgreSQL, re-read only when the change marker moved (DDL of temporary objects does
        not move it: the catalog never holds them) and then only for the relations that changed.
        A role whose verdicts depend on the catalog waits for it, so its next statement is judged
        on the new facts; for any other role nothing this session sends depends on it and the
        session goes on while the catalog catches up in the background; only while statements of
        other sessions wait for DDL to be followed does it wait for the DDL still being followed
        from before (so a stream of DDL is then followed at the pace the catalog is read, and
        those statements wait for about one read). Other sessions compare the change marker
        themselves before they rely on the catalog."""
        role = self.role()
        if role is not None and self._judged_by_definitions(role):
            await self.enforcement.fresh_catalog(required=True)
        else:
            # noted at once, so other sessions wait for it; while statements wait for follows,
            # this session waits for the earlier ones (DDL is followed at the pace of the reads)
            before = self.enforcement.follow_ddl_soon()
            if self.enforcement.statements_waiting:
                await self.enforcement.ddl_followed(upto=before)

    # -- the cache-hit fast path ----------------------------------------------------------------
    # A statement whose verdict is in the verdict cache, decided without a coroutine. Whatever the
    # async path would do differently (a refusal, a fingerprint check, catalog freshness to ask
    # PostgreSQL about, session effects or DDL to follow, prepared statements or cursors to track)
    # makes it decline (None) before anything of the session changed; the relay then asks on_query
    # or on_bind, which decide again from scratch.

    def fast_query(self, sql: str) -> Verdict | None:
        """on_query's verdict for a cache hit that needs nothing more, or None (ask on_query)."""
        decided = self._fast_hit(sql)
        if decided is None:
            return None
        self.prepared.call()
        verdict = self._upstream_form(sql, decided[1])
        self._effects.append(NO_EFFECTS)
        return verdict

    def fast_parse(self, statement_name: str, sql: str, param_types: tuple[int, ...]) -> Verdict | None:
        """on_parse's verdict for a cache hit that needs nothing more (the statement is recorded as
        prepared under it, as on_parse does), or None (ask on_parse)."""
        if statement_name.startswith(NAME_PREFIX):
            return None
        decided = self._fast_hit(sql)
        if decided is None:
            return None
        role, verdict = decided
        self.prepared.call()
        self.prepared.define(("statement", statement_name),
                             Prepared(sql, verdict.sql, verdict, self._basis(role), (), False, ()))
        self._effects.append(NO_EFFECTS)
        return verdict

    def _fast_hit(self, sql: str) -> tuple[Role, Allow | Rewrite] | None:
        """The role and the cached verdict of `sql` when nothing but that verdict is needed: no
        refusal, session effect, DDL, catalog check or session object (PREPARE, DECLARE, ...)."""
        if len(sql) >= LONG_STATEMENT or (not sql.isascii() and self._client_encoding() is not None):
            return None  # (a statement in another client encoding is read in it by the async path)
        self._check_upstream_statements()
        role = self._fast_role()
        if role is None:
            return None
        cache = self.enforcement.cache
        hit = cache.lookup(sql, self.context_and_key(role)[1])
        if hit is None:
            cache.misses -= 1  # the async path looks it up again and counts the miss
            return None
        verdict = hit.verdict
        if not isinstance(verdict, Refuse) and not (
                hit.effects or hit.ddl or (self._judged_by_definitions(role) and _reads_definitions(verdict))
                or _may_use_session_objects(sql)):
            return role, verdict
        cache.hits -= 1
        return None

    def _check_upstream_statements(self) -> None:
        """pgveil's upstream statements are relied on only while every statement of the session is
        the same masked role's: an unmasked one (after an elevation or a reload) could deallocate
        and redefine them in ways pgveil does not read (DO, dynamic SQL), and another role is judged
        by other rules, so on any change of role they are forgotten."""
        if len(self.upstream):
            role = self.role()
            if role is None or role is not self._upstream_role or not self._masked(role):
                self.upstream.forget_all()

    def _upstream_form(self, sql: str, verdict: Verdict) -> Verdict:
        """A masked SELECT as EXECUTE of a statement prepared on this upstream connection when its
        shape allows (proxy/guard/upstream_prepare.py), else `verdict` as it is. Not for a
        LONG_STATEMENT: its template (a scan and a parse of the whole text) would be worked out on
        the event loop, about half a second for 500 kB, stalling every session of the process."""
        if not isinstance(verdict, Rewrite) or not verdict.info.masks or len(sql) >= LONG_STATEMENT:
            return verdict
        role = self.role()
        if role is None:
            return verdict
        form = prepared_form(sql, verdict, row_filtered=bool(role.row_filters))
        if form is None:
            return verdict
        if role is not self._upstream_role:
            self.upstream.forget_all()
            self._upstream_role = role
        return self.upstream.forward(self.context_and_key(role)[1], form, verdict)

    def fast_bind(self, statement_name: str) -> Verdict | None:
        """on_bind's verdict for a prepared statement still valid as it was prepared, or None."""
        self._check_upstream_statements()
        role = self._fast_role()
        if role is None:
            return None
        entry = self.prepared.current(("statement", statement_name))
        if (not isinstance(entry, Prepared) or isinstance(entry.verdict, Refuse) or entry.effects or entry.ddl
                or entry.events or not _same_basis(entry.basis, self._basis(role))
                or (self._judged_by_definitions(role) and _reads_definitions(entry.verdict))):
            return None
        self.prepared.call()
        self._effects.append(NO_EFFECTS)
        return entry.verdict

    def fast_complete(self, outcome: Outcome) -> bool:
        """on_complete of a request that leaves no session effect or DDL to follow; else False."""
        if not self.no_effects_ahead(outcome.verdicts):
            return False
        self.prepared.complete(outcome.verdicts + outcome.closes, ok=outcome.sqlstate is None)
        return True

    def no_effects_ahead(self, count: int) -> bool:
        """The next `count` queued entries (a completing request's) are all NO_EFFECTS: taken off the
        queue (True); else nothing changes and on_complete takes them (False)."""
        pending = self._effects
        if count == 1 and pending and pending[0] == NO_EFFECTS:  # usual; ==, not is: mypyc boxes anew
            pending.popleft()
            return True
        if len(pending) < count:
            return False
        for index in range(count):
            if pending[index] != NO_EFFECTS:
                return False
        for _ in range(count):
            pending.popleft()
        return True

    def _fast_role(self) -> Role | None:
        """The role when the fast path may decide for it: no session refusal, no fingerprint
        allow-list (its approvals are read with an await), a recent catalog check when it is
        judged by definitions; else None."""
        role = self.role()
        if role is None or role.fingerprints != "off" or self._session_refusal(role) is not None:
            return None
        if self._judged_by_definitions(role) and not self.enforcement.catalog_checked_lately():
            return None
        return role

    # -- prepared statements and cursors ------------------------------------------------------
    def _basis(self, role: Role | None) -> tuple[object, ...]:
        return (self.enforcement.state, role, self.session.search_path,
                tuple(sorted(self.session.settings.items())) if self.session.settings else ())

    async def _with_session_objects(self, sql: str, verdict: Verdict, effects: Effects, ddl: bool, *,
                                    keep: bool) -> tuple[Verdict, Prepared | None]:
        """The verdict of a Query/Parse once the statements and cursors it defines, removes or uses
        are accounted for, and (`keep`) what it prepares upstream (None when refused: nothing is)."""
        if isinstance(verdict, Refuse):
            return verdict, None
        try:
            if len(sql) < LONG_STATEMENT:
                events = session_object_events(sql)
            else:
                events = await self.enforcement.off_loop(lambda: session_object_events(sql))
        except Exception:  # the guard parsed it; pglast failing here is a pgveil bug: fail closed
            log.exception("cannot read the prepared statements and cursors of a statement")
            return Refuse("analysis-failed", "pgveil could not analyse the statement; the pgveil log "
                          "says why", info=verdict.info), None
        if not events and not keep:
            return verdict, None
        entry = Prepared(sql, verdict.sql, verdict, self._basis(self.role()), effects, ddl, events)
        if events:
            refusal = await self._session_object_events(events, entry)
            if refusal is not None:
                self._pending_effects, self._pending_ddl = (), False
                return refusal, None
        return verdict, entry

    async def _session_object_events(self, events: tuple[SessionObjectEvent, ...],
                                     entry: Prepared) -> Refuse | None:
        """Queue the SQL-level PREPAREs/DECLAREs/DEALLOCATEs of a statement about to run; check
        what its EXECUTEs and FETCHes use."""
        for event in events:
            if event.action == "define":
                assert event.name is not None
                if event.namespace == "statement" and event.name.lower().startswith(NAME_PREFIX):
                    return replace(_reserved_name(event.name), info=entry.verdict.info)
                self.prepared.define((event.namespace, event.name), entry)
            elif event.action == "forget":
                if event.namespace == "statement":
                    # also when a Bind runs a Parsed DEALLOCATE/DISCARD again: pgveil's statements
                    # are gone upstream and their names free
                    self.upstream.forget_all(deallocated=True)
                self.prepared.forget(event.namespace, event.name)
            else:
                assert event.name is not None
                refusal, used = await self._still_valid((event.namespace, event.name))
                if refusal is not None:
                    return replace(refusal, info=entry.verdict.info)
                assert used is not None
                self._pending_effects = (*self._pending_effects, *used.effects)
        return None

    async def _still_valid(self, key: Key) -> tuple[Refuse | None, Prepared | None]:
        """The prepared statement or cursor `key` may run as prepared upstream: (None, entry); or
        the refusal (policy, role or session changed its verdict, or pgveil does not know it)."""
        namespace, name = key
        what = "statement" if namespace == "statement" else "cursor"
        entry = self.prepared.current(key)
        if entry is None and namespace == "cursor":
            role = self.role()
            if role is not None and not self._masked(role):
                # e.g. a refcursor a function opened: nothing masked to keep stale
                return None, Prepared("", "", Allow(""), ())
        if entry is None:  # PostgreSQL's own error: nothing of the name was prepared through pgveil
            if namespace == "cursor":
                message, sqlstate = f'cursor "{name}" does not exist', "34000"
            elif name:
                message, sqlstate = f'prepared statement "{name}" does not exist', "26000"
            else:
                message, sqlstate = "unnamed prepared statement does not exist", "26000"
            return Refuse("prepared-statement-unknown", message, sqlstate=sqlstate, native=True), None
        if entry is UNCERTAIN or not isinstance(entry, Prepared):
            return Refuse(STALE, f"after an error pgveil cannot tell which {what} {name!r} is; close it "
                          "and prepare it again"), None
        role = self.role()
        if (role is not None and self._judged_by_definitions(role)
                and not await self.enforcement.fresh_catalog(required=_reads_definitions(entry.verdict))):
            return Refuse(CATALOG_UNKNOWN, _CATALOG_UNKNOWN_MESSAGE, info=entry.verdict.info), None
        basis = self._basis(role)
        if _same_basis(entry.basis, basis):
            return None, entry
        if role is None:
            return Refuse("no-role", f"no role for user {self.session.user} any more; reconnect"), None
        state = self.enforcement.state
        verdict, effects, ddl = await self._decide(entry.sql, role)
        if not self._same_role_since(state, role):
            return Refuse(STALE, f"the policy or the login's role changed while pgveil judged {what} "
                          f"{name!r} again; run it again", info=verdict.info), None
        rewritten = not isinstance(verdict, Refuse) and verdict.sql != entry.forwarded
        if isinstance(verdict, Refuse) or (rewritten and self._judged_by_definitions(role)):
            why = f"refused now ({verdict.rule})" if isinstance(verdict, Refuse) else "masked differently now"
            return Refuse(STALE, f"the policy, the role or the session changed since {what} {name!r} was "
                          f"prepared and it would be {why}; prepare it again", info=verdict.info), None
        if rewritten:
            # a role with nothing masked, filtered or out of bounds: only how names are written
            # differs (the catalog, followed after DDL, knew a relation then and not now, or the
            # other way round); what PostgreSQL has prepared stays as it is
            verdict = entry.verdict
        fresh = replace(entry, verdict=verdict, basis=basis, effects=effects, ddl=ddl)
        self.prepared.refresh(key, entry, fresh)
        return None, fresh

    # -- the guard --------------------------------------------------------------------------
    async def _judge(self, sql: str) -> Verdict:
        for _ in range(_JUDGE_ATTEMPTS):
            role = self.role()
            if role is None:
                return Refuse("no-role", f"no role for user {self.session.user} any more; reconnect")
            refusal = self._session_refusal(role, sql)
            if refusal is not None:
                self._pending_effects, self._pending_ddl = (), False
                return refusal
            state = self.enforcement.state
            verdict, self._pending_effects, self._pending_ddl = await self._decide(sql, role)
            if self._same_role_since(state, role):
                return verdict
        # a reload or an elevation grant changed the role while the statement was being judged
        self._pending_effects, self._pending_ddl = (), False
        return Refuse("policy-changed", "the policy or the login's role changed while pgveil judged the "
                      "statement; run it again")

    def _same_role_since(self, state: _State, role: Role) -> bool:
        """No reload and no elevation grant starting or ending since `state` and `role` were taken (a
        verdict decided under them, maybe over awaits, still applies). A catalog read again meanwhile
        (after DDL) does not count: _decide judges again when the catalog it relied on changed."""
        if self.enforcement.state.policy is not state.policy:
            return False
        return self.enforcement.active_role is None or self.role() is role

    async def _decide(self, sql: str, role: Role) -> tuple[Verdict, Effects, bool]:
        """The verdict for `sql` and the session effects and DDL flag of running it; for a masked
        role (or one limited to some tables) decided again when the catalog it was decided with is no
        longer current."""
        state = self.enforcement.state
        decided = await self._decide_now(sql, role)
        if not self._judged_by_definitions(role):
            return decided
        if not await self.enforcement.fresh_catalog(required=_reads_definitions(decided[0])):
            return Refuse(CATALOG_UNKNOWN, _CATALOG_UNKNOWN_MESSAGE, info=decided[0].info), (), False
        if self.enforcement.state is not state:
            return await self._decide_now(sql, role)
        return decided

    async def _decide_now(self, sql: str, role: Role) -> tuple[Verdict, Effects, bool]:
        if len(sql) >= LONG_STATEMENT:
            return await self._decide_long(sql, role)
        context, key = self.context_and_key(role)
        hit = self.enforcement.cache.lookup(sql, key)
        if hit is not None:
            if isinstance(hit.verdict, Refuse) or role.fingerprints == "off":  # no await on a plain hit
                return hit.verdict, hit.effects, hit.ddl
            return await self._fingerprinted(role, hit.verdict, hit.effects, hit.ddl)
        if len(sql) >= JUDGED_OFF_LOOP:
            return await self._judge_off_loop(sql, role, context, key)
        analysis = analyse(sql, context)
        verdict = analysis.verdict
        if (isinstance(verdict, Refuse) and verdict.rule == "unknown-relation"
                and self.enforcement.may_refresh_for_unknown_relation()):
            await self.enforcement.refresh_catalog()
            context, key = self.context_and_key(role)
            analysis = analyse(sql, context)
            verdict = analysis.verdict
        effects = _effects(analysis)
        self.enforcement.cache.store(sql, key, analysis, effects)
        ddl = not isinstance(verdict, Refuse) and any(s.statement_class == "ddl" for s in analysis.statements)
        return await self._fingerprinted(role, verdict, effects, ddl)

    async def _decide_long(self, sql: str, role: Role) -> tuple[Verdict, Effects, bool]:
        """_decide_now for a LONG_STATEMENT: refused when over max_statement_size, else judged as
        _decide_now does, the cache lookup too on an analysis worker thread."""
        enforcement = self.enforcement
        if len(sql) > enforcement.max_statement_size:
            why = (f"the statement is {len(sql)} characters long and pgveil judges at most "
                   f"{enforcement.max_statement_size}; send data as bind parameters or with COPY, "
                   "or split it")
            return Refuse(STATEMENT_TOO_LARGE, why), (), False
        cache = enforcement.cache
        context, key = self.context_and_key(role)

        def lookup() -> CacheHit | None:
            try:
                return cache.lookup(sql, key)
            except RuntimeError:  # the loop changed the cache meanwhile: judge the statement anew
                return None

        hit = await enforcement.off_loop(lookup)
        if hit is not None:
            if isinstance(hit.verdict, Refuse) or role.fingerprints == "off":
                return hit.verdict, hit.effects, hit.ddl
            return await self._fingerprinted(role, hit.verdict, hit.effects, hit.ddl)
        return await self._judge_off_loop(sql, role, context, key)

    async def _judge_off_loop(self, sql: str, role: Role, context: GuardContext,
                              key: tuple[object, ...]) -> tuple[Verdict, Effects, bool]:
        """The analysis and cache store of a cache miss of JUDGED_OFF_LOOP characters or more, on an
        analysis worker thread (as _decide_now does them on the loop for shorter statements)."""
        enforcement = self.enforcement
        cache = enforcement.cache

        def judge(context: GuardContext, key: tuple[object, ...],
                  may_refresh: bool) -> tuple[Analysis, Effects | None]:
            analysis = analyse(sql, context)
            verdict = analysis.verdict
            if may_refresh and isinstance(verdict, Refuse) and verdict.rule == "unknown-relation":
                return analysis, None  # judged again after a catalog refresh
            effects = _effects(analysis)
            with contextlib.suppress(RuntimeError):  # the loop changed the cache meanwhile: not kept
                cache.store(sql, key, analysis, effects)
            return analysis, effects

        deadline = enforcement.analysis_deadline
        may_refresh = enforcement.may_refresh_for_unknown_relation()
        try:
            analysis, effects = await enforcement.off_loop(lambda: judge(context, key, may_refresh), deadline)
            if effects is None:
                await enforcement.refresh_catalog()
                context, key = self.context_and_key(role)
                analysis, effects = await enforcement.off_loop(lambda: judge(context, key, False), deadline)
        except AnalysisTimedOut:
            log.warning("analysis of a %d-character statement passed %g s; refused", len(sql), deadline)
            refusal = Refuse("too-complex", f"pgveil could not analyse the statement within {deadline:g} s; "
                             "simplify or split it")

            def keep() -> None:  # so the same shape is refused at once next time
                with contextlib.suppress(RuntimeError):
                    cache.store(sql, key, Analysis(refusal))

            await enforcement.off_loop(keep)
            return refusal, (), False
        assert effects is not None
        verdict = analysis.verdict
        ddl = not isinstance(verdict, Refuse) and any(s.statement_class == "ddl" for s in analysis.statements)
        return await self._fingerprinted(role, verdict, effects, ddl)

    async def _fingerprinted(self, role: Role, verdict: Verdict, effects: Effects,
                             ddl: bool) -> tuple[Verdict, Effects, bool]:
        """The role's fingerprint allow-list (firewall rule unknown-fingerprint), after the verdict cache:
        approvals change it without a policy reload."""
        if isinstance(verdict, Refuse) or role.fingerprints == "off":
            return verdict, effects, ddl
        refusal = await self.enforcement.fingerprints.screen(role, verdict.info)
        if refusal is None:
            return verdict, effects, ddl
        return Refuse(refusal.rule, refusal.message, info=verdict.info), (), False


STALE = "prepared-statement-stale"
_JUDGE_ATTEMPTS = 3
"""Times a statement is judged again when a reload or an elevation change lands while it is judged."""
STATEMENT_TOO_LARGE = "statement-too-large"
CATALOG_UNKNOWN = "catalog-unavailable"
_CATALOG_UNKNOWN_MESSAGE = ("pgveil cannot tell whether the database's definitions changed since it read "
                            "them; retry, and see the pgveil log if it persists")
_UNCHECKED = ("", "")  # GuardedConnection._settings_problem: to be worked out again
NO_EFFECTS: tuple[Effects, bool] = ((), False)
"""The queued entry of a verdict without session effects or DDL (GuardedConnection._effects)."""


def _reserved_name(name: str) -> Refuse:
    """A client statement under the name of one of pgveil's own upstream statements would be EXECUTEd
    by pgveil in place of its masked one (the names show in pg_prepared_statements)."""
    return Refuse("reserved-name", f"prepared statement names starting with {NAME_PREFIX} are pgveil's own "
                  f"(masked statements it prepares upstream); prepare {name} under another name")


def _reads_definitions(verdict: Verdict) -> bool:
    """The verdict depends on definitions PostgreSQL can change under pgveil (or on a name pgveil
    did not find): the catalog must be current before it is used."""
    unknown = isinstance(verdict, Refuse) and verdict.rule in ("unknown-relation", "unknown-function")
    return unknown or verdict.info.reads_definitions


def _may_use_session_objects(sql: str) -> bool:
    """`sql` may PREPARE, EXECUTE, DECLARE, FETCH, ... (session_object_events would parse it)."""
    return _SESSION_OBJECT_WORDS.search(sql.lower()) is not None


_SESSION_OBJECT_WORDS = re.compile("|".join(SESSION_OBJECT_KEYWORDS))


def _same_basis(stored: tuple[object, ...], now: tuple[object, ...]) -> bool:
    return stored[0] is now[0] and stored[1] is now[1] and stored[2] == now[2] and stored[3] == now[3]


def _one_line(exc: Exception, more_hint: str = "") -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    if len(lines) > 1 and more_hint:
        return f"{lines[0]} (and {len(lines) - 1} more; {more_hint})"
    return lines[0]


def _effects(analysis: Analysis) -> tuple[tuple[str, str], ...]:
    """Session state the statements change when they succeed: search_path, transaction end."""
    if isinstance(analysis.verdict, Refuse):
        return ()
    effects: list[tuple[str, str]] = []
    for statement in analysis.statements:
        node = statement.node
        if isinstance(node, ast.VariableSetStmt) and (node.name or "").lower() == "search_path":
            values = [getattr(getattr(arg, "val", None), "sval", None) for arg in node.args or ()]
            if node.kind == VariableSetKind.VAR_SET_VALUE and all(isinstance(v, str) for v in values):
                effects.append(("search_path", ", ".join(f'"{v}"' for v in values if v is not None)))
            else:
                effects.append(("search_path", ""))
        elif isinstance(node, ast.VariableSetStmt) and node.kind == VariableSetKind.VAR_RESET_ALL:
            effects.append(("search_path", ""))
            effects.append(("role", ""))
        elif isinstance(node, ast.VariableSetStmt) and (node.name or "").lower() == "role":
            values = [str(getattr(getattr(arg, "val", None), "sval", "")).lower() for arg in node.args or ()]
            reset = node.kind != VariableSetKind.VAR_SET_VALUE or values == ["none"]
            effects.append(("role", "" if reset else "set"))
        elif isinstance(node, ast.DiscardStmt) and node.target == DiscardMode.DISCARD_ALL:
            effects.append(("search_path", ""))
            effects.append(("role", ""))
        elif isinstance(node, ast.TransactionStmt):
            effects.append(("commit", ""))
    return tuple(effects)


def _only_settings(sql: str) -> bool:
    """`sql` is plain ASCII (read alike in every client encoding) and only SETs or RESETs settings."""
    if len(sql) >= LONG_STATEMENT or not sql.isascii():  # SETs are short; parsing is not free
        return False
    try:
        statements = parse_sql(sql)
    except Exception:  # pglast's parse errors: not a statement that repairs the session
        return False
    return bool(statements) and all(
        isinstance(raw.stmt, ast.VariableSetStmt) for raw in statements if isinstance(raw, ast.RawStmt))


def _startup_settings(params: Mapping[str, str]) -> list[tuple[str, str]]:
    """Every setting a startup packet makes: its own keys and `-c name=value` / `--name=value` in
    `options`, split as PostgreSQL splits them. Anything else in `options` (another switch, a name
    that is not a plain setting name, a non-ASCII byte) comes back as ("options", word): refused."""
    found = [(name.lower(), value) for name, value in params.items() if name.lower() != "options"]
    options = params.get("options", "")
    if not options.isascii():  # isspace() of a byte >= 0x80 depends on the server's locale
        return [*found, ("options", options)]
    words = split_startup_options(options)
    index = 0
    while index < len(words):
        word = words[index]
        if word == "-c" and index + 1 < len(words):
            word = "--" + words[index + 1]
            index += 1
        elif word.startswith("-c"):
            word = "--" + word[2:]
        name, equals, value = word[2:].partition("=")
        name = name.replace("-", "_").lower()
        if word.startswith("--") and equals and _SETTING_NAME.fullmatch(name):
            found.append((name, value))
        else:
            found.append(("options", word))
        index += 1
    return found


_SETTING_NAME = re.compile(r"[a-z_][a-z0-9_$]*(\.[a-z_][a-z0-9_$]*)*")
_C_SPACE = frozenset(" \t\n\v\f\r")  # isspace() in the C locale


def split_startup_options(options: str) -> list[str]:
    """The words of a startup `options` string exactly as PostgreSQL's pg_split_opts() makes them:
    split at every isspace() character (\\v and \\f too), a backslash takes the next character
    literally (a space included), quotes mean nothing."""
    words: list[str] = []
    index, length = 0, len(options)
    while index < length:
        while index < length and options[index] in _C_SPACE:
            index += 1
        if index == length:
            break
        word: list[str] = []
        escaped = False
        while index < length:
            char = options[index]
            if char in _C_SPACE and not escaped:
                break
            if not escaped and char == "\\":
                escaped = True
            else:
                escaped = False
                word.append(char)
            index += 1
        words.append("".join(word))
    return words
