"""Rule `unknown-fingerprint`: per-role allow-lists of query fingerprints, learned or enforced.

PostgreSQL's query fingerprint (pglast / libpg_query) is the same for every statement with the
same shape: literal values, whitespace, comments and letter case do not change it. A role with
`fingerprints: learn` records the fingerprints its application sends, one normalised example each
(literals as $n, so no data values are stored); with `fingerprints: enforce` any other fingerprint
is refused and recorded as `pending` for an operator to approve; `revoked` ones stay refused even
in learn mode. `pgveil fingerprints list | approve ID | revoke ID` reviews the list.

Two stores share one interface: a JSON file beside the policy (one node; atomic rewrites under a
lock file, so several worker processes can share it) and a PostgreSQL table (a fleet of replicas
reading and writing one list). The allow-list lives in memory: decisions are synchronous set
look-ups; new entries are written by `flush()` and other replicas' changes read by `refresh()`.

The check runs after the verdict cache (it depends on the list, which changes without a policy
reload), on the fingerprints the guard puts in `StatementInfo`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol

from proxy.guard.verdict import Refuse, StatementInfo
from proxy.policy.model import Role

RULE = "unknown-fingerprint"
log = logging.getLogger("pgveil.fingerprints")

Status = Literal["approved", "pending", "revoked"]
STATUSES: tuple[Status, ...] = ("approved", "pending", "revoked")


@dataclass(frozen=True, slots=True)
class FingerprintEntry:
    """One statement shape seen for one role; the fingerprint (hex) is its ID on the command line."""

    role: str
    fingerprint: str
    example: str  # normalised SQL: literals replaced by $n
    status: Status
    first_seen: str  # ISO-8601, UTC


class FingerprintStore(Protocol):
    """Where allow-lists persist. `record` never overwrites an entry (role, fingerprint) that exists."""

    async def load(self) -> list[FingerprintEntry]: ...

    async def record(self, entries: Sequence[FingerprintEntry]) -> None: ...

    async def set_status(self, fingerprint: str, status: Status, role: str | None = None) -> int:
        """Change matching entries (all roles unless `role`); returns how many changed."""
        ...


def default_store_path(policy_path: str | Path) -> Path:
    """`policies/reviews.yaml` -> `policies/reviews.fingerprints.json`."""
    return Path(policy_path).with_suffix(".fingerprints.json")


class FileFingerprintStore:
    """A JSON file, rewritten atomically (temp file + rename) under an exclusive lock file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    async def load(self) -> list[FingerprintEntry]:
        return await asyncio.to_thread(self._read)

    async def record(self, entries: Sequence[FingerprintEntry]) -> None:
        await asyncio.to_thread(self._update, lambda current: _added(current, entries))

    async def set_status(self, fingerprint: str, status: Status, role: str | None = None) -> int:
        changed = 0

        def change(current: list[FingerprintEntry]) -> list[FingerprintEntry]:
            nonlocal changed
            result = []
            for entry in current:
                if entry.fingerprint == fingerprint and role in (None, entry.role) and entry.status != status:
                    entry = replace(entry, status=status)
                    changed += 1
                result.append(entry)
            return result

        await asyncio.to_thread(self._update, change)
        return changed

    def _read(self) -> list[FingerprintEntry]:
        try:
            document = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        return [_entry(item) for item in document.get("fingerprints", [])]

    def _update(self, change: Any) -> None:
        with self._locked():
            entries = change(self._read())
            document = {"version": 1, "fingerprints": [asdict(entry) for entry in entries]}
            handle, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
            try:
                with os.fdopen(handle, "w") as out:
                    json.dump(document, out, indent=1)
                    out.write("\n")
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(temporary, self.path)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temporary)
                raise

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


