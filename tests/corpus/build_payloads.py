"""Build tests/corpus/injection_payloads.json from sqlmap's payload files, once, by hand.

    /work/venv/bin/pip install sqlmap && /work/venv/bin/python tests/corpus/build_payloads.py

sqlmap (PyPI package `sqlmap`) ships its payloads as XML: tests (boolean-blind, error-based,
inline, stacked, time-blind, UNION) and boundaries (prefix/suffix that close the application's
quote or parenthesis). This script combines them the way sqlmap does — origin value, prefix,
payload, comment, suffix — for the tests that are generic or PostgreSQL-specific, and wraps the
result in six realistic application queries (string literal, number, LIKE pattern, ORDER BY, LIMIT,
OFFSET). It also adds the exploitation-phase forms (the vector with a real inference or query),
sqlmap's CHR() escaping of string literals, UNION column-count probes, a list of classic
hand-written payloads, and hand-written probes of issue 13's classes placed in every context.
`valid` records whether PostgreSQL's grammar (pglast) accepts the wrapped query: invalid ones
never reach the firewall (the guard's gate refuses them as syntax errors).
The generated file is committed; CI never runs this script.
"""

from __future__ import annotations

import json
import re
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pglast

OUTPUT = Path(__file__).with_name("injection_payloads.json")

CONTEXTS = {
    # name: (application query with {input}, original value, sqlmap ptype, sqlmap clause)
    "string": ("SELECT id, name, price FROM shop_products WHERE name = '{input}' AND active", "widget", 2, 1),
    "number": ("SELECT id, name, price FROM shop_products WHERE id = {input} AND active", "42", 1, 1),
    "like": ("SELECT id, name, price FROM shop_products WHERE name LIKE '%{input}%' ORDER BY name",
             "wid", 3, 1),
    "order_by": ("SELECT id, name, price FROM shop_products WHERE active ORDER BY {input} LIMIT 20",
                 "price", 1, 3),
    "limit": ("SELECT id, name, price FROM shop_products WHERE active ORDER BY id LIMIT {input}", "20", 1, 4),
    "offset": ("SELECT id, name, price FROM shop_products WHERE active ORDER BY id LIMIT 20 OFFSET {input}",
               "0", 1, 5),
}

