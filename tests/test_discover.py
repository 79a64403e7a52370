"""`pgveil discover` on real PostgreSQL: generated data with known truth, decoys, Faker data, no leaks."""

from __future__ import annotations

import base64
import json
import random
import string
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from proxy.cli import main
from proxy.discovery import detectors as d

DATABASE = "pgveil_discover"

FIRST = ["Alice", "Bruno", "Chloé", "Dmitri", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jonas",
         "Kaja", "Liam", "Maëlle", "Noah", "Olga", "Pedro", "Quinn", "Rosa", "Sven", "Tariq"]
LAST = ["Anderson", "Becker", "Castillo", "Dubois", "O'Neill", "Fischer", "García", "Hansen",
        "Ivanova", "Jansen", "Kowalski", "Lefèvre", "Müller", "Nakamura", "van Dijk", "Smith-Jones"]
STREETS = ["Main Street", "Oak Avenue", "Kirchweg", "Rue de la Paix", "Elm Road", "Baker Street"]
WORDS = ["customer", "called", "about", "the", "late", "delivery", "and", "asked", "for", "a", "refund",
         "because", "package", "arrived", "damaged", "please", "follow", "up", "next", "week"]

# (table, column) -> detector kind; every other column of the generated tables is not sensitive.
TRUTH: dict[tuple[str, str], str] = {
    ("public.customers", "first_name"): "person_name",
    ("public.customers", "last_name"): "person_name",
    ("public.customers", "email"): "email",
    ("public.customers", "phone"): "phone",
    ("public.customers", "birth_date"): "date_of_birth",
    ("public.customers", "gender"): "gender",
    ("public.customers", "zip_code"): "postal_code",
    ("public.customers", "street_address"): "postal_address",
    ("public.customers", "ssn"): "us_ssn",
    ("public.customers", "contact"): "email",           # name says nothing: values only
    ("public.customers", "last_login_ip"): "ip_address",
    ("public.payments", "card_number"): "payment_card",
    ("public.payments", "iban"): "iban",
    ("public.accounts", "password_hash"): "secret",
    ("public.accounts", "api_token"): "secret",
    ("public.accounts", "blob"): "secret",              # JWTs under a name that says nothing
    ("public.accounts", "nino"): "national_id",
    ("public.accounts", "bsn"): "national_id",
    ("public.tickets", "notes"): "free_text",
    ("public.tickets", "age"): "age",
    ("public.events", "client_addr"): "ip_address",
    ("public.archived", "email"): "email",              # empty table: by name only
    ("public.archived", "buyer"): "email",              # empty table: foreign key to customers.email
    ("public.Odd Table", "E-Mail Address"): "email",    # names that YAML must quote
    ("public.Odd Table", "homePhone"): "phone",         # camelCase
}
CANARIES = ["Canarywyn", "canary.h11@example.org", "4111 1111 1111 1111", "CANARY-NOTE lorem ipsum dolor sit",
            "Canary Lane 77", "DE89370400440532013000", "078-05-1120"]


def luhn_complete(prefix: str, length: int, rng: random.Random) -> str:
    body = prefix + "".join(rng.choice(string.digits) for _ in range(length - len(prefix) - 1))
    return next(body + c for c in string.digits if d.luhn_valid(body + c))


def iban_de(rng: random.Random) -> str:
    bban = "".join(rng.choice(string.digits) for _ in range(18))
    check = 98 - int("".join(str(int(c, 36)) for c in bban + "DE00")) % 97
    return f"DE{check:02d}{bban}"


def ssn(rng: random.Random) -> str:
    return f"{rng.randint(1, 665):03d}-{rng.randint(1, 99):02d}-{rng.randint(1, 9999):04d}"


def nino(rng: random.Random) -> str:
    while True:
        prefix = rng.choice("ABCEGHJKLMNOPRSTWXYZ") + rng.choice("ABCEGHJKLMNPRSTWXYZ")
        if prefix not in ("BG", "GB", "KN", "NK", "NT", "TN", "ZZ"):
            break
    digits = "".join(rng.choice(string.digits) for _ in range(6))
    return f"{prefix} {digits[:2]} {digits[2:4]} {digits[4:]} {rng.choice('ABCD')}"


