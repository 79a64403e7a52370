"""Audit records as hash-chained JSON lines on standard output (for container log collectors)."""

from __future__ import annotations

import asyncio
import os

from proxy.audit.chain import HashChain
from proxy.audit.sink import AuditError, GroupCommit, MappingWrites, Unsealed


class StdoutSink(MappingWrites):
    """Writes each batch of sealed records to a file descriptor (1 by default) before its writers
    go on. The write runs in a thread: a collector that stops reading fills the pipe, and that
    must hold up the statements being audited, not the whole event loop."""

    def __init__(self, fd: int = 1, key: bytes | None = None) -> None:
        self.fd = fd
        self.chain = HashChain(key=key)
        self._committer: GroupCommit[Unsealed] = GroupCommit(self._commit)

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

    def append(self, record: Unsealed) -> asyncio.Future[None]:
        return self._committer.submit(record)

    def append_behind(self, record: Unsealed) -> None:
        self._committer.enqueue(record)

    async def flush(self) -> None:
        await self._committer.wait_idle()

    async def close(self) -> None:
        await self.flush()