EXTRACTED = "COALESCE(CAST(usename AS VARCHAR(10000))::text,' ')"
QUERY = f"SELECT {EXTRACTED} FROM pg_user OFFSET 0 LIMIT 1"
INFERENCE = f"ASCII(SUBSTRING(({QUERY})::text FROM 1 FOR 1))>64"
PLACEHOLDERS = {
    "[RANDNUM]": "5323", "[RANDNUM1]": "5324", "[RANDNUM2]": "7741", "[RANDNUM3]": "1180",
    "[RANDNUM4]": "9026", "[RANDNUM5]": "3357", "[RANDSTR]": "qZxv", "[RANDSTR1]": "pLmo",
    "[RANDSTR2]": "Tkqa", "[SLEEPTIME]": "5", "[DELIMITER_START]": "qvkjq", "[DELIMITER_STOP]": "qzvxq",
    "[GENERIC_SQL_COMMENT]": "-- wXyZ", "[DELAYED]": "5",
}
CLASSIC = [
    # Widely published hand-written payloads (OWASP testing guide, PayloadsAllTheThings style).
    ("string", "' OR '1'='1"), ("string", "' OR '1'='1' --"), ("string", "' OR 1=1--"),
    ("string", "admin'--"), ("string", "admin' #"), ("string", "' OR 'x'='x"),
    ("string", "x' AND 1=(SELECT COUNT(*) FROM pg_user); --"),
    ("string", "'; DROP TABLE shop_products; --"),
    ("string", "' UNION SELECT NULL, usename, NULL FROM pg_user--"),
    ("string", "' UNION SELECT 1, passwd, 3 FROM pg_shadow--"),
    ("string", "' AND 1=CAST((SELECT version()) AS int)--"), ("string", "' OR pg_sleep(5) IS NOT NULL--"),
    ("string", "' OR TRUE--"), ("string", "' OR 'a' LIKE 'a"), ("string", "x' OR 2>1 OR 'a'='b"),
    ("string", "'||(SELECT current_user)||'"), ("string", "'||pg_sleep(5)||'"),
    ("string", "';COPY (SELECT '') TO PROGRAM 'id';--"),
    ("string", "' UNION SELECT 1, pg_read_file('/etc/passwd'), 3--"),
    ("string", "' AND 1=(SELECT 1 FROM pg_catalog.pg_tables LIMIT 1)--"),
    ("string", "' UNION SELECT NULL, table_name, NULL FROM information_schema.tables--"),
    ("string", "' AND 1=0 UNION SELECT NULL, current_database(), NULL--"),
    ("string", "' OR name=convert_from(decode('7769646765', 'hex'), 'UTF8') OR 'a'='b"),
    ("number", "42 OR 1=1"), ("number", "42 OR TRUE"), ("number", "42 OR 5323=5323"),
    ("number", "42; SELECT pg_sleep(5)"), ("number", "42 AND 1=2 UNION SELECT NULL,NULL,NULL"),
    ("number", "-1 UNION ALL SELECT 1,usename,3 FROM pg_user"), ("number", "42 AND 2>1"),
    ("number", "42 AND (SELECT COUNT(*) FROM GENERATE_SERIES(1,5000000))>0"),
    ("number", "42 AND 1=CAST((SELECT usename FROM pg_user LIMIT 1) AS int)"),
    ("number", "42 AND 1=(SELECT usename FROM pg_user LIMIT 1)::regclass::oid::int"),
    ("number", "(SELECT 42 FROM pg_sleep(5))"), ("number", "42/**/OR/**/1=1"),
    ("number", "42 AND version() LIKE 'PostgreSQL%'"), ("number", "42 AND current_user='postgres'"),
    ("number", "42 AND lo_import('/etc/passwd') > 0"),
    ("number", "42 AND name=CHR(119)||CHR(105)||CHR(100)"),
    ("like", "%' OR '1'='1"), ("like", "%' OR 1=1 --"), ("like", "%' AND pg_sleep(5) IS NULL AND '%'='"),
    ("like", "%' UNION SELECT NULL,usename,NULL FROM pg_user--"),
    ("order_by", "1"), ("order_by", "(CASE WHEN (1=1) THEN name ELSE price::text END)"),
    ("order_by", "(SELECT CASE WHEN current_user='postgres' THEN 1 ELSE 1/0 END)"),
    ("order_by", "price; SELECT pg_sleep(5)"), ("order_by", "price-- "), ("order_by", "10--"),
    ("order_by", "(SELECT 1 FROM pg_sleep(5))"), ("order_by", "price,(SELECT 1 WHERE 5323=5323)"),
]

# Hand-written probes of the three classes issue 13 found forwarded for roles that are not marked
# `application` (a sleep in a subquery, a subquery over a login catalog, a server value computed into
# the value, a FROM-less UNION branch of server values), and the manual forms around them, placed in
# every context. Each is PostgreSQL that runs against the shop table (tests/test_firewall_probes_e2e.py).
_SERVER = ["(SELECT version())", "(SELECT current_user)", "(SELECT session_user)",
           "(SELECT current_database())", "(SELECT inet_server_addr())", "(SELECT pg_backend_pid())",
           "(SELECT current_setting('data_directory'))", "version()", "inet_server_addr()",
           "current_setting('config_file')"]
_LOGINS = ["(SELECT usename FROM pg_user LIMIT 1)", "(SELECT passwd FROM pg_shadow LIMIT 1)",
           "(SELECT rolname FROM pg_roles LIMIT 1)", "(SELECT rolpassword FROM pg_authid LIMIT 1)"]
_DELAYS = ["(SELECT '' FROM pg_sleep(5))", "(SELECT count(*) FROM generate_series(1, 50000000))",
           "(SELECT CASE WHEN (SELECT count(*) FROM pg_user) > 0 THEN pg_sleep(5)::text ELSE '' END)",
           "pg_sleep(5)::text"]
