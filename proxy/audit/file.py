"""JSON-lines audit file: hash-chained, rotated by size, fsync always | batch | never."""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import re
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from proxy.audit.chain import HEAD_SIZE, ChainState, HashChain, head_record, read_head, state_after
from proxy.audit.sink import AuditError, AuditRecord, GroupCommit, log

FsyncMode = Literal["always", "batch", "never"]
FSYNC_MODES: tuple[FsyncMode, ...] = ("always", "batch", "never")

_TAIL_BYTES = 1 << 20
HEAD_SUFFIX = "-head"


def head_path(path: Path) -> Path:
    """The head file of an audit log (`audit.jsonl-head`): seq and hash of its last record, so
    records cut off the end (or a whole file removed) show against something outside the log.
    Named so that neither `*.jsonl` nor `audit.jsonl.*` (the rotated files) matches it."""
    return path.with_name(f"{path.name}{HEAD_SUFFIX}")


def read_head_file(path: Path, key: bytes | None) -> ChainState | None:
    """The state in the head file of the log at `path`; None when there is none; ValueError when
    it is unreadable or does not match its mac. A read torn by a concurrent rewrite is retried."""
    error = ValueError("unreadable")
    for _ in range(3):
        try:
            data = head_path(path).read_bytes()[:HEAD_SIZE]
        except FileNotFoundError:
            return None
        try:
            return read_head(data, key)
        except ValueError as exc:
            error = exc
    raise error


def rotated_files(path: Path) -> list[Path]:
    """Rotated siblings of an audit file (`audit.jsonl.1`, `.2`, ...), oldest first."""
    pattern = re.compile(re.escape(path.name) + r"\.(\d+)$")
    found: list[tuple[int, Path]] = []
    if path.parent.is_dir():
        for sibling in path.parent.iterdir():
            match = pattern.match(sibling.name)
            if match:
                found.append((int(match.group(1)), sibling))
    return [p for _, p in sorted(found)]


