"""The listener: accepts clients, runs a Session for each, workers via SO_REUSEPORT, signals, drain."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from proxy import native
from proxy.config import Settings, parse_listen
from proxy.connection_policy import ClientInfo, ConnectionPolicy, PassThrough
from proxy.session import (
    NullObserver,
    PolicyFactory,
    RelayObserver,
    Session,
    SessionContext,
    client_tls_context,
)
from proxy.session.endpoint import Endpoint

if TYPE_CHECKING:
    from proxy.metrics_workers import WorkersEndpoint

log = logging.getLogger("pgveil.server")

ReloadHook = Callable[[], Awaitable[Any] | Any]
"""Called on SIGHUP (the policy reload lives elsewhere); may be a coroutine function."""


def as_policy_factory(factory: Callable[..., ConnectionPolicy] | None) -> PolicyFactory:
    """Accept `f(client_info)` or `f()` (e.g. a ConnectionPolicy class) as the policy factory."""
    if factory is None:
        return lambda client: PassThrough()
    try:
        takes_client = bool(inspect.signature(factory).parameters)
    except (TypeError, ValueError):
        takes_client = True
    if takes_client:
        return factory
    return lambda client: factory()


class ProxyServer:
    """One listening socket and the sessions it accepted, on the running event loop."""

    def __init__(
        self,
        settings: Settings,
        policy_factory: Callable[..., ConnectionPolicy] | None = None,
        observer: RelayObserver | None = None,
        *,
        cancel_secret: bytes | None = None,
        reload: ReloadHook | None = None,
    ) -> None:
        self.settings = settings
        client_tls = None
        if settings.tls_cert and settings.tls_key:
            client_tls = client_tls_context(settings.tls_cert, settings.tls_key)
        self.context = SessionContext(
            settings=settings,
            policy_factory=as_policy_factory(policy_factory),
            observer=observer or NullObserver(),
            client_tls=client_tls,
            cancel_secret=cancel_secret or secrets.token_bytes(32),
        )
        self.reload_hook = reload
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.address: tuple[str, int] = settings.listen_address

    @property
    def sessions(self) -> set[Session]:
        return self.context.sessions

    async def start(self, sock: socket.socket | None = None) -> tuple[str, int]:
        """Bind and listen (or listen on `sock`); returns the address actually bound."""
        loop = asyncio.get_running_loop()
        if sock is not None:
            self._server = await loop.create_server(self._accept, sock=sock, backlog=1024)
        else:
            host, port = self.settings.listen_address
            self._server = await loop.create_server(
                self._accept, host, port, backlog=1024, reuse_address=True,
                reuse_port=self.settings.workers > 1 or None,
            )
        bound = self._server.sockets[0].getsockname()
        self.address = (str(bound[0]), int(bound[1]))
        return self.address

    def _accept(self) -> Endpoint:
        endpoint = Endpoint(self.settings.max_message_size)
        endpoint.connected = self._spawn
        return endpoint

    def _spawn(self, endpoint: Endpoint) -> None:
        if self.context.draining:
            endpoint.abort()
            return
        transport = endpoint.transport
        if transport is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        task = asyncio.get_running_loop().create_task(Session(self.context, endpoint).run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def reload(self) -> None:
        """SIGHUP: run the reload hook; a failing reload is logged and the old state stays."""
        if self.reload_hook is None:
            log.info("SIGHUP: nothing to reload (no policy)")
            return
        try:
            result = self.reload_hook()
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("reload failed; the previous policy stays in force")

    async def drain(self, timeout: float | None = None) -> None:
        """Stop accepting; let each session finish its current request; then close the rest."""
        timeout = self.settings.drain_timeout if timeout is None else timeout
        self.context.draining = True
        if self._server is not None:
            self._server.close()
        for session in list(self.context.sessions):
            session.drain()
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=timeout or None)
            if pending:
                log.warning("drain: %d sessions still busy after %.0fs; closing them", len(pending), timeout)
                for session in list(self.context.sessions):
                    if session.relay is not None:
                        session.relay.finish("drain timeout")
                    else:
                        session.client.abort()
                await asyncio.wait(pending, timeout=5)
        if self._server is not None:
            await self._server.wait_closed()

    async def close(self) -> None:
        """Close everything now (tests); in-flight statements are cancelled."""
        self.context.draining = True
        if self._server is not None:
            self._server.close()
        for session in list(self.context.sessions):
            if session.relay is not None:
                session.relay.finish("server closed")
            else:
                session.client.abort()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=5)


def configure_logging(level: str = "info") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s pgveil[%(process)d] %(name)s: %(message)s",
        stream=sys.stderr,
    )


def install_uvloop() -> bool:
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


Runtime = Callable[[Settings, int], Awaitable["ServeHooks"]]


class ServeHooks:
    """What the rest of pgveil plugs into one serving process (built inside that process)."""

    def __init__(
        self,
        policy_factory: Callable[..., ConnectionPolicy] | None = None,
        observer: RelayObserver | None = None,
        reload: ReloadHook | None = None,
        on_started: Callable[[ProxyServer], Awaitable[None]] | None = None,
        on_stopped: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.policy_factory = policy_factory
        self.observer = observer
        self.reload = reload
        self.on_started = on_started
        self.on_stopped = on_stopped


async def _no_hooks(settings: Settings, worker_index: int) -> ServeHooks:
    return ServeHooks()


def serve(settings: Settings, runtime: Runtime = _no_hooks) -> int:
    """Run `pgveil serve` until SIGTERM/SIGINT; returns the exit code."""
    install_uvloop()
    if settings.workers > 1:
        return _serve_workers(settings, runtime)
    try:
        return asyncio.run(_serve_one(settings, runtime, 0, secrets.token_bytes(32), None, None))
    except StartupFailed as exc:
        log.error("%s", exc)
        return 1


class StartupFailed(Exception):
    """The server could not start; the message is the one-line reason."""


def _bind_error(settings: Settings, exc: OSError) -> StartupFailed:
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    return StartupFailed(f"cannot listen on {settings.listen}: {reason}")


async def _serve_one(
    settings: Settings,
    runtime: Runtime,
    worker_index: int,
    cancel_secret: bytes,
    ready_fd: int | None,
    sock: socket.socket | None,
) -> int:
    loop = asyncio.get_running_loop()
    try:
        hooks = await runtime(settings, worker_index)
    except Exception as exc:
        raise StartupFailed(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
    server = ProxyServer(settings, hooks.policy_factory, hooks.observer, cancel_secret=cancel_secret,
                         reload=hooks.reload)
    try:
        host, port = await server.start(sock)
    except OSError as exc:
        raise _bind_error(settings, exc) from None
    if hooks.on_started is not None:
        await hooks.on_started(server)
    stop = loop.create_future()

    def request_stop(signame: str) -> None:
        if not stop.done():
            log.info("%s: draining (no new connections; open ones finish their current statement)", signame)
            stop.set_result(None)

    loop.add_signal_handler(signal.SIGTERM, request_stop, "SIGTERM")
    loop.add_signal_handler(signal.SIGINT, request_stop, "SIGINT")
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(server.reload()))
    log.info("hot path: %s", native.describe())
    if ready_fd is None:
        log.info("listening on %s:%d", host, port)
    else:
        os.write(ready_fd, f"{port}\n".encode())
        os.close(ready_fd)
    await stop
    await server.drain()
    if hooks.on_stopped is not None:
        await hooks.on_stopped()
    log.info("stopped")
    return 0


def _serve_workers(settings: Settings, runtime: Runtime) -> int:
    """Fork N workers that each listen on the same port (SO_REUSEPORT); relay signals to them;
    start a worker again when it dies unexpectedly. With --metrics the parent serves the one
    metrics endpoint, summing what each worker serves on its private unix socket."""
    host, port = settings.listen_address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        probe.bind((host, port))
    except OSError as exc:
        probe.close()
        log.error("%s", _bind_error(settings, exc))
        return 1
    port = probe.getsockname()[1]  # resolves port 0; bound but not listening, so it gets no clients
    worker_settings = _with_listen(settings, f"{host}:{port}")
    metrics_dir: str | None = None
    endpoint: WorkersEndpoint | None = None
    if settings.metrics is not None:
        from proxy.metrics_workers import WorkersEndpoint, worker_socket
        from proxy.operations import WORKER_METRICS

        try:
            metrics_dir = tempfile.mkdtemp(prefix="pgveil-metrics-")  # the workers' private sockets
        except OSError as exc:
            probe.close()
            log.error("cannot create a directory for the workers' metrics sockets in %s: %s",
                      tempfile.gettempdir(), exc.strerror or exc)
            return 1
        try:
            endpoint = WorkersEndpoint(parse_listen(settings.metrics),
                                       [worker_socket(metrics_dir, i) for i in range(settings.workers)])
        except OSError as exc:
            probe.close()
            shutil.rmtree(metrics_dir, ignore_errors=True)
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            log.error("cannot serve metrics on %s: %s", settings.metrics, reason)
            return 1
        worker_settings = replace(worker_settings, metrics=WORKER_METRICS + metrics_dir)
    try:
        return _run_workers(settings, worker_settings, runtime, probe, endpoint, (host, port))
    finally:
        if endpoint is not None:
            endpoint.close()
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


MAX_RESTARTS = 5
RESTART_WINDOW = 60.0
"""More than MAX_RESTARTS unexpected worker exits within RESTART_WINDOW seconds stop the whole
group (exit code 1), so a worker that keeps dying ends in the supervisor's restart, not a loop."""