class PostgresFingerprintStore:
    """A table shared by every replica (created on first use): `(role, fingerprint)` is the key."""

    def __init__(self, dsn: str, table: str = "public.pgveil_fingerprints") -> None:
        self.dsn = dsn
        self.table = ".".join(_quoted(part) for part in table.split("."))
        self._created = False

    async def load(self) -> list[FingerprintEntry]:
        rows = await self._run(lambda connection: connection.fetch(
            f"SELECT role, fingerprint, example, status, first_seen FROM {self.table} ORDER BY first_seen"))
        return [FingerprintEntry(row[0], row[1], row[2], row[3], row[4].isoformat()) for row in rows]

    async def record(self, entries: Sequence[FingerprintEntry]) -> None:
        if not entries:
            return
        rows = [(e.role, e.fingerprint, e.example, e.status, datetime.fromisoformat(e.first_seen))
                for e in entries]
        await self._run(lambda connection: connection.executemany(
            f"INSERT INTO {self.table} (role, fingerprint, example, status, first_seen) "
            "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (role, fingerprint) DO NOTHING", rows))

    async def set_status(self, fingerprint: str, status: Status, role: str | None = None) -> int:
        result = await self._run(lambda connection: connection.execute(
            f"UPDATE {self.table} SET status = $1 WHERE fingerprint = $2 AND ($3::text IS NULL OR role = $3) "
            "AND status <> $1", status, fingerprint, role))
        return int(str(result).split()[-1])

    async def _run(self, work: Any) -> Any:
        import asyncpg

        connection = await asyncpg.connect(self.dsn)
        try:
            if not self._created:
                await connection.execute(
                    f"CREATE TABLE IF NOT EXISTS {self.table} (role text NOT NULL, "
                    "fingerprint text NOT NULL, example text NOT NULL, status text NOT NULL CHECK "
                    "(status IN ('approved', 'pending', 'revoked')), first_seen timestamptz NOT NULL, "
                    "PRIMARY KEY (role, fingerprint))")
                self._created = True
            return await work(connection)
        finally:
            await connection.close()


class FingerprintAllowList:
    """The allow-lists of one proxy process: decide synchronously, persist with `flush()`."""

    def __init__(self, store: FingerprintStore) -> None:
        self.store = store
        self.entries: dict[tuple[str, str], FingerprintEntry] = {}
        self._new: list[FingerprintEntry] = []
        self._learned: list[FingerprintEntry] = []  # pending entries approved by learn mode

    async def refresh(self) -> None:
        """Reload from the store (approvals and revocations made elsewhere), keeping unsaved entries."""
        loaded = {(entry.role, entry.fingerprint): entry for entry in await self.store.load()}
        for entry in self._new:
            loaded.setdefault((entry.role, entry.fingerprint), entry)
        self.entries = loaded

    @property
    def unsaved(self) -> bool:
        return bool(self._new or self._learned)

    async def flush(self) -> None:
        """Write new entries (kept for the next flush if the store fails)."""
        new, learned = self._new, self._learned
        self._new, self._learned = [], []
        try:
            await self.store.record(new)
            for entry in learned:
                await self.store.set_status(entry.fingerprint, "approved", entry.role)
        except BaseException:
            self._new, self._learned = new + self._new, learned + self._learned
            raise

    def screen(self, role: Role, info: StatementInfo) -> Refuse | None:
        """Check (and in learn mode record) every statement of a message; refuse unknown ones in enforce."""
        if role.fingerprints == "off" or not info.fingerprint:
            return None
        fingerprints = info.fingerprint.split(",")
        examples = info.normalized_sql.split("; ") if len(fingerprints) > 1 else [info.normalized_sql]
        for index, fingerprint in enumerate(fingerprints):
            example = examples[index] if index < len(examples) else info.normalized_sql
            refusal = self._decide(role, fingerprint, example)
            if refusal is not None:
                return refusal
        return None

    def _decide(self, role: Role, fingerprint: str, example: str) -> Refuse | None:
        if not fingerprint:
            return None
        key = (role.name, fingerprint)
        entry = self.entries.get(key)
        if entry is not None and entry.status == "approved":
            return None
        if entry is not None and entry.status == "revoked":
            return Refuse(RULE, f"statement shape {fingerprint} was revoked for role {role.name} "
                                f"(`{_short(entry.example)}`); ask an operator to approve it again with "
                                f"`pgveil fingerprints approve {fingerprint}`")
        if role.fingerprints == "learn":
            learned = FingerprintEntry(role.name, fingerprint, example, "approved", _now())
            if entry is None:
                self._new.append(learned)
            else:
                learned = replace(entry, status="approved")
                self._learned.append(learned)
            self.entries[key] = learned
            return None
        if entry is None:
            pending = FingerprintEntry(role.name, fingerprint, example, "pending", _now())
            self.entries[key] = pending
            self._new.append(pending)
        return Refuse(RULE, f"statement shape {fingerprint} (`{_short(example)}`) is not on role "
                            f"{role.name}'s allow-list, which is enforced; if the application really sends "
                            f"it, approve it with `pgveil fingerprints approve {fingerprint}`")


