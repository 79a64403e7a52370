"""Privileged elevation: signed, time-limited grants of a role, checked against the policy's `elevations:`."""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import json
import os
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from proxy.policy.model import Elevation, Policy

GRANT_KEY_ENV = "PGVEIL_GRANT_KEY"
"""Default environment variable holding the HMAC key shared by `pgveil elevate` and the proxy."""

_DURATION = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")


class GrantError(ValueError):
    """A grant that the policy does not allow, or a grants file that cannot be written."""


def parse_duration(text: str) -> int:
    """Seconds in a duration like `30m`, `2h`, `1h30m`, `90s` or `1d`."""
    match = _DURATION.match(text.strip())
    if match is None or not any(match.groups()):
        raise GrantError(f"expected a duration like 30m, 2h, 1h30m or 1d, got {text!r}")
    days, hours, minutes, seconds = (int(part or 0) for part in match.groups())
    total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    if total <= 0:
        raise GrantError("the duration must be longer than zero")
    return total


def iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")


@dataclass(frozen=True, slots=True)
class Grant:
    """`user` may act as `role` from `granted_at` until `expires_at` (Unix seconds)."""

    id: str
    user: str
    role: str
    reason: str
    approver: str | None
    granted_at: float
    expires_at: float

    def signature(self, key: bytes) -> str:
        body = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hmac.new(key, body.encode(), hashlib.sha256).hexdigest()

    def line(self, key: bytes) -> str:
        return json.dumps({**asdict(self), "signature": self.signature(key)}, ensure_ascii=False)

    def audit_fields(self) -> dict[str, Any]:
        return {"grant_id": self.id, "login": self.user, "elevated_role": self.role, "reason": self.reason,
                "approver": self.approver, "granted_at": iso(self.granted_at),
                "expires_at": iso(self.expires_at)}


def _elevation_for(policy: Policy, user: str, role: str) -> Elevation | None:
    for elevation in policy.elevations:
        if elevation.role == role and any(fnmatch.fnmatchcase(user, u) for u in elevation.users):
            return elevation
    return None


def grant_problem(policy: Policy, grant: Grant) -> str | None:
    """Why the policy does not allow this grant, or None when it does."""
    if grant.role not in policy.roles:
        return f"the policy has no role named '{grant.role}'"
    elevation = _elevation_for(policy, grant.user, grant.role)
    if elevation is None:
        return f"no entry under elevations: lets '{grant.user}' assume role '{grant.role}'"
    duration = grant.expires_at - grant.granted_at
    if duration > elevation.max_duration_seconds:
        return (f"{int(duration)}s is longer than the {elevation.max_duration_seconds}s the policy allows "
                f"for role '{grant.role}'")
    if elevation.approver_required:
        if not grant.approver:
            return f"elevation to '{grant.role}' needs an approver (--approver NAME)"
        if grant.approver == grant.user:
            return "a user cannot approve their own elevation"
        approved = any(fnmatch.fnmatchcase(grant.approver, a) for a in elevation.approvers)
        if elevation.approvers and not approved:
            return (f"'{grant.approver}' may not approve elevation to '{grant.role}' "
                    f"(approvers: {', '.join(elevation.approvers)})")
    if not grant.reason.strip():
        return "a reason is required"
    return None


def create_grant(policy: Policy, user: str, role: str, seconds: int, reason: str,
                 approver: str | None, now: float | None = None) -> Grant:
    """A new grant, or GrantError saying why the policy does not allow it."""
    granted_at = time.time() if now is None else now
    grant = Grant(id=secrets.token_hex(8), user=user, role=role, reason=reason, approver=approver,
                  granted_at=granted_at, expires_at=granted_at + seconds)
    problem = grant_problem(policy, grant)
    if problem:
        raise GrantError(problem)
    return grant


def append_grant(path: str | os.PathLike[str], grant: Grant, key: bytes) -> None:
    """Append the signed grant as one line, durably, where the proxy watches for it."""
    data = (grant.line(key) + "\n").encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise GrantError(f"cannot write grants file {path}: {exc.strerror}") from exc


