"""The one-step hit path (proxy/hitpath.py, compiled when built) answers, audits and counts exactly
what the layered FastPath of the guard, audit and metrics layers does, and declines wherever they
would. Each scenario runs twice on one Enforcement, once through `fast_path_of` (the HitPath the
relay gets) and once through the layered path, each with its own audit log and metrics, the verdict
cache emptied in between; verdicts, audit records (less time and chain fields) and counts must match."""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from proxy import hitpath as plain_hitpath
from proxy import metrics as metrics_module
from proxy.audit import connection as audit_connection
from proxy.audit.chain import ChainState, HashChain
from proxy.audit.connection import now_iso
from proxy.audit.file import JsonLinesFileSink
from proxy.audit.verify import verify
from proxy.connection_policy import ClientInfo, Outcome, fast_path_of, layered_fast_path_of
from proxy.enforcement import Enforcement, GuardedConnection
from proxy.guard.cache import VerdictCache, shape
from proxy.guard.pipeline import Analysis
from proxy.guard.verdict import Allow, Refuse, Rewrite
from proxy.metrics import Metrics
from proxy.native import compiled
from proxy.operations import build_connection_policy_factory
from tests.audit_consistency import audit_problems
from tests.guard_setup import DATABASE, POLICY, GuardWorld, world  # noqa: F401 (fixture)

PEOPLE = "select full_name, email from gv.people where id = {}"
IDS = "select id, region from gv.people where id = {} and region = '{}'"
CHAIN = ("seq", "prev", "chain", "hash", "time")

HITPATH = compiled(plain_hitpath)  # what fast_path_of uses: the compiled copy when built and current


@pytest.fixture
async def enforcement(world: GuardWorld) -> AsyncIterator[Enforcement]:  # noqa: F811
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "policy.yaml")
        with open(path, "w") as handle:
            handle.write(POLICY)
        enforcement = await Enforcement.create(path, world.dsn())
        try:
            yield enforcement
        finally:
            await enforcement.close()


async def _stack(enforcement: Enforcement, sink: Any, metrics: Metrics | None, login: str,
                 combined: bool = True) -> Any:
    """The layers as `pgveil serve` stacks them; not `combined`: each layer calls the one below
    through its own layered FastPath (as before proxy/hitpath.py), not through a HitPath."""
    factory = build_connection_policy_factory(enforcement.connection_policy, sink, metrics)
    client = ClientInfo(7, "127.0.0.1:7", login, DATABASE, "app", False)
    with pytest.MonkeyPatch.context() as patch:
        if not combined:
            patch.setattr(audit_connection, "fast_path_of", layered_fast_path_of)
            patch.setattr(metrics_module, "fast_path_of", layered_fast_path_of)
        policy = factory(client)
    assert await policy.on_startup({"user": login, "database": DATABASE}, client) is None
    return policy


async def _answer(answer: Any) -> Any:
    if answer is None or isinstance(answer, (Allow, Rewrite, Refuse)):
        return answer
    return await answer


async def _run(policy: Any, combined: bool, steps: list[tuple[str, ...]]) -> list[tuple[Any, ...]]:
    """Drive `policy` as the relay does: the synchronous answer first, the async hook when declined;
    each request completed (fast_complete first, else on_complete). Returns what each step got and
    whether it was answered at once."""
    fast = fast_path_of(policy) if combined else layered_fast_path_of(policy)
    assert fast is not None
    if combined:
        assert type(fast).__name__ == "HitPath"
    seen: list[tuple[Any, ...]] = []
    for step in steps:
        kind = step[0]
        if kind == "query":
            answer = await _answer(fast.fast_query(step[1]))
            at_once = answer is not None
            if answer is None:
                answer = await policy.on_query(step[1])
        elif kind == "parse":
            answer = await _answer(fast.fast_parse(step[1], step[2], ()))
            at_once = answer is not None
            if answer is None:
                answer = await policy.on_parse(step[1], step[2], ())
        else:
            answer = await _answer(fast.fast_bind(step[1]))
            at_once = answer is not None
            if answer is None:
                answer = await policy.on_bind(step[1])
        failed = "22012" if step[-1] == "fails" else None
        outcome = Outcome(rows=3, sqlstate=failed, upstream_seconds=0.0012)
        if not fast.fast_complete(outcome):
            await policy.on_complete(outcome)
        seen.append((at_once, type(answer).__name__, getattr(answer, "sql", None),
                     getattr(answer, "rule", None)))
    return seen


def _records(log: Path) -> list[dict[str, Any]]:
    return [{key: value for key, value in json.loads(line).items() if key not in CHAIN}
            for line in log.read_text().splitlines()]