def _added(current: list[FingerprintEntry], entries: Sequence[FingerprintEntry]) -> list[FingerprintEntry]:
    known = {(entry.role, entry.fingerprint) for entry in current}
    result = list(current)
    for entry in entries:
        if (entry.role, entry.fingerprint) not in known:
            known.add((entry.role, entry.fingerprint))
            result.append(entry)
    return result


def _entry(item: dict[str, Any]) -> FingerprintEntry:
    status = item.get("status")
    if status not in STATUSES:
        raise ValueError(f"fingerprint {item.get('fingerprint')!r}: unknown status {status!r}")
    return FingerprintEntry(str(item["role"]), str(item["fingerprint"]), str(item.get("example", "")), status,
                            str(item.get("first_seen", "")))


def _quoted(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _short(sql: str) -> str:
    text = " ".join(sql.split())
    return text if len(text) <= 80 else text[:77] + "..."


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class FingerprintKeeper:
    """The allow-list as a serving process uses it: loaded on first use, re-read every
    `refresh_seconds` (approvals made with the CLI or by other replicas), new entries written at once.

    A store that cannot be read fails closed for `enforce` roles (nothing is known, so nothing is
    allowed) and open for `learn` roles (they allow everything anyway); write failures are logged.
    """

    def __init__(self, store: FingerprintStore, refresh_seconds: float = 10.0) -> None:
        self.allow_list = FingerprintAllowList(store)
        self.refresh_seconds = refresh_seconds
        self._loaded_at: float | None = None

    @classmethod
    def for_policy(cls, policy_path: str | Path) -> FingerprintKeeper:
        """The PostgreSQL table named by PGVEIL_FINGERPRINTS_DSN (and PGVEIL_FINGERPRINTS_TABLE),
        else the JSON file beside the policy; re-read every PGVEIL_FINGERPRINTS_REFRESH_SECONDS (10)."""
        refresh = float(os.environ.get("PGVEIL_FINGERPRINTS_REFRESH_SECONDS", "10"))
        dsn = os.environ.get("PGVEIL_FINGERPRINTS_DSN")
        if dsn:
            table = os.environ.get("PGVEIL_FINGERPRINTS_TABLE", "public.pgveil_fingerprints")
            return cls(PostgresFingerprintStore(dsn, table), refresh)
        return cls(FileFingerprintStore(default_store_path(policy_path)), refresh)

    def reload_soon(self) -> None:
        """Re-read the list at the next screen (its store told of a change)."""
        if self._loaded_at is not None:
            self._loaded_at = -self.refresh_seconds - 1.0

    async def screen(self, role: Role, info: StatementInfo) -> Refuse | None:
        if role.fingerprints == "off":
            return None
        now = time.monotonic()
        if self._loaded_at is None or now - self._loaded_at > self.refresh_seconds:
            try:
                await self.allow_list.refresh()
                self._loaded_at = now
            except Exception as exc:  # an unreadable store must not take the proxy down
                log.warning("fingerprint store unreadable, keeping what is known: %s", exc)
                if self._loaded_at is None and role.fingerprints == "enforce":
                    return Refuse(RULE, "the fingerprint allow-list cannot be read, so no statement shape "
                                        "is known; fix the fingerprint store and retry")
        refusal = self.allow_list.screen(role, info)
        if self.allow_list.unsaved:
            try:
                await self.allow_list.flush()
            except Exception as exc:
                log.warning("fingerprint store not written, will retry: %s", exc)
        return refusal
