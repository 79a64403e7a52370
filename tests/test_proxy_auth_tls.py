"""Authentication passes through pgveil (trust, password, MD5, SCRAM) and TLS works on both legs."""

from __future__ import annotations

import socket
import struct
import subprocess

import psycopg
import pytest

from proxy.connection_policy import ClientInfo, PassThrough
from proxy.embedded import EmbeddedPostgres
from proxy.session.session import sasl_mechanisms_for_client
from proxy.wire import AuthenticationSASL, GSSENCRequest, SSLRequest, StartupMessage
from tests.proxy_harness import running_proxy

HBA = (
    "local all all trust",
    "host all postgres 127.0.0.1/32 trust",
    "host all relay_md5 127.0.0.1/32 md5",
    "host all relay_clear 127.0.0.1/32 password",
    "host all all 127.0.0.1/32 scram-sha-256",
)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[str, str]:
    directory = tmp_path_factory.mktemp("relay-tls")
    cert, key = directory / "server.crt", directory / "server.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    key.chmod(0o600)
    return str(cert), str(key)


@pytest.fixture(scope="module")
def auth_pg():
    """A PostgreSQL of its own with MD5 / password / SCRAM rules (pg_hba is per server)."""
    server = EmbeddedPostgres.start(hba=HBA)
    server.psql(
        "set password_encryption = 'md5'; create role relay_md5 login password 'md5-secret';"
        " reset password_encryption; create role relay_scram login password 'scram-secret';"
        " create role relay_clear login password 'clear-secret';"
    )
    try:
        yield server
    finally:
        server.stop()


class Target:
    """The upstream fixture's interface, for a server of our own."""

    def __init__(self, server: EmbeddedPostgres, query: str = "") -> None:
        self.server = server
        self.superuser, self.superpassword = server.superuser, None
        self.query = query

    def dsn(self, user: str | None = None, password: str | None = None, dbname: str = "postgres") -> str:
        return self.server.dsn(user, password, dbname) + self.query


@pytest.fixture(scope="module")
def plain_proxy(auth_pg):
    with running_proxy(Target(auth_pg, "?sslmode=disable")) as proxy:
        yield proxy


class Recorder(PassThrough):
    seen: list[ClientInfo] = []

    def __init__(self, client: ClientInfo) -> None:
        self.seen.append(client)


@pytest.fixture(scope="module")
def tls_proxy(auth_pg, certificate):
    """pgveil with TLS for its clients and TLS (sslmode=require) to its upstream.

    The embedded PostgreSQL is built without TLS, so the upstream that speaks TLS is a second
    pgveil (TLS on its client leg) in front of it: client -> pgveil -> TLS -> pgveil -> PostgreSQL."""
    cert, key = certificate
    with running_proxy(Target(auth_pg), tls_cert=cert, tls_key=key, policy_factory=Recorder) as inner:
        outer_upstream = Target(auth_pg, "?sslmode=require")
        outer_upstream.dsn = lambda user=None, password=None, dbname="postgres": (  # type: ignore[method-assign]
            f"postgresql://{inner.host}:{inner.port}/{dbname}?sslmode=require")
        with running_proxy(outer_upstream, tls_cert=cert, tls_key=key) as outer:
            outer.upstream_port = inner.port
            yield outer


def login(dsn: str) -> str:
    with psycopg.connect(dsn) as conn:
        return conn.execute("select current_user").fetchone()[0]


@pytest.mark.parametrize(("user", "password"), [
    ("relay_scram", "scram-secret"), ("relay_md5", "md5-secret"), ("relay_clear", "clear-secret")])
def test_password_logins_pass_through(auth_pg, plain_proxy, user, password):
    assert login(plain_proxy.dsn(user, password)) == user


@pytest.mark.parametrize("user", ["relay_scram", "relay_md5", "relay_clear"])
def test_wrong_password_fails_exactly_as_postgres_says(auth_pg, plain_proxy, user):
    errors = []
    for dsn in (auth_pg.dsn(user, "wrong") + "?sslmode=disable", plain_proxy.dsn(user, "wrong")):
        with pytest.raises(psycopg.OperationalError) as caught:
            psycopg.connect(dsn)
        errors.append(str(caught.value).rsplit(" failed: ", 1)[1])
    assert errors[0] == errors[1] == f'FATAL:  password authentication failed for user "{user}"'



@pytest.mark.parametrize(("user", "password"), [("relay_scram", "scram-secret"), ("relay_md5", "md5-secret")])
def test_tls_on_the_client_leg(tls_proxy, user, password):
    with psycopg.connect(tls_proxy.dsn(user, password) + "?sslmode=require") as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("select current_user").fetchone() == (user,)


