"""Installs what masking needs in the upstream database: the keyed hash function and its secret."""

from __future__ import annotations

import hashlib

import asyncpg

_BLOCK_SIZE = 64  # SHA-256 block size in bytes (RFC 2104)

_INSTALL = """
CREATE SCHEMA IF NOT EXISTS pgveil;
REVOKE ALL ON SCHEMA pgveil FROM PUBLIC;
GRANT USAGE ON SCHEMA pgveil TO PUBLIC;
CREATE TABLE IF NOT EXISTS pgveil.hash_key (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    inner_pad bytea NOT NULL,
    outer_pad bytea NOT NULL
);
REVOKE ALL ON TABLE pgveil.hash_key FROM PUBLIC;
-- PL/pgSQL, so that the value never enters a query: PostgreSQL 18 plans a SQL function's query
-- with its arguments as constants (custom plans), and debug_print_plan or auto_explain would show
-- them; here the only query reads the key, and RETURN's expression runs on a generic plan.
CREATE OR REPLACE FUNCTION pgveil.mask_hash(value text) RETURNS text
    LANGUAGE plpgsql STABLE STRICT SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $body$
DECLARE
    ipad bytea;
    opad bytea;
BEGIN
    SELECT k.inner_pad, k.outer_pad INTO ipad, opad FROM pgveil.hash_key AS k;
    RETURN encode(sha256(opad || sha256(ipad || convert_to(value, 'UTF8'))), 'hex');
END
$body$;
REVOKE ALL ON FUNCTION pgveil.mask_hash(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgveil.mask_hash(text) TO PUBLIC;
"""

# The key goes only into objects this session's user owns and nobody else was granted: a schema
# or table planted beforehand by another role would otherwise receive the secret.
_OWNERSHIP = """
SELECT
  (SELECT n.nspowner FROM pg_catalog.pg_namespace n WHERE n.nspname = 'pgveil') = r.oid,
  (SELECT c.relowner FROM pg_catalog.pg_class c WHERE c.oid = 'pgveil.hash_key'::regclass) = r.oid,
  (SELECT p.proowner FROM pg_catalog.pg_proc p WHERE p.oid = 'pgveil.mask_hash(text)'::regprocedure) = r.oid,
  (SELECT count(*) FROM pg_catalog.pg_class c, pg_catalog.aclexplode(c.relacl) a
   WHERE c.oid = 'pgveil.hash_key'::regclass AND a.grantee <> c.relowner) = 0
FROM pg_catalog.pg_roles r WHERE r.rolname = current_user
"""

_STORE_KEY = """
INSERT INTO pgveil.hash_key (singleton, inner_pad, outer_pad) VALUES (true, $1, $2)
ON CONFLICT (singleton) DO UPDATE SET inner_pad = EXCLUDED.inner_pad, outer_pad = EXCLUDED.outer_pad
"""


class UpstreamSetupError(RuntimeError):
    """pgveil's objects in the upstream cannot be trusted with the key (say why and what to do)."""


def hmac_pads(key: bytes) -> tuple[bytes, bytes]:
    """(key XOR ipad, key XOR opad) of HMAC-SHA256, so SQL needs only sha256()."""
    if len(key) > _BLOCK_SIZE:
        key = hashlib.sha256(key).digest()
    key = key.ljust(_BLOCK_SIZE, b"\x00")
    return bytes(b ^ 0x36 for b in key), bytes(b ^ 0x5C for b in key)


async def install_masking_functions(dsn: str, hash_key: bytes, database: str | None = None) -> None:
    """Create or update schema `pgveil`, its key table and `pgveil.mask_hash(text)`; idempotent.

    Running it again with another key rotates the key. The key travels only as bound parameters,
    so it is never part of any SQL text the server could show. Raises UpstreamSetupError, before
    the key is sent, when the objects belong to another role or the key table is granted to one.
    `database` overrides the DSN's: every database whose columns are hashed needs the function."""
    inner_pad, outer_pad = hmac_pads(hash_key)
    connection = await asyncpg.connect(dsn, database=database)
    try:
        async with connection.transaction():
            # Concurrent installers (several pgveil processes) would race on CREATE ... IF NOT EXISTS.
            await connection.execute("SELECT pg_advisory_xact_lock(hashtext('pgveil.install'))")
            await connection.execute(_INSTALL)
            owns_schema, owns_table, owns_function, private = await connection.fetchrow(_OWNERSHIP)
            if not (owns_schema and owns_table and owns_function):
                raise UpstreamSetupError(
                    "schema pgveil (or its hash_key table or mask_hash function) belongs to another role; "
                    "pgveil will not store its hash key there (drop schema pgveil, or use its owner's DSN)")
            if not private:
                raise UpstreamSetupError(
                    "table pgveil.hash_key is granted to other roles; pgveil will not store its hash key "
                    "there (REVOKE those grants or drop the table)")
            await connection.execute(_STORE_KEY, inner_pad, outer_pad)
    finally:
        await connection.close()


