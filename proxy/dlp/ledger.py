"""Rows each login received in the rolling last hour, per process in memory or shared."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

WINDOW_SECONDS = 3600
BUCKET_SECONDS = 60  # the rolling hour is 60 one-minute buckets: a row leaves it 59-60 minutes later


class RowLedger(Protocol):
    """What the row budgets ask: rows a login received in the last hour, and rows it just received."""

    def used(self, login: str) -> int:
        """Rows `login` received in the rolling last hour (as far as this replica knows now)."""

    def add(self, login: str, rows: int) -> None:
        """`login` received `rows` more rows now."""

    def reserve(self, login: str, rows: int, limit: int) -> int:
        """Set aside up to `rows` rows of what `limit` leaves `login` after the rows it received and
        those set aside already (for results still being read); returns how many were."""

    def release(self, login: str, rows: int) -> None:
        """Give back `rows` rows set aside (received since, or not needed)."""

    def free(self, login: str, limit: int) -> int:
        """What `limit` leaves `login` after the rows received and those set aside."""


class Reservations:
    """Rows set aside per login for results being read, in this process: concurrent statements of
    one login share the hour's allowance instead of each starting with all of it."""

    def __init__(self) -> None:
        self.reserved: dict[str, int] = {}

    def reserve_from(self, used: int, login: str, rows: int, limit: int) -> int:
        reserved = self.reserved.get(login, 0)
        granted = max(0, min(rows, limit - used - reserved))
        if granted:
            self.reserved[login] = reserved + granted
        return granted

    def free(self, used: int, login: str, limit: int) -> int:
        return max(0, limit - used - self.reserved.get(login, 0))

    def release(self, login: str, rows: int) -> None:
        left = self.reserved.get(login, 0) - rows
        if left > 0:
            self.reserved[login] = left
        else:
            self.reserved.pop(login, None)


class MemoryLedger:
    """The rolling hour of each login in this process (per replica; per worker with --workers)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        # login -> (one-minute buckets [minute, rows], total of those buckets)
        self._logins: dict[str, tuple[deque[list[int]], list[int]]] = {}
        self._reservations = Reservations()

    def _entry(self, login: str) -> tuple[deque[list[int]], list[int]]:
        entry = self._logins.get(login)
        if entry is None:
            entry = self._logins[login] = (deque(), [0])
        buckets, total = entry
        oldest = int(self._clock()) // BUCKET_SECONDS - WINDOW_SECONDS // BUCKET_SECONDS + 1
        while buckets and buckets[0][0] < oldest:
            total[0] -= buckets.popleft()[1]
        return entry

    def used(self, login: str) -> int:
        if login not in self._logins:
            return 0
        return self._entry(login)[1][0]

    def add(self, login: str, rows: int) -> None:
        if rows <= 0:
            return
        buckets, total = self._entry(login)
        minute = int(self._clock()) // BUCKET_SECONDS
        if buckets and buckets[-1][0] == minute:
            buckets[-1][1] += rows
        else:
            buckets.append([minute, rows])
        total[0] += rows

    def reserve(self, login: str, rows: int, limit: int) -> int:
        return self._reservations.reserve_from(self.used(login), login, rows, limit)

    def release(self, login: str, rows: int) -> None:
        self._reservations.release(login, rows)

    def free(self, login: str, limit: int) -> int:
        return self._reservations.free(self.used(login), login, limit)
