"""Turns a column protection into the PostgreSQL expression that masks the column's values."""

from __future__ import annotations

import datetime
import json
import re
import uuid
from decimal import Decimal

from proxy.policy.model import Constant, Email, Generalize, Hash, Partial, Protection, Redact

MASK_HASH_FUNCTION = "pgveil.mask_hash"

_TEXT_TYPES = frozenset({"text", "character varying", "character", "name", "citext", "bpchar", "varchar"})
_INTEGER_TYPES = frozenset({"smallint", "integer", "bigint"})
_FLOAT_TYPES = frozenset({"real", "double precision"})
_DATETIME_TYPES = frozenset({
    "date", "timestamp without time zone", "timestamp with time zone",
})
_INTEGER_RANGES = {
    "smallint": (-(2**15), 2**15 - 1),
    "integer": (-(2**31), 2**31 - 1),
    "bigint": (-(2**63), 2**63 - 1),
}
_TYPMOD = re.compile(r"\(([^)]*)\)")


class ProtectionError(ValueError):
    """The protection does not fit the column's type (say which and what would)."""


def mask_expression(column_sql: str, column_type: str, protection: Protection) -> str:
    """SQL expression (no alias) that yields the masked value of `column_sql`.

    `column_type` is `format_type()` of the column (for a domain: of its base type,
    `Column.mask_type_sql`). NULL stays NULL for every protection. Functions are called
    schema-qualified, so user functions of the same name cannot stand in for them."""
    family, typmods, is_array = _type_family(column_type)
    value = f"({column_sql})"
    if isinstance(protection, Redact):
        return f"NULL::{column_type}"
    if isinstance(protection, Hash):
        return f"{MASK_HASH_FUNCTION}({_stable_text(value, column_type, family, is_array)})"
    if isinstance(protection, Partial):
        return _partial(value if family == "text" and not is_array
                        else _stable_text(value, column_type, family, is_array), protection)
    if isinstance(protection, Email):
        if family != "text" or is_array:
            raise ProtectionError(f"'email' needs a text column, not {column_type} (use partial or hash)")
        return _email(value)
    if isinstance(protection, Generalize):
        return _generalize(value, column_type, family, is_array, protection)
    if isinstance(protection, Constant):
        return _constant(value, column_type, family, typmods, is_array, protection.value)
    raise ProtectionError(f"unknown protection {protection!r}")


def sql_text_literal(text: str) -> str:
    """A string literal that PostgreSQL reads the same whatever standard_conforming_strings says."""
    quoted = text.replace("'", "''")
    if "\\" in text:
        return "E'" + quoted.replace("\\", "\\\\") + "'"
    return f"'{quoted}'"


def _type_family(column_type: str) -> tuple[str, tuple[str, ...], bool]:
    """('text'|'integer'|..., typmods, is_array) of a format_type() string."""
    is_array = column_type.endswith("[]")
    base = column_type[:-2] if is_array else column_type
    match = _TYPMOD.search(base)
    typmods = tuple(part.strip() for part in match.group(1).split(",")) if match else ()
    name = _TYPMOD.sub("", base).strip().removeprefix("public.").removeprefix("pg_catalog.")
    name = " ".join(name.split())
    if name in _TEXT_TYPES:
        return "text", typmods, is_array
    if name in _INTEGER_TYPES:
        return name, typmods, is_array
    if name == "numeric":
        return "numeric", typmods, is_array
    if name in _FLOAT_TYPES:
        return "float", typmods, is_array
    if name in _DATETIME_TYPES:
        return ("date" if name == "date" else "timestamp"), typmods, is_array
    return name, typmods, is_array


# Types whose text output no session setting changes (DateStyle, TimeZone, IntervalStyle,
# extra_float_digits, lc_monetary, bytea_output all change the others').
_STABLE_TEXT_FAMILIES = frozenset({
    "text", "smallint", "integer", "bigint", "numeric", "boolean", "uuid", "json", "jsonb",
    "inet", "cidr", "macaddr", "macaddr8", "time without time zone", "time with time zone",
})


