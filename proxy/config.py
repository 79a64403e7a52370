"""One Settings object for `pgveil serve`, from --config YAML, then PGVEIL_* env, then flags."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from proxy.wire.framing import DEFAULT_MAX_MESSAGE_SIZE, POSTGRES_MAX_MESSAGE_SIZE

SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
DEFAULT_MAX_STATEMENT_SIZE = 1024 * 1024
"""Longer statements are refused (statement-too-large) without being judged: analysing 1 MiB of SQL
takes the guard seconds and a few hundred MB."""
DEFAULT_MAX_CONNECTIONS = 500
DEFAULT_MAX_LOGINS_PER_ADDRESS = 32
DEFAULT_MAX_QUEUED_LOGINS_PER_ADDRESS = 1000
"""Client connections one pgveil process serves at once; each holds one PostgreSQL connection."""


class SettingsError(ValueError):
    """A setting that cannot be used; the message is one line saying what to fix."""


@dataclass(frozen=True, slots=True)
class UpstreamTarget:
    """Where PostgreSQL is, parsed from the --upstream DSN (URI or key=value form)."""

    host: str = "127.0.0.1"
    port: int = 5432
    dbname: str | None = None
    user: str | None = None
    password: str | None = None
    sslmode: str = "prefer"
    sslrootcert: str | None = None
    sslcert: str | None = None
    sslkey: str | None = None
    connect_timeout: float = 10.0
    dsn: str = ""

    @property
    def is_unix_socket(self) -> bool:
        return self.host.startswith("/")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def parse_dsn(dsn: str) -> UpstreamTarget:
    """Parse a libpq connection string; raise SettingsError with the reason when malformed."""
    dsn = dsn.strip()
    if not dsn:
        raise SettingsError("upstream DSN is empty: give --upstream postgresql://HOST:PORT/DBNAME")
    if dsn.startswith(("postgresql://", "postgres://")):
        values = _parse_uri(dsn)
    elif "=" in dsn:
        values = _parse_keywords(dsn)
    else:
        raise SettingsError(
            f"upstream DSN {dsn!r} is malformed: "
            "expected postgresql://HOST:PORT/DBNAME or 'host=... port=...'"
        )
    known = {"host", "hostaddr", "port", "dbname", "user", "password", "sslmode", "sslrootcert",
             "sslcert", "sslkey", "connect_timeout", "application_name", "options", "sslnegotiation",
             "target_session_attrs", "channel_binding", "gssencmode"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise SettingsError(f"upstream DSN has unknown parameter {unknown[0]!r}")
    host = values.get("hostaddr") or values.get("host") or "127.0.0.1"
    if "," in host:
        raise SettingsError("upstream DSN lists several hosts; pgveil needs exactly one")
    port_text = values.get("port") or "5432"
    try:
        port = int(port_text)
    except ValueError:
        raise SettingsError(f"upstream DSN has an invalid port {port_text!r}") from None
    if not 0 < port < 65536:
        raise SettingsError(f"upstream DSN has an invalid port {port}")
    sslmode = values.get("sslmode") or "prefer"
    if sslmode not in SSLMODES:
        raise SettingsError(f"upstream DSN has an invalid sslmode {sslmode!r} (one of {', '.join(SSLMODES)})")
    try:
        timeout = float(values.get("connect_timeout") or 10)
    except ValueError:
        raise SettingsError("upstream DSN has an invalid connect_timeout") from None
    return UpstreamTarget(
        host=host, port=port, dbname=values.get("dbname") or None, user=values.get("user") or None,
        password=values.get("password"), sslmode=sslmode, sslrootcert=values.get("sslrootcert"),
        sslcert=values.get("sslcert"), sslkey=values.get("sslkey"),
        connect_timeout=timeout if timeout > 0 else 10.0, dsn=dsn,
    )


def _parse_uri(dsn: str) -> dict[str, str]:
    try:
        parts = urlsplit(dsn)
        port = parts.port
    except ValueError as exc:
        raise SettingsError(f"upstream DSN is malformed: {exc}") from None
    values: dict[str, str] = {}
    if parts.hostname:
        values["host"] = unquote(parts.hostname)
    if port is not None:
        values["port"] = str(port)
    if parts.username:
        values["user"] = unquote(parts.username)
    if parts.password is not None:
        values["password"] = unquote(parts.password)
    if parts.path and parts.path != "/":
        values["dbname"] = unquote(parts.path.lstrip("/"))
    try:
        query = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        raise SettingsError(f"upstream DSN has a malformed query string {parts.query!r}") from None
    values.update(query)
    return values


def _parse_keywords(dsn: str) -> dict[str, str]:
    values: dict[str, str] = {}
    i, n = 0, len(dsn)
    while i < n:
        while i < n and dsn[i].isspace():
            i += 1
        if i >= n:
            break
        eq = dsn.find("=", i)
        if eq < 0:
            raise SettingsError(f"upstream DSN is malformed near {dsn[i:]!r}: expected key=value")
        key = dsn[i:eq].strip()
        i = eq + 1
        while i < n and dsn[i].isspace():
            i += 1
        value = []
        if i < n and dsn[i] == "'":
            i += 1
            while i < n and dsn[i] != "'":
                if dsn[i] == "\\" and i + 1 < n:
                    i += 1
                value.append(dsn[i])
                i += 1
            if i >= n:
                raise SettingsError("upstream DSN has an unterminated quoted value")
            i += 1
        else:
            while i < n and not dsn[i].isspace():
                if dsn[i] == "\\" and i + 1 < n:
                    i += 1
                value.append(dsn[i])
                i += 1
        if not key:
            raise SettingsError("upstream DSN has a value without a key")
        values[key] = "".join(value)
    return values


def parse_listen(text: str) -> tuple[str, int]:
    """HOST:PORT (IPv6 as [::1]:PORT); raise SettingsError when malformed."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise SettingsError(f"listen address {text!r} is malformed: expected HOST:PORT")
    host = host.removeprefix("[").removesuffix("]")
    try:
        port = int(port_text)
    except ValueError:
        raise SettingsError(f"listen address {text!r} has an invalid port") from None
    if not 0 <= port < 65536:
        raise SettingsError(f"listen address {text!r} has an invalid port")
    return host, port


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything `pgveil serve` runs with. Keys other components read from the --config YAML
    and that pgveil serve does not know itself stay in `extra` (e.g. audit sink options)."""

    upstream: str = ""
    policy: str | None = None
    listen: str = "127.0.0.1:6432"
    metrics: str | None = None
    audit_log: str | None = None
    workers: int = 1
    tls_cert: str | None = None
    tls_key: str | None = None
    config: str | None = None
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    max_statement_size: int = DEFAULT_MAX_STATEMENT_SIZE
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_logins_per_address: int = DEFAULT_MAX_LOGINS_PER_ADDRESS
    max_queued_logins_per_address: int = DEFAULT_MAX_QUEUED_LOGINS_PER_ADDRESS
    startup_timeout: float = 10.0
    drain_timeout: float = 30.0
    log_level: str = "info"
    state_dsn: str | None = None  # the state store (proxy/state); "upstream": the --upstream database
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def listen_address(self) -> tuple[str, int]:
        return parse_listen(self.listen)

    @property
    def upstream_target(self) -> UpstreamTarget:
        return parse_dsn(self.upstream)

    def validate(self) -> Settings:
        """Check every value; raise SettingsError with a one-line reason."""
        if not self.upstream:
            raise SettingsError(
                "no upstream: give --upstream DSN (or PGVEIL_UPSTREAM, or upstream: in --config)"
            )
        parse_dsn(self.upstream)
        parse_listen(self.listen)
        if self.metrics is not None:
            parse_listen(self.metrics)
        if self.workers < 1:
            raise SettingsError(f"--workers must be at least 1, not {self.workers}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise SettingsError("TLS needs both --tls-cert and --tls-key")
        for path in (self.tls_cert, self.tls_key, self.policy):
            if path is not None and not Path(path).is_file():
                raise SettingsError(f"file not found: {path}")
        if not 0 < self.max_message_size <= POSTGRES_MAX_MESSAGE_SIZE:
            raise SettingsError(f"max_message_size must be between 1 and {POSTGRES_MAX_MESSAGE_SIZE} bytes")
        if self.max_statement_size < 1:
            raise SettingsError(f"max_statement_size must be at least 1, not {self.max_statement_size}")
        if self.max_connections < 1:
            raise SettingsError(f"max_connections must be at least 1, not {self.max_connections}")
        if self.max_logins_per_address < 0:
            raise SettingsError("max_logins_per_address must be 0 (no limit) or more, "
                                f"not {self.max_logins_per_address}")
        if self.max_queued_logins_per_address < 0:
            raise SettingsError("max_queued_logins_per_address must be 0 (refuse at once) or more, "
                                f"not {self.max_queued_logins_per_address}")
        if self.startup_timeout <= 0 or self.drain_timeout < 0:
            raise SettingsError("startup_timeout must be positive and drain_timeout not negative")
        return self


_FIELDS = {f.name: f for f in fields(Settings) if f.name != "extra"}
_INT_KEYS = {"workers", "max_message_size", "max_statement_size", "max_connections", "max_logins_per_address",
             "max_queued_logins_per_address"}
_FLOAT_KEYS = {"startup_timeout", "drain_timeout"}


def _coerce(key: str, value: Any, source: str) -> Any:
    if value is None:
        return None
    try:
        if key in _INT_KEYS:
            return int(value)
        if key in _FLOAT_KEYS:
            return float(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{source}: {key} must be a number, not {value!r}") from None
    return str(value)


def load_settings(
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Merge the --config file (if flags or env name one), PGVEIL_* variables, and flags.

    Precedence: flags override the environment, which overrides the file. A flag whose value
    is None counts as not given. Raises SettingsError."""
    flags = {k.replace("-", "_"): v for k, v in (flags or {}).items() if v is not None}
    environ = os.environ if environ is None else environ
    env_values: dict[str, Any] = {}
    for key in _FIELDS:
        name = f"PGVEIL_{key.upper()}"
        if name in environ:
            env_values[key] = _coerce(key, environ[name], name)
    config_path = flags.get("config") or env_values.get("config")
    file_values: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    if config_path:
        for key, value in _read_config_file(str(config_path)).items():
            norm = key.replace("-", "_")
            if norm in _FIELDS:
                file_values[norm] = _coerce(norm, value, str(config_path))
            else:
                extra[norm] = value
    merged: dict[str, Any] = {**file_values, **env_values}
    for key, value in flags.items():
        if key in _FIELDS:
            merged[key] = _coerce(key, value, f"--{key.replace('_', '-')}")
    if config_path:
        merged["config"] = str(config_path)
    return replace(Settings(), **merged, extra=extra)


def _read_config_file(path: str) -> dict[str, Any]:
    import yaml

    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise SettingsError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SettingsError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"config file {path} must be a mapping of setting: value")
    return data