_BOOLEAN = "(SELECT substr(usename, 1, 1) FROM pg_user LIMIT 1) = 'p'"
_NO_TABLE = "FROM (VALUES (true)) v(active) WHERE TRUE"  # gives the template's trailing `AND active` a column
_TEXT_PROBES = _SERVER + _LOGINS + _DELAYS + [
    f"(SELECT CASE WHEN {_BOOLEAN} THEN 'a' ELSE 'b' END)",
    "(SELECT CASE WHEN starts_with(version(), 'PostgreSQL') THEN 'a' ELSE 'b' END)",
    "CAST((SELECT usename FROM pg_user LIMIT 1) AS int)::text", "(current_user::int)::text",
    "CASE WHEN starts_with(current_user, 'p') THEN (SELECT count(*) FROM pg_class a, pg_class b)::text "
    "ELSE '' END",
]
_NUMBER_PROBES = [
    "(SELECT length(version()))", "(SELECT pg_backend_pid())", "(SELECT length(current_user))",
    "(SELECT inet_server_port())", "(SELECT usesysid::int FROM pg_user LIMIT 1)",
    "(SELECT count(*) FROM pg_roles)", "(SELECT length(passwd) FROM pg_shadow LIMIT 1)",
    "(SELECT 0 FROM pg_sleep(5))", "(SELECT count(*) FROM generate_series(1, 50000000))",
    f"(SELECT CASE WHEN {_BOOLEAN} THEN 1 ELSE 0 END)",
    "(SELECT CASE WHEN starts_with(version(), 'PostgreSQL') THEN 1 ELSE 0 END)",
    "CASE WHEN EXISTS (SELECT 1 FROM pg_user WHERE usename LIKE 'p%') THEN 1 ELSE 0 END",
    "CAST((SELECT usename FROM pg_user LIMIT 1) AS int)", "current_user::int", "version()::int",
    "length(version())", "pg_backend_pid()", "CASE WHEN starts_with(current_user, 'f') THEN 1/0 ELSE 0 END",
]
CONTEXT_PROBES = (
    [("string", f"x' || {probe} || '") for probe in _TEXT_PROBES]
    + [("like", f"x' || {probe} || '") for probe in _TEXT_PROBES]
    + [("number", f"42 + {probe}") for probe in _NUMBER_PROBES]
    + [("limit", f"{probe}") for probe in _NUMBER_PROBES]
    + [("limit", f"20 + {probe}") for probe in _NUMBER_PROBES]
    + [("offset", f"{probe}") for probe in _NUMBER_PROBES]
    + [("order_by", f"id, {probe}") for probe in _SERVER + _LOGINS + _DELAYS]
    + [("order_by", f"{probe}") for probe in _NUMBER_PROBES]
    + [("order_by", f"CASE WHEN {_BOOLEAN} THEN name ELSE id::text END"),
       ("order_by",
        "CASE WHEN starts_with((SELECT usename FROM pg_user LIMIT 1), 'p') THEN name ELSE id::text END"),
       ("order_by", "CASE WHEN starts_with(version(), 'PostgreSQL') THEN name ELSE id::text END"),
       ("order_by", "(SELECT CASE WHEN starts_with(current_user, 'p') THEN 1 ELSE 1/0 END)"),
       ("order_by", "(SELECT CASE WHEN (SELECT count(*) FROM pg_user) > 0 THEN pg_sleep(5) END)::text")]
    + [("string", "x' AND active UNION SELECT 1, current_user, 3 FROM shop_products WHERE name <> '"),
       ("string", "x' AND active UNION SELECT 1, version(), 3 FROM shop_products WHERE name <> '"),
       ("number", f"42 UNION SELECT 1, current_user, NULL {_NO_TABLE}"),
       ("number", f"42 UNION SELECT pg_backend_pid(), version(), 3.0 {_NO_TABLE}"),
       ("number", f"42 UNION SELECT 1, session_user || '@' || current_database(), 3 {_NO_TABLE}"),
       ("like", "x%' UNION SELECT inet_server_port(), inet_server_addr()::text, price FROM shop_products "
                "WHERE name LIKE '"),
       ("like", "x%' UNION SELECT 1, current_user, 3 FROM shop_products WHERE name LIKE '")]
)


