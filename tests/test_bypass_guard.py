"""Bypass attempts against the guard: each statement is judged by the guard for a masked login, and
what the guard forwards is run as that login directly on PostgreSQL; no canary value may appear in
the refusal, the rows, the error (message, detail, hint, context) or the notices."""

from __future__ import annotations

import pytest

from proxy.guard.verdict import Refuse
from tests.guard_setup import GuardWorld, leaked_canaries, world  # noqa: F401

A = "gv_analyst"
W = "gv_writer"
P = "gv_public"

ATTEMPTS: list[tuple[str, str]] = [
    # plain reads, every way of naming the table
    (A, "select * from gv.people"),
    (A, "select ssn from gv.people"),
    (A, "select p.ssn from gv.people p"),
    (A, "select gv.people.ssn from gv.people"),
    (A, "select people.ssn from gv.people"),
    (A, "select guard_test.gv.people.ssn from gv.people"),
    (A, "table gv.people"),
    (A, "TABLE ONLY gv.people"),
    (A, "select * from only gv.people"),
    (A, "select * from gv.people*"),
    (A, "select * from only (gv.people)"),
    (A, "select email, full_name, card, birth_date, salary, notes, password_hash from gv.people"),
    (A, "select * from gv.\"people\""),
    (A, "select * from \"gv\".\"people\""),
    (A, "SELECT * FROM GV.PEOPLE"),
    (A, "select * from guard_test.gv.people"),
    (A, "select * from postgres.gv.people"),
    (A, "select * from \"GV\".\"PEOPLE\""),
    (A, "select * from gv./**/people"),
    (A, "select * from gv . people"),
    (A, "select * from gv.people /* c */ where /* x */ true -- tail"),
    # whole-row and functional notation
    (A, "select p from gv.people p"),
    (A, "select people from gv.people"),
    (A, "select row_to_json(p) from gv.people p"),
    (A, "select to_jsonb(p) from gv.people p"),
    (A, "select json_agg(p) from gv.people p"),
    (A, "select array_agg(p)::text from gv.people p"),
    (A, "select (p).ssn from gv.people p"),
    (A, "select (p).* from gv.people p"),
    (A, "select ssn(p) from gv.people p"),
    (A, "select email(people) from gv.people"),
    (A, "select p::text from gv.people p"),
    (A, "select row(p.*)::text from gv.people p"),
    (A, "select hashtext(p::text) from gv.people p"),
    (A, "select d from gv.people as p(a, b, c, d)"),
    (A, "select * from gv.people as p(i, n, e, s)"),
    (A, "select p.* from gv.people as p(a, b, c, d)"),
    (A, "select gv.people.* from gv.people"),
    # predicates, ordering, grouping, windows
    (A, "select id from gv.people where ssn = '914-27-6380'"),
    (A, "select id from gv.people where ssn like '914%'"),
    (A, "select id from gv.people where position('6380' in ssn) > 0"),
    (A, "select id from gv.people where email like 'quokka%'"),
    (A, "select id from gv.people where substr(ssn, 1, 3) = '914'"),
    (A, "select id from gv.people where birth_date = '1987-06-23'"),
    (A, "select id from gv.people where salary between 123457 and 123458"),
    (A, "select id, ssn from gv.people order by ssn"),
    (A, "select ssn, count(*) from gv.people group by ssn"),
    (A, "select ssn from gv.people group by ssn having ssn > '9'"),
    (A, "select max(ssn), min(email), string_agg(full_name, ',') from gv.people"),
    (A, "select string_agg(card, ',' order by card) from gv.people"),
    (A, "select id, rank() over (order by ssn), lag(email) over w from gv.people window w as (order by id)"),
    (A, "select count(*) filter (where ssn = '914-27-6380') from gv.people"),
    (A, "select distinct on (ssn) ssn, notes from gv.people"),
    (A, "select regexp_replace(full_name, '^', '') from gv.people"),
    (A, "select id from gv.people where notes is not null"),
    (A, "select id from gv.people where password_hash = 'PWHASH-CANARY'"),
    # subqueries, CTEs, lateral
    (A, "select (select ssn from gv.people where id = 1)"),
    (A, "select * from (select * from gv.people) s"),
    (A, "select * from (select ssn from gv.people) s(x)"),
    (A, "with p as (select * from gv.people) select * from p"),
    (A, "with p(a, b, c, d) as (select * from gv.people) select d from p"),
    (A, "with recursive r as (select ssn from gv.people union select ssn from r) select * from r"),
    (A, "with people as (select 1 as ssn) select * from people, gv.people p2"),
    (A, "with gv as (select 1) select * from gv.people"),
    (A, "with x as (select * from people) select * from gv.people"),
    (A, "with a as (select * from b), b as (select 1) select * from a"),
    (A, "select exists(select 1 from gv.people where ssn = '914-27-6380')"),
    (A, "select id from gv.orders where person_id in (select id from gv.people where ssn = '914-27-6380')"),
    (A, "select * from gv.orders o where exists "
        "(select 1 from gv.people p where p.id = o.person_id and p.ssn like '9%')"),
    (A, "with x as materialized (select * from gv.people) select ssn from x"),
    (A, "select * from lateral (select ssn from gv.people) l"),
    (A, "select o.id, l.ssn from gv.orders o cross join lateral "
        "(select ssn from gv.people p where p.id = o.person_id) l"),
    (A, "select * from gv.orders o, lateral (select o.id, gv.people.ssn from gv.people) x"),
    # set operations and VALUES
    (A, "select ssn from gv.people union select email from gv.people"),
    (A, "select ssn from gv.people union all select 'x'"),
    (A, "select ssn from gv.people intersect select '914-27-6380'"),
    (A, "select '914-27-6380' except select ssn from gv.people"),
    (A, "values ((select ssn from gv.people limit 1))"),
    (A, "select * from (values (1)) v(x) join gv.people on id = x"),
    # joins of every kind
    (A, "select * from gv.people natural join gv.orders"),
    (A, "select * from gv.people join gv.orders using (id)"),
    (A, "select * from gv.orders o left join gv.people p on p.id = o.person_id"),
    (A, "select * from gv.orders o full join gv.people p on p.id = o.person_id"),
    (A, "select * from gv.people a join gv.people b on a.ssn = b.ssn"),
    (A, "select * from gv.orders o right join gv.people p on true"),
    (A, "select * from (gv.people p join gv.orders o on o.person_id = p.id)"),
    (A, "select * from gv.people p, gv.people q where p.ssn = q.ssn"),
    (A, "select * from gv.orders join gv.people on gv.people.id = gv.orders.person_id"),
    (A, "select * from gv.people join gv.orders on gv.people.ssn is not null"),
    # casts and functions raising errors that could carry values
    (A, "select ssn::int from gv.people"),
    (A, "select email::int from gv.people"),
    (A, "select full_name::date from gv.people"),
    (A, "select cast(notes as int) from gv.people"),
    (A, "select card::numeric from gv.people"),
    (A, "select password_hash::int from gv.people"),
    (A, "select ('x' || ssn)::int from gv.people"),
    (A, "select xmlparse(document ssn) from gv.people"),
    (A, "select to_date(email, 'YYYY') from gv.people"),
    (A, "select jsonb_build_object('a', ssn)::text::int from gv.people"),
    (A, "select notes::json from gv.people"),
    (A, "select int4in(ssn::cstring) from gv.people"),
    (A, "select id from gv.people where city::int = 1"),
    (A, "select id from gv.people where case when city = 'HIDDENCITY' then 1/0 else 0 end = 0"),
    (A, "select id from gv.people where case when ssn = '914-27-6380' then 1/0 else 0 end = 0"),
    (A, "select 1/0 from gv.people where ssn = '914-27-6380'"),
    (A, "select birth_date::text::int from gv.people"),
    (A, "select salary::text::int from gv.people"),
    (A, "select full_name::regclass from gv.people"),
    (A, "select ssn::uuid from gv.people"),
    # side doors: SQL text, whole tables, files, large objects, statistics, secrets
    (A, "select query_to_xml('select * from gv.people', true, true, '')"),
    (A, "select pg_catalog.query_to_xml('select ssn from gv.people', true, true, '')"),
    (A, "select \"query_to_xml\"('select ssn from gv.people', true, true, '')"),
    (A, "select Query_To_Xml('select ssn from gv.people', true, true, '')"),
    (A, "select query_to_xml_and_xmlschema('select ssn from gv.people', true, true, '')"),
    (A, "select table_to_xml('gv.people', true, true, '')"),
    (A, "select table_to_xml('gv.people'::regclass, true, true, '')"),
    (A, "select schema_to_xml('gv', true, true, '')"),
    (A, "select database_to_xml(true, true, '')"),
    (A, "select cursor_to_xml('c', 10, true, true, '')"),
    (A, "select * from dblink('dbname=guard_test', 'select ssn from gv.people') as t(s text)"),
    (A, "select pg_read_file('/etc/passwd')"),
    (A, "select pg_read_binary_file('postgresql.auto.conf')"),
    (A, "select pg_ls_dir('.')"),
    (A, "select lo_get(oid) from pg_largeobject_metadata"),
    (A, "select * from pg_largeobject"),
    (A, "select lo_import('/etc/passwd')"),
    (A, "select loread(lo_open(16384, 262144), 100)"),
    (A, "select * from pg_stats where tablename = 'people'"),
    (A, "select most_common_vals::text from pg_catalog.pg_stats"),
    (A, "select * from pg_stats_ext"),
    (A, "select * from pg_statistic"),
    (A, "select * from pg_statistic_ext_data"),
    (A, "select * from pg_authid"),
    (A, "select * from pg_shadow"),
    (A, "select * from pg_user_mappings"),
    (A, "select * from pg_stat_statements"),
    (A, "select current_query()"),
    (A, "select ts_stat('select ssn::tsvector from gv.people')"),
    (A, "select xpath('/a', query_to_xml('select ssn from gv.people', true, true, ''))"),
    (A, "select pgveil.mask_hash('914-27-6380')"),
    (A, "select * from pgveil.hash_key"),
    (A, "select 'x'::pgveil.missing_type"),
    # user functions and views reading protected tables
    (A, "select gv.leak_ssn(1)"),
    (A, "select * from gv.leak_ssn(1)"),
    (A, "select gv.leak_ssn(id) from gv.orders"),
    (A, "select p.leak_ssn from gv.people p"),
    (A, "select gv.dyn('select count(*) from gv.people')"),
    (A, "select * from gv.people_names"),
    (A, "select * from gv.people_listed"),
    (A, "select * from gv.people_listed where ssn = '914-27-6380'"),
    # quoting, escapes, dollar quoting
    (A, "select * from U&\"gv\".U&\"\\0070eople\""),
    (A, "select U&\"\\0073sn\" from gv.people"),
    (A, "select U&\"\\0073sn\" from U&\"\\0067v\".people"),
    (A, "select $$x$$, ssn from gv.people"),
    (A, "select $a$ ') from gv.people -- $a$, ssn from gv.people"),
    (A, "select e'\\'', ssn from gv.people"),
    (A, "select 'a'';select ssn from gv.people --', id from gv.orders"),
    (A, "select $$;$$; select ssn from gv.people"),
    (A, "select 1; select * from gv.people"),
    (A, "select * from gv.orders; select ssn from gv.people where id = 1"),
    (A, "select e'\\x27 from gv.people --', ssn from gv.people"),
    # search_path, temp tables, settings
    (A, "set search_path = gv_other, gv"),
    (A, "set search_path to gv"),
    (A, "select set_config('search_path', 'gv', true)"),
    (A, "select set_config('role', 'gv_admin', false)"),
    (A, "set role gv_admin"),
    (A, "set local role gv_admin"),
    (A, "set session authorization gv_admin"),
    (A, "set standard_conforming_strings = off"),
    (A, "set client_encoding = 'SQL_ASCII'"),
    (A, "set backslash_quote = on"),
    (A, "set pgveil.key = 'x'"),
    (A, "select set_config(current_user, 'x', false)"),
    (A, "create temp table people as select * from gv.people"),
    (A, "select * from pg_temp.people"),
    (A, "select * from people"),
    (A, "select * into temp t from gv.people"),
    # COPY, cursors, PREPARE/EXECUTE, EXPLAIN
    (A, "copy gv.people to stdout"),
    (A, "copy gv.people (ssn, email) to stdout"),
    (A, "copy (select * from gv.people) to stdout"),
    (A, "copy gv.people to stdout with (format csv, header)"),
    (A, "copy gv.people to '/tmp/gv_people'"),
    (A, "copy gv.people to program 'cat'"),
    (A, "begin; declare c cursor for select * from gv.people; fetch all from c; commit"),
    (A, "begin; declare c cursor for select ssn from gv.people; fetch all from c; "
        "select cursor_to_xml('c', 10, true, true, ''); commit"),
    (A, "prepare gvp1 as select ssn from gv.people where id = $1; execute gvp1(1); deallocate gvp1"),
    (A, "prepare gvp2 as select * from gv.people; execute gvp2; deallocate gvp2"),
    (A, "explain select ssn from gv.people where ssn = '914-27-6380'"),
    (A, "explain (verbose, costs off) select * from gv.people"),
    (A, "explain analyze select * from gv.people"),
    (A, "explain (analyze, verbose) select * from gv.people where city = 'HIDDENCITY'"),
    # DDL and procedural code over protected data
    (A, "create table gv.copy_people as select * from gv.people"),
    (A, "create view gv.v2 as select * from gv.people"),
    (A, "do $$ begin raise notice '%', (select ssn from gv.people limit 1); end $$"),
    (A, "create function gv.f() returns text language sql as 'select ssn from gv.people'"),
    (A, "alter table gv.people rename column ssn to public_id"),
    (A, "create index on gv.people (ssn)"),
    # notifications
    (A, "select pg_notify('gvchan', (select ssn from gv.people limit 1))"),
    (A, "listen gvchan; select pg_notify('gvchan', ssn) from gv.people"),
    # partitions and inheritance
    (A, "select * from gv.events"),
    (A, "select * from gv.events_2024"),
    (A, "select secret from gv.events_2024"),
    (A, "select * from gv.child"),
    (A, "select * from gv.base"),
    (A, "select * from only gv.base"),
    (A, "select * from gv.people tablesample system (100)"),
    # row filter
    (A, "select * from gv.people where id = 4"),
    (A, "select * from gv.people where region = 'hidden'"),
    (A, "select city from gv.people"),
    (A, "select * from gv.people p1 where not exists (select 1 from gv.people p2 where p2.city = 'HIDDENCITY')"),
    (A, "select * from gv.orders o left join gv.people p on p.id = o.person_id where o.person_id = 4"),
    (A, "update gv.people set city = 'x' where id = 4"),
    # DML by a masked writer
    (W, "update gv.people set notes = ssn returning notes"),
    (W, "delete from gv.people where ssn = '914-27-6380' returning id"),
    (W, "update gv.people set city = city where ssn like '9%'"),
    (W, "insert into gv.people (id) values (99) returning *"),
    (W, "insert into gv.people (id, ssn) values (1, 'x') on conflict (id) do update "
        "set notes = excluded.notes || gv.people.ssn"),
    (W, "merge into gv.people t using gv.orders o on t.id = o.person_id when matched then update set notes = t.ssn"),
    (W, "insert into gv.scratch select id, ssn, email from gv.people"),
    (W, "update gv.scratch s set note = p.ssn from gv.people p where p.id = s.id returning s.note"),
    (W, "with d as (delete from gv.scratch returning *) select * from d"),
    (W, "update gv.people set notes = 'n' where id = 2 returning people"),
    (W, "delete from gv.people p where p.email like 'q%'"),
    # PostgreSQL's own errors about a written row carry its raw values ("Failing row contains")
    (W, "update gv.people set id = null where id = 1"),
    (W, "update gv.people set city = null where id = 1"),
    (W, "insert into gv.people (id, ssn) values (7, '914-27-6380')"),
    (W, "insert into gv.people (id) values (1) on conflict (id) do update set city = 'x'"),
    (W, "delete from gv.people where id = 1"),
    (W, "insert into gv.people select * from gv.people"),
    (W, "copy gv.people (id, ssn) from stdin"),
    (A, "select '914-27-6380' '9' from"),
    # strings read differently under standard_conforming_strings = off
    (A, "select '\\' -- ', ssn from gv.people"),
    (A, "select 'a\\', ssn from gv.people --'"),
    # planner output over filtered rows
    (A, "explain analyze select * from gv.people where city = 'x'"),
    (A, "explain select * from gv.people where city = 'HIDDENCITY'"),
    # more ways to carry a row out
    (A, "select ctid, xmin, tableoid from gv.people"),
    (A, "select * from gv.people where id = 1 for update"),
    (A, "select pg_column_size(p) from gv.people p"),
    (A, "values ((select row_to_json(p) from gv.people p limit 1))"),
    (A, "select (select string_agg(ssn, ',') from gv.people) as x"),
    (A, "select * from gv.people p join lateral (select p.ssn) s on true"),
    (A, "select array(select ssn from gv.people)"),
    (A, "select (array_agg(ssn))[1] from gv.people"),
    (A, "select jsonb_agg(to_jsonb(p) - 'id') from gv.people p"),
    (A, "select xmlforest(ssn, email) from gv.people"),
    (A, "select format('%s', p) from gv.people p"),
    (A, "select * from json_populate_recordset(null::gv.people, (select json_agg(p) from gv.people p))"),
    (A, "select (json_populate_record(null::gv.people, row_to_json(p))).ssn from gv.people p"),
    (A, "select * from gv.people where (ssn, email) = ('914-27-6380', 'x')"),
    (A, "select * from gv.people_listed l join gv.people p using (ssn)"),
    (A, "select " + "(" * 3000 + "1" + ")" * 3000),
    (A, "select 1 from gv.people where ssn = any(array['914-27-6380'])"),
    (A, "select count(*) from gv.people group by grouping sets ((ssn), (email))"),
    (A, "select ssn from gv.people order by 1 offset 0 rows fetch first 1 rows only"),
    # a role that reveals only `public`: unlisted columns are `internal` and masked
    (P, "select * from gv.events"),
    (P, "select notes, secret from gv.people, gv.base"),
]


