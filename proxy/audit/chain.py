"""The integrity chain of audit records: sealing a record into a line, and verifying lines."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

GENESIS = "0" * 64
"""`prev` of the very first record of a chain."""


@dataclass(frozen=True, slots=True)
class ChainState:
    """Where a chain stands: the sequence number and hash of the last sealed record."""

    seq: int = -1
    last_hash: str = GENESIS


def canonical(record: Mapping[str, Any]) -> str:
    """The one serialisation that is hashed: sorted keys, no spaces, UTF-8 kept."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class HashChain:
    """Seals records: each carries `seq`, `prev` (hash of the previous record) and its own `hash`.

    With a key the hash is HMAC-SHA256, so someone without the key cannot re-seal an edited log.
    """

    def __init__(self, state: ChainState = ChainState(), key: bytes | None = None) -> None:
        self.state = state
        self.key = key
        self.algorithm = "hmac-sha256" if key else "sha256"

    def digest(self, text: str) -> str:
        data = text.encode()
        if self.key:
            return hmac.new(self.key, data, hashlib.sha256).hexdigest()
        return hashlib.sha256(data).hexdigest()

    def seal(self, record: Mapping[str, Any], state: ChainState) -> tuple[str, ChainState]:
        """The JSON line for `record` following `state`, and the state after it (not committed)."""
        body = dict(record)
        body["seq"] = state.seq + 1
        body["prev"] = state.last_hash
        body["chain"] = self.algorithm
        text = canonical(body)
        record_hash = self.digest(text)
        line = f'{text[:-1]},"hash":"{record_hash}"}}'
        return line, ChainState(body["seq"], record_hash)


def unseal(line: str, key: bytes | None) -> tuple[dict[str, Any], bool]:
    """Parse a sealed line; returns the record and whether its own hash matches its content."""
    record = json.loads(line)
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    claimed = record.pop("hash", None)
    chain = HashChain(key=key)
    intact = isinstance(claimed, str) and hmac.compare_digest(chain.digest(canonical(record)), claimed)
    record["hash"] = claimed
    return record, intact


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