def _counts(metrics: Metrics) -> dict[str, Any]:
    return {
        "statements": dict(metrics.statements), "refusals": dict(metrics.refusals),
        "errors": dict(metrics.statement_errors), "pgveil": sum(metrics.pgveil_seconds.counts),
        "upstream": sum(metrics.upstream_seconds.counts),
        "audit": {k: sum(v.counts) for k, v in metrics.audit_write_seconds.items()},
        "failures": dict(metrics.audit_failures),
    }


STEPS: list[tuple[str, ...]] = [
    ("query", PEOPLE.format(1)),  # a miss: decided by the async hooks
    ("query", PEOPLE.format(2)),  # hits from here on
    ("query", PEOPLE.format(3), "fails"),
    ("query", IDS.format(1, "north")),
    ("query", IDS.format(2, "south")),
    ("query", "delete from gv.people where id = 1"),  # refused for the analyst
    ("query", "delete from gv.people where id = 2"),
    ("query", "select 1; prepare p as select 1"),  # a session object: declined every time
    ("query", "select 1; prepare p as select 1"),
    ("parse", "s1", PEOPLE.format(4)),
    ("bind", "s1"),
    ("bind", "s1"),
    ("parse", "s2", IDS.format(3, "west")),
    ("bind", "s2", "fails"),
    ("query", "set search_path = gv, public"),  # a session effect: declined
    ("query", PEOPLE.format(5)),
    ("query", PEOPLE.format(6)),
]


@pytest.mark.parametrize("mode", ["default", "strict", "metrics only", "audit only"])
@pytest.mark.parametrize("login", ["gv_analyst", "gv_admin"])
async def test_the_hit_path_answers_audits_and_counts_as_the_layers_do(
        enforcement: Enforcement, tmp_path: Path, mode: str, login: str) -> None:
    results: dict[bool, tuple[Any, ...]] = {}
    for combined in (True, False):
        enforcement.cache.clear()
        hits, misses = enforcement.cache.hits, enforcement.cache.misses
        log = tmp_path / f"audit-{combined}.jsonl"
        sink = None if mode == "metrics only" else JsonLinesFileSink(log, 0.0 if mode == "strict" else 1.0)
        metrics = None if mode == "audit only" else Metrics()
        policy = await _stack(enforcement, sink, metrics, login, combined)
        seen = await _run(policy, combined, STEPS)
        guard = policy
        while not isinstance(guard, GuardedConnection):
            guard = guard.inner
        book = guard.prepared
        records: list[dict[str, Any]] = []
        if sink is not None:
            await sink.close()
            assert verify(log) == []
            assert audit_problems(log) == []
            records = _records(log)
        results[combined] = (seen, records, _counts(metrics) if metrics else None,
                             enforcement.cache.hits - hits, enforcement.cache.misses - misses,
                             book._calls, book._completed, dict(book.entries))
    assert results[True] == results[False]
    seen = results[True][0]
    assert sum(1 for at_once, *_ in seen if at_once) >= 8, seen  # cache hits and re-executions
    if mode != "metrics only":
        accesses = [r["request"] for r in results[True][1] if r["type"] == "access"]
        assert accesses == list(range(1, len(STEPS) + 1))


async def test_a_failed_audit_write_refuses_the_cached_statement_as_the_layers_do(
        enforcement: Enforcement, tmp_path: Path) -> None:
    results = {}
    for combined in (True, False):
        enforcement.cache.clear()
        metrics = Metrics()
        sink = JsonLinesFileSink(tmp_path / f"audit-{combined}.jsonl", 1.0)
        policy = await _stack(enforcement, sink, metrics, "gv_analyst", combined)
        first = await _run(policy, combined, [("query", PEOPLE.format(1))])
        full = os.open("/dev/full", os.O_WRONLY)
        os.dup2(full, sink._fd)  # type: ignore[arg-type]  # the disk is full from now on
        os.close(full)
        seen = await _run(policy, combined, [("query", PEOPLE.format(2)), ("query", PEOPLE.format(3))])
        results[combined] = (first, seen, _counts(metrics))
        await sink.close()
    assert results[True] == results[False]
    assert results[True][1] == [(True, "Refuse", None, "audit-unavailable")] * 2


def test_the_hit_path_is_what_the_relay_gets_only_for_the_layers_it_knows() -> None:
    class Other:
        def fast_query(self, sql: str) -> None: ...
        def fast_parse(self, name: str, sql: str, types: tuple[int, ...]) -> None: ...
        def fast_bind(self, name: str) -> None: ...
        def fast_complete(self, outcome: Outcome) -> bool: return False

    other = Other()
    assert fast_path_of(other) is other
    assert HITPATH.combined_fast_path(other) is None


