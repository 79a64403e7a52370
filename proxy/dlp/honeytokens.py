"""Honeytoken values as one compiled bytes search, and the book of logins locked out after one."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from proxy.guard.encodings import CODECS
from proxy.policy.model import Honeytoken


def _forms(value: str) -> list[bytes]:
    """The byte strings `value` travels as: its UTF-8 text (text results, COPY, error and notice
    texts, and the binary format of text types), and for a UUID its 16 binary bytes."""
    forms = [value.encode("utf-8")]
    with contextlib.suppress(ValueError):
        forms.append(uuid.UUID(value).bytes)
    if not value.isascii():  # PostgreSQL converts results to the session's client_encoding
        for codec in _CLIENT_CODECS:
            with contextlib.suppress(UnicodeError, LookupError):
                encoded = value.encode(codec)
                if encoded not in forms:
                    forms.append(encoded)
    return forms


_CLIENT_CODECS = (*dict.fromkeys(CODECS.values()), "shift_jis", "shift_jis_2004", "big5", "gbk", "cp949",
                  "gb18030", "johab")
"""Python's codecs of the client encodings PostgreSQL converts to (those pgveil reads, and the
client-only ones a role without masked data may use); EUC_TW and MULE_INTERNAL have none."""


@dataclass(frozen=True, slots=True)
class HoneytokenMatcher:
    """Every honeytoken value of a policy as one regular expression over bytes (one search per
    relayed chunk), and which honeytoken each matched byte string belongs to."""

    pattern: re.Pattern[bytes]
    tokens: dict[bytes, Honeytoken]

    @classmethod
    def of(cls, honeytokens: Iterable[Honeytoken]) -> HoneytokenMatcher | None:
        tokens: dict[bytes, Honeytoken] = {}
        for token in honeytokens:
            for form in _forms(token.value):
                tokens.setdefault(form, token)
        if not tokens:
            return None
        # longest first, so a value that contains another is reported as itself
        alternatives = sorted(tokens, key=len, reverse=True)
        return cls(re.compile(b"|".join(re.escape(form) for form in alternatives)), tokens)


def _file_name(login: str) -> str:
    return hashlib.sha256(login.encode("utf-8")).hexdigest()[:32] + ".json"


def default_lockout_dir(policy_path: str | Path) -> Path:
    """`policies/reviews.yaml` -> `policies/reviews.lockouts/` (beside the policy, as the
    fingerprint store is)."""
    return Path(policy_path).with_suffix(".lockouts")


@dataclass(frozen=True, slots=True)
class Lockout:
    login: str
    until: float  # Unix time
    token: str
    since: float


class Lockouts(Protocol):
    """Where lockouts are kept: a directory (LockoutBook) or the state store (StateLockouts)."""

    def lock(self, login: str, seconds: int, token: str) -> Lockout:
        """Lock `login` out for `seconds` (in force in this process at once); raises OSError or
        StateError when it could not be kept for the others."""

    def locked(self, login: str, now: float | None = None) -> Lockout | None:
        """The lockout of `login` in force, else None. Synchronous and cheap (asked at startup)."""


class LockoutBook:
    """Logins refused new connections after reading a `terminate` honeytoken: one small JSON file
    per login in a directory (every worker and every replica that shares the directory sees it;
    `pgveil honeytokens clear LOGIN` deletes it). A missing directory means nobody is locked out.
    A lockout that cannot be written (a read-only directory) holds in this process only."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self._memory: dict[str, Lockout] = {}

    def lock(self, login: str, seconds: int, token: str) -> Lockout:
        now = time.time()
        lockout = Lockout(login, now + seconds, token, now)
        body = json.dumps({"login": login, "until": lockout.until, "token": token, "since": now})
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=self.directory, prefix=".lock-")
            try:
                with os.fdopen(handle, "w") as out:
                    out.write(body)
                os.replace(temporary, self.directory / _file_name(login))
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temporary)
                raise
        except OSError:
            self._memory[login] = lockout  # not for the others, but at least here
            raise
        return lockout

    def locked(self, login: str, now: float | None = None) -> Lockout | None:
        """The lockout of `login` in force, else None (an expired one is removed)."""
        remembered = self._memory.get(login)
        if remembered is not None:
            if remembered.until > (time.time() if now is None else now):
                return remembered
            del self._memory[login]
        path = self.directory / _file_name(login)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):  # unreadable: fail closed, for the configured time from its change
            return Lockout(login, float("inf"), "?", 0.0)
        lockout = Lockout(str(data.get("login", login)), float(data.get("until", 0)),
                          str(data.get("token", "")), float(data.get("since", 0)))
        if lockout.until <= (time.time() if now is None else now):
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        return lockout

    def clear(self, login: str) -> bool:
        self._memory.pop(login, None)
        try:
            (self.directory / _file_name(login)).unlink()
        except FileNotFoundError:
            return False
        return True

    def entries(self) -> list[Lockout]:
        found: list[Lockout] = []
        if not self.directory.is_dir():
            return found
        now = time.time()
        for path in sorted(self.directory.glob("*.json")):
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if float(data.get("until", 0)) > now:
                found.append(Lockout(str(data.get("login")), float(data["until"]), str(data.get("token", "")),
                                     float(data.get("since", 0))))
        return found
