"""Start pgveil in front of the test PostgreSQL (the `upstream` fixture) for end-to-end tests.

The proxy runs in-process on its own event loop in a background thread, so it works the same
from sync tests (psycopg, psql, pgbench) and from async tests (asyncpg on the test's loop):

    import psycopg
    from tests.proxy_harness import running_proxy

    def test_masked_email(upstream):
        with running_proxy(upstream, policy_path="policies/reviews.yaml") as proxy:
            with psycopg.connect(proxy.dsn("alice", "secret")) as conn:
                ...

    # relay only (no policy), any Settings field as a keyword:
    with running_proxy(upstream, startup_timeout=0.5, max_message_size=4096) as proxy: ...

    # your own ConnectionPolicy: a factory taking the ClientInfo (or taking nothing)
    with running_proxy(upstream, policy_factory=lambda client: MyPolicy(client)) as proxy: ...

    # share one proxy across a module
    @pytest.fixture(scope="module")
    def proxy(upstream):
        with running_proxy(upstream) as running:
            yield running

`RunningProxy` gives `host`, `port`, `dsn(user=None, password=None, dbname="postgres")`
(user None = the upstream superuser, as `upstream.dsn()`), `counters` (a RelayCounters
observer: connections opened/closed, bytes, upstream errors), `server` (the ProxyServer),
`run(coro)` (run a coroutine on the proxy's loop and return its result) and `drain()`.

With `policy_path`, the per-connection policy is built exactly as `pgveil serve --policy`
builds it (proxy.commands.serve.policy_runtime), so what the test sees is what users get.

Audit logs: a proxy started with `audit_log=PATH` (or `pgveil serve --audit-log PATH` that the test
stopped itself, exit code 0) has its log checked when it stops (tests/audit_consistency.py: every
access record has one completion, request numbers rise per connection); a test that breaks the
log on purpose says `audit_check=False`.

For the real command line, `spawn_serve(*args)` starts `pgveil serve ...` as a subprocess,
waits for its `listening on HOST:PORT` line and returns a ServeProcess (`port`, `dsn()`,
`stderr_lines`, `terminate()`, `wait()`); use it as a context manager so it is always stopped.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from proxy.config import Settings
from proxy.connection_policy import ConnectionPolicy
from proxy.server import ProxyServer
from proxy.session import RelayCounters, RelayObserver
from tests.audit_consistency import audit_problems

T = TypeVar("T")

AUDIT_LOGS_CHECKED: list[str] = []
"""Every audit log checked when the proxy that wrote it stopped (the session summary counts them)."""


def check_audit_log(path: str | None) -> None:
    """Fail when the audit log at `path` (a regular file, with its rotations and per-worker logs)
    has access and completion records out of step."""
    if not path or path == "-":
        return
    log = Path(path)
    if not log.is_file() and not list(log.parent.glob(f"{log.stem}-w*{log.suffix}")):
        return
    problems = audit_problems(log, wait=True, timeout=5)
    AUDIT_LOGS_CHECKED.append(path)
    assert not problems, f"audit log {path} out of step:\n" + "\n".join(problems[:20])


@dataclass
class RunningProxy:
    host: str
    port: int
    server: ProxyServer
    counters: RelayCounters
    loop: asyncio.AbstractEventLoop
    default_user: str
    default_password: str | None
    hooks: Any = None

    def dsn(self, user: str | None = None, password: str | None = None, dbname: str = "postgres") -> str:
        if user is None:
            user, password = self.default_user, self.default_password
        auth = user if password is None else f"{user}:{password}"
        return f"postgresql://{auth}@{self.host}:{self.port}/{dbname}"

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        """Run a coroutine on the proxy's event loop (from a sync test) and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def drain(self, timeout: float = 10) -> None:
        self.run(self.server.drain(timeout), timeout + 5)

    def open_sessions(self) -> int:
        return len(self.server.sessions)


