"""The book of prepared statements and cursors alone: which changes a completed request carried,
and what a name holds after a request that failed part-way."""

from __future__ import annotations

from proxy.guard.verdict import Allow
from proxy.prepared import UNCERTAIN, Prepared, SessionObjectEvent, StatementBook, session_object_events


def prepared(sql: str) -> Prepared:
    return Prepared(sql, sql, Allow(sql), ())


def test_a_parse_counts_once_its_request_succeeded_and_is_seen_before_that() -> None:
    book, entry = StatementBook(), prepared("select 1")
    book.call()
    book.define(("statement", "s1"), entry)
    assert book.current(("statement", "s1")) is entry  # a pipelined Bind sees it already
    assert ("statement", "s1") not in book.entries
    book.complete(1, ok=True)
    assert book.entries == {("statement", "s1"): entry}


def test_requests_complete_in_order_each_with_its_own_changes() -> None:
    book, first, second = StatementBook(), prepared("select 1"), prepared("select 2")
    book.call()
    book.define(("statement", "a"), first)
    book.call()
    book.define(("statement", "b"), second)
    book.complete(1, ok=True)
    assert book.entries == {("statement", "a"): first}
    book.complete(1, ok=True)
    assert book.entries == {("statement", "a"): first, ("statement", "b"): second}


def test_a_failed_request_keeps_a_new_name_since_absent_upstream_is_harmless() -> None:
    book, entry = StatementBook(), prepared("select 1")
    book.call()
    book.define(("statement", "s1"), entry)
    book.complete(1, ok=False)
    assert book.entries == {("statement", "s1"): entry}


def test_a_failed_request_that_closed_and_prepared_a_name_again_leaves_it_uncertain() -> None:
    book, old, new = StatementBook(), prepared("select 1"), prepared("select 2")
    book.entries[("statement", "s1")] = old
    book.call()
    book.forget("statement", "s1")
    book.call()
    book.define(("statement", "s1"), new)
    book.complete(2, ok=False)  # did the Close run before the error? PostgreSQL may hold either
    assert book.entries[("statement", "s1")] is UNCERTAIN


def test_redefining_a_name_that_may_exist_is_uncertain_until_the_request_succeeds() -> None:
    book, old, new = StatementBook(), prepared("select 1"), prepared("select 2")
    book.entries[("statement", "p")] = old
    book.call()
    book.define(("statement", "p"), new)
    assert book.current(("statement", "p")) is UNCERTAIN  # PostgreSQL refuses to redefine it if it exists
    book.complete(1, ok=True)
    assert book.entries[("statement", "p")] is new


def test_the_unnamed_statement_is_replaced_by_every_parse() -> None:
    book, old, new = StatementBook(), prepared("select 1"), prepared("select 2")
    book.entries[("statement", "")] = old
    book.call()
    book.define(("statement", ""), new)
    assert book.current(("statement", "")) is new


def test_a_failed_close_keeps_the_statement_and_deallocate_all_forgets_only_its_namespace() -> None:
    book, statement, cursor = StatementBook(), prepared("select 1"), prepared("declare c cursor for select 1")
    book.entries.update({("statement", "s"): statement, ("cursor", "c"): cursor})
    book.call()
    book.forget("statement", "s")
    book.complete(1, ok=False)
    assert book.entries[("statement", "s")] is statement
    book.call()
    book.forget("statement", None)
    book.complete(1, ok=True)
    assert book.entries == {("cursor", "c"): cursor}


def test_sql_level_statements_are_read_in_order_and_ordinary_sql_is_not_parsed() -> None:
    events = session_object_events("prepare p as select 1; execute p; deallocate p; "
                                   "declare c cursor with hold for select 1; fetch 2 from c; close all")
    assert events == (
        SessionObjectEvent("define", "statement", "p"), SessionObjectEvent("use", "statement", "p"),
        SessionObjectEvent("forget", "statement", "p"), SessionObjectEvent("define", "cursor", "c"),
        SessionObjectEvent("use", "cursor", "c"), SessionObjectEvent("forget", "cursor", None),
    )
    assert session_object_events("select prepared_at from t where executed") == ()
    used = SessionObjectEvent("use", "statement", "p")
    assert session_object_events("create table t as execute p") == (used,)
