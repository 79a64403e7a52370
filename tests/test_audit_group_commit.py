"""Group commit of audit records: records queued behind ride with the next writer's batch."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from pathlib import Path

from proxy.audit.chain import ChainState, HashChain, serialise
from proxy.audit.connection import now_iso
from proxy.audit.file import JsonLinesFileSink
from proxy.audit.sink import GroupCommit


class Batches:
    """A commit that remembers the batches it was given."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    async def commit(self, items: list[str]) -> None:
        self.batches.append(list(items))


async def until(condition: object, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, "condition never became true"
        await asyncio.sleep(0.005)


async def test_a_record_queued_behind_shares_the_next_writers_commit() -> None:
    batches = Batches()
    committer: GroupCommit[str] = GroupCommit(batches.commit, write_behind_delay=60)
    committer.enqueue("completion 1")
    await committer.submit("access 2")
    assert batches.batches == [["completion 1", "access 2"]]


async def test_a_record_queued_behind_is_committed_alone_when_no_writer_comes() -> None:
    batches = Batches()
    committer: GroupCommit[str] = GroupCommit(batches.commit, write_behind_delay=0.01)
    committer.enqueue("completion 1")
    await until(lambda: batches.batches)
    assert batches.batches == [["completion 1"]]


async def test_waiting_for_idle_commits_records_queued_behind_at_once() -> None:
    batches = Batches()
    committer: GroupCommit[str] = GroupCommit(batches.commit, write_behind_delay=60)
    committer.enqueue("completion 1")
    await committer.wait_idle()
    assert batches.batches == [["completion 1"]]


async def test_file_sink_keeps_the_order_of_queued_and_waited_records(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    sink = JsonLinesFileSink(log, fsync="batch")
    await sink.write({"type": "access", "request": 1})
    sink.write_behind({"type": "completion", "request": 1})
    await sink.write({"type": "access", "request": 2})
    sink.write_behind({"type": "completion", "request": 2})
    await sink.close()
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["seq"], r["type"], r["request"]) for r in records] == [
        (0, "access", 1), (1, "completion", 1), (2, "access", 2), (3, "completion", 2)]


def test_sealed_line_is_the_record_with_seq_first_and_chain_fields_last() -> None:
    record = {"type": "access", "relations": ["public.t"], "rule": None, "text": "é"}
    for chain in (HashChain(), HashChain(key=b"secret")):
        state = ChainState(4, "ab" * 32)
        line, after = chain.seal(record, state)
        body = serialise({"seq": 5, **record, "prev": state.last_hash, "chain": chain.algorithm})
        assert line == f'{body[:-1]},"hash":"{chain.digest(body)}"}}'
        assert after == ChainState(5, chain.digest(body))


def test_audit_time_is_utc_iso_with_microseconds() -> None:
    stamp = now_iso()
    parsed = datetime.fromisoformat(stamp)
    assert stamp.endswith("+00:00") and len(stamp) == len("2026-01-01T00:00:00.000000+00:00")
    assert parsed.utcoffset() is not None and parsed.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
