"""Client encodings: how a statement sent in the session's client_encoding is read as PostgreSQL reads it.

The relay hands the policy each statement decoded as UTF8 (invalid bytes kept as lone surrogates,
so the bytes survive exactly). In a session whose client_encoding is another encoding, the
statement is turned back into the client's bytes, decoded with the Python codec of that encoding,
judged, and a rewrite encoded back, so PostgreSQL (which converts the client's bytes to its own
UTF8 before it parses them) reads what pgveil judged.

Every encoding read here is ASCII-safe: a byte below 0x80 is always that ASCII character, and
every byte of a multibyte character is 0x80 or above. So quotes, backslashes, operators and
keywords sit in the same places whichever mapping table reads the other bytes, and a difference
between Python's table and PostgreSQL's can change only which non-ASCII letter a byte is (in a
literal or an identifier), never where a token ends. `decode_statement` checks this for every
statement. The client-only encodings whose second bytes can be ASCII (SJIS, SHIFT_JIS_2004, BIG5,
GBK, UHC, GB18030, JOHAB: `\\` or a quote inside a character, the tricks behind CVE-2006-2313)
are refused for roles with masked data, as are EUC_TW and MULE_INTERNAL, for which Python has
no codec.
"""

from __future__ import annotations

from proxy.guard.gate import invalid_byte_sequence
from proxy.guard.verdict import Refuse

CODECS: dict[str, str] = {
    "UTF8": "utf-8", "SQL_ASCII": "utf-8",  # SQL_ASCII: PostgreSQL checks the bytes as UTF8
    "LATIN1": "iso8859_1", "LATIN2": "iso8859_2", "LATIN3": "iso8859_3", "LATIN4": "iso8859_4",
    "LATIN5": "iso8859_9", "LATIN6": "iso8859_10", "LATIN7": "iso8859_13", "LATIN8": "iso8859_14",
    "LATIN9": "iso8859_15", "LATIN10": "iso8859_16",
    "ISO_8859_5": "iso8859_5", "ISO_8859_6": "iso8859_6", "ISO_8859_7": "iso8859_7",
    "ISO_8859_8": "iso8859_8",
    "WIN866": "cp866", "WIN874": "cp874", "WIN1250": "cp1250", "WIN1251": "cp1251",
    "WIN1252": "cp1252", "WIN1253": "cp1253", "WIN1254": "cp1254", "WIN1255": "cp1255",
    "WIN1256": "cp1256", "WIN1257": "cp1257", "WIN1258": "cp1258",
    "KOI8R": "koi8_r", "KOI8U": "koi8_u",
    "EUC_JP": "euc_jp", "EUC_JIS_2004": "euc_jis_2004", "EUC_CN": "gb2312", "EUC_KR": "euc_kr",
}
"""PostgreSQL's name of each client encoding pgveil reads -> Python's codec for it."""

_ALIASES: dict[str, str] = {  # PostgreSQL's other names for them (pg_encname_tbl)
    "unicode": "UTF8", "iso88591": "LATIN1", "iso88592": "LATIN2", "iso88593": "LATIN3",
    "iso88594": "LATIN4", "iso88599": "LATIN5", "iso885910": "LATIN6", "iso885913": "LATIN7",
    "iso885914": "LATIN8", "iso885915": "LATIN9", "iso885916": "LATIN10", "iso88595": "ISO_8859_5",
    "iso88596": "ISO_8859_6", "iso88597": "ISO_8859_7", "iso88598": "ISO_8859_8", "alt": "WIN866",
    "win": "WIN1251", "abc": "WIN1258", "tcvn": "WIN1258", "tcvn5712": "WIN1258", "vscii": "WIN1258",
    "koi8": "KOI8R",
    **{f"windows{n}": f"WIN{n}" for n in (866, 874, 1250, 1251, 1252, 1253, 1254, 1255, 1256, 1257, 1258)},
}
READABLE_NAMES: frozenset[str] = frozenset(
    {name.lower().replace("_", "") for name in CODECS}
    | set(_ALIASES))
"""The names (lower case, without '-' and '_') `SET client_encoding` may give an encoding pgveil reads."""


def decode_statement(sql: str, encoding: str) -> str | Refuse:
    """`sql` as the relay decoded it (UTF8, invalid bytes as surrogates), read in the session's
    client `encoding` (PostgreSQL's name) instead; PostgreSQL's error for bytes it would reject."""
    if sql.isascii():  # ASCII bytes are ASCII characters in every client encoding PostgreSQL has
        return sql
    codec = CODECS.get(encoding)
    if codec is None:
        return Refuse("session-setting", f"the session's client_encoding is {encoding}, which pgveil cannot "
                      "read exactly as PostgreSQL does; SET client_encoding = 'UTF8' (or another encoding "
                      "whose bytes below 0x80 are always ASCII)")
    raw = sql.encode("utf-8", "surrogateescape")
    invalid = invalid_byte_sequence(raw, encoding, codec)
    if invalid is not None:
        return invalid
    text = raw.decode(codec)
    if text.encode(codec) != raw or not _same_ascii(raw, text):
        return Refuse("invalid-encoding", f"pgveil cannot read this statement's bytes in {encoding} exactly "
                      "as PostgreSQL does; send it in UTF8")
    return text


def encode_statement(text: str, encoding: str) -> str | Refuse:
    """A statement pgveil wrote (a rewrite), as the relay must send it in client `encoding`: its
    bytes in that encoding, carried as the relay's UTF8-with-surrogates text."""
    codec = CODECS[encoding]
    try:
        raw = text.encode(codec)
    except UnicodeEncodeError:
        return Refuse("invalid-encoding", f"the rewritten statement names a column or table that cannot be "
                      f"written in client_encoding {encoding}; use UTF8")
    return raw.decode("utf-8", "surrogateescape")


def _same_ascii(raw: bytes, text: str) -> bool:
    """Every ASCII character of `text` is an ASCII byte of `raw` and the other way round, in order:
    the codec read no ASCII byte as part of another character and made no ASCII of other bytes."""
    return raw.translate(None, _HIGH_BYTES) == text.encode("ascii", "ignore")


_HIGH_BYTES = bytes(range(0x80, 0x100))