def bsn(rng: random.Random) -> str:
    while True:
        head = "".join(rng.choice(string.digits) for _ in range(8))
        last = sum(int(x) * w for x, w in zip(head, range(9, 1, -1), strict=True)) % 11
        if last < 10 and head != "00000000":
            return head + str(last)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt(rng: random.Random) -> str:
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = b64url(json.dumps({"sub": str(rng.randint(1, 10**6))}).encode())
    return f"{header}.{payload}.{b64url(rng.randbytes(32))}"


def generated_rows(rng: random.Random, count: int) -> dict[str, list[tuple[Any, ...]]]:
    alnum = string.ascii_letters + string.digits
    today = date.today()
    customers, payments, accounts, products, tickets = [], [], [], [], []
    for i in range(count):
        first, last = rng.choice(FIRST), rng.choice(LAST)
        email = f"{first.lower()}.{i}@example.com".encode("ascii", "ignore").decode()
        phone = rng.choice([f"({rng.randint(200, 999)}) {rng.randint(200, 999)}-{rng.randint(0, 9999):04d}",
                            f"+1 {rng.randint(200, 999)} {rng.randint(200, 999)} {rng.randint(0, 9999):04d}"])
        customers.append((
            first, last, email, phone, today - timedelta(days=rng.randint(18 * 365, 90 * 365)),
            rng.choice(["female", "male", "other"]), f"{rng.randint(1000, 99999):05d}",
            f"{rng.randint(1, 400)} {rng.choice(STREETS)}", ssn(rng),
            f"c{i}.{last[:3].lower()}@mail.example.net".replace("'", ""),
            f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
            today - timedelta(days=rng.randint(0, 700)), rng.random() < 0.5, rng.randint(0, 5),
            rng.randint(0, 3), rng.choice(["gold", "silver", "bronze"])))
        payments.append((i + 1, luhn_complete(rng.choice(["4", "51", "37"]), 16, rng), iban_de(rng),
                         f"{rng.randint(0, 9999):04d}", "".join(rng.choice(string.digits) for _ in range(16)),
                         rng.randint(100, 99999) / 100))
        accounts.append((f"user{i}", "$2b$12$" + "".join(rng.choice(alnum + "./") for _ in range(53)),
                         "sk_live_" + "".join(rng.choice(alnum) for _ in range(24)), jwt(rng), nino(rng),
                         bsn(rng)))
        products.append((f"Widget {rng.choice(['Pro', 'Max', 'Mini'])} {rng.randint(100, 999)}",
                         f"SKU-{rng.randint(1000, 9999)}-{rng.choice(string.ascii_uppercase)}",
                         rng.randint(100, 99999) / 100, rng.choice(["mobile", "home", "work"]),
                         f"{rng.randint(1, 9)}.{rng.randint(0, 20)}.{rng.randint(0, 99)}"))
        tickets.append((" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 16))).capitalize() + ".",
                        rng.randint(18, 90), f"T-2026-{i:06d}"))
    # Canaries: distinctive values in sampled columns; none may ever be printed.
    customers[0] = (CANARIES[0], *customers[0][1:])
    customers[1] = (*customers[1][:2], CANARIES[1], *customers[1][3:7], CANARIES[4], CANARIES[6],
                    *customers[1][9:])
    payments[0] = (1, CANARIES[2], CANARIES[5], *payments[0][3:])
    tickets[0] = (CANARIES[3], *tickets[0][1:])
    return {"customers": customers, "payments": payments, "accounts": accounts, "products": products,
            "tickets": tickets}


