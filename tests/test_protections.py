"""Every protection, run as SQL on a real PostgreSQL: exact outputs, kept types, NULLs, Unicode."""

from __future__ import annotations

import datetime
import hashlib
import hmac
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.policy.model import Constant, Email, Generalize, Hash, Partial, Protection, Redact
from proxy.policy.protections import ProtectionError, mask_expression
from proxy.upstream_setup import install_masking_functions
from tests.conftest import Upstream

DATABASE = "policy_protections"
KEY = b"protections-test-key-0123456789"

# column -> (format_type, value in row 1, value in row 2); row 3 is NULL everywhere.
COLUMNS: dict[str, tuple[str, Any, Any]] = {
    "card": ("text", "4111-9876-5432-1098", "Zoë Åström-Ørsted"),
    "name": ("character varying(100)", "Jane Doe", "李小龍"),
    "short": ("character(3)", "abc", "xy"),
    "email": ("text", "jane.doe@example.com", "élodie@exämple.fr"),
    "born": ("date", datetime.date(1984, 7, 23), datetime.date(2001, 12, 31)),
    "seen": ("timestamp with time zone", datetime.datetime(2024, 5, 17, 13, 45, tzinfo=datetime.UTC),
             datetime.datetime(1999, 12, 31, 23, 59, tzinfo=datetime.UTC)),
    "seen_local": ("timestamp(3) without time zone", datetime.datetime(2024, 5, 17, 13, 45, 1),
                   datetime.datetime(2000, 2, 29, 0, 0)),
    "age": ("integer", 37, -3),
    "big": ("bigint", 9_000_000_000_123, 5),
    "balance": ("numeric(10,2)", Decimal("123.45"), Decimal("-0.01")),
    "score": ("double precision", 7.9, 2.5),
    "code": ("character varying(3)", "ABC", "Z"),
    "flag": ("boolean", True, False),
    "tags": ("text[]", ["a", "b"], []),
}


@pytest.fixture(scope="module")
def masking_db(upstream: Upstream) -> Iterator[str]:
    upstream.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
    upstream.execute(f"CREATE DATABASE {DATABASE}")
    dsn = upstream.dsn(dbname=DATABASE)
    definitions = ", ".join(f"{name} {type_sql}" for name, (type_sql, _, _) in COLUMNS.items())
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE protected_values (id integer PRIMARY KEY, {definitions})")
        names = ", ".join(COLUMNS)
        placeholders = ", ".join(["%s"] * len(COLUMNS))
        for row_id, index in ((1, 1), (2, 2)):
            conn.execute(f"INSERT INTO protected_values (id, {names}) VALUES (%s, {placeholders})",
                         [row_id, *(spec[index] for spec in COLUMNS.values())])
        conn.execute("INSERT INTO protected_values (id) VALUES (3)")
    import asyncio

    asyncio.run(install_masking_functions(dsn, KEY))
    yield dsn
    upstream.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")


def masked(dsn: str, column: str, protection: Protection) -> tuple[list[Any], str]:
    """Masked values of rows 1, 2, 3 and the SQL type of the masked column."""
    expression = mask_expression(column, COLUMNS[column][0], protection)
    with psycopg.connect(dsn, autocommit=True, options="-c TimeZone=UTC") as conn:
        rows = conn.execute(
            f"SELECT {expression}, pg_typeof({expression})::text FROM protected_values ORDER BY id"
        ).fetchall()
    return [row[0] for row in rows], rows[0][1]


def hmac_hex(value: str) -> str:
    return hmac.new(KEY, value.encode("utf-8"), hashlib.sha256).hexdigest()


