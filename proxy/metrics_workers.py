"""With --workers N, the parent's one metrics endpoint: every worker's exposition, fetched at scrape
time from its private unix socket, summed into one (nothing is added to the statement path)."""

from __future__ import annotations

import logging
import signal
import socket
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.utils import floatToGoString

log = logging.getLogger("pgveil.metrics")

GAUGE_COMBINE: dict[str, Callable[[float, float], float]] = {
    "pgveil_policy_loaded_timestamp_seconds": min,  # the oldest policy still in force on some worker
    "pgveil_policy_info": max,  # 1 per (version, source) loaded on at least one worker
    "pgveil_unclassified_sensitive_columns": max,  # every worker reads the same catalog and policy
    "pgveil_elevations_active": max,  # every worker reads the same state store
}
"""How a gauge of several workers becomes one; a gauge not named here is a count and is summed.
`*_created` (when a series began) takes the earliest worker's."""

FETCH_TIMEOUT = 5.0


def worker_socket(directory: str, worker_index: int) -> str:
    """Where worker i serves its own /metrics, /healthz and /readyz (a unix socket, not a port)."""
    return str(Path(directory) / f"worker-{worker_index}.sock")


def _combine(family: str, kind: str) -> Callable[[float, float], float]:
    if family.endswith("_created"):
        return min
    if kind == "gauge":
        return GAUGE_COMBINE.get(family, _add)
    return _add


def _add(a: float, b: float) -> float:
    return a + b