_WATCH_INSTALL = """
CREATE SCHEMA IF NOT EXISTS pgveil;
REVOKE ALL ON SCHEMA pgveil FROM PUBLIC;
GRANT USAGE ON SCHEMA pgveil TO PUBLIC;
-- one row per DDL: inserts never wait for each other (a single counter row would serialise
-- concurrent DDL transactions and could deadlock them); the trigger trims old rows now and then
CREATE TABLE IF NOT EXISTS pgveil.ddl_log (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY);
REVOKE ALL ON TABLE pgveil.ddl_log FROM PUBLIC;
CREATE OR REPLACE FUNCTION pgveil.note_catalog_change() RETURNS event_trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $body$
DECLARE
    logged bigint;
BEGIN
    -- temporary objects (apps create them all the time) are invisible to other sessions
    IF TG_EVENT = 'ddl_command_end' AND NOT EXISTS (
            SELECT 1 FROM pg_event_trigger_ddl_commands() c
            WHERE c.schema_name IS NULL OR c.schema_name !~ '^pg_temp') THEN
        RETURN;
    END IF;
    IF TG_EVENT = 'sql_drop' AND NOT EXISTS (
            SELECT 1 FROM pg_event_trigger_dropped_objects() o WHERE NOT o.is_temporary) THEN
        RETURN;
    END IF;
    INSERT INTO pgveil.ddl_log DEFAULT VALUES RETURNING id INTO logged;
    IF logged % 1000 = 0 THEN
        DELETE FROM pgveil.ddl_log WHERE id < logged - 100;
    END IF;
EXCEPTION WHEN OTHERS THEN
    NULL;  -- never make a DDL fail; pgveil then sees no change and its catalog may go stale
END
$body$;
REVOKE ALL ON FUNCTION pgveil.note_catalog_change() FROM PUBLIC;
"""
_WATCH_OWNERSHIP = """
SELECT (SELECT n.nspowner FROM pg_catalog.pg_namespace n WHERE n.nspname = 'pgveil') = r.oid
   AND (SELECT c.relowner FROM pg_catalog.pg_class c WHERE c.oid = 'pgveil.ddl_log'::regclass) = r.oid
   AND (SELECT p.proowner FROM pg_catalog.pg_proc p
        WHERE p.oid = 'pgveil.note_catalog_change()'::regprocedure) = r.oid
FROM pg_catalog.pg_roles r WHERE r.rolname = current_user
"""
_WATCH_TRIGGERS = """
SELECT e.event FROM (VALUES ('pgveil_catalog_ddl', 'ddl_command_end'),
                            ('pgveil_catalog_drop', 'sql_drop')) AS e(name, event)
WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_event_trigger t WHERE t.evtname = e.name)
"""


async def install_catalog_watch(dsn: str, database: str | None = None) -> bool:
    """Install the event triggers that log DDL in `pgveil.ddl_log` (see
    proxy.catalog_watch); idempotent. False, with nothing changed, when the DSN's role may not
    (event triggers need a superuser): pgveil then fingerprints the catalogs instead. Raises
    UpstreamSetupError when schema pgveil or its objects belong to another role."""
    connection = await asyncpg.connect(dsn, database=database)
    try:
        superuser = "SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user"
        if not await connection.fetchval(superuser):
            return False
        async with connection.transaction():
            await connection.execute("SELECT pg_advisory_xact_lock(hashtext('pgveil.install'))")
            await connection.execute(_WATCH_INSTALL)
            if not await connection.fetchval(_WATCH_OWNERSHIP):
                raise UpstreamSetupError(
                    "schema pgveil (or its ddl_log table or note_catalog_change function) belongs to another "
                    "role; pgveil will not trust its DDL log (drop schema pgveil, or use its owner's DSN)")
            for (event,) in await connection.fetch(_WATCH_TRIGGERS):
                name = "pgveil_catalog_ddl" if event == "ddl_command_end" else "pgveil_catalog_drop"
                await connection.execute(f"CREATE EVENT TRIGGER {name} ON {event} "
                                         "EXECUTE FUNCTION pgveil.note_catalog_change()")
        return True
    finally:
        await connection.close()