@pytest.mark.parametrize("key", [None, b"audit-key"])
@pytest.mark.parametrize("body", ['"type":"access","sql":"caf\\u00e9 \udcff é"', '"type":"completion"', ""])
def test_a_record_sealed_by_the_hit_path_is_the_line_the_chain_seals(key: bytes | None, body: str) -> None:
    chain = HashChain(ChainState(41, "ab" * 32), key)
    line, state = chain.seal_body(body, chain.state)
    assert HITPATH.seal(body, 42, "ab" * 32, key, chain.algorithm) == (line, state.last_hash)


def test_the_hit_paths_clock_writes_what_now_iso_writes() -> None:
    stamp = HITPATH._now()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00", stamp)
    assert abs(len(now_iso()) - len(stamp)) == 0 and stamp[:16] <= now_iso()[:16]


@pytest.mark.parametrize("sql", [
    "select a from t where id = 5 and name = 'x''y'", "select a from t where id = 5.5e3 and name = ''",
    "select a from t where id = 12 and name = 'ab'", "select a from t where id = 12 and name = 'a\\b'",
    "select a from t where id = x and name = 'ab'", "select a from t where id = 12 and name = 'ab' ",
    "select a from t where id = 1 and name = 'it''s'", "select a from t where id = 1e5 and name = 'q'",
])
def test_literals_are_taken_out_of_a_statement_as_the_cache_takes_them(sql: str) -> None:
    stored = "select a from t where id = 1 and name = 'q'"
    cache = VerdictCache()
    cache.store(stored, "k", Analysis(Allow(stored)))
    entry = next(iter(cache._shapes.values()))[0]
    assert HITPATH._extract(entry.skeleton, entry.kinds, sql) == entry.extract(sql)
    assert shape(stored) is not None


def test_the_verdicts_of_a_hit_are_the_ones_their_constructors_make() -> None:
    from proxy.guard.positions import Splices
    from proxy.guard.verdict import StatementInfo

    info = StatementInfo(kind="select", masks=("gv.people.email:email",))
    assert HITPATH._KNOWN_FIELDS  # else the constructors run (slower, the same verdicts)
    allow = HITPATH._allow("select 1", info)
    assert type(allow) is Allow and allow == Allow("select 1", info) and allow.info is info
    layout = ((1, 7, 12, 20),)
    made = HITPATH._rewrite("select mask(x) from t where a = 5", info, layout, ["5"])
    expected = Rewrite("select mask(x) from t where a = 5", info, Splices(layout=layout, literals=["5"]))
    assert type(made) is Rewrite and made == expected and made.prepares is None
    assert made.splices is not None and expected.splices is not None
    assert made.splices.spans == expected.splices.spans and made.splices.literals == ("5",)
    assert made.splices.client_position(9) == expected.splices.client_position(9)


@pytest.mark.parametrize("login", ["gv_analyst", "gv_admin"])
def test_the_compiled_cache_lookup_finds_what_the_cache_finds(world: GuardWorld, login: str) -> None:  # noqa: F811
    """VerdictCache uses proxy.hitpath.cache_lookup when it is compiled: over the bypass attempts and
    the reporting corpus, with their literals changed, it answers what VerdictCache.lookup does."""
    from proxy.guard.pipeline import analyse
    from tests.test_bypass_guard import ATTEMPTS
    from tests.test_guard_enforcement import REPORTING, _variant

    context = world.context(login)
    statements = [sql for _, sql in ATTEMPTS] + REPORTING
    ours, theirs = VerdictCache(), VerdictCache()
    for sql in statements:
        analysis = analyse(sql, context)
        ours.store(sql, "k", analysis)
        theirs.store(sql, "k", analysis)
    found = 0
    for sql in statements:
        for text in (sql, _variant(sql), sql + " ", sql.replace("1", "12", 1)):
            if text is None:
                continue
            mine, expected = HITPATH.cache_lookup(ours, text, "k"), VerdictCache.lookup(theirs, text, "k")
            assert (mine is None) == (expected is None), text
            if mine is None:
                continue
            found += 1
            assert type(mine) is type(expected) and mine == expected, text
            assert type(mine.verdict) is type(expected.verdict) and mine.verdict.info is expected.verdict.info
            splices = getattr(mine.verdict, "splices", None)
            wanted = getattr(expected.verdict, "splices", None)
            assert (splices is None) == (wanted is None)
            if splices is not None and wanted is not None:
                assert (splices.spans, splices.literals) == (wanted.spans, wanted.literals), text
    assert (ours.hits, ours.misses) == (theirs.hits, theirs.misses)
    assert found >= 50