SCHEMA = """
CREATE TABLE customers (
  id serial PRIMARY KEY, first_name text, last_name text, email text UNIQUE, phone text,
  birth_date date, gender text, zip_code text, street_address text, ssn text, contact text,
  last_login_ip inet, created_at date, email_verified boolean, card_count integer,
  zip_code_count integer, loyalty_tier text);
CREATE TABLE payments (
  id serial PRIMARY KEY, customer_id integer REFERENCES customers(id), card_number text, iban text,
  card_last4 text, tracking_code text, amount numeric(10,2));
CREATE TABLE accounts (
  id serial PRIMARY KEY, username text, password_hash text, api_token text, blob text, nino text, bsn text);
CREATE TABLE products (id serial PRIMARY KEY, name text, notes text, price numeric, phone_type text,
  version text);
COMMENT ON COLUMN products.notes IS 'internal product codes';
CREATE TABLE tickets (id serial PRIMARY KEY, notes text, age integer, reference text);
CREATE TABLE events (id integer, client_addr inet, kind text);
INSERT INTO events SELECT i, ('10.1.' || (i / 256) % 256 || '.' || i % 256)::inet, 'login'
  FROM generate_series(1, 5000) i;
ANALYZE events;
CREATE TABLE archived (id integer, email text, buyer text REFERENCES customers(email));
CREATE TABLE "Odd Table" ("E-Mail Address" text, "homePhone" text, "yes" integer);
INSERT INTO "Odd Table"
  SELECT 'odd' || i || '@example.com', '+44 20 7946 ' || lpad(i::text, 4, '0'), i
  FROM generate_series(1, 40) i;
"""


@pytest.fixture(scope="module")
def database(upstream: Any) -> Iterator[tuple[str, dict[str, list[tuple[Any, ...]]]]]:
    upstream.execute(f"DROP DATABASE IF EXISTS {DATABASE}")
    upstream.execute(f"CREATE DATABASE {DATABASE}")
    upstream.execute(SCHEMA, dbname=DATABASE)
    rows = generated_rows(random.Random(12), 300)
    columns = {
        "customers": "first_name, last_name, email, phone, birth_date, gender, zip_code, street_address, "
                     "ssn, contact, last_login_ip, created_at, email_verified, card_count, zip_code_count, "
                     "loyalty_tier",
        "payments": "customer_id, card_number, iban, card_last4, tracking_code, amount",
        "accounts": "username, password_hash, api_token, blob, nino, bsn",
        "products": "name, notes, price, phone_type, version",
        "tickets": "notes, age, reference",
    }
    with psycopg.connect(upstream.dsn(dbname=DATABASE), autocommit=True) as conn, conn.cursor() as cur:
        for table, names in columns.items():
            marks = ", ".join(["%s"] * len(names.split(",")))
            cur.executemany(f"INSERT INTO {table} ({names}) VALUES ({marks})", rows[table])  # type: ignore[arg-type]
    yield upstream.dsn(dbname=DATABASE), rows