class GrantBook:
    """The grants file as the proxy sees it: re-read when it changes (one stat per lookup).

    Every grant is re-checked against the policy in force at each use, so a reload that removes
    an elevation ends its grants. Grant creation (as seen by the proxy), first use, expiry and
    rejection, and revocation (its line removed from the file) become audit events, collected
    until the audit layer takes them.
    """

    def __init__(self, path: str | os.PathLike[str], policy: Callable[[], Policy | None],
                 key: bytes | None, on_event: Callable[[str], None] | None = None) -> None:
        self.path = Path(path)
        self.policy = policy
        self.key = key
        self.on_event = on_event
        self._stamp: tuple[int, int, int] | None = None
        self._grants: dict[str, Grant] = {}
        self._used: set[str] = set()
        self._ended: set[str] = set()
        self._events: list[dict[str, Any]] = []

    def _event(self, event: str, grant: Grant | None, **extra: Any) -> None:
        fields = grant.audit_fields() if grant else {}
        self._events.append({"type": "elevation", "event": event, **fields, **extra})
        if self.on_event:
            self.on_event(event)

    def _refresh(self) -> None:
        try:
            info = self.path.stat()
        except FileNotFoundError:
            return
        stamp = (info.st_mtime_ns, info.st_size, info.st_ino)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        text = self.path.read_text(encoding="utf-8", errors="replace")
        listed: set[str] = set()
        for number, line in enumerate(text.splitlines(keepends=True), start=1):
            if line.endswith("\n") and line.strip():  # a line still being written is read next time
                listed.add(self._read_line(line, f"{self.path}:{number}"))
        for grant in [g for g in self._grants.values() if g.id not in listed]:
            del self._grants[grant.id]  # its line was removed from the file: revoked
            self._ended.add(grant.id)
            self._event("revoked", grant)

    def _read_line(self, line: str, where: str) -> str:
        """Take in one line of the grants file; returns the grant id it names ("" if none)."""
        try:
            raw = json.loads(line)
            signature = raw.pop("signature")
            grant = Grant(**raw)
        except (ValueError, TypeError, KeyError, AttributeError):
            if where not in self._ended:
                self._ended.add(where)
                self._event("rejected", None, problem=f"{where}: not a grant")
            return ""
        if grant.id in self._grants or grant.id in self._ended:
            return grant.id
        problem = None
        if self.key is None:
            problem = "no grant key configured in the proxy (set the grant key environment variable)"
        elif not isinstance(signature, str) or not hmac.compare_digest(grant.signature(self.key), signature):
            problem = "bad signature: the grant was not made with the proxy's grant key"
        if problem:
            self._ended.add(grant.id)
            self._event("rejected", grant, problem=f"{where}: {problem}")
            return grant.id
        self._grants[grant.id] = grant
        self._event("granted", grant)
        return grant.id

    def active_role(self, login: str, now: float) -> str | None:
        """The role `login` is elevated to at `now`, or None (the base role applies)."""
        self._refresh()
        policy = self.policy()
        chosen: Grant | None = None
        for grant in list(self._grants.values()):
            if now >= grant.expires_at:
                del self._grants[grant.id]
                self._ended.add(grant.id)
                self._event("expired", grant)
                continue
            if grant.user != login or now < grant.granted_at:
                continue
            problem = "no policy loaded" if policy is None else grant_problem(policy, grant)
            if problem:
                del self._grants[grant.id]
                self._ended.add(grant.id)
                self._event("rejected", grant, problem=f"the current policy: {problem}")
                continue
            if chosen is None or grant.expires_at > chosen.expires_at:
                chosen = grant
        if chosen is None:
            return None
        if chosen.id not in self._used:
            self._used.add(chosen.id)
            self._event("used", chosen)
        return chosen.role

    def take_events(self) -> list[dict[str, Any]]:
        events, self._events = self._events, []
        return events

    def return_events(self, events: list[dict[str, Any]]) -> None:
        """Put back events the audit could not write, ahead of newer ones."""
        self._events[:0] = events