CASES: list[tuple[str, Protection, list[Any], str]] = [
    ("card", Partial(keep_last=4), ["***************1098", "*" * 13 + "sted", None], "text"),
    ("card", Partial(keep_first=2, keep_last=1, mask_char="•"), ["41" + "•" * 16 + "8",
                                                                 "Zo" + "•" * 14 + "d", None], "text"),
    ("name", Partial(keep_first=1), ["J*******", "李**", None], "text"),
    ("short", Partial(keep_first=2, keep_last=2), ["***", "**", None], "text"),
    ("card", Partial(mask_char="'"), ["'" * 19, "'" * 17, None], "text"),
    ("card", Partial(keep_last=2, mask_char="\\"), ["\\" * 17 + "98", "\\" * 15 + "ed", None], "text"),
    ("age", Partial(keep_first=1), ["3*", "-*", None], "text"),
    ("email", Email(), ["j***@example.com", "é***@exämple.fr", None], "text"),
    ("card", Email(), ["4***", "Z***", None], "text"),
    ("card", Hash(), [hmac_hex("4111-9876-5432-1098"), hmac_hex("Zoë Åström-Ørsted"), None], "text"),
    ("age", Hash(), [hmac_hex("37"), hmac_hex("-3"), None], "text"),
    ("born", Generalize(unit="year"), [datetime.date(1984, 1, 1), datetime.date(2001, 1, 1), None], "date"),
    ("born", Generalize(unit="month"), [datetime.date(1984, 7, 1), datetime.date(2001, 12, 1), None], "date"),
    ("seen", Generalize(unit="month"), [datetime.datetime(2024, 5, 1, tzinfo=datetime.UTC),
                                        datetime.datetime(1999, 12, 1, tzinfo=datetime.UTC), None],
     "timestamp with time zone"),
    ("seen_local", Generalize(unit="year"),
     [datetime.datetime(2024, 1, 1), datetime.datetime(2000, 1, 1), None], "timestamp without time zone"),
    ("age", Generalize(bucket=10), [30, -10, None], "integer"),
    ("big", Generalize(bucket=1000), [9_000_000_000_000, 0, None], "bigint"),
    ("balance", Generalize(bucket=0.5), [Decimal("123.00"), Decimal("-0.50"), None], "numeric"),
    ("balance", Generalize(bucket=100), [Decimal("100.00"), Decimal("-100.00"), None], "numeric"),
    ("score", Generalize(bucket=2.5), [7.5, 2.5, None], "double precision"),
    ("card", Redact(), [None, None, None], "text"),
    ("born", Redact(), [None, None, None], "date"),
    ("balance", Redact(), [None, None, None], "numeric"),
    ("tags", Redact(), [None, None, None], "text[]"),
    ("card", Constant("REDACTED"), ["REDACTED", "REDACTED", None], "text"),
    ("name", Constant("O'Brien"), ["O'Brien", "O'Brien", None], "character varying"),
    ("code", Constant("REDACTED"), ["REDACTED", "REDACTED", None], "text"),
    ("code", Constant("N/A"), ["N/A", "N/A", None], "character varying"),
    ("age", Constant(0), [0, 0, None], "integer"),
    ("age", Constant(2**40), ["1099511627776", "1099511627776", None], "text"),
    ("age", Constant("n/a"), ["n/a", "n/a", None], "text"),
    ("balance", Constant(9.99), [Decimal("9.99"), Decimal("9.99"), None], "numeric"),
    ("balance", Constant(0.001), ["0.001", "0.001", None], "text"),
    ("born", Constant("1970-01-01"), [datetime.date(1970, 1, 1)] * 2 + [None], "date"),
    ("born", Constant("unknown"), ["unknown", "unknown", None], "text"),
    ("flag", Constant(False), [False, False, None], "boolean"),
    ("flag", Constant("hidden"), ["hidden", "hidden", None], "text"),
    ("score", Constant(None), [None, None, None], "double precision"),
]


