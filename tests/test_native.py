"""The compiled hot path (mypyc, built by `pip install`) behaves exactly as the plain-Python one.

The scanner is compared with its plain twin on random streams; the relay (compiled Relay) is run
end to end through `pgveil serve`, once compiled and once with
PGVEIL_PURE_PYTHON=1, and must answer alike."""

from __future__ import annotations

import io
import itertools
import os
import struct
import types
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy import native
from proxy.wire import ProtocolViolation, framing
from proxy.wire.framing import PureMessageScanner
from tests.proxy_harness import spawn_serve

NATIVE = framing.MessageScanner if framing.SCANNER_IMPLEMENTATION == "mypyc" else None


def test_ci_runs_the_compiled_hot_path() -> None:
    """CI installs with a C compiler: the relay there (and in its benchmarks) is the compiled one."""
    if not os.environ.get("CI"):
        pytest.skip("only asserted in CI, where the build must have compiled the hot path")
    native.describe()  # resolves the modules not imported yet
    assert native.IMPLEMENTATIONS == {"proxy.wire.scanner": "mypyc", "proxy.session.relay": "mypyc",
                                      "proxy.hitpath": "mypyc"}


def test_a_stale_compiled_copy_is_not_used(tmp_path: Path) -> None:
    """A compiled copy built from another source (an edited checkout) is ignored."""
    from proxy.wire import scanner

    if native.IMPLEMENTATIONS[scanner.__name__] != "mypyc":
        pytest.skip("the compiled scanner is not built here")
    edited = tmp_path / "scanner.py"
    edited.write_text(Path(scanner.__file__).read_text() + "\n# edited\n")
    twin = types.ModuleType(scanner.__name__)
    twin.__file__ = str(edited)
    try:
        assert native.compiled(twin) is twin
        assert "stale" in native.IMPLEMENTATIONS[scanner.__name__]
        plain = types.ModuleType(scanner.__name__)
        plain.__file__ = scanner.__file__
        assert native.compiled(plain) is not plain  # the current source: the compiled copy
    finally:
        native.IMPLEMENTATIONS[scanner.__name__] = "mypyc"


def _session(dsn: str) -> list[Any]:
    """A bit of everything a session without a policy relays."""
    seen: list[Any] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.add_notice_handler(lambda notice: seen.append(("notice", notice.message_primary)))
        seen.append(conn.execute("select 1 as one, 'two'::text").fetchall())
        seen.append(conn.execute("select %s::int + %s", (40, 2)).fetchall())
        seen.append(conn.execute("select %s::bytea", (b"\x00Z\x00\x00\x00\x05I",), binary=True).fetchall())
        with conn.pipeline():
            cursors = [conn.execute("select %s::int", (n,)) for n in range(5)]
        seen.append([c.fetchall() for c in cursors])
        conn.execute("drop table if exists native_twin; create table native_twin (n int, t text)")
        with conn.cursor().copy("copy native_twin from stdin") as copy:
            for n in range(1000):
                copy.write_row((n, "x" * (n % 97)))
        out = io.BytesIO()
        with conn.cursor().copy("copy (select * from native_twin order by n) to stdout") as copy:
            for chunk in copy:
                out.write(chunk)
        seen.append(len(out.getvalue()))
        conn.execute("do $$ begin raise notice 'hello'; end $$")
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("select 1/0")
        seen.append(conn.execute("select count(*), sum(n) from native_twin").fetchall())
        with conn.transaction():
            conn.execute("insert into native_twin values (-1, 'in a transaction')")
        seen.append(conn.execute("select count(*) from native_twin").fetchall())
        conn.execute("drop table native_twin")
    return seen


@pytest.mark.parametrize("pure", [False, True], ids=["compiled", "plain"])
def test_the_relay_without_a_policy_answers_alike_compiled_and_plain(upstream: Any, pure: bool) -> None:
    direct = _session(upstream.dsn())
    env = {"PGVEIL_PURE_PYTHON": "1"} if pure else {}
    with spawn_serve("--upstream", upstream.dsn(), "--listen", "127.0.0.1:0", "--log-level", "info",
                     env=env) as served:
        line = served.wait_for_line("hot path: ")
        if pure:
            assert "relay python (PGVEIL_PURE_PYTHON is set)" in line
            assert "scanner python (PGVEIL_PURE_PYTHON is set)" in line
        assert _session(served.dsn()) == direct
        served.terminate()


def _message(tag: int, body: bytes) -> bytes:
    return bytes([tag]) + struct.pack("!I", len(body) + 4) + body


TAGS = b"QPBESXdcfHZCDTGnI1234"
messages = st.builds(_message, st.sampled_from(list(TAGS)), st.binary(max_size=40))
garbage = st.one_of(
    st.binary(min_size=1, max_size=12),  # anything at all
    st.builds(lambda tag, n: bytes([tag]) + struct.pack("!I", n), st.integers(0, 255),
              st.sampled_from([0, 3, 4, 5, 1 << 20, 0x7FFFFFFF, 0xFFFFFFFF])),  # odd lengths and tags
)


def _run(scanner_class: type, stream: bytes, cuts: list[int], watched: bytes, allowed: bytes,
         limit: int) -> list[object]:
    scanner = scanner_class(watched, allowed, limit)
    events: list[object] = []
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    for start, end in itertools.pairwise(points):
        try:
            events.append(scanner.feed(stream[start:end]))
        except ProtocolViolation as exc:
            events.append(("violation", exc.reason))
            break
        events.append(scanner.mid_message)
    return events


@pytest.mark.skipif(NATIVE is None, reason="the compiled scanner is not built here")
@given(
    parts=st.lists(st.one_of(messages, messages, messages, garbage), max_size=12),
    cuts=st.lists(st.integers(0, 10_000), max_size=8),
    watched=st.sampled_from([b"QPFSXcf", b"EZG", b"CEZGS", b"", bytes(TAGS)]),
    allowed=st.sampled_from([bytes(TAGS), b"QPBESXdcfH", bytes(range(256))]),
    limit=st.sampled_from([16, 1 << 20]),
)
def test_compiled_and_plain_scanners_agree(parts: list[bytes], cuts: list[int], watched: bytes,
                                           allowed: bytes, limit: int) -> None:
    stream = b"".join(parts)
    assert _run(NATIVE, stream, cuts, watched, allowed, limit) == _run(  # type: ignore[arg-type]
        PureMessageScanner, stream, cuts, watched, allowed, limit)
