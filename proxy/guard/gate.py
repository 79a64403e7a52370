"""Gate pass: PostgreSQL's own parser (pglast) decides how many statements there are and what they are."""

from __future__ import annotations

from pglast import parse_sql, parser

from proxy.guard.statement import GuardStatement
from proxy.guard.verdict import Refuse

_FEATURE_NOT_SUPPORTED = frozenset({"WITH CHECK OPTION not supported on recursive views"})
"""Grammar errors PostgreSQL raises with SQLSTATE 0A000 (besides `... is not yet implemented`)."""


def gate(sql: str) -> list[GuardStatement] | Refuse:
    """Split and parse `sql` exactly as PostgreSQL would; unparseable text is refused with the
    error PostgreSQL gives for it (nothing of the message is forwarded, as PostgreSQL parses a
    whole Query string before it runs any of its statements)."""
    if "\x00" in sql:
        return Refuse("unparseable", "the statement contains a NUL character; remove it")
    invalid = invalid_utf8(sql)
    if invalid is not None:
        return invalid
    try:
        raw_statements = parse_sql(sql)
    except parser.ParseError as exc:
        return syntax_error(sql, exc)
    except Exception as exc:  # libpg_query signals a few limits (nesting depth) with other errors
        return Refuse("unparseable", f"the statement cannot be analysed ({type(exc).__name__}); simplify it")
    statements: list[GuardStatement] = []
    for raw in raw_statements:
        if raw.stmt is None:
            continue
        start = raw.stmt_location or 0
        end = start + raw.stmt_len if raw.stmt_len else len(sql)
        statement = GuardStatement(sql=sql, start=start, end=end, node=raw.stmt)
        try:
            statement.fingerprint = parser.fingerprint(sql[start:end])
        except parser.ParseError:
            statement.fingerprint = ""
        statements.append(statement)
    return statements


def syntax_error(sql: str, exc: parser.ParseError) -> Refuse:
    """PostgreSQL's own error for text its grammar rejects: the message libpg_query gives (the
    same words as the server's), SQLSTATE 42601 (0A000 for the grammar's not-implemented
    features) and the 1-based character position PostgreSQL reports (the end of the text for
    `syntax error at end of input`). The audit records only the rule, never the message, which
    can quote a literal value."""
    message = exc.args[0] if exc.args and isinstance(exc.args[0], str) else "syntax error"
    location = exc.args[1] if len(exc.args) > 1 and isinstance(exc.args[1], int) else None
    position = location + 1 if location is not None else len(sql) + 1
    sqlstate = "42601"
    if message.endswith(" is not yet implemented") or message in _FEATURE_NOT_SUPPORTED:
        sqlstate = "0A000"
    return Refuse("unparseable", message, sqlstate=sqlstate, native=True, position=position)


def invalid_utf8(sql: str) -> Refuse | None:
    """PostgreSQL's 22021 for a statement whose bytes are not UTF8 (the relay decodes client bytes
    as UTF8 with surrogateescape, so each invalid byte is a lone surrogate here), else None."""
    if sql.isascii():
        return None
    try:
        sql.encode("utf-8")
        return None
    except UnicodeEncodeError:
        pass
    raw = sql.encode("utf-8", "surrogateescape")
    return invalid_byte_sequence(raw, "UTF8", "utf-8")


def invalid_byte_sequence(raw: bytes, encoding: str, codec: str) -> Refuse | None:
    """PostgreSQL's error for the first byte sequence of `raw` that is not valid in `encoding`
    (Python's `codec`): 22021 `invalid byte sequence for encoding "X": 0x.. 0x..` with as many
    bytes as the first byte announces, or 22P05 for a valid character that has no equivalent in
    UTF8 (single-byte encodings), as PostgreSQL prints them; None when `raw` decodes."""
    try:
        raw.decode(codec)
        return None
    except UnicodeDecodeError as exc:
        start = exc.start
    if encoding not in MULTIBYTE:
        shown = f"0x{raw[start]:02x}"
        return Refuse("invalid-encoding", f'character with byte sequence {shown} in encoding "{encoding}" '
                      'has no equivalent in encoding "UTF8"', sqlstate="22P05", native=True)
    length = MULTIBYTE[encoding](raw[start])
    shown = " ".join(f"0x{byte:02x}" for byte in raw[start : start + length])
    return Refuse("invalid-encoding", f'invalid byte sequence for encoding "{encoding}": {shown}',
                  sqlstate="22021", native=True)


def _utf8_length(first: int) -> int:
    """pg_utf_mblen: the length a UTF8 lead byte announces (1 for a byte that leads nothing)."""
    if first < 0x80:
        return 1
    if first & 0xE0 == 0xC0:
        return 2
    if first & 0xF0 == 0xE0:
        return 3
    if first & 0xF8 == 0xF0:
        return 4
    return 1


def _euc_length(first: int) -> int:
    """pg_euc_mblen (EUC_CN, EUC_KR): two bytes for a high lead byte."""
    return 2 if first >= 0x80 else 1


def _euc_jp_length(first: int) -> int:
    """pg_eucjp_mblen: SS2 (0x8e) two bytes, SS3 (0x8f) three, other high bytes two."""
    if first == 0x8F:
        return 3
    return 2 if first >= 0x80 else 1


MULTIBYTE = {"UTF8": _utf8_length, "EUC_JP": _euc_jp_length, "EUC_JIS_2004": _euc_jp_length,
             "EUC_CN": _euc_length, "EUC_KR": _euc_length}
"""The multibyte client encodings pgveil reads, with the character length their first byte announces."""
