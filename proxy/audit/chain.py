"""The integrity chain of audit records: sealing a record into a line, and verifying lines."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

GENESIS = "0" * 64
"""`prev` of the very first record of a chain."""


class ChainState(NamedTuple):
    """Where a chain stands: the sequence number and hash of the last sealed record (a tuple:
    one is made per record written)."""

    seq: int = -1
    last_hash: str = GENESIS


_START = ChainState()

_HASH_SUFFIX = re.compile(r',"hash":"([0-9a-f]{64})"}$')


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
_CHAIN_FIELDS = frozenset({"seq", "prev", "chain"})


def serialise(record: Mapping[str, Any]) -> str:
    """One JSON object on one line: no spaces, UTF-8 kept, keys in the order given."""
    return _ENCODER.encode(record)


class HashChain:
    """Seals records: each carries `seq`, `prev` (hash of the previous record) and its own `hash`.

    With a key the hash is HMAC-SHA256, so someone without the key cannot re-seal an edited log.
    """

    def __init__(self, state: ChainState = _START, key: bytes | None = None) -> None:
        self.state = state
        self.key = key
        self.algorithm = "hmac-sha256" if key else "sha256"

    def digest(self, text: str) -> str:
        data = text.encode()
        if self.key:
            return hmac.digest(self.key, data, "sha256").hex()
        return hashlib.sha256(data).hexdigest()

    def seal(self, record: Mapping[str, Any], state: ChainState) -> tuple[str, ChainState]:
        """The JSON line for `record` following `state`, and the state after it (not committed).

        The hash covers the exact text of the line up to the `hash` field, so verifying needs
        no re-serialisation: any change to a byte of the record changes it.
        """
        seq = state.seq + 1
        if not record or _CHAIN_FIELDS.intersection(record):
            text = serialise({"seq": seq, **record, "prev": state.last_hash, "chain": self.algorithm})
        else:  # the same text, without copying the record into a new dict first
            body = _ENCODER.encode(record)[1:-1]
            text = f'{{"seq":{seq},{body},"prev":"{state.last_hash}","chain":"{self.algorithm}"}}'
        record_hash = self.digest(text)
        return f'{text[:-1]},"hash":"{record_hash}"}}', ChainState(seq, record_hash)

    def seal_body(self, body: str, state: ChainState) -> tuple[bytes, ChainState]:
        """The line (UTF-8, with its newline) of a record given as its JSON members without braces
        (`Unsealed.body`), following `state`: the same text `seal` makes of the same record, with
        one encode and one hash."""
        seq = state.seq + 1
        members = f"{body}," if body else ""
        text = f'{{"seq":{seq},{members}"prev":"{state.last_hash}","chain":"{self.algorithm}"'
        key = self.key
        # A lone surrogate (bytes a client sent that are not UTF-8) cannot be encoded: it becomes the
        # JSON escape \udcXX, which reads back as the same string.
        sealed = f"{text}}}".encode("utf-8", "backslashreplace")
        record_hash = hmac.digest(key, sealed, "sha256").hex() if key else hashlib.sha256(sealed).hexdigest()
        line = f'{text},"hash":"{record_hash}"}}\n'.encode("utf-8", "backslashreplace")
        return line, ChainState(seq, record_hash)


def unseal(line: str, key: bytes | None) -> tuple[dict[str, Any], bool]:
    """Parse a sealed line; returns the record and whether its own hash matches its text."""
    record = json.loads(line)
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    sealed = _HASH_SUFFIX.search(line)
    if sealed is None:
        return record, False
    body = line[: sealed.start()] + "}"
    return record, hmac.compare_digest(HashChain(key=key).digest(body), sealed.group(1))


HEAD_SIZE = 256
"""Bytes of a head record: fixed, so it is rewritten in place with one pwrite of one sector."""


def _head_body(state: ChainState) -> str:
    return f'{{"seq":{state.seq},"hash":"{state.last_hash}"'


def head_record(state: ChainState, chain: HashChain) -> bytes:
    """The head of a log: the seq and hash of its last record, sealed like a record (`mac`)."""
    body = _head_body(state)
    mac = chain.digest(f"pgveil audit head {body}")
    return f'{body},"mac":"{mac}"}}'.encode().ljust(HEAD_SIZE - 1) + b"\n"


def read_head(data: bytes, key: bytes | None) -> ChainState:
    """The state a head record names; ValueError when it is not a head or its mac does not match."""
    record = json.loads(data)
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    seq, last_hash, mac = record.get("seq"), record.get("hash"), record.get("mac")
    if not isinstance(seq, int) or not isinstance(last_hash, str) or not isinstance(mac, str):
        raise ValueError("not a head record")
    state = ChainState(seq, last_hash)
    expected = HashChain(key=key).digest(f"pgveil audit head {_head_body(state)}")
    if not hmac.compare_digest(expected, mac):
        raise ValueError("the head does not match its mac")
    return state


def state_after(line: str) -> ChainState | None:
    """Chain state after a sealed line, or None when the line is not a sealed record."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict):
        return None
    seq, record_hash = record.get("seq"), record.get("hash")
    if isinstance(seq, int) and isinstance(record_hash, str):
        return ChainState(seq, record_hash)
    return None