@pytest.mark.parametrize(("login", "sql"), ATTEMPTS, ids=[f"{i:03d}" for i in range(len(ATTEMPTS))])
def test_no_canary_reaches_a_masked_client(world: GuardWorld, login: str, sql: str) -> None:
    verdict, outcome = world.guarded(sql, login)
    text = outcome.text() + (verdict.text if isinstance(verdict, Refuse) else "")
    # A canary the client typed itself may come back as an echo; whether it *confirms* anything is
    # what the oracle tests below check.
    assert [c for c in leaked_canaries(text) if c not in sql] == [], (verdict, outcome)


def test_there_are_at_least_150_attempts() -> None:
    assert len(ATTEMPTS) >= 150


ORACLES: list[tuple[str, str, str]] = [
    ("select count(*) from gv.people where ssn = {}", "'914-27-6380'", "'000-00-0000'"),
    ("select count(*) from gv.people where ssn like {}", "'914%'", "'000%'"),
    ("select count(*) from gv.people where position({} in ssn) > 0", "'6380'", "'0000'"),
    ("select count(*) from gv.people where email = {}", "'quokkamail7731@leak.example'", "'quokkamail7732@leak.example'"),
    ("select count(*) from gv.people where email ilike {}", "'quokka%'", "'quarrel%'"),
    ("select count(*) from gv.people where birth_date = {}", "'1987-06-23'", "'1987-06-24'"),
    ("select count(*) from gv.people where salary = {}", "123457.89", "123457.88"),
    ("select count(*) from gv.people where full_name = {}", "'Zed Quokkafeld'", "'Zed Quokkafelt'"),
    ("select count(*) from gv.people where card like {}", "'4111%'", "'4112%'"),
    ("select count(*) from gv.people where notes = {}", "'NOTE-CANARY'", "'NOTE-CANARX'"),
    ("select count(*) from gv.people where password_hash = {}", "'PWHASH-CANARY'", "'PWHASH-CANARX'"),
    ("select count(*) from gv.people where city = {}", "'HIDDENCITY'", "'NOWHERE'"),
    ("select exists(select 1 from gv.people where ssn = {})", "'914-27-6380'", "'000-00-0000'"),
    ("select sum(case when ssn = {} then 1 else 0 end) from gv.people", "'914-27-6380'", "'000-00-0000'"),
    ("select count(*) from gv.people where ssn in (select {})", "'914-27-6380'", "'000-00-0000'"),
    ("select count(*) from gv.people where md5(ssn) = md5({})", "'914-27-6380'", "'000-00-0000'"),
    ("select count(*) from gv.people where ssn >= {}", "'914-27-6380'", "'914-27-6381'"),
    ("select count(*) from gv.people where birth_date > {}", "'1987-06-22'", "'1987-06-23'"),
]


