"""JSON-lines audit file: hash-chained, rotated by size, written at once, fsynced on a delay or strictly."""

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
from proxy.audit.sink import AuditError, MappingWrites, Unsealed, log

FsyncMode = Literal["always", "batch", "never"]
FSYNC_MODES: tuple[FsyncMode, ...] = ("always", "batch", "never")
"""The `audit.fsync` names of earlier versions, still accepted (see `fsync_interval_of`)."""

DEFAULT_FSYNC_INTERVAL = 1.0
"""Seconds within which a written record is fsynced by default (SQL Server Audit's QUEUE_DELAY)."""

TIDY_DELAY = 0.002
"""Seconds after a write until records queued behind are written and the head file is updated."""


def fsync_interval_of(mode: FsyncMode) -> float | None:
    """The fsync interval an `audit.fsync` name of earlier versions means: `always` and `batch`
    made every statement wait for the fsync of its record, which strict mode (0) keeps; `never`
    wrote records without fsyncing them (None)."""
    return None if mode == "never" else 0.0

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


def _hash_of(line: bytes) -> str:
    """The hash of a sealed line (`…,"hash":"<64 hex>"}\n`)."""
    return line[-67:-3].decode()


class JsonLinesFileSink(MappingWrites):
    """Appends sealed records to `path`; rotates to `path.N` before a write would pass `max_bytes`.

    Every record is written (one write(2), to the operating system) when it is appended, so a
    crash of pgveil, even SIGKILL, cannot lose it. `fsync_interval` (seconds) says when it is
    fsynced: > 0, within that long after it was written (records written meanwhile share the
    fsync); 0, strict: `append` returns a future that finishes when an fsync covering the record
    has, and every record written while one fsync runs shares the next (group commit); None,
    never (the operating system writes it back; a machine crash can lose the last records). After
    a failed fsync the sink refuses every later record until pgveil is restarted, since the kernel
    may have dropped unsynced data (PostgreSQL stops for the same reason).
    """

    def __init__(self, path: str | os.PathLike[str], fsync_interval: float | None = DEFAULT_FSYNC_INTERVAL,
                 max_bytes: int | None = 100 * 1024 * 1024, key: bytes | None = None, *,
                 fsync: FsyncMode | None = None) -> None:
        if fsync is not None:
            if fsync not in FSYNC_MODES:
                raise ValueError(f"fsync must be one of {', '.join(FSYNC_MODES)}, not {fsync!r}")
            fsync_interval = fsync_interval_of(fsync)
        if fsync_interval is not None and fsync_interval < 0:
            raise ValueError(f"fsync_interval must be 0 (strict) or more seconds, not {fsync_interval}")
        self.path = Path(path)
        self.fsync_interval = fsync_interval
        self.strict = fsync_interval == 0
        self.max_bytes = max_bytes
        self._fd: int | None = None
        self._size = 0
        self._broken: str | None = None
        self._rotatable = False
        self._head_fd: int | None = None
        self._head_failed = False
        self._behind: list[Unsealed] = []  # records queued behind, written with the next record
        self._tidy: asyncio.TimerHandle | None = None
        self._unsynced = False  # records were written since the last fsync began
        self._retired: list[int] = []  # rotated files (fds) not fsynced and closed yet
        self._directory_unsynced = False  # a rotation renamed and created files since the last fsync
        self._waiters: list[asyncio.Future[None]] = []  # strict: records written since the last fsync began
        self._sync_due: asyncio.Handle | None = None
        self._sync_soon = False  # _sync_due is a call_soon (strict: a writer waits), not a timer
        self._syncing: asyncio.Future[None] | None = None
        self.chain = HashChain(self._resume(key), key)
        self._open()  # fail at start-up, not at the first statement
        self._write_head(self.chain.state)  # the head exists from the start, also for an idle worker
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

    # ---- writing: on the event loop, one write(2) per append ---------------------------------

    def append(self, record: Unsealed) -> asyncio.Future[None] | None:
        if self._broken:
            raise AuditError(self._broken)
        if self._behind:
            records, self._behind = [*self._behind, record], []
            try:
                self._write(records)
            except AuditError:
                self._log_lost_behind()
                raise
        else:
            self._write((record,))
        if not self.strict:
            return None
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        if self._syncing is None and not self._sync_soon:  # starts once this turn's records are in
            if self._sync_due is not None:
                self._sync_due.cancel()
            self._sync_due = asyncio.get_running_loop().call_soon(self._start_sync)
            self._sync_soon = True
        return waiter

    def append_behind(self, record: Unsealed) -> None:
        self._behind.append(record)
        if self._tidy is None:
            self._tidy = asyncio.get_running_loop().call_later(TIDY_DELAY, self._tidy_up)

    def _write(self, records: list[Unsealed] | tuple[Unsealed, ...]) -> None:
        """Seal and write `records` with one write(2), or, when they would take the file past
        `max_bytes`, rotating between them; the chain advances over what reached the file, also
        when a later record fails."""
        chain = self.chain
        if len(records) == 1:
            data, state = chain.seal_body(records[0].body, chain.state)
            lines = [data]
        else:
            state = chain.state
            lines = []
            for record in records:
                line, state = chain.seal_body(record.body, state)
                lines.append(line)
            data = b"".join(lines)
        limit = self.max_bytes if self._rotatable else None
        try:
            if limit is not None and self._size + len(data) > limit:
                self._write_rotating(lines, limit)
            else:
                self._write_all(data)
        except OSError as exc:
            raise AuditError(self._write_failure(exc)) from exc
        chain.state = state
        self._unsynced = True
        self._schedule()

    # proxy/hitpath.py writes the common case (no rotation due) itself, as `_write` and `_write_all`
    # do, with these helpers: keep the two in step.

    def _write_failure(self, exc: OSError) -> str:
        return f"cannot write audit log {self.path}: {exc.strerror or exc}"

    @staticmethod
    def _log_lost_behind() -> None:
        log.error("audit records queued behind were lost with the record that failed")

    def _schedule(self) -> None:
        """After a write: the fsync within the interval, the tidy-up (head file, records behind)."""
        if self._sync_due is None and self._syncing is None and self.fsync_interval is not None:
            delay = self.fsync_interval or DEFAULT_FSYNC_INTERVAL  # strict: records nobody waits for
            self._sync_due = asyncio.get_running_loop().call_later(delay, self._start_sync)
        if self._tidy is None:
            self._tidy = asyncio.get_running_loop().call_later(TIDY_DELAY, self._tidy_up)

    def _write_rotating(self, lines: list[bytes], limit: int) -> None:
        """Write `lines`, rotating before one would take the file past `limit`; the chain advances
        over each part written, so a failure after a rotation keeps what reached the files."""
        state = self.chain.state
        pending: list[bytes] = []
        pending_size = 0
        states: list[ChainState] = []
        for line in lines:
            states.append(state := ChainState(state.seq + 1, _hash_of(line)))
            if self._size + pending_size > 0 and self._size + pending_size + len(line) > limit:
                if pending:
                    self._write_all(b"".join(pending))
                    self.chain.state = states[-2]
                    pending, pending_size = [], 0
                self._rotate()
            pending.append(line)
            pending_size += len(line)
        self._write_all(b"".join(pending))

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
        """All of `data` or nothing: a write that fails part way is cut off again (no torn record)."""
        fd = self._fd if self._fd is not None else self._open()
        before = self._size
        written = os.write(fd, data)  # raising, nothing was written
        if written < len(data):
            self._write_rest(fd, data, written, before)
        self._size = before + len(data)

    def _write_rest(self, fd: int, data: bytes, written: int, before: int) -> None:
        """The rest of `data` after a short write (a file size limit): it raises or goes on; when it
        raises, what was written of it is cut off again (the file was `before` bytes long)."""
        try:
            while written < len(data):
                written += os.write(fd, memoryview(data)[written:])
        except OSError:
            if written:
                try:
                    os.ftruncate(fd, before)
                except OSError as exc:
                    self._broken = (f"audit log {self.path} holds a torn record that cannot be cut off "
                                    f"({exc.strerror}); restart pgveil")
            raise

    def _rotate(self) -> None:
        """Close the full file and start a new one; the chain simply continues into it. The old
        file is fsynced (and closed) by the next fsync, with the directory."""
        if self._fd is not None:
            if self.fsync_interval is None:
                os.close(self._fd)
            else:
                self._retired.append(self._fd)
                self._directory_unsynced = True
            self._fd = None
        existing = rotated_files(self.path)
        next_index = int(existing[-1].name.rsplit(".", 1)[1]) + 1 if existing else 1
        os.rename(self.path, self.path.with_name(f"{self.path.name}.{next_index}"))
        self._open()

    # ---- later: records queued behind, the head file, fsyncs ---------------------------------

    def _tidy_up(self) -> None:
        """Write the records queued behind, and (unless strict) the head file."""
        self._tidy = None
        self._write_behind()
        if not self.strict:
            self._write_head(self.chain.state)

    def _write_behind(self) -> None:
        if not self._behind:
            return
        records, self._behind = self._behind, []
        if self._broken:
            log.error("audit records lost (%d): %s", len(records), self._broken)
            return
        try:
            self._write(records)
        except AuditError as exc:
            log.error("audit records lost (%d): %s", len(records), exc)

    def _write_head(self, state: ChainState) -> None:
        """The chain stands at `state`, written: the head file says so too (one pwrite in place).
        Strict: only states an fsync has covered, so a machine crash never leaves a head naming
        records the log lost; otherwise within TIDY_DELAY of a write."""
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

    def _start_sync(self) -> None:
        """Hand one fsync, covering every record written so far, to the writer thread."""
        self._sync_due, self._sync_soon = None, False
        if self._syncing is not None or self._broken:
            return
        if not (self._unsynced or self._retired or self._waiters):
            return
        fd, retired, directory = self._fd, self._retired, self._directory_unsynced
        waiters, covered = self._waiters, self.chain.state
        self._retired, self._directory_unsynced, self._waiters, self._unsynced = [], False, [], False
        syncing = self._syncing = self._writer.run(lambda: self._sync(fd, retired, directory))
        syncing.add_done_callback(lambda done: self._synced(done, waiters, covered))

    def _sync(self, fd: int | None, retired: list[int], directory: bool) -> None:
        """In the writer thread: fsync rotated files (then close them), the file, the directory."""
        try:
            for old in retired:
                os.fsync(old)
            if fd is not None:
                os.fsync(fd)
            if directory:
                handle = os.open(self.path.parent, os.O_RDONLY)
                try:
                    os.fsync(handle)
                finally:
                    os.close(handle)
        finally:
            for old in retired:
                with contextlib.suppress(OSError):
                    os.close(old)

    def _synced(self, done: asyncio.Future[None], waiters: list[asyncio.Future[None]],
                covered: ChainState) -> None:
        self._syncing = None
        error = done.exception() if not done.cancelled() else AuditError("the fsync was cancelled")
        if error is not None:
            reason = getattr(error, "strerror", None) or error
            self._broken = f"fsync of audit log {self.path} failed ({reason}); restart pgveil"
            log.error("%s: records up to seq %d may not be on disk; every statement is refused from now on",
                      self._broken, covered.seq)
            failure = AuditError(self._broken)
            for waiter in [*waiters, *self._waiters]:
                if not waiter.done():
                    waiter.set_exception(failure)
            self._waiters = []
            return
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
        if self.strict:
            self._write_head(covered)
        if self._waiters:  # written while this fsync ran: the next one starts at once
            self._start_sync()
        elif (self._unsynced or self._retired) and self._sync_due is None:
            delay = self.fsync_interval or DEFAULT_FSYNC_INTERVAL
            self._sync_due = asyncio.get_running_loop().call_later(delay, self._start_sync)

    async def flush(self) -> None:
        """Write what is queued behind and, unless fsync is never, fsync everything written."""
        if self._tidy is not None:
            self._tidy.cancel()
            self._tidy = None
        self._write_behind()
        if self.fsync_interval is not None and not self._broken:
            while self._syncing is not None:
                await asyncio.shield(self._syncing)
            if self._sync_due is not None:
                self._sync_due.cancel()
            self._start_sync()
            if self._syncing is not None:
                with contextlib.suppress(Exception):  # _synced logs it and breaks the sink
                    await asyncio.shield(self._syncing)
        if not self.strict:
            self._write_head(self.chain.state)

    async def close(self) -> None:
        await self.flush()
        self._writer.stop()
        for fd in [*self._retired, self._fd, self._head_fd]:
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._retired, self._fd, self._head_fd = [], None, None
