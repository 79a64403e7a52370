"""Opening connections to PostgreSQL: TCP or Unix socket, TLS as the DSN's sslmode says, cancels."""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from pathlib import Path
from typing import cast

from proxy.config import UpstreamTarget
from proxy.session.endpoint import ConnectionClosed, Endpoint
from proxy.wire import CancelRequest, SSLRequest


class UpstreamUnavailable(Exception):
    """PostgreSQL could not be reached or refused the transport we need; `kind` is for metrics."""

    def __init__(self, reason: str, kind: str = "connect") -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind


def upstream_tls_context(target: UpstreamTarget) -> ssl.SSLContext | None:
    """The client-side TLS context for the upstream leg, following libpq's sslmode semantics."""
    if target.sslmode == "disable" or target.is_unix_socket:
        return None
    root = target.sslrootcert
    if root is None:
        default_root = Path(os.path.expanduser("~/.postgresql/root.crt"))
        if default_root.is_file():
            root = str(default_root)
    verify = target.sslmode in ("verify-ca", "verify-full") or (target.sslmode == "require" and root)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if verify:
        if root is None:
            raise UpstreamUnavailable(
                f"sslmode={target.sslmode} needs a root certificate: add sslrootcert=FILE to the DSN", "tls"
            )
        context.load_verify_locations(root)
        context.check_hostname = target.sslmode == "verify-full"
        context.verify_mode = ssl.CERT_REQUIRED
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if target.sslcert and target.sslkey:
        context.load_cert_chain(target.sslcert, target.sslkey)
    return context


async def connect(
    target: UpstreamTarget, tls: ssl.SSLContext | None, max_message_size: int
) -> tuple[Endpoint, bool]:
    """Connect and negotiate TLS; returns the endpoint and whether the leg is encrypted."""
    loop = asyncio.get_running_loop()
    endpoint = Endpoint(max_message_size)
    try:
        async with asyncio.timeout(target.connect_timeout):
            if target.is_unix_socket:
                path = f"{target.host}/.s.PGSQL.{target.port}"
                await loop.create_unix_connection(lambda: endpoint, path)
            else:
                await loop.create_connection(lambda: endpoint, target.host, target.port)
            if tls is None:
                return endpoint, False
            endpoint.write(SSLRequest().encode())
            answer = await endpoint.read_byte()
            if answer == ord("S"):
                if len(endpoint.buffer):
                    raise UpstreamUnavailable("PostgreSQL sent unencrypted data after accepting TLS", "tls")
                assert endpoint.transport is not None
                hostname = target.host if target.sslmode == "verify-full" else None
                transport = await loop.start_tls(endpoint.transport, endpoint, tls, server_hostname=hostname)
                transport = cast(asyncio.Transport, transport)
                endpoint.transport = transport
                return endpoint, True
            if answer == ord("N"):
                if target.sslmode in ("require", "verify-ca", "verify-full"):
                    raise UpstreamUnavailable(
                        f"PostgreSQL at {target.address} does not accept TLS but the DSN says "
                        f"sslmode={target.sslmode}", "tls")
                return endpoint, False
            raise UpstreamUnavailable(f"unexpected answer {answer!r} to SSLRequest", "tls")
    except UpstreamUnavailable:
        endpoint.abort()
        raise
    except TimeoutError:
        endpoint.abort()
        raise UpstreamUnavailable(f"timed out connecting to PostgreSQL at {target.address}") from None
    except ssl.SSLError as exc:
        endpoint.abort()
        reason = f"TLS with PostgreSQL at {target.address} failed: {exc.reason}"
        raise UpstreamUnavailable(reason, "tls") from None
    except (OSError, ConnectionClosed) as exc:
        endpoint.abort()
        reason = getattr(exc, "strerror", None) or "connection closed"
        raise UpstreamUnavailable(f"cannot connect to PostgreSQL at {target.address}: {reason}") from None


async def send_cancel(
    target: UpstreamTarget, tls: ssl.SSLContext | None, process_id: int, secret_key: bytes
) -> None:
    """Deliver a CancelRequest to PostgreSQL; it answers by closing the connection."""
    endpoint, _ = await connect(target, tls, 1024)
    try:
        endpoint.write(CancelRequest(process_id, secret_key).encode())
        with contextlib.suppress(ConnectionClosed, TimeoutError):
            async with asyncio.timeout(target.connect_timeout):
                while True:
                    await endpoint.read_byte()
    finally:
        endpoint.close()