@pytest.mark.parametrize(("template", "true_value", "false_value"), ORACLES,
                         ids=[f"oracle{i:02d}" for i in range(len(ORACLES))])
def test_oracle_cannot_tell_a_raw_value_from_a_wrong_one(
    world: GuardWorld, template: str, true_value: str, false_value: str
) -> None:
    _, with_true = world.guarded(template.format(true_value))
    _, with_false = world.guarded(template.format(false_value))
    assert with_true.rows == with_false.rows
    assert with_true.error is None or with_true.error == with_false.error


@pytest.mark.parametrize(("template", "true_value", "false_value"), [
    ("select count(*) from gv.people where ssn = $1", "914-27-6380", "000-00-0000"),
    ("select count(*) from gv.people where email like $1", "quokka%", "quarrel%"),
    ("select count(*) from gv.people where city = $1", "HIDDENCITY", "NOWHERE"),
    ("select count(*) from gv.people where birth_date = $1::date", "1987-06-23", "1987-06-24"),
])
def test_bound_parameters_do_not_confirm_raw_values(
    world: GuardWorld, template: str, true_value: str, false_value: str
) -> None:
    _, with_true = world.guarded(template, params=(true_value,))
    _, with_false = world.guarded(template, params=(false_value,))
    assert with_true.error is None
    assert with_true.rows == with_false.rows