class _LoopThread:
    """An event loop (uvloop when available) running in a daemon thread."""

    def __init__(self) -> None:
        try:
            import uvloop

            self.loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        except ImportError:
            self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="pgveil-test-proxy", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class _BothObservers:
    """Tells the test's observer and pgveil's own (its metrics) alike."""

    def __init__(self, first: RelayObserver, second: RelayObserver) -> None:
        self.first, self.second = first, second
        self.traffic = second.traffic  # bytes are counted once, in pgveil's own metrics

    def connection_opened(self, connection_id: int) -> None:
        self.first.connection_opened(connection_id)
        self.second.connection_opened(connection_id)

    def connection_closed(self, connection_id: int, reason: str) -> None:
        self.first.connection_closed(connection_id, reason)
        self.second.connection_closed(connection_id, reason)

    def upstream_error(self, kind: str) -> None:
        self.first.upstream_error(kind)
        self.second.upstream_error(kind)


@contextmanager
def running_proxy(
    upstream: Any,
    policy_path: str | None = None,
    *,
    policy_factory: Callable[..., ConnectionPolicy] | None = None,
    observer: RelayObserver | None = None,
    audit_check: bool = True,
    **settings: Any,
) -> Iterator[RunningProxy]:
    """pgveil on 127.0.0.1:<free port> in front of `upstream`; stopped (sessions closed) on exit,
    then its audit log (`audit_log=PATH`) checked unless `audit_check` is False."""
    base = Settings(upstream=upstream.dsn(), listen="127.0.0.1:0", policy=policy_path)
    config = replace(base, **settings).validate()
    counters = RelayCounters()
    thread = _LoopThread()

    async def start() -> tuple[ProxyServer, Any]:
        factory = policy_factory
        reload = None
        hooks = None
        if policy_path is not None and factory is None:
            from proxy.commands.serve import policy_runtime

            hooks = await policy_runtime(config, 0)
            factory, reload = hooks.policy_factory, hooks.reload
        watching: RelayObserver = observer or counters
        if hooks is not None and hooks.observer is not None:  # the metrics, as under `pgveil serve`
            watching = _BothObservers(watching, hooks.observer)
        server = ProxyServer(config, factory, watching, reload=reload)
        await server.start()
        if hooks is not None and hooks.on_started is not None:
            await hooks.on_started(server)
        return server, hooks

    try:
        server, hooks = thread.run(start())
        host, port = server.address
        yield RunningProxy(host, port, server, counters, thread.loop, upstream.superuser,
                           upstream.superpassword, hooks)
    finally:
        try:
            if "server" in locals():
                thread.run(server.close())
                if hooks is not None and hooks.on_stopped is not None:
                    thread.run(hooks.on_stopped())
        finally:
            thread.stop()
    if audit_check:  # reached only when the test itself passed
        check_audit_log(config.audit_log)


# ---- the real command line ----------------------------------------------------------------------

_LISTENING = re.compile(r"listening on (\S+):(\d+)")


@dataclass
class ServeProcess:
    process: subprocess.Popen[str]
    host: str = ""
    port: int = 0
    stderr_lines: list[str] = field(default_factory=list)
    _reader: threading.Thread | None = None
    audit_log: str | None = None  # checked on exit when the test stopped pgveil and it exited 0

    def dsn(self, user: str = "postgres", password: str | None = None, dbname: str = "postgres") -> str:
        auth = user if password is None else f"{user}:{password}"
        return f"postgresql://{auth}@{self.host}:{self.port}/{dbname}"

    def terminate(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()

    def wait(self, timeout: float = 30) -> int:
        code = self.process.wait(timeout)
        if self._reader is not None:
            self._reader.join(5)
        return code

    def wait_for_line(self, pattern: str, timeout: float = 30) -> str:
        """Wait (polling, with a deadline) until a stderr line matches `pattern`."""
        compiled = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            lines = list(self.stderr_lines)
            for line in lines[seen:]:
                if compiled.search(line):
                    return line
            seen = len(lines)
            if self.process.poll() is not None and (self._reader is None or not self._reader.is_alive()):
                break
            time.sleep(0.02)
        raise AssertionError(f"no line matching {pattern!r}; stderr was:\n" + "".join(self.stderr_lines))

    @property
    def stderr(self) -> str:
        return "".join(self.stderr_lines)

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        stopped_by_test = self.process.poll() == 0
        if self.process.poll() is None:
            self.process.kill()  # records written behind may be lost: its log is not checked
        self.process.wait(10)
        if stopped_by_test and exc[0] is None:
            check_audit_log(self.audit_log)


def start_serve(*args: str, env: dict[str, str] | None = None, audit_check: bool = True) -> ServeProcess:
    """Start `pgveil serve ARGS` and return at once (do not wait for it to listen)."""
    full_env = {**os.environ, **(env or {})}
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy", "serve", *args],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=full_env,
    )
    served = ServeProcess(process)
    if audit_check and "--audit-log" in args[:-1]:
        served.audit_log = args[args.index("--audit-log") + 1]

    def read() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            served.stderr_lines.append(line)

    served._reader = threading.Thread(target=read, daemon=True)
    served._reader.start()
    return served