class _WriterThread:
    """One long-lived thread that runs the sink's blocking writes and fsyncs, one at a time.

    A hand-off to it costs a queue put and one call_soon_threadsafe back; asyncio.to_thread costs
    about twice that in CPU (executor futures, context copy, a wrapper future), and a commit
    happens for nearly every audited statement."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._jobs: queue.SimpleQueue[tuple[asyncio.AbstractEventLoop, asyncio.Future[None],
                                            Callable[[], None]] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def run(self, job: Callable[[], None]) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name=self._name, daemon=True)
            self._thread.start()
        self._jobs.put((loop, future, job))
        return future

    def stop(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            self._thread = None

    def _work(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                return
            loop, future, job = item
            error: BaseException | None = None
            try:
                job()
            except BaseException as exc:  # handed to the waiting coroutine, raised there
                error = exc
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                loop.call_soon_threadsafe(_settle, future, error)


def _settle(future: asyncio.Future[Any], error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def _last_sealed_line(path: Path) -> tuple[ChainState | None, bool]:
    """Chain state after the last sealed record of a regular file, and whether it ends mid-line."""
    if not path.is_file() or path.stat().st_size == 0:
        return None, False
    with path.open("rb") as handle:
        size = handle.seek(0, os.SEEK_END)
        handle.seek(max(0, size - _TAIL_BYTES))
        tail = handle.read()
    ends_mid_line = not tail.endswith(b"\n")
    for raw in reversed(tail.split(b"\n")):
        if raw.strip():
            state = state_after(raw.decode(errors="replace"))
            if state is not None:
                return state, ends_mid_line
    return None, ends_mid_line


class JsonLinesFileSink:
    """Appends sealed records to `path`; rotates to `path.N` before a write would pass `max_bytes`.

    `fsync`: `always` syncs every record on its own; `batch` lets concurrent writers share one
    write and one fsync (group commit); `never` leaves durability to the OS (a crash of the
    machine can lose the last records, a crash of pgveil cannot). After a failed fsync the sink
    refuses every later write, since the kernel may have dropped the unsynced data.
    """

    def __init__(self, path: str | os.PathLike[str], fsync: FsyncMode = "batch",
                 max_bytes: int | None = 100 * 1024 * 1024, key: bytes | None = None) -> None:
        if fsync not in FSYNC_MODES:
            raise ValueError(f"fsync must be one of {', '.join(FSYNC_MODES)}, not {fsync!r}")
        self.path = Path(path)
        self.fsync = fsync
        self.max_bytes = max_bytes
        self._fd: int | None = None
        self._size = 0
        self._broken: str | None = None
        self._appended = 0
        self._rotatable = False
        self._head_fd: int | None = None
        self._head_failed = False
        self.chain = HashChain(self._resume(key), key)
        self._open()  # fail at start-up, not at the first statement
        self._advance(self.chain.state)  # the head exists from the start, also for an idle worker
        self._committer = GroupCommit(self._commit, max_batch=1 if fsync == "always" else 1024)
        self._writer = _WriterThread(f"pgveil-audit {self.path.name}")

    def _resume(self, key: bytes | None) -> ChainState:
        """Continue the chain of what is already on disk (this file, else its newest rotation).

        When the head file names a later record (or another record at the same seq), records were
        cut off the end: the chain goes on from the head, so the gap stays visible to `verify`
        instead of being sealed over."""
        state, ends_mid_line = _last_sealed_line(self.path)
        if ends_mid_line:  # a torn last line stays as evidence; the next record starts a new line
            try:
                self._write_all(b"\n")
            except OSError as exc:
                raise AuditError(f"cannot write audit log {self.path}: {exc.strerror}") from exc
        if state is None:
            for older in reversed(rotated_files(self.path)):
                state, _ = _last_sealed_line(older)
                if state is not None:
                    break
        state = state or ChainState()
        try:
            head = read_head_file(self.path, key)
        except (OSError, ValueError) as exc:
            log.warning("audit head %s ignored: %s", head_path(self.path), exc)
            return state
        if head is not None and (head.seq > state.seq or
                                 (head.seq == state.seq and head.last_hash != state.last_hash)):
            log.warning("audit log %s ends at seq %d but its head records seq %d: records were cut "
                        "off; the chain goes on from the head", self.path, state.seq, head.seq)
            return head
        return state

    def _open(self) -> int:
        if self._fd is None:
            try:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
                info = os.fstat(self._fd)
            except OSError as exc:
                raise AuditError(f"cannot open audit log {self.path}: {exc.strerror}") from exc
            self._size = info.st_size
            self._rotatable = stat.S_ISREG(info.st_mode)  # not /dev/stdout, a pipe or /dev/full
        return self._fd

    def _write_all(self, data: bytes) -> None:
        fd = self._open()
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        self._size += len(data)

    def _rotate(self) -> None:
        """Close the full file and start a new one; the chain simply continues into it."""
        if self._fd is not None:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
        existing = rotated_files(self.path)
        next_index = int(existing[-1].name.rsplit(".", 1)[1]) + 1 if existing else 1
        os.rename(self.path, self.path.with_name(f"{self.path.name}.{next_index}"))
        self._open()
        if self.fsync != "never":
            directory = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)

    def _write_segment(self, data: bytes) -> None:
        fd = self._open()
        before = self._size
        try:
            self._write_all(data)
        except OSError:
            self._size = before
            with contextlib.suppress(OSError):  # do not leave a torn record behind
                os.ftruncate(fd, before)
            raise
        if self.fsync != "never":
            try:
                os.fsync(fd)
            except OSError as exc:
                self._broken = f"fsync of {self.path} failed ({exc.strerror}); restart pgveil"
                raise

    def _append(self, lines: list[bytes]) -> None:
        """Write lines, rotating between them; runs in the writer thread unless fsync is `never`.

        `self._appended` counts the lines that reached the file, also when a later one fails.
        """
        self._appended = 0
        self._open()
        limit = self.max_bytes if self._rotatable else None
        segment: list[bytes] = []
        pending = 0
        for line in lines:
            if limit is not None and self._size + pending > 0 and self._size + pending + len(line) > limit:
                if segment:
                    self._write_segment(b"".join(segment))
                    self._appended += len(segment)
                    segment, pending = [], 0
                self._rotate()
            segment.append(line)
            pending += len(line)
        self._write_segment(b"".join(segment))
        self._appended += len(segment)

    def _seal(self, records: list[AuditRecord]) -> tuple[list[bytes], list[ChainState]]:
        if self._broken:
            raise AuditError(self._broken)
        state = self.chain.state
        lines, states = [], []
        for record in records:
            line, state = self.chain.seal(record, state)
            lines.append((line + "\n").encode())
            states.append(state)
        return lines, states

    def _advance(self, state: ChainState) -> None:
        """The chain stands at `state`, written: the head file says so too (one pwrite in place)."""
        self.chain.state = state
        if not self._rotatable or self._head_failed:
            return
        try:
            if self._head_fd is None:
                self._head_fd = os.open(head_path(self.path), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            os.pwrite(self._head_fd, head_record(state, self.chain), 0)
        except OSError as exc:
            self._head_failed = True
            log.error("audit head %s cannot be written (%s): records cut off the end of the log "
                      "will not be detected", head_path(self.path), exc.strerror)

    def _failed(self, states: list[ChainState], exc: OSError) -> AuditError:
        if self._appended:  # those lines are in the file: the chain goes on from the last of them
            self._advance(states[self._appended - 1])
        return AuditError(f"cannot write audit log {self.path}: {exc.strerror or exc}")

    async def _commit(self, records: list[AuditRecord]) -> None:
        lines, states = self._seal(records)
        try:
            if self._fits(lines):
                await self._append_then_sync(lines)
            else:
                await self._writer.run(lambda: self._append(lines))
        except OSError as exc:
            raise self._failed(states, exc) from exc
        self._advance(states[-1])

    def _fits(self, lines: list[bytes]) -> bool:
        """The lines go into the current file without a rotation."""
        limit = self.max_bytes if self._rotatable else None
        return self._fd is not None and (limit is None or self._size + sum(map(len, lines)) <= limit)

    async def _append_then_sync(self, lines: list[bytes]) -> None:
        """The usual commit: one write(2) to the page cache on the event loop (as with `never`), and
        only the fsync in the writer thread, so the thread takes the GIL back once per commit."""
        self._appended = 0
        fd = self._open()
        data = b"".join(lines)
        before = self._size
        try:
            self._write_all(data)
        except OSError:
            self._size = before
            with contextlib.suppress(OSError):  # do not leave a torn record behind
                os.ftruncate(fd, before)
            raise
        await self._writer.run(lambda: self._sync(fd))
        self._appended = len(lines)

    def _sync(self, fd: int) -> None:
        try:
            os.fsync(fd)
        except OSError as exc:
            self._broken = f"fsync of {self.path} failed ({exc.strerror}); restart pgveil"
            raise

    def _write_now(self, record: AuditRecord) -> None:
        """`never`: one write(2) on the event loop; a page-cache write is cheaper than a hand-off."""
        lines, states = self._seal([record])
        try:
            self._append(lines)
        except OSError as exc:
            raise self._failed(states, exc) from exc
        self._advance(states[-1])

    async def write(self, record: AuditRecord) -> None:
        if self.fsync == "never":
            self._write_now(record)
        else:
            await self._committer.submit(record)

    def write_behind(self, record: AuditRecord) -> None:
        if self.fsync != "never":
            self._committer.enqueue(record)
            return
        try:
            self._write_now(record)
        except AuditError as exc:
            log.error("audit record lost: %s", exc)

    async def flush(self) -> None:
        await self._committer.wait_idle()

    async def close(self) -> None:
        await self.flush()
        self._writer.stop()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._head_fd is not None:
            os.close(self._head_fd)
            self._head_fd = None
