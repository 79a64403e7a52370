"""Logins in progress per client address: a few hold a PostgreSQL connection, the rest wait in line."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque


class LoginLine:
    """Per client address, at most `per_address` logins past their startup packet and not yet
    authenticated may hold a PostgreSQL connection (authentication is passed through, so each one
    does); up to `queue_per_address` more wait in line, first come first served, holding nothing
    but their socket; past that a login is turned away.

    Addresses never wait for each other: each has its own places and its own line, so a flood of
    stalled logins from one address holds at most `per_address` PostgreSQL connections and delays
    only that address's own logins."""

    def __init__(self, per_address: int, queue_per_address: int) -> None:
        self.per_address = per_address
        self.queue_per_address = queue_per_address
        self.logging_in: dict[str, int] = {}
        """Logins holding a place (and a PostgreSQL connection), by client address."""
        self.waiting: dict[str, deque[asyncio.Future[None]]] = {}
        """Logins in line for a place, by client address, oldest first."""

    def pending(self, host: str) -> int:
        """Logins from `host` in progress: holding a place or waiting for one."""
        return self.logging_in.get(host, 0) + len(self.waiting.get(host, ()))

    def enter(self, host: str) -> asyncio.Future[None] | None:
        """A login from `host` got past its startup packet: a future that is done once it holds a
        place (at once when one is free), or None when the line is full too (refuse it)."""
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        holding = self.logging_in.get(host, 0)
        if holding < self.per_address:
            self.logging_in[host] = holding + 1
            turn.set_result(None)
            return turn
        line = self.waiting.get(host)
        if line is None:
            line = self.waiting[host] = deque()
        if len(line) >= self.queue_per_address:
            if not line:
                del self.waiting[host]
            return None
        line.append(turn)
        return turn

    def leave(self, host: str) -> None:
        """A login that held a place is over (authenticated, refused or gone): its place goes to
        the next login in line, or is freed."""
        line = self.waiting.get(host)
        while line:
            turn = line.popleft()
            if not turn.done():
                turn.set_result(None)  # the place passes on: logging_in stays as it is
                if not line:
                    del self.waiting[host]
                return
        self.waiting.pop(host, None)
        remaining = self.logging_in[host] - 1
        if remaining:
            self.logging_in[host] = remaining
        else:
            del self.logging_in[host]

    def give_up(self, host: str, turn: asyncio.Future[None]) -> None:
        """A login stops waiting (its client left, the startup timeout passed, pgveil drains):
        out of the line, or, when a place had just been handed to it, that place passes on."""
        if turn.done() and not turn.cancelled():
            self.leave(host)
            return
        turn.cancel()
        line = self.waiting.get(host)
        if line is not None:
            with contextlib.suppress(ValueError):
                line.remove(turn)
            if not line:
                del self.waiting[host]
