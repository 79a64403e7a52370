"""The keyed hash installed in the upstream: correct HMAC, and its key hidden from every client."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import Iterator

import psycopg
import pytest

from proxy.upstream_setup import UpstreamSetupError, hmac_pads, install_masking_functions
from tests.conftest import Upstream

DATABASE = "policy_hash_function"
READER = "policy_hash_reader"
READER_PASSWORD = "policy-hash-reader-pw"
KEY = b"hash-function-test-key-\x00\xff-0123456789"
LONG_KEY = b"k" * 100  # longer than SHA-256's block: HMAC hashes it first


@pytest.fixture(scope="module")
def hash_db(upstream: Upstream) -> Iterator[str]:
    upstream.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
    upstream.execute(f"CREATE DATABASE {DATABASE}")
    upstream.execute(f"DROP ROLE IF EXISTS {READER}; "
                     f"CREATE ROLE {READER} LOGIN PASSWORD '{READER_PASSWORD}'")
    dsn = upstream.dsn(dbname=DATABASE)
    asyncio.run(install_masking_functions(dsn, KEY))
    yield dsn
    upstream.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
    upstream.execute(f"DROP ROLE IF EXISTS {READER}")


def reader_dsn(upstream: Upstream) -> str:
    return upstream.dsn(user=READER, password=READER_PASSWORD, dbname=DATABASE)


def mask_hash(dsn: str, value: str) -> str:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT pgveil.mask_hash(%s)", [value]).fetchone()
    assert row is not None
    return str(row[0])


@pytest.mark.parametrize("value", ["123-45-6789", "", "Zoë Åström", "😀 emoji", "a" * 1000])
def test_mask_hash_equals_python_hmac_sha256(hash_db: str, value: str) -> None:
    assert mask_hash(hash_db, value) == hmac.new(KEY, value.encode(), hashlib.sha256).hexdigest()


def test_mask_hash_of_null_is_null(hash_db: str) -> None:
    with psycopg.connect(hash_db, autocommit=True) as conn:
        assert conn.execute("SELECT pgveil.mask_hash(NULL)").fetchone() == (None,)


def test_a_role_without_privileges_can_hash_but_cannot_read_the_key(hash_db: str, upstream: Upstream) -> None:
    dsn = reader_dsn(upstream)
    assert mask_hash(dsn, "x") == hmac.new(KEY, b"x", hashlib.sha256).hexdigest()
    with psycopg.connect(dsn, autocommit=True) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("SELECT * FROM pgveil.hash_key")


def test_the_key_is_not_in_the_function_definition_or_any_catalog_text(hash_db: str) -> None:
    inner, outer = hmac_pads(KEY)
    secrets = [KEY.hex(), inner.hex(), outer.hex()]
    with psycopg.connect(hash_db, autocommit=True) as conn:
        row = conn.execute("SELECT pg_get_functiondef('pgveil.mask_hash(text)'::regprocedure)").fetchone()
        assert row is not None
        definition = str(row[0])
        settings = conn.execute("SELECT string_agg(name || '=' || setting, ',') FROM pg_settings").fetchone()
        activity = conn.execute(
            "SELECT string_agg(coalesce(query, ''), ',') FROM pg_stat_activity").fetchone()
    assert "SECURITY DEFINER" in definition and "search_path" in definition
    for secret in secrets:
        assert secret not in definition
        assert secret not in str(settings) and secret not in str(activity)


def test_install_is_idempotent_and_rerunning_with_a_new_key_rotates_it(hash_db: str) -> None:
    asyncio.run(install_masking_functions(hash_db, KEY))
    assert mask_hash(hash_db, "v") == hmac.new(KEY, b"v", hashlib.sha256).hexdigest()
    try:
        asyncio.run(install_masking_functions(hash_db, LONG_KEY))
        assert mask_hash(hash_db, "v") == hmac.new(LONG_KEY, b"v", hashlib.sha256).hexdigest()
        with psycopg.connect(hash_db, autocommit=True) as conn:
            assert conn.execute("SELECT count(*) FROM pgveil.hash_key").fetchone() == (1,)
    finally:
        asyncio.run(install_masking_functions(hash_db, KEY))


def test_concurrent_installs_do_not_collide(upstream: Upstream) -> None:
    database = "policy_hash_concurrent"
    upstream.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
    upstream.execute(f"CREATE DATABASE {database}")
    dsn = upstream.dsn(dbname=database)

    async def install_twice() -> None:
        await asyncio.gather(install_masking_functions(dsn, KEY), install_masking_functions(dsn, KEY))

    try:
        asyncio.run(install_twice())
        assert mask_hash(dsn, "v") == hmac.new(KEY, b"v", hashlib.sha256).hexdigest()
    finally:
        upstream.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")


def test_a_schema_planted_by_another_role_never_receives_the_key(hash_db: str, upstream: Upstream) -> None:
    database = "policy_hash_planted"
    upstream.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
    upstream.execute(f"CREATE DATABASE {database}")
    upstream.execute(f"CREATE SCHEMA pgveil AUTHORIZATION {READER}", dbname=database)
    dsn = upstream.dsn(dbname=database)
    try:
        with pytest.raises(UpstreamSetupError) as raised:
            asyncio.run(install_masking_functions(dsn, KEY))
        assert "belongs to another role" in str(raised.value)
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert conn.execute("SELECT to_regclass('pgveil.hash_key')").fetchone() == (None,)
    finally:
        upstream.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")


def test_a_key_table_granted_to_other_roles_is_refused(hash_db: str) -> None:
    with psycopg.connect(hash_db, autocommit=True) as conn:
        conn.execute(f"GRANT SELECT ON pgveil.hash_key TO {READER}")
    try:
        with pytest.raises(UpstreamSetupError) as raised:
            asyncio.run(install_masking_functions(hash_db, LONG_KEY))
        assert "granted to other roles" in str(raised.value)
        assert mask_hash(hash_db, "v") == hmac.new(KEY, b"v", hashlib.sha256).hexdigest()  # unchanged
    finally:
        with psycopg.connect(hash_db, autocommit=True) as conn:
            conn.execute(f"REVOKE SELECT ON pgveil.hash_key FROM {READER}")
