-- Statements drivers and ORMs send on their own (connect, type introspection, pool reset).
-- psycopg 3 TypeInfo.fetch (register a type by name)
SELECT
    typname AS name, oid, typarray AS array_oid,
    oid::regtype::text AS regtype, typdelim AS delimiter
FROM pg_type t
WHERE t.oid = to_regtype($1)
ORDER BY t.oid;
-- psycopg 3 connection setup
SET client_encoding TO 'UTF8';
-- asyncpg pool reset (Connection.get_reset_query)
SELECT pg_advisory_unlock_all();
CLOSE ALL;
UNLISTEN *;
RESET ALL;
-- asyncpg jit toggle around introspection
SELECT
    current_setting('jit') AS cur,
    set_config('jit', 'off', false) AS new;
-- asyncpg jit restore
SELECT
    set_config('jit', $1, false);
-- pgjdbc connection setup
SET extra_float_digits = 3;
-- pgjdbc connection setup
SET application_name = 'PostgreSQL JDBC Driver';
-- pgjdbc TypeInfoCache.getSQLTypeQuery
SELECT typinput='pg_catalog.array_in'::regproc as is_array, typtype, typname, pg_type.oid   FROM pg_catalog.pg_type   LEFT JOIN (select ns.oid as nspoid, ns.nspname, r.r           from pg_namespace as ns           join ( select s.r, (current_schemas(false))[s.r] as nspname                    from generate_series(1, array_upper(current_schemas(false), 1)) as s(r) ) as r          using ( nspname )        ) as sp     ON sp.nspoid = typnamespace  WHERE pg_type.oid = $1  ORDER BY sp.r, pg_type.oid DESC;
-- pgjdbc TypeInfoCache.getPGType by oid
SELECT n.nspname = ANY(current_schemas(true)), n.nspname, t.typname FROM pg_catalog.pg_type t JOIN pg_catalog.pg_namespace n ON t.typnamespace = n.oid WHERE t.oid = $1;
-- pgjdbc PgConnection.getSchema
select current_schema();
-- pgjdbc transaction isolation
SHOW TRANSACTION ISOLATION LEVEL;
-- SQLAlchemy psycopg dialect on first connect
select pg_catalog.version();
-- SQLAlchemy psycopg dialect on first connect
select current_schema();
-- SQLAlchemy psycopg dialect on first connect
show standard_conforming_strings;
-- SQLAlchemy has_table
select pg_catalog.pg_class.relname
from pg_catalog.pg_class join pg_catalog.pg_namespace on pg_catalog.pg_namespace.oid = pg_catalog.pg_class.relnamespace
where pg_catalog.pg_class.relname = $1 and pg_catalog.pg_class.relkind = any (array['r', 'p', 'f', 'v', 'm'])
  and pg_catalog.pg_table_is_visible(pg_catalog.pg_class.oid) and pg_catalog.pg_namespace.nspname != 'pg_catalog';
-- Rails connection configuration
SET client_min_messages TO 'warning'; SET standard_conforming_strings = on; SET intervalstyle = iso_8601;