@pytest.mark.parametrize(("column", "protection", "expected", "type_name"), CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_protection_output_and_type(masking_db: str, column: str, protection: Protection,
                                    expected: list[Any], type_name: str) -> None:
    values, masked_type = masked(masking_db, column, protection)
    assert values == expected
    assert masked_type == type_name


def test_partial_keeps_the_length_in_characters_for_unicode(masking_db: str) -> None:
    values, _ = masked(masking_db, "card", Partial(keep_first=1, keep_last=1))
    assert [len(value) for value in values[:2]] == [19, len("Zoë Åström-Ørsted")]
    assert values[1] == "Z" + "*" * 15 + "d"


def test_hash_is_deterministic_so_grouping_still_works(masking_db: str, upstream: Upstream) -> None:
    expression = mask_expression("v", "text", Hash())
    with psycopg.connect(masking_db, autocommit=True) as conn:
        rows = conn.execute(
            f"SELECT {expression}, count(*) FROM (VALUES ('a'), ('b'), ('a'), ('a')) AS t(v) "
            "GROUP BY 1 ORDER BY 2"
        ).fetchall()
    assert rows == [(hmac_hex("b"), 1), (hmac_hex("a"), 3)]


def test_hash_sql_text_calls_the_installed_function_and_holds_no_key() -> None:
    expression = mask_expression("ssn", "text", Hash())
    assert expression == "pgveil.mask_hash((ssn)::text)"


def test_masking_works_on_qualified_and_quoted_column_references(masking_db: str) -> None:
    expression = mask_expression('p."email"', "text", Email())
    with psycopg.connect(masking_db, autocommit=True) as conn:
        value = conn.execute(f"SELECT {expression} FROM protected_values AS p WHERE id = 1").fetchone()
    assert value == ("j***@example.com",)


def test_literals_read_the_same_without_standard_conforming_strings(masking_db: str) -> None:
    expression = mask_expression("card", "text", Constant("a\\b'c"))
    with psycopg.connect(masking_db, autocommit=True) as conn:
        conn.execute("SET standard_conforming_strings = off")
        off = conn.execute(f"SELECT {expression} FROM protected_values WHERE id = 1").fetchone()
        conn.execute("SET standard_conforming_strings = on")
        on = conn.execute(f"SELECT {expression} FROM protected_values WHERE id = 1").fetchone()
    assert off == on == ("a\\b'c",)


@pytest.mark.parametrize(("type_sql", "protection", "message"), [
    ("integer", Generalize(unit="year"), "needs a date or timestamp column, not integer"),
    ("text", Generalize(unit="month"), "needs a date or timestamp column, not text"),
    ("time without time zone", Generalize(unit="year"), "needs a date or timestamp column"),
    ("date[]", Generalize(unit="year"), "needs a date or timestamp column, not date[]"),
    ("text", Generalize(bucket=10), "needs a numeric column, not text"),
    ("date", Generalize(bucket=10), "needs a numeric column, not date"),
    ("integer", Generalize(bucket=2.5), "needs a whole-number bucket"),
    ("integer", Email(), "'email' needs a text column, not integer"),
    ("text[]", Email(), "'email' needs a text column, not text[]"),
])
def test_protection_that_does_not_fit_the_type_is_refused(type_sql: str, protection: Protection,
                                                          message: str) -> None:
    with pytest.raises(ProtectionError) as raised:
        mask_expression("c", type_sql, protection)
    assert message in str(raised.value)


def partial_reference(value: str, keep_first: int, keep_last: int, mask_char: str) -> str:
    hidden = len(value) - keep_first - keep_last
    if hidden < 0 or len(value) <= keep_first + keep_last:
        return mask_char * len(value)
    return value[:keep_first] + mask_char * hidden + value[len(value) - keep_last:]


def email_reference(value: str) -> str:
    if "@" not in value:
        return value[:1] + "***"
    return value.split("@")[0][:1] + "***@" + value.split("@")[-1]


TEXTS = st.lists(
    st.text(alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=30),
    max_size=25)


@settings(max_examples=40, deadline=None)
@given(values=TEXTS, keep_first=st.integers(0, 4), keep_last=st.integers(0, 4),
       mask_char=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)))