def test_tls_to_the_upstream_as_the_dsn_sslmode_says(tls_proxy):
    Recorder.seen.clear()
    assert login(tls_proxy.dsn("relay_md5", "md5-secret") + "?sslmode=disable") == "relay_md5"
    assert [client.tls for client in Recorder.seen] == [True]


@pytest.mark.parametrize("sslmode", ["verify-ca", "verify-full"])
def test_verified_tls_to_the_upstream(auth_pg, certificate, tls_proxy, sslmode):
    inner_port = tls_proxy.upstream_port

    class Verified:
        superuser, superpassword = "postgres", None

        def dsn(self, user=None, password=None, dbname="postgres"):
            return f"postgresql://127.0.0.1:{inner_port}/{dbname}?sslmode={sslmode}&sslrootcert={certificate[0]}"

    with running_proxy(Verified()) as proxy:
        assert login(proxy.dsn("relay_md5", "md5-secret")) == "relay_md5"


def test_upstream_certificate_that_does_not_verify_is_refused(auth_pg, tls_proxy, tmp_path):
    other_cert, other_key = tmp_path / "other.crt", tmp_path / "other.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=other", "-keyout", str(other_key), "-out", str(other_cert)],
                   check=True, capture_output=True)
    inner_port = tls_proxy.upstream_port

    class Unverifiable:
        superuser, superpassword = "postgres", None

        def dsn(self, user=None, password=None, dbname="postgres"):
            return f"postgresql://127.0.0.1:{inner_port}/{dbname}?sslmode=verify-ca&sslrootcert={other_cert}"

    with running_proxy(Unverifiable()) as proxy:
        with pytest.raises(psycopg.OperationalError, match="pgveil: upstream: TLS with PostgreSQL") as caught:
            psycopg.connect(proxy.dsn("relay_md5", "md5-secret"))
        assert "CERTIFICATE_VERIFY_FAILED" in str(caught.value)
        assert proxy.counters.upstream_errors == {"tls": 1}


def test_scram_plus_is_never_offered_through_pgveil():
    # Channel binding ties SCRAM to the TLS channel the client sees, which ends at pgveil;
    # PostgreSQL would check it against its own channel and always fail.
    offered = AuthenticationSASL(("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"))
    assert sasl_mechanisms_for_client(offered) == AuthenticationSASL(("SCRAM-SHA-256",))


def test_a_client_requiring_channel_binding_is_told_it_is_unavailable(tls_proxy):
    with pytest.raises(psycopg.OperationalError, match="channel binding"):
        psycopg.connect(tls_proxy.dsn("relay_scram", "scram-secret")
                        + "?sslmode=require&channel_binding=require")


def test_client_tls_is_refused_when_no_certificate_is_configured(plain_proxy):
    with pytest.raises(psycopg.OperationalError, match="does not support SSL"):
        psycopg.connect(plain_proxy.dsn("relay_scram", "scram-secret") + "?sslmode=require")


def raw_connect(proxy) -> socket.socket:
    sock = socket.create_connection((proxy.host, proxy.port), timeout=10)
    return sock


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_bytes_after_ssl_request_before_the_handshake_are_refused(tls_proxy):
    # CVE-2021-23214: plaintext queued behind SSLRequest must not be read as if it came over TLS.
    with raw_connect(tls_proxy) as sock:
        sock.sendall(SSLRequest().encode() + StartupMessage(3 << 16, (("user", "postgres"),)).encode())
        answer = read_all(sock)
    assert answer.startswith(b"E")
    assert b"received unencrypted data after SSL request" in answer and b"08P01" in answer


def test_gssenc_request_is_declined_and_startup_continues(plain_proxy):
    with raw_connect(plain_proxy) as sock:
        sock.sendall(GSSENCRequest().encode())
        assert sock.recv(1) == b"N"
        sock.sendall(StartupMessage(3 << 16, (("user", "relay_scram"), ("database", "postgres"))).encode())
        reply = sock.recv(5)
        assert reply[:1] == b"R" and struct.unpack("!I", reply[1:5])[0] > 4


def test_replication_connections_are_refused_with_a_clear_error(plain_proxy):
    with pytest.raises(psycopg.OperationalError, match="pgveil: replication"):
        psycopg.connect(plain_proxy.dsn("relay_scram", "scram-secret") + "?replication=database")


def test_startup_options_reach_postgres(plain_proxy):
    dsn = plain_proxy.dsn("relay_scram", "scram-secret") + "?options=-c%20search_path%3Drelay_x%2Cpublic"
    with psycopg.connect(dsn, application_name="relay-app") as conn:
        assert conn.execute("show search_path").fetchone() == ("relay_x,public",)
        assert conn.execute("select current_setting('application_name')").fetchone() == ("relay-app",)