def _stable_text(value: str, column_type: str, family: str, is_array: bool) -> str:
    """The value as text, spelled the same in every session: partial and hash work on this text,
    so a setting that changed it would change what is kept visible (DateStyle shows other digits
    of a date) or make equal values hash differently."""
    if family in _STABLE_TEXT_FAMILIES:
        return f"{value}::text"
    if not is_array:
        if family == "float":
            return f"{value}::numeric::text"
        if family == "date":
            return f"pg_catalog.to_char({value}::timestamp, 'YYYY-MM-DD')"
        if column_type.startswith("timestamp with"):
            return (f"pg_catalog.to_char({value} AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') "
                    f"{CONCAT} '+00'::text")
        if family == "timestamp":
            return f"pg_catalog.to_char({value}, 'YYYY-MM-DD HH24:MI:SS.US')"
        if family == "bytea":
            return f"pg_catalog.encode({value}, 'hex')"
    raise ProtectionError(
        f"partial and hash need a value whose text no session setting changes; {column_type} "
        "depends on DateStyle, TimeZone, IntervalStyle or similar (use redact, constant or generalize)"
    )


# Operators are written OPERATOR(pg_catalog.x): a user-defined operator with closer argument
# types (say public./(numeric, integer)) would otherwise be chosen and receive the raw value.
LE = "OPERATOR(pg_catalog.<=)"
EQ = "OPERATOR(pg_catalog.=)"
MINUS = "OPERATOR(pg_catalog.-)"
CONCAT = "OPERATOR(pg_catalog.||)"
DIV = "OPERATOR(pg_catalog./)"
MUL = "OPERATOR(pg_catalog.*)"


def _partial(value: str, protection: Partial) -> str:
    keep = protection.keep_first + protection.keep_last
    mask = sql_text_literal(protection.mask_char)
    length = f"pg_catalog.char_length({value})"
    # A value no longer than what would be kept is masked whole: showing it all is not masking.
    return (
        f"CASE WHEN {length} {LE} {keep} THEN pg_catalog.repeat({mask}, {length}) "
        f"ELSE pg_catalog.left({value}, {protection.keep_first}) "
        f"{CONCAT} pg_catalog.repeat({mask}, {length} {MINUS} {keep}) "
        f"{CONCAT} pg_catalog.right({value}, {protection.keep_last}) END"
    )


def _floor_to_bucket(value: str, step: str, column_type: str) -> str:
    return f"(pg_catalog.floor({value} {DIV} {step}) {MUL} {step})::{column_type}"


def _email(value: str) -> str:
    text = f"{value}::text"
    return (
        f"CASE WHEN pg_catalog.strpos({text}, '@') {EQ} 0 "
        f"THEN pg_catalog.left({text}, 1) {CONCAT} '***'::text "
        f"ELSE pg_catalog.left(pg_catalog.split_part({text}, '@', 1), 1) {CONCAT} '***@'::text "
        f"{CONCAT} pg_catalog.split_part({text}, '@', -1) END"
    )


def _generalize(value: str, column_type: str, family: str, is_array: bool, protection: Generalize) -> str:
    if protection.unit is not None:
        if family == "date" and not is_array:
            return f"pg_catalog.date_trunc('{protection.unit}', {value}::timestamp)::date"
        if family == "timestamp" and not is_array and column_type.startswith("timestamp with"):
            # truncated in UTC: in the session's time zone, SET timezone would move the boundary
            return f"pg_catalog.date_trunc('{protection.unit}', {value}, 'UTC')::{column_type}"
        if family == "timestamp" and not is_array:
            return f"pg_catalog.date_trunc('{protection.unit}', {value})::{column_type}"
        raise ProtectionError(
            f"'generalize: {protection.unit}' needs a date or timestamp column, not {column_type} "
            "(use generalize: {bucket: N} for numbers, or redact)"
        )
    bucket = protection.bucket
    if bucket is None or bucket <= 0:
        raise ProtectionError("'generalize' needs year, month or {bucket: N} with N > 0")
    step = _number_literal(bucket)
    if family in _INTEGER_TYPES and not is_array:
        if Decimal(step) != Decimal(step).to_integral_value():
            raise ProtectionError(
                f"'generalize: {{bucket: {step}}}' on an {column_type} column needs a whole-number bucket"
            )
        return _floor_to_bucket(f"{value}::numeric", f"{step}::numeric", column_type)
    if family == "numeric" and not is_array:
        return _floor_to_bucket(f"{value}::numeric", f"{step}::numeric", column_type)
    if family == "float" and not is_array:
        step = f"{step}::double precision"
        return _floor_to_bucket(value, step, column_type)
    raise ProtectionError(
        f"'generalize: {{bucket: {step}}}' needs a numeric column, not {column_type} "
        "(use generalize: year/month for dates, or redact)"
    )