def spawn_serve(*args: str, env: dict[str, str] | None = None, timeout: float = 30,
                audit_check: bool = True) -> ServeProcess:
    """Start `pgveil serve ARGS` (give --listen 127.0.0.1:0 for a free port) and wait until it listens."""
    served = start_serve(*args, env=env, audit_check=audit_check)
    try:
        line = served.wait_for_line(_LISTENING.pattern, timeout)
    except AssertionError:
        served.__exit__()
        raise
    match = _LISTENING.search(line)
    assert match is not None
    served.host, served.port = match.group(1), int(match.group(2))
    return served


def wait_until(condition: Any, what: str = "the condition", timeout: float = 20) -> None:
    """Poll `condition` until it holds; fail the test after `timeout` seconds (a deadline, not a
    timed assertion: the polling only bounds how long a broken proxy can hang the suite)."""
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


# ---- a protocol-level client ---------------------------------------------------------------------


class RawClient:
    """A bare PostgreSQL protocol client over a blocking socket, for tests that need exact messages
    (FunctionCall, hand-made pipelines, malformed bytes). Logs in with trust auth (the superuser).

        with RawClient.connect(proxy.host, proxy.port) as client:
            client.send(Query("select 1"))
            messages = client.until_ready()     # decoded backend messages up to ReadyForQuery
    """

    def __init__(self, sock: Any) -> None:
        from proxy.wire import ReceiveBuffer

        self.sock = sock
        self.buffer = ReceiveBuffer(1 << 30)
        self.startup_messages: list[Any] = []

    @classmethod
    def connect(cls, host: str, port: int, user: str = "postgres", database: str = "postgres",
                protocol: int = 3 << 16, timeout: float = 20, **params: str) -> RawClient:
        import socket

        from proxy.wire import StartupMessage

        client = cls(socket.create_connection((host, port), timeout=timeout))
        parameters = (("user", user), ("database", database), *params.items())
        client.sock.sendall(StartupMessage(protocol, parameters).encode())
        client.startup_messages = client.until_ready()
        return client

    def send(self, *messages: Any) -> None:
        self.sock.sendall(b"".join(m if isinstance(m, bytes) else m.encode() for m in messages))

    def receive(self) -> Any:
        """The next backend message (raises EOFError when the server closed the connection)."""
        from proxy.wire import decode_backend

        while True:
            framed = self.buffer.next_message()
            if framed is not None:
                return decode_backend(*framed)
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("server closed the connection")
            self.buffer.feed(data)

    def until_ready(self) -> list[Any]:
        from proxy.wire import ErrorResponse, ReadyForQuery

        messages = []
        while True:
            message = self.receive()
            messages.append(message)
            if isinstance(message, ReadyForQuery):
                return messages
            if isinstance(message, ErrorResponse) and message.get("S") == "FATAL":
                return messages

    def read_to_end(self) -> list[Any]:
        """Every message until the server closes the connection."""
        messages = []
        try:
            while True:
                messages.append(self.receive())
        except (EOFError, ConnectionResetError):
            return messages

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
