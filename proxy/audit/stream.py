"""Audit records as hash-chained JSON lines on standard output (for container log collectors)."""

from __future__ import annotations

import asyncio
import os
import select

from proxy.audit.chain import HashChain
from proxy.audit.sink import AuditError, GroupCommit, MappingWrites, Unsealed, log

_AT_ONCE = select.PIPE_BUF
"""Bytes a write to a pipe with room (poll says POLLOUT) takes without blocking."""


class StdoutSink(MappingWrites):
    """Writes sealed records to a file descriptor (1 by default) before their writers go on.

    A record is written at once, on the event loop, when nothing is queued before it, it fits in
    one atomic pipe write and the descriptor has room (poll); otherwise it joins a batch written
    in a thread: a collector that stops reading fills the pipe, and that must hold up the
    statements being audited, not the whole event loop."""

    def __init__(self, fd: int = 1, key: bytes | None = None) -> None:
        self.fd = fd
        self.chain = HashChain(key=key)
        self._committer: GroupCommit[Unsealed] = GroupCommit(self._commit)
        self._room = select.poll()
        self._room.register(fd, select.POLLOUT)

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]

    async def _commit(self, records: list[Unsealed]) -> None:
        state = self.chain.state
        lines = []
        for record in records:
            line, state = self.chain.seal_body(record.body, state)
            lines.append(line)
        try:
            await asyncio.to_thread(self._write_all, b"".join(lines))
        except OSError as exc:
            raise AuditError(f"cannot write audit records to fd {self.fd}: {exc.strerror}") from exc
        self.chain.state = state

    def _write_now(self, record: Unsealed) -> bool:
        """Write the record on the loop if that cannot block; False when it must be queued."""
        if not self._committer.idle:
            return False
        line, state = self.chain.seal_body(record.body, self.chain.state)
        if len(line) > _AT_ONCE or not self._room.poll(0):
            return False
        try:
            written = os.write(self.fd, line)
            if written != len(line):
                self._write_all(line[written:])
        except OSError as exc:
            raise AuditError(f"cannot write audit records to fd {self.fd}: {exc.strerror}") from exc
        self.chain.state = state
        return True

    def append(self, record: Unsealed) -> asyncio.Future[None] | None:
        if self._write_now(record):
            return None
        return self._committer.submit(record)

    def append_behind(self, record: Unsealed) -> None:
        try:
            if self._write_now(record):
                return
        except AuditError as exc:
            log.error("audit record lost: %s", exc)
            return
        self._committer.enqueue(record)

    async def flush(self) -> None:
        await self._committer.wait_idle()

    async def close(self) -> None:
        await self.flush()