def test_text_protections_match_their_definition_on_any_unicode_text(
        masking_db: str, values: list[str], keep_first: int, keep_last: int, mask_char: str) -> None:
    partial = mask_expression("v", "text", Partial(keep_first, keep_last, mask_char))
    email = mask_expression("v", "text", Email())
    hashed = mask_expression("v", "text", Hash())
    with psycopg.connect(masking_db, autocommit=True) as conn:
        rows = conn.execute(
            # the generated SQL may contain '%' (mask_char); escape it for psycopg's placeholders
            f"SELECT {partial}, {email}, {hashed} ".replace("%", "%%")
            + "FROM unnest(%s::text[]) WITH ORDINALITY AS t(v, n) "
            "ORDER BY n", [values]).fetchall()
    assert rows == [(partial_reference(v, keep_first, keep_last, mask_char), email_reference(v), hmac_hex(v))
                    for v in values]


def test_user_functions_named_like_builtins_cannot_stand_in_for_them(masking_db: str) -> None:
    with psycopg.connect(masking_db, autocommit=True) as conn:
        conn.execute("CREATE OR REPLACE FUNCTION public.left(text, integer) RETURNS text "
                     "LANGUAGE sql AS $$ SELECT 'HIJACKED' $$")
        conn.execute("SET search_path = public, pg_catalog")
        row = conn.execute(f"SELECT {mask_expression('card', 'text', Partial(keep_first=2))} "
                           "FROM protected_values WHERE id = 1").fetchone()
        conn.execute("DROP FUNCTION public.left(text, integer)")
    assert row == ("41" + "*" * 17,)


@pytest.mark.parametrize("settings_sql", [
    "SET DateStyle = 'ISO, MDY'", "SET DateStyle = 'SQL, DMY'", "SET DateStyle = 'German'",
    "SET TimeZone = 'Pacific/Kiritimati'", "SET extra_float_digits = 3",
])
def test_partial_and_hash_of_non_text_values_do_not_depend_on_session_settings(
        masking_db: str, settings_sql: str) -> None:
    expressions = [
        mask_expression("d", "date", Partial(keep_first=4)),
        mask_expression("d", "date", Hash()),
        mask_expression("t", "timestamp with time zone", Hash()),
        mask_expression("f", "double precision", Partial(keep_last=2)),
    ]
    query = (f"SELECT {', '.join(expressions)} FROM (VALUES (DATE '1987-06-23', "
             "TIMESTAMPTZ '2024-03-29 17:42:00+00', 0.1::float8)) AS v(d, t, f)")
    with psycopg.connect(masking_db, autocommit=True) as conn:
        conn.execute(settings_sql)
        row = conn.execute(query).fetchone()
    assert row == ("1987******", hmac_hex("1987-06-23"), hmac_hex("2024-03-29 17:42:00.000000+00"), "*.1")


def test_generalized_timestamptz_is_truncated_in_utc_whatever_the_session_time_zone(masking_db: str) -> None:
    expression = mask_expression("t", "timestamp with time zone", Generalize(unit="month"))
    with psycopg.connect(masking_db, autocommit=True) as conn:
        conn.execute("SET TimeZone = '-150'")
        row = conn.execute(f"SELECT {expression} = TIMESTAMPTZ '2024-03-01 00:00:00+00' "
                           "FROM (VALUES (TIMESTAMPTZ '2024-03-31 23:00:00+00')) AS v(t)").fetchone()
    assert row == (True,)


@pytest.mark.parametrize("column_type", ["interval", "money", "date[]", "timestamp without time zone[]"])
def test_partial_and_hash_refuse_types_whose_text_depends_on_settings(column_type: str) -> None:
    for protection in (Partial(keep_first=1), Hash()):
        with pytest.raises(ProtectionError, match="session setting"):
            mask_expression("v", column_type, protection)
