"""Audit records in a PostgreSQL table (its own DSN, batched inserts, one chain per sink instance)."""

from __future__ import annotations

import asyncio
import re
import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg

from proxy.audit.chain import HashChain
from proxy.audit.sink import AuditError, GroupCommit, MappingWrites, Unsealed

_TABLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")


class PostgresSink(MappingWrites):
    """Inserts records into `table` in batches; a batch is one COPY (one transaction), committed
    before any of its writers go on. The records appended while the event loop runs other
    callbacks form one batch, and so do those appended while a batch is being committed. Each
    sink instance starts a new chain (column `chain`), ordered by `seq`; `line` holds the exact
    sealed JSON so the chain can be re-verified later.
    """

    def __init__(self, dsn: str, table: str = "pgveil_audit", key: bytes | None = None,
                 timeout_seconds: float = 5.0) -> None:
        if not _TABLE_NAME.match(table):
            raise ValueError(f"audit table must be a plain [schema.]name, not {table!r}")
        self.dsn = dsn
        self.table = table
        self.chain_id = uuid.uuid4().hex
        self.chain = HashChain(key=key)
        self.timeout_seconds = timeout_seconds
        self._connection: Any = None
        self._committer: GroupCommit[Unsealed] = GroupCommit(self._commit)

    async def _connect(self) -> Any:
        if self._connection is None or self._connection.is_closed():
            self._connection = await asyncpg.connect(self.dsn, timeout=self.timeout_seconds)
            await self._connection.execute(
                f"CREATE TABLE IF NOT EXISTS {self.table} ("
                " chain text NOT NULL, seq bigint NOT NULL, at timestamptz NOT NULL,"
                " type text NOT NULL, line text NOT NULL, PRIMARY KEY (chain, seq))"
            )
        return self._connection

    async def _commit(self, records: list[Unsealed]) -> None:
        state = self.chain.state
        rows = []
        for record in records:
            line, state = self.chain.seal_body(record.body, state)
            at = datetime.fromisoformat(record.time) if record.time else datetime.now(UTC)
            rows.append((self.chain_id, state.seq, at, record.type, line[:-1].decode()))
        try:
            connection = await self._connect()
            await connection.copy_records_to_table(
                self.table.rsplit(".", 1)[-1],
                schema_name=self.table.rsplit(".", 1)[0] if "." in self.table else None,
                records=rows,
                columns=["chain", "seq", "at", "type", "line"],
                timeout=self.timeout_seconds,
            )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            if self._connection is not None:
                self._connection.terminate()
                self._connection = None
            raise AuditError(f"cannot write audit table {self.table}: {exc}") from exc
        self.chain.state = state

    def append(self, record: Unsealed) -> asyncio.Future[None]:
        return self._committer.submit(record)

    def append_behind(self, record: Unsealed) -> None:
        self._committer.enqueue(record)

    async def flush(self) -> None:
        await self._committer.wait_idle()

    async def close(self) -> None:
        await self.flush()
        if self._connection is not None:
            await self._connection.close()
            self._connection = None


async def verify_table(dsn: str, table: str = "pgveil_audit", key: bytes | None = None) -> list[str]:
    """Problems in every chain stored in `table` ([] when all are intact), each as `table:chain:row`."""
    from proxy.audit.verify import verify_lines

    if not _TABLE_NAME.match(table):
        raise ValueError(f"audit table must be a plain [schema.]name, not {table!r}")
    connection = await asyncpg.connect(dsn)
    try:
        rows = await connection.fetch(f"SELECT chain, seq, line FROM {table} ORDER BY chain, seq")
    finally:
        await connection.close()
    problems: list[str] = []
    chains: dict[str, list[tuple[str, str]]] = {}
    for row in rows:
        chains.setdefault(row["chain"], []).append((f"{table}:{row['chain']}:seq {row['seq']}", row["line"]))
    for chain, lines in chains.items():
        problems.extend(verify_lines(lines, key, f"{table}:{chain}"))
    if not chains:
        problems.append(f"{table}: the table holds no records")
    return problems
