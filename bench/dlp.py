"""Relay cost of row budgets and honeytokens (docs/dlp.md): PostgreSQL's answer bytes through the relay, in-process.

    python bench/dlp.py [--megabytes 64] [--rounds 5] [--row-bytes 100,1000]

Feeds the relay's `from_upstream` (whatever this interpreter imports: run it with
PYTHONPATH=TREE to measure another checkout, e.g. one built with `python setup.py build_ext
--inplace`) a stream of DataRows cut into 64 KiB reads at arbitrary places, as a socket hands
them over, with a CommandComplete and ReadyForQuery after every 10,000 rows, in four
configurations of a connection with a policy: no DLP (the relay's usual path), a row budget that
is never reached, three honeytokens that never match, and both. Printed: ns per row and MB/s
(best of the rounds), and which implementation ran (mypyc or python).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import struct
import sys
import tempfile
import time
from typing import Any


class _Transport:
    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def close(self) -> None: ...


class _Endpoint:
    def __init__(self) -> None:
        self.transport = _Transport()
        self.lost = False
        self.on_lost: Any = None
        self.on_write_paused: Any = None
        self.on_eof: Any = None

    def relay_to(self, relay: Any) -> None:
        self.relay = relay

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    def close(self) -> None: ...


class _Policy:
    """A policy that allows everything; `guard` is what its data_guard hook answers."""

    def __init__(self, guard: Any) -> None:
        self.guard = guard

    async def on_startup(self, params: Any, client: Any) -> None:
        return None

    async def on_query(self, sql: str) -> Any:
        from proxy.guard.verdict import Allow
        return Allow(sql)

    async def on_parse(self, name: str, sql: str, types: Any) -> Any:
        from proxy.guard.verdict import Allow
        return Allow(sql)

    async def on_bind(self, name: str) -> None:
        return None

    async def on_close_statement(self, name: str) -> None: ...

    async def on_function_call(self, oid: int) -> Any:
        from proxy.guard.verdict import Allow
        return Allow("")

    async def on_complete(self, outcome: Any) -> None: ...

    def data_guard(self) -> Any:
        return self.guard


def _guard(budget: bool, honeytokens: bool) -> Any:
    if not budget and not honeytokens:
        return None
    from proxy.dlp.guard import DataGuard, DlpRuntime
    from proxy.policy.loader import parse_policy

    text = "version: 1\nroles:\n  r:\n    members: [bench]\n"
    if budget:
        text += "    max_rows_per_statement: 1000000000\n    max_rows_per_hour: 1000000000000\n"
    if honeytokens:
        text += "honeytokens:\n" + "".join(
            f"  - {{name: h{i}, table: public.t, column: c, value: HT-{i}-5f0e9a7c1b2d3e4f}}\n" for i in range(3))
    policy = parse_policy(text)
    runtime = DlpRuntime(tempfile.mkdtemp())
    return DataGuard(runtime, policy, lambda: policy.roles["r"], "bench", 3600)


def _stream(row_bytes: int, megabytes: int) -> tuple[list[bytes], int]:
    value = b"v" * max(1, row_bytes - 11)
    row = b"D" + struct.pack("!IhI", 4 + 2 + 4 + len(value), 1, len(value)) + value
    batch = row * 10_000 + b"C\x00\x00\x00\x11SELECT 10000\x00" + b"Z\x00\x00\x00\x05I"
    total = megabytes * 1024 * 1024
    data = batch * max(1, total // len(batch))
    rows = 10_000 * (len(data) // len(batch))
    chunk = 65536 + 17  # reads end anywhere inside a message
    return [data[i : i + chunk] for i in range(0, len(data), chunk)], rows


async def _run(chunks: list[bytes], guard: Any) -> float:
    from proxy.session.observer import NullObserver
    from proxy.session.session import Relay  # the compiled one when it is current (proxy/native.py)

    client, upstream = _Endpoint(), _Endpoint()
    relay = Relay(client=client, upstream=upstream, policy=_Policy(guard), observer=NullObserver(),  # type: ignore[arg-type]
                  max_message_size=1 << 30, marker_prefix="pgveil_refused_bench", cancel_upstream=lambda: None,
                  on_finished=lambda reason: None, label="bench")
    relay.start(b"", b"")
    feed = relay.from_upstream
    started = time.perf_counter()
    for chunk in chunks:
        feed(chunk)
    elapsed = time.perf_counter() - started
    assert client.transport.written == sum(map(len, chunks)), "the relay did not pass every byte"
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--row-bytes", default="100,1000")
    args = parser.parse_args()
    import proxy.native
    import proxy.session.relay  # noqa: F401  (fills IMPLEMENTATIONS)

    has_dlp = True
    try:
        import proxy.dlp.guard  # noqa: F401
    except ImportError:
        has_dlp = False
    print(f"{proxy.__file__}: {proxy.native.describe()}")
    configurations = [("no DLP", False, False)]
    if has_dlp:
        configurations += [("row budget", True, False), ("honeytokens", False, True), ("both", True, True)]
    for row_bytes in (int(size) for size in args.row_bytes.split(",")):
        chunks, rows = _stream(row_bytes, args.megabytes)
        size = sum(map(len, chunks))
        for name, budget, honeytokens in configurations:
            times = [asyncio.run(_run(chunks, _guard(budget, honeytokens))) for _ in range(args.rounds)]
            best, median = min(times), statistics.median(times)
            print(f"rows of {row_bytes:>5} B  {name:<12} {best / rows * 1e9:8.1f} ns/row (median "
                  f"{median / rows * 1e9:8.1f})  {size / best / 1e6:8.0f} MB/s")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