def discover(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["discover", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def reported_kinds(report: dict[str, Any]) -> dict[tuple[str, str], str]:
    return {(t["name"], c["name"]): c["kind"] for t in report["tables"] for c in t["columns"]}


def precision_recall(truth: dict[tuple[str, str], str], found: dict[tuple[str, str], str],
                     columns: set[tuple[str, str]]) -> dict[str, tuple[int, int, int]]:
    """Per kind: (true positives, false positives, false negatives)."""
    scores: dict[str, tuple[int, int, int]] = {}
    for kind in sorted(set(truth.values()) | set(found.values())):
        tp = sum(1 for c in columns if truth.get(c) == kind and found.get(c) == kind)
        fp = sum(1 for c in columns if found.get(c) == kind and truth.get(c) != kind)
        fn = sum(1 for c in columns if truth.get(c) == kind and found.get(c) != kind)
        scores[kind] = (tp, fp, fn)
    return scores


def test_detectors_find_every_sensitive_column_and_no_decoy(
        database: tuple[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    dsn, _ = database
    code, out, _ = discover(capsys, "--upstream", dsn, "--format", "json")
    assert code == 0
    report = json.loads(out)
    found = reported_kinds(report)
    columns = set(found) | set(TRUTH)
    scores = precision_recall(TRUTH, found, columns)
    print("\nkind: tp fp fn", *(f"{k}: {v}" for k, v in scores.items()), sep="\n")
    assert {c: k for c, k in found.items() if TRUTH.get(c) != k} == {}, "false positives (decoys flagged)"
    assert {c: k for c, k in TRUTH.items() if found.get(c) != k} == {}, "sensitive columns missed"
    tables = {t["name"]: t for t in report["tables"]}
    assert tables["public.events"]["sampled_rows"] <= 1000
    card = next(c for c in tables["public.payments"]["columns"] if c["name"] == "card_number")
    assert card["evidence"][1] == "300 of 300 sampled values are valid card numbers (Luhn)"
    assert card["suggested"] == {"sensitivity": "restricted", "protection": {"partial": {"keep_last": 4}},
                                 "joinable": False}


def test_sample_is_bounded(database: tuple[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    dsn, _ = database
    code, out, _ = discover(capsys, "--upstream", dsn, "--format", "json", "--sample", "50")
    assert code == 0
    report = json.loads(out)
    for table in report["tables"]:
        assert table["sampled_rows"] <= 50
    addr = next(c for t in report["tables"] if t["name"] == "public.events" for c in t["columns"])
    assert addr["kind"] == "ip_address" and 0 < addr["sampled"] <= 50


def test_no_sampled_value_is_ever_printed(database: tuple[str, Any], capsys: pytest.CaptureFixture[str],
                                         tmp_path: Path) -> None:
    dsn, rows = database
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\ndatasets:\n  public.customers:\n    columns:\n"
                      "      ssn: {sensitivity: internal}\n")
    runs = [discover(capsys, "--upstream", dsn, "--format", fmt, *extra)
            for fmt in ("yaml", "json") for extra in ((), ("--policy", str(policy)), ("--sample", "7"))]
    output = "\n".join(out + err for _, out, err in runs)
    assert "customers" in output and "ssn" in output
    secrets = set(CANARIES)
    for table_rows in rows.values():
        for row in table_rows:
            secrets.update(str(v) for v in row if isinstance(v, str) and len(v) >= 8)
    secrets.update(c.replace(" ", "") for c in CANARIES)
    leaked = sorted(s for s in secrets if s in output)
    assert leaked == []


def test_draft_is_accepted_by_check(database: tuple[str, Any], capsys: pytest.CaptureFixture[str],
                                   tmp_path: Path) -> None:
    dsn, _ = database
    code, out, _ = discover(capsys, "--upstream", dsn)
    assert code == 0 and out.count("\ndatasets:\n") == 1
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\nroles:\n  analyst:\n    members: [alice]\n    tables: ['public.*']\n"
                      + out)
    capsys.readouterr()
    assert main(["check", "--policy", str(policy), "--upstream", dsn]) == 0, capsys.readouterr().out
    # Pasted into the policy, the draft leaves nothing for discover to report: the gate passes.
    code, out, err = discover(capsys, "--upstream", dsn, "--policy", str(policy), "--fail-at", "public")
    assert code == 0, out + err
    assert "datasets: {}" in out


def test_policy_mode_reports_gaps_and_gates(database: tuple[str, Any], capsys: pytest.CaptureFixture[str],
                                            tmp_path: Path) -> None:
    dsn, _ = database
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "version: 1\n"
        "datasets:\n"
        "  public.customers:\n"
        "    columns:\n"
        "      email: {sensitivity: confidential, protection: email}\n"
        "      ssn: {sensitivity: internal}\n"
        "      birth_date: {sensitivity: confidential}\n"
        "      gender: {sensitivity: internal, quasi_identifier: true}\n")
    code, out, err = discover(capsys, "--upstream", dsn, "--policy", str(policy), "--format", "json")
    assert code == 1, "restricted and confidential gaps must fail the gate"
    gaps = {(t["name"], c["name"]): c["policy"]["status"]
            for t in json.loads(out)["tables"] for c in t["columns"]}
    assert gaps[("public.customers", "ssn")] == "under-classified"
    assert gaps[("public.customers", "birth_date")] == "under-classified"  # not a quasi_identifier
    assert gaps[("public.payments", "card_number")] == "unclassified"
    assert ("public.customers", "email") not in gaps and ("public.customers", "gender") not in gaps
    assert "at or above confidential" in err
    code, out, _ = discover(capsys, "--upstream", dsn, "--policy", str(policy), "--schema", "public",
                            "--fail-at", "restricted")
    assert code == 1
    assert "# under-classified: the policy says internal" in out


def test_unreachable_upstream_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = discover(capsys, "--upstream", "postgresql://nobody@127.0.0.1:1/none")
    assert code == 2 and out == "" and "cannot connect" in err


# ---------------------------------------------------------------------------------------------
# A data set from a generator we did not write (Faker, several locales)

FAKER_TRUTH = {
    "name": "person_name", "email": "email", "phone_number": "phone", "address": "postal_address",
    "postcode": "postal_code", "date_of_birth": "date_of_birth", "iban": "iban",
    "credit_card_number": "payment_card", "us_ssn": "us_ssn", "bsn": "national_id",
    "ip_address": "ip_address", "client_ipv6": "ip_address", "notes": "free_text", "password": "secret",
    "sex": "gender",
}
FAKER_DECOYS = ["job", "company", "catch_phrase", "user_agent", "uuid", "license_plate", "isbn13", "ean13",
                "city", "color_name", "file_path"]


def test_faker_data_several_locales(upstream: Any, database: tuple[str, Any],
                                    capsys: pytest.CaptureFixture[str]) -> None:
    faker = pytest.importorskip("faker")
    fake = faker.Faker(["en_US", "de_DE", "nl_NL", "en_GB", "fr_FR"])
    us, nl = faker.Faker("en_US"), faker.Faker("nl_NL")
    faker.Faker.seed(2026)
    names = list(FAKER_TRUTH) + FAKER_DECOYS
    rows = [(fake.name(), fake.email(), fake.phone_number(), fake.address(), fake.postcode(),
             fake.date_of_birth(), fake.iban(), fake.credit_card_number(), us.ssn(), nl.ssn(), fake.ipv4(),
             fake.ipv6(), fake.text(), fake.password(), fake.random_element(["M", "F"]), fake.job(),
             fake.company(), fake.catch_phrase(), fake.user_agent(), fake.uuid4(), fake.license_plate(),
             fake.isbn13(), fake.ean13(), fake.city(), fake.color_name(), fake.file_path())
            for _ in range(300)]
    dsn, _ = database
    types = {"date_of_birth": "date", "ip_address": "inet"}
    columns = ", ".join(f"{n} {types.get(n, 'text')}" for n in names)
    upstream.execute(f"DROP SCHEMA IF EXISTS faker CASCADE; CREATE SCHEMA faker;"
                     f"CREATE TABLE faker.people ({columns})", dbname=DATABASE)
    with psycopg.connect(dsn, autocommit=True) as conn, conn.cursor() as cur:
        cur.executemany(f"INSERT INTO faker.people ({', '.join(names)}) "  # type: ignore[arg-type]
                        f"VALUES ({', '.join(['%s'] * len(names))})", rows)
    code, out, _ = discover(capsys, "--upstream", dsn, "--schema", "faker", "--format", "json")
    assert code == 0
    report = json.loads(out)
    assert [t["name"] for t in report["tables"]] == ["faker.people"]
    found = {(t, c): k for (t, c), k in reported_kinds(report).items()}
    truth = {("faker.people", c): k for c, k in FAKER_TRUTH.items()}
    scores = precision_recall(truth, found, {("faker.people", n) for n in names})
    print("\nFaker kind: tp fp fn", *(f"{k}: {v}" for k, v in scores.items()), sep="\n")
    assert {c: k for c, k in found.items() if truth.get(c) != k} == {}, "false positives"
    assert {c: k for c, k in truth.items() if found.get(c) != k} == {}, "missed"
    leaked = sorted(v for row in rows for v in row if isinstance(v, str) and len(v) >= 8 and v in out)
    assert leaked == []


# ---------------------------------------------------------------------------------------------
# The value checks on their own (pure functions)

def test_sample_sql_is_bounded() -> None:
    from proxy.discovery.sample import Column, Table, sample_sql

    table = Table(1, "public", 'we"ird', 5_000_000.0, True, [Column(d.ColumnFacts('we"ird', "a b", "text"))])
    assert sample_sql(table, 1000) == ('SELECT pg_catalog.left("a b"::pg_catalog.text, 512) FROM "public".'
                                       '"we""ird" TABLESAMPLE SYSTEM (0.024000) LIMIT 1000')
    table.reltuples = 2000.0
    assert "TABLESAMPLE BERNOULLI (60.000000) LIMIT 1000" in sample_sql(table, 1000)
    table.reltuples = -1.0
    assert "TABLESAMPLE BERNOULLI (100.000000) LIMIT 10" in sample_sql(table, 10)


def test_checksums() -> None:
    assert d.is_card_number("4111 1111 1111 1111") and not d.is_card_number("4111 1111 1111 1112")
    assert not d.is_card_number("9111111111111111")  # no card network starts with 9
    assert d.is_iban("GB82 WEST 1234 5698 7654 32") and not d.is_iban("GB82 WEST 1234 5698 7654 33")
    assert d.is_us_ssn("078-05-1120") and not d.is_us_ssn("666-05-1120") and not d.is_us_ssn("078-00-1120")
    assert not d.is_us_ssn("912-05-1120") and not d.is_us_ssn_dashed("078051120")
    assert d.is_uk_nino("AB 12 34 56 C") and not d.is_uk_nino("ZZ260181T") and not d.is_uk_nino("DA123456A")
    assert d.is_nl_bsn("111222333") and not d.is_nl_bsn("111222334")
    assert d.is_ip_address("192.0.2.1") and d.is_ip_address("2001:db8::1") and not d.is_ip_address("1.2.3")
    assert d.is_jwt("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2ln") and not d.is_jwt("eyJub3QiOjF9.e30.x")
    assert d.is_credential_shape("$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo")
    assert d.is_credential_shape("AKIA" + "ABCDEFGHIJKLMNOP") and not d.is_credential_shape("hello world")


@pytest.mark.parametrize(("name", "type_sql", "values"), [
    ("card_count", "integer", ["0", "3", "1", "2", "5"]),
    ("zip_code_count", "integer", ["0", "1", "2", "2", "0"]),
    ("email_verified", "boolean", ["true", "false"] * 3),
    ("notes", "text", ["SKU-1234-AB", "SKU-9981-C", "SKU-0001-X", "SKU-7777-Q", "SKU-1000-A"]),
    ("phone_type", "text", ["mobile", "home", "work", "mobile", "home"]),
    ("created_at", "date", ["2025-01-02", "2024-11-30", "2023-06-01", "2025-07-07", "2022-02-02"]),
    ("tracking_code", "text", ["1234567890123456", "9999888877776666", "0000111122223333",
                               "5555444433332222", "8888777766665555"]),
])
def test_decoys_are_not_classified(name: str, type_sql: str, values: list[str]) -> None:
    assert d.classify(d.ColumnFacts("customers", name, type_sql), values) == []


def test_names_alone_classify_only_without_values() -> None:
    facts = d.ColumnFacts("users", "credit_card", "text")
    (finding,) = d.classify(facts, [])
    assert finding.kind == "payment_card" and finding.confidence == 0.5
    assert d.classify(facts, ["n/a"] * 10) == []  # values contradict the name
    assert [f.kind for f in d.classify(d.ColumnFacts("users", "name", "text"), ["Ada Lovelace"] * 5)] \
        == ["person_name"]
    assert d.classify(d.ColumnFacts("products", "name", "text"), ["Widget Pro"] * 5) == []
    assert [f.kind for f in d.classify(d.ColumnFacts("cards", "card_holder_name", "text"),
                                       ["Ada Lovelace"] * 5)] == ["person_name"]


def test_partitions_privileges_and_failed_samples(upstream: Any, database: tuple[str, Any],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A partitioned table is sampled through its parent (partitions are not listed twice); a table
    the login may not read and a sample PostgreSQL refuses are classified by name only, and the
    error message (which could quote data) is not printed, only its SQLSTATE."""
    assert database  # creates the database
    upstream.execute("""
        DROP SCHEMA IF EXISTS edge CASCADE; CREATE SCHEMA edge;
        CREATE TABLE edge.signups (id integer, contact_email text, day date) PARTITION BY RANGE (day);
        CREATE TABLE edge.signups_2025 PARTITION OF edge.signups
          FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
        INSERT INTO edge.signups
          SELECT i, 'p' || i || '@example.com', '2025-03-01' FROM generate_series(1, 50) i;
        CREATE TABLE edge.secrets (id integer, ssn text);
        INSERT INTO edge.secrets VALUES (1, 'not-an-ssn-at-all');
        CREATE MATERIALIZED VIEW edge.unfilled AS SELECT 'x'::text AS iban WITH NO DATA;
        CREATE TABLE edge.big AS
          SELECT 'b' || i || '@example.com' AS mail FROM generate_series(1, 120000) i;
        ANALYZE edge.big;
        DROP ROLE IF EXISTS discover_limited;
        CREATE ROLE discover_limited LOGIN PASSWORD 'limited';
        GRANT USAGE ON SCHEMA edge TO discover_limited;
        GRANT SELECT ON edge.signups, edge.unfilled, edge.big TO discover_limited;
    """, dbname=DATABASE)
    limited = upstream.dsn("discover_limited", "limited", dbname=DATABASE)
    code, out, err = discover(capsys, "--upstream", limited, "--schema", "edge", "--format", "json")
    assert code == 0, err
    tables = {t["name"]: t for t in json.loads(out)["tables"]}
    assert set(tables) == {"edge.signups", "edge.secrets", "edge.unfilled", "edge.big"}
    (mail,) = tables["edge.big"]["columns"]   # 120,000 rows: whole pages sampled (SYSTEM), at most N rows
    assert mail["kind"] == "email" and 0 < tables["edge.big"]["sampled_rows"] <= 1000
    (email,) = tables["edge.signups"]["columns"]
    assert email["kind"] == "email" and email["evidence"][1] == "50 of 50 sampled values are e-mail addresses"
    assert tables["edge.secrets"]["problem"] == "no SELECT privilege: classified by names only"
    assert tables["edge.secrets"]["columns"][0]["confidence"] == 0.5   # the name alone
    assert tables["edge.unfilled"]["problem"].startswith("sampling failed (SQLSTATE 55000")
    # A table another session holds locked: lock_timeout ends the wait, the next tables are sampled.
    with psycopg.connect(upstream.dsn(dbname=DATABASE)) as locker:
        locker.execute("LOCK TABLE edge.signups IN ACCESS EXCLUSIVE MODE")
        code, out, err = discover(capsys, "--upstream", limited, "--schema", "edge", "--format", "json")
    assert code == 0, err
    tables = {t["name"]: t for t in json.loads(out)["tables"]}
    assert tables["edge.signups"]["problem"].startswith("sampling failed (SQLSTATE 55P03")
    assert tables["edge.big"]["sampled_rows"] > 0
    assert "edge.secrets: no SELECT privilege" in err and "not-an-ssn" not in out + err
    assert "has not been populated" not in out + err   # PostgreSQL's message is not passed on


def test_demo_policy_gaps(upstream: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """Against the demo data set: the detectors find the demo policy's sensitive columns, and with the
    demo policy only what it leaves out (the `mock` schema's copy of users, the review text)."""
    import asyncio

    from proxy.demo.dataset import load_dataset

    upstream.execute("DROP DATABASE IF EXISTS pgveil_discover_demo")
    asyncio.run(load_dataset(upstream.dsn(), "pgveil_discover_demo"))
    dsn = upstream.dsn(dbname="pgveil_discover_demo")
    code, out, _ = discover(capsys, "--upstream", dsn, "--format", "json")
    assert code == 0
    found = reported_kinds(json.loads(out))
    expected = {("public.users", "full_name"), ("public.users", "email"), ("public.users", "password_hash"),
                ("public.users", "phone"), ("public.user_demographics", "birth_date"),
                ("public.user_demographics", "gender"), ("public.user_demographics", "zip"),
                ("public.identity_verifications", "document_number_hash"),
                ("public.identity_verifications", "national_id")}
    assert expected <= set(found)
    policy = str(Path(__file__).parent.parent / "proxy" / "demo" / "reviews.yaml")
    code, out, _ = discover(capsys, "--upstream", dsn, "--policy", policy, "--format", "json")
    assert code == 1
    gaps = {(t["name"], c["name"]) for t in json.loads(out)["tables"] for c in t["columns"]}
    assert gaps == {("mock.users", "email"), ("mock.users", "password_hash"), ("mock.users", "phone"),
                    ("public.reviews", "body")}


# ---------------------------------------------------------------------------------------------
# `pgveil serve`: the same detectors on names only, after each catalog read

def test_serve_counts_and_logs_unclassified_columns_after_ddl(upstream: Any, tmp_path: Path) -> None:
    import urllib.request

    from proxy.embedded import free_port
    from tests.proxy_harness import spawn_serve, wait_until

    upstream.execute("DROP DATABASE IF EXISTS pgveil_discover_serve")
    upstream.execute("CREATE DATABASE pgveil_discover_serve")
    upstream.execute("CREATE TABLE t (id integer, email text, card_count integer)",
                     dbname="pgveil_discover_serve")
    policy = tmp_path / "policy.yaml"
    policy.write_text(f"version: 1\nroles:\n  admin:\n    members: [{upstream.superuser}]\n"
                      "    statements: [all]\n    tables: ['*']\n"
                      "    reveal: [public, internal, confidential, restricted]\n"
                      "datasets:\n  public.t:\n    columns:\n      email: {sensitivity: confidential}\n")
    port = free_port()

    def gauge() -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
        (line,) = [x for x in text.splitlines() if x.startswith("pgveil_unclassified_sensitive_columns ")]
        return float(line.split()[1])

    dsn = upstream.dsn(dbname="pgveil_discover_serve")
    with spawn_serve("--upstream", dsn, "--policy", str(policy), "--listen", "127.0.0.1:0",
                     "--metrics", f"127.0.0.1:{port}") as served:
        served.wait_for_line("metrics on http://")
        assert gauge() == 0   # email is classified; card_count is a count, not a card
        with psycopg.connect(served.dsn(upstream.superuser, upstream.superpassword,
                                        dbname="pgveil_discover_serve"), autocommit=True) as conn:
            conn.execute("ALTER TABLE t ADD COLUMN ssn text")
            conn.execute("CREATE TABLE u (id integer, phone_number text, gender text)")
            conn.execute("SELECT 1")
            wait_until(lambda: gauge() == 2, "the gauge to count t.ssn and u.phone_number")
            served.wait_for_line(r"discovery: column public\.t\.ssn looks like us_ssn \(restricted\)")
            served.wait_for_line(r"discovery: column public\.u\.gender looks like gender \(internal\)")
            conn.execute("ALTER TABLE t ADD COLUMN note_count integer, ADD COLUMN iban text")
            conn.execute("SELECT 1")
            wait_until(lambda: gauge() == 3, "the gauge to count t.iban too")
            served.wait_for_line(r"discovery: column public\.t\.iban looks like iban")
        served.terminate()
        served.wait()
    # One line per new finding: the second catalog read did not log t.ssn again.
    assert gauge_lines(served.stderr) == ["public.t.ssn", "public.u.phone_number", "public.u.gender",
                                          "public.t.iban"]


def gauge_lines(stderr: str) -> list[str]:
    return [line.split("discovery: column ", 1)[1].split(" ", 1)[0]
            for line in stderr.splitlines() if "discovery: column " in line]


def test_a_telling_comment_counts_like_a_telling_name() -> None:
    emails = [f"p{i}@example.com" for i in range(3)]   # too few for values alone
    assert d.classify(d.ColumnFacts("t", "c7", "text"), emails) == []
    (finding,) = d.classify(d.ColumnFacts("t", "c7", "text", comment="Customer E-Mail, from signup"), emails)
    assert finding.kind == "email" and finding.evidence == (
        "the column's comment mentions email", "3 of 3 sampled values are e-mail addresses")


def test_inheritance_children_are_governed_by_their_parents_entry(
        upstream: Any, database: tuple[str, Any], capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    dsn, _ = database
    upstream.execute("""
        DROP SCHEMA IF EXISTS inh CASCADE; CREATE SCHEMA inh;
        CREATE TABLE inh.people (email text);
        CREATE TABLE inh.people_old (moved_on date) INHERITS (inh.people);
        INSERT INTO inh.people SELECT 'n' || i || '@example.com' FROM generate_series(1, 20) i;
        INSERT INTO inh.people_old
          SELECT 'o' || i || '@example.com', '2020-01-01' FROM generate_series(1, 20) i;
    """, dbname=DATABASE)
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\ndatasets:\n  inh.people:\n    columns:\n"
                      "      email: {sensitivity: confidential, protection: email}\n")
    code, out, err = discover(capsys, "--upstream", dsn, "--schema", "inh", "--policy", str(policy),
                              "--fail-at", "public")
    assert (code, out.splitlines()[-1]) == (0, "datasets: {}"), out + err
    code, out, _ = discover(capsys, "--upstream", dsn, "--schema", "inh")
    assert "inh.people_old:" in out   # without a policy the child is drafted like any table
