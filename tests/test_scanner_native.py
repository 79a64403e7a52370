"""The compiled scanner (mypyc, built by `pip install`) behaves exactly as the plain-Python one."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.wire import ProtocolViolation, framing
from proxy.wire.framing import PureMessageScanner

NATIVE = framing.MessageScanner if framing.SCANNER_IMPLEMENTATION == "mypyc" else None


def test_ci_runs_the_compiled_scanner() -> None:
    """CI installs with a C compiler: the relay there (and in its benchmarks) is the compiled one."""
    if not os.environ.get("CI"):
        pytest.skip("only asserted in CI, where the build must have compiled the scanner")
    assert framing.SCANNER_IMPLEMENTATION == "mypyc"


def test_a_stale_compiled_scanner_is_not_used(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A compiled copy built from another scanner.py (an edited checkout) is ignored."""
    edited = tmp_path / "scanner.py"
    edited.write_text(Path(framing._scanner.__file__).read_text() + "\n# edited\n")
    monkeypatch.setattr(framing._scanner, "__file__", str(edited))
    scanner, implementation = framing._load_scanner()
    assert scanner is PureMessageScanner
    assert implementation.startswith("python")


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
    for start, end in zip(points, points[1:], strict=False):
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