def _run_workers(settings: Settings, worker_settings: Settings, runtime: Runtime, probe: socket.socket,
                 endpoint: WorkersEndpoint | None, address: tuple[str, int]) -> int:
    cancel_secret = secrets.token_bytes(32)  # shared so any worker can map any cancel key
    children: dict[int, int] = {}
    stopping: list[int] = []  # the signal that stops the group, once one came
    recent: list[float] = []  # when workers last exited unexpectedly (monotonic)

    def start(index: int) -> int:
        """Fork worker `index`; returns the read end of the pipe it reports its port on."""
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            probe.close()
            if endpoint is not None:
                endpoint.close_inherited()
            code = 1
            try:
                code = asyncio.run(_serve_one(worker_settings, runtime, index, cancel_secret, write_fd, None))
            except StartupFailed as exc:
                log.error("worker %d: %s", index, exc)
            except BaseException:
                log.exception("worker %d crashed", index)
            finally:
                os._exit(code)
        os.close(write_fd)
        children[pid] = index
        return read_fd

    def started(fd: int) -> bool:
        with os.fdopen(fd) as ready:
            return bool(ready.readline().strip())

    pipes = [start(index) for index in range(settings.workers)]
    ok = all([started(fd) for fd in pipes])
    probe.close()

    def on_signal(signum: int, frame: object) -> None:
        if signum != signal.SIGHUP and not stopping:
            stopping.append(signum)
        _relay_signal(children, signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, on_signal)
    if not ok:
        log.error("a worker failed to start; stopping the others")
        stopping.append(signal.SIGTERM)
        _relay_signal(children, signal.SIGTERM)
    else:
        if endpoint is not None:
            endpoint.serve_in_background()
            log.info("metrics on http://%s:%d/metrics (all %d workers; each also on its own socket in %s)",
                     *endpoint.address, settings.workers, Path(endpoint.sockets[0]).parent)
        log.info("listening on %s:%d (%d workers)", *address, settings.workers)
    code = 0 if ok else 1
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        index = children.pop(pid, None)
        exit_code = os.waitstatus_to_exitcode(status)
        if index is None:
            continue
        if stopping:
            if exit_code != 0:
                code = 1
            continue
        how = f"signal {-exit_code}" if exit_code < 0 else f"exit code {exit_code}"
        now = time.monotonic()
        recent[:] = [when for when in recent if now - when < RESTART_WINDOW] + [now]
        if len(recent) > MAX_RESTARTS:
            log.error("worker %d (pid %d) exited unexpectedly (%s), %d unexpected exits in %.0f s: "
                      "stopping the others", index, pid, how, len(recent), RESTART_WINDOW)
            stopping.append(signal.SIGTERM)
            _relay_signal(children, signal.SIGTERM)
            code = 1
            continue
        log.error("worker %d (pid %d) exited unexpectedly (%s); starting it again", index, pid, how)
        if endpoint is not None:
            endpoint.restarts += 1
        if not started(start(index)) and not stopping:
            log.error("worker %d failed to start again; stopping the others", index)
            stopping.append(signal.SIGTERM)
            _relay_signal(children, signal.SIGTERM)
            code = 1
    return code


def _relay_signal(children: dict[int, int], signum: int) -> None:
    for pid in list(children):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def _with_listen(settings: Settings, listen: str) -> Settings:
    return replace(settings, listen=listen)


__all__ = ["ClientInfo", "ProxyServer", "ServeHooks", "StartupFailed", "configure_logging", "serve"]