def main() -> int:
    import sqlmap  # the PyPI package; only this script needs it

    data = Path(sqlmap.__file__).parent / "data" / "xml"
    boundaries = [_element(node) for node in ElementTree.parse(data / "boundaries.xml").getroot()]
    tests = [
        _element(node) | {"file": path.stem}
        for path in sorted((data / "payloads").glob("*.xml"))
        for node in ElementTree.parse(path).getroot()
    ]
    entries: dict[str, dict[str, object]] = {}
    for context, (template, original, ptype, clause) in CONTEXTS.items():
        for test in tests:
            if test.get("dbms") not in (None, "PostgreSQL") or not _overlaps(test["clause"], clause):
                continue
            for payload in _payloads(test):
                for boundary in boundaries:
                    if (boundary["ptype"] != str(ptype) or not _overlaps(boundary["clause"], clause)
                            or not set(boundary["where"].split(",")) & set(test["where"].split(","))):
                        continue
                    for where in sorted(set(boundary["where"].split(",")) & set(test["where"].split(","))):
                        value = _injected(original, where, boundary, payload, test.get("comment", ""))
                        _add(entries, context, template, test["file"], test["title"], value)
                if ptype == 1 and "3" in test["where"].split(","):
                    # sqlmap's `where` 3 without a boundary: the payload replaces the value outright
                    # (only meaningful outside quotes; inside them it would be plain data)
                    _add(entries, context, template, test["file"], test["title"], payload)
        for source_context, payload in CLASSIC:
            if source_context == context:
                _add(entries, context, template, "classic", "hand-written classic", payload)
        for source_context, payload in CONTEXT_PROBES:
            if source_context == context:
                _add(entries, context, template, "context_probe", "hand-written probe", payload)
    corpus = sorted(entries.values(), key=lambda entry: (str(entry["context"]), str(entry["sql"])))
    OUTPUT.write_text(json.dumps(corpus, indent=1) + "\n")
    valid = sum(1 for entry in corpus if entry["valid"])
    print(f"{len(corpus)} payload queries ({valid} valid PostgreSQL) -> {OUTPUT}", file=sys.stderr)
    return 0


def _element(node: ElementTree.Element) -> dict[str, str]:
    values: dict[str, str] = {}
    for child in node.iter():
        if child is node or len(child):
            continue
        values.setdefault(child.tag, (child.text or "").strip())
    return values


def _overlaps(listed: str, clause: int) -> bool:
    numbers: set[int] = set()
    for part in listed.split(","):
        low, _, high = part.strip().partition("-")  # sqlmap writes ranges as "1-8"
        if low.isdigit():
            numbers.update(range(int(low), int(high or low) + 1))
    return 0 in numbers or clause in numbers


def _payloads(test: dict[str, str]) -> list[str]:
    """Detection payload, exploitation vector, and sqlmap's CHR()-escaped forms of both."""
    if test.get("vector") == "[UNION]":
        char = test.get("char", "NULL")
        forms = [f"UNION ALL SELECT {', '.join([char] * columns)}" for columns in range(1, 7)]
        extraction = f"'qvkjq'||{EXTRACTED}||'qzvxq'"
        forms += [f"UNION ALL SELECT {char},{extraction},{char} FROM pg_user",
                  f"UNION ALL SELECT {char},{_escape(extraction)},{char} FROM pg_user"]
        return [_fill(form) for form in forms]
    forms = [test.get("payload", ""), test.get("vector", "").replace("[INFERENCE]", INFERENCE)
             .replace("[QUERY]", QUERY)]
    forms = [_fill(form) for form in forms if form]
    return list(dict.fromkeys(forms + [_escape(form) for form in forms]))


def _fill(text: str) -> str:
    for placeholder, value in PLACEHOLDERS.items():
        text = text.replace(placeholder, value)
    return text.replace("[ORIGVALUE]", "42").replace("[ORIGINAL]", "42")


def _escape(payload: str) -> str:
    """sqlmap's PostgreSQL escaper: quoted strings become (CHR(..)||CHR(..)) chains."""
    def chain(match: re.Match[str]) -> str:
        text = match.group(1)
        if len(text) < 2:
            return match.group(0)
        return "(" + "||".join(f"CHR({ord(char)})" for char in text) + ")"
    return re.sub(r"'([^']*)'", chain, payload)


def _injected(original: str, where: str, boundary: dict[str, str], payload: str, comment: str) -> str:
    origin = {"1": original, "2": "-5323", "3": ""}[where]
    text = f"{origin}{_fill(boundary.get('prefix', ''))} {payload}"
    if comment:
        return text + " " + _fill(comment)
    suffix = _fill(boundary.get("suffix", ""))
    return f"{text} {suffix}".rstrip() if suffix else text


def _add(entries: dict[str, dict[str, object]], context: str, template: str, family: str, title: str,
         value: str) -> None:
    sql = template.format(input=value)
    if sql in entries:
        return
    try:
        pglast.parse_sql(sql)
        valid = True
    except pglast.parser.ParseError:
        valid = False
    entries[sql] = {"context": context, "family": family, "title": title, "input": value, "sql": sql,
                    "valid": valid}


if __name__ == "__main__":
    raise SystemExit(main())