def aggregate(texts: Sequence[str]) -> bytes:
    """One Prometheus text exposition from several workers' (as prometheus-client writes them):
    counters and histogram buckets summed per identical label set, gauges per GAUGE_COMBINE;
    families and series in first-seen order. Works on lines: no parsing into objects."""
    heads: dict[str, list[str]] = {}  # family -> its HELP and TYPE lines
    series: dict[str, dict[str, float]] = {}  # family -> "name{labels}" -> value
    for text in texts:
        family = ""
        combine: Callable[[float, float], float] = _add
        for line in text.splitlines():
            if line.startswith("#"):
                parts = line.split(" ", 3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    family = parts[2]
                    lines = heads.setdefault(family, [])
                    if len(lines) < 2:
                        lines.append(line)
                    if parts[1] == "TYPE" and len(parts) == 4:
                        combine = _combine(family, parts[3])
                    series.setdefault(family, {})
                continue
            key, _, value = line.rpartition(" ")
            if not key:
                continue
            values = series.setdefault(family, {})
            number = float(value)
            values[key] = combine(values[key], number) if key in values else number
    out: list[str] = []
    for family, values in series.items():
        out.extend(heads.get(family, ()))
        out.extend(f"{key} {floatToGoString(value)}" for key, value in values.items())  # type: ignore[no-untyped-call]
    return ("\n".join(out) + "\n").encode() if out else b""


def fetch(path: str, target: str, timeout: float = FETCH_TIMEOUT) -> tuple[int, bytes] | None:
    """GET `target` from a worker's unix socket: (status, body), or None when it does not answer."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(timeout)
            conn.connect(path)
            conn.sendall(f"GET {target} HTTP/1.1\r\nHost: worker\r\n\r\n".encode())
            chunks: list[bytes] = []
            while chunk := conn.recv(65536):
                chunks.append(chunk)
    except OSError:
        return None
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    parts = head.split(b" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        return None
    return int(parts[1]), body


def group_metrics(workers: int, scraped: int, restarts: int) -> str:
    """The series the parent adds about the worker processes themselves."""
    return (
        "# HELP pgveil_workers Worker processes configured (--workers)\n"
        "# TYPE pgveil_workers gauge\n"
        f"pgveil_workers {workers}\n"
        "# HELP pgveil_workers_scraped Worker processes whose metrics are in this scrape\n"
        "# TYPE pgveil_workers_scraped gauge\n"
        f"pgveil_workers_scraped {scraped}\n"
        "# HELP pgveil_worker_restarts Worker processes that exited unexpectedly and were started again\n"
        "# TYPE pgveil_worker_restarts counter\n"
        f"pgveil_worker_restarts_total {restarts}\n"
    )


def _said(answer: tuple[int, bytes] | None) -> str:
    return "not answering" if answer is None else answer[1].decode(errors="replace").strip()


class WorkersEndpoint:
    """The parent's /metrics, /healthz and /readyz on HOST:PORT, answering for all workers.

    /metrics sums the expositions of the workers that answer and adds pgveil_workers (configured),
    pgveil_workers_scraped (answered this scrape) and pgveil_worker_restarts_total; /healthz and
    /readyz are 200 only when every worker says so. Served from a thread of the parent process."""

    def __init__(self, listen: tuple[str, int], sockets: list[str]) -> None:
        self.sockets = sockets
        self.restarts = 0
        self._pool = ThreadPoolExecutor(max_workers=len(sockets), thread_name_prefix="pgveil-scrape")
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                endpoint._answer(self, head_only=False)

            def do_HEAD(self) -> None:
                endpoint._answer(self, head_only=True)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._http = ThreadingHTTPServer(listen, Handler, bind_and_activate=True)
        self._http.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._http.server_address[:2]
        return str(host), int(port)

    def serve_in_background(self) -> None:
        """Serve from a thread that, like every thread it starts, blocks the signals the parent
        handles: a signal the kernel gave one of them would not interrupt the main thread's
        wait for its children, so SIGTERM or SIGHUP would wait for a worker to exit."""
        self._thread = threading.Thread(target=self._http.serve_forever, name="pgveil-metrics", daemon=True)
        handled = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD}
        before = signal.pthread_sigmask(signal.SIG_BLOCK, handled)
        try:
            self._thread.start()  # a new thread starts with its creator's signal mask
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, before)

    def close_inherited(self) -> None:
        """In a forked worker: drop the inherited listening socket (the parent keeps serving it)."""
        self._http.socket.close()

    def close(self) -> None:
        if self._thread is not None:
            self._http.shutdown()
        self._http.server_close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _ask_all(self, target: str) -> list[tuple[int, bytes] | None]:
        return list(self._pool.map(lambda path: fetch(path, target), self.sockets))

    def respond(self, path: str) -> tuple[int, str, bytes]:
        if path == "/metrics":
            texts = [answer[1].decode() for answer in self._ask_all("/metrics")
                     if answer is not None and answer[0] == 200]
            scraped = len(texts)
            texts.append(group_metrics(len(self.sockets), scraped, self.restarts))
            return 200, CONTENT_TYPE_LATEST, aggregate(texts)
        if path in ("/healthz", "/readyz"):
            failing = [f"worker {i}: {_said(answer)}" for i, answer in enumerate(self._ask_all(path))
                       if answer is None or answer[0] != 200]
            if not failing:
                return 200, "text/plain", b"ok\n" if path == "/healthz" else b"ready\n"
            status = 503
            word = "unhealthy" if path == "/healthz" else "not ready"
            return status, "text/plain", (f"{word}\n" + "".join(f"{line}\n" for line in failing)).encode()
        return 404, "text/plain", b"not found: try /metrics, /healthz or /readyz\n"

    def _answer(self, handler: BaseHTTPRequestHandler, head_only: bool) -> None:
        try:
            status, content_type, body = self.respond(handler.path.split("?", 1)[0])
        except Exception:  # a scrape must not take the parent down; say so and answer 500
            log.exception("metrics scrape failed")
            status, content_type, body = 500, "text/plain", b"scrape failed; see pgveil's log\n"
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(body)))
        handler.send_header("Connection", "close")
        handler.end_headers()
        if not head_only:
            handler.wfile.write(body)
        handler.close_connection = True