def _number_literal(number: int | float) -> str:
    if isinstance(number, int):
        return str(number)
    text = format(Decimal(repr(number)), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def _constant(value: str, column_type: str, family: str, typmods: tuple[str, ...], is_array: bool,
              constant: str | int | float | bool | None) -> str:
    if constant is None:
        return f"NULL::{column_type}"
    literal = _typed_literal(column_type, family, typmods, is_array, constant)
    if literal is None:
        literal = f"{sql_text_literal(_constant_text(constant))}::text"
        return f"CASE WHEN {value} IS NULL THEN NULL::text ELSE {literal} END"
    return f"CASE WHEN {value} IS NULL THEN NULL::{column_type} ELSE {literal} END"


def _constant_text(constant: str | int | float | bool) -> str:
    if isinstance(constant, bool):
        return "true" if constant else "false"
    if isinstance(constant, float):
        return _number_literal(constant)
    return str(constant)


def _typed_literal(column_type: str, family: str, typmods: tuple[str, ...], is_array: bool,
                   constant: str | int | float | bool) -> str | None:
    """The constant as a literal of the column's type, or None when it does not fit that type."""
    if is_array:
        return None
    if family == "boolean":
        return f"{_constant_text(constant)}::boolean" if isinstance(constant, bool) else None
    if isinstance(constant, bool):
        return None
    if family in _INTEGER_RANGES:
        low, high = _INTEGER_RANGES[family]
        if isinstance(constant, int) and low <= constant <= high:
            return f"{constant}::{column_type}"
        return None
    if family in ("numeric", "float"):
        if not isinstance(constant, int | float):
            return None
        if family == "numeric" and typmods and not _fits_numeric(constant, typmods):
            return None
        return f"{sql_text_literal(_constant_text(constant))}::{column_type}"
    if not isinstance(constant, str):
        return f"{sql_text_literal(_constant_text(constant))}::{column_type}" if family == "text" else None
    if family == "text":
        if typmods and typmods[0].isdigit() and len(constant) > int(typmods[0]):
            return None
        return f"{sql_text_literal(constant)}::{column_type}"
    if _parses_as(family, constant):
        return f"{sql_text_literal(constant)}::{column_type}"
    return None


def _fits_numeric(constant: int | float, typmods: tuple[str, ...]) -> bool:
    """Whether numeric(precision, scale) holds the constant exactly (no rounding, no overflow)."""
    try:
        precision = int(typmods[0])
        scale = int(typmods[1]) if len(typmods) > 1 else 0
    except ValueError:
        return False
    number = Decimal(repr(constant)) if isinstance(constant, float) else Decimal(constant)
    exponent = number.as_tuple().exponent
    if not isinstance(exponent, int) or max(0, -exponent) > scale:
        return False
    whole = abs(int(number))
    return (len(str(whole)) if whole else 0) <= precision - scale


def _parses_as(family: str, constant: str) -> bool:
    """Whether a text constant is surely a valid input for these types (others fall back to text)."""
    try:
        if family == "date":
            datetime.date.fromisoformat(constant)
        elif family == "timestamp":
            datetime.datetime.fromisoformat(constant)
        elif family == "uuid":
            uuid.UUID(constant)
        elif family in ("json", "jsonb"):
            json.loads(constant)
        else:
            return False
    except ValueError:
        return False
    return True
