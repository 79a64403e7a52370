"""Policy format v1: what loads, what it means, and how each mistake is reported."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.policy.loader import PolicyError, hash_key, load_policy, parse_policy
from proxy.policy.model import (
    Constant,
    Email,
    Generalize,
    Hash,
    Partial,
    Redact,
    Sensitivity,
)

REPO = Path(__file__).resolve().parent.parent
KEY = "policy-loader-test-key-0123456789"

MINIMAL = """
version: 1
roles:
  analyst:
    members: [alice]
    tables: ["public.*"]
datasets:
  public.users:
    columns:
      email: {sensitivity: confidential, protection: email}
"""


@pytest.fixture(autouse=True)
def hash_key_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGVEIL_HASH_KEY", KEY)


def errors_of(text: str) -> list[str]:
    with pytest.raises(PolicyError) as raised:
        parse_policy(text, "p.yaml")
    return raised.value.errors


def with_role(body: str) -> str:
    lines = "\n".join("    " + line for line in body.strip().splitlines())
    return f"version: 1\nroles:\n  analyst:\n{lines}\n"


def with_column(spec: str) -> str:
    return f"version: 1\ndatasets:\n  public.t:\n    columns:\n      c: {spec}\n"


def test_example_policy_of_the_product_spec_loads_with_its_meaning() -> None:
    policy = load_policy(REPO / "policies" / "example.yaml")
    analyst = policy.roles["analyst"]
    assert analyst.members == ("alice", "bi_*")
    assert analyst.statements == frozenset({"select"})
    assert analyst.tables == ("public.*", "analytics.*")
    assert analyst.reveal == frozenset({Sensitivity.PUBLIC, Sensitivity.INTERNAL})
    assert analyst.max_quasi_identifiers == 2
    assert analyst.row_filters == {"public.users": "region = 'CA'"}
    assert (analyst.injection, analyst.fingerprints) == ("enforce", "off")
    columns = policy.datasets["public.users"].columns
    assert columns["full_name"].protection == Partial(keep_first=1)
    assert columns["full_name"].quasi_identifier
    assert columns["email"].protection == Email()
    assert columns["ssn"].protection == Hash() and not columns["ssn"].joinable
    assert columns["birth_date"].protection == Generalize(unit="year")
    assert columns["password_hash"].protection == Redact()
    assert policy.settings.default_role == "deny"
    assert policy.role_for_user("bi_tableau") is analyst
    assert policy.role_for_user("mallory") is None
    assert policy.source.endswith("example.yaml")


def test_demo_reviews_policy_loads() -> None:
    policy = load_policy(REPO / "policies" / "reviews.yaml")
    assert "public.users" in policy.datasets
    assert policy.elevations and policy.elevations[0].max_duration_seconds == 1800


def test_defaults_of_a_minimal_role_deny_almost_everything() -> None:
    role = parse_policy("version: 1\nroles:\n  r: {members: [bob]}\n").roles["r"]
    assert role.statements == frozenset({"select"})
    assert role.tables == ()
    assert role.reveal == frozenset({Sensitivity.PUBLIC, Sensitivity.INTERNAL})
    assert role.row_filters == {} and role.max_quasi_identifiers is None
    assert (role.injection, role.fingerprints, role.application) == ("enforce", "off", False)


def test_unknown_sensitivity_is_reported_with_its_path_and_the_choices() -> None:
    errors = errors_of(with_role("reveal: [public, secret]"))
    assert errors == ["p.yaml: roles.analyst.reveal[1]: unknown sensitivity 'secret' "
                      "(expected one of public, internal, confidential, restricted)"]


def test_every_problem_is_collected_and_str_stays_one_line() -> None:
    text = """
version: 2
settings: {default_role: nobody}
roles:
  analyst:
    statments: [select]
    injection: maybe
datasets:
  public.users:
    columns:
      ssn: {sensitivity: secret, protection: hash}
"""
    with pytest.raises(PolicyError) as raised:
        parse_policy(text, "p.yaml")
    errors = raised.value.errors
    assert any("version: unsupported policy format version 2" in e for e in errors)
    assert any("settings.default_role: no role named 'nobody'" in e for e in errors)
    assert any("roles.analyst.statments: unknown key 'statments'" in e for e in errors)
    assert any("roles.analyst.injection: unknown value 'maybe'" in e for e in errors)
    assert any("datasets.public.users.columns.ssn.sensitivity: unknown value 'secret'" in e for e in errors)
    assert all(e.startswith("p.yaml: ") for e in errors)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(errors[0]) and f"(and {len(errors) - 1} more problems)" in message


@pytest.mark.parametrize(("text", "expected"), [
    ("version: 1\nrolez: {}\n", "p.yaml: rolez: unknown key 'rolez'"),
    ("version: 1\nsettings: {default_rol: deny}\n", "settings.default_rol: unknown key"),
    (with_role("members: alice"), "roles.analyst.members: expected a list, got text"),
    (with_role("statements: [select, merge]"), "statements[1]: unknown statement class 'merge'"),
    (with_role("tables: [users]"), "roles.analyst.tables[0]: table pattern 'users' is not schema.name"),
    (with_role("tables: [a.b.c]"), "table pattern 'a.b.c' is not schema.name"),
    (with_role("max_quasi_identifiers: -1"), "roles.analyst.max_quasi_identifiers: expected a whole number"),
    (with_role("fingerprints: learning"), "roles.analyst.fingerprints: unknown value 'learning'"),
    (with_role("application: yes"), "roles.analyst.application: expected true or false, got 'yes'"),
    (with_column("{sensitivity: secret}"), "datasets.public.t.columns.c.sensitivity: unknown value 'secret'"),
    (with_column("{sensitivity: public, protecton: hash}"), "columns.c.protecton: unknown key 'protecton'"),
    (with_column("{protection: scramble}"), "columns.c.protection: unknown protection 'scramble'"),
    (with_column("{protection: {partial: {keep_first: -1}}}"), "partial.keep_first: expected a whole"),
    (with_column("{protection: {partial: {keep_frist: 1}}}"), "protection.partial.keep_frist: unknown key"),
    (with_column("{protection: {partial: {mask_char: '**'}}}"), "mask_char: expected exactly one character"),
    (with_column("{protection: {generalize: week}}"), "protection.generalize: unknown generalization 'week'"),
    (with_column("{protection: {generalize: {bucket: 0}}}"), "generalize.bucket: expected a number > 0"),
    (with_column("{protection: {constant: [1, 2]}}"), "protection.constant: expected one value"),
    (with_column("{protection: {hash: {salt: x}}}"), "protection.hash: 'hash' takes no options"),
    (with_column("{protection: {email: null, hash: null}}"), "give exactly one protection"),
    (with_column("{joinable: no}"), "columns.c.joinable: expected true or false, got 'no'"),
    (with_column("{mode: OPTIONAL}"), "columns.c.mode: unknown value 'OPTIONAL'"),
    ("version: 1\ndatasets:\n  public.t*: {}\n", "datasets.public.t*: 'public.t*' is not a table name"),
    ("version: 1\ndatasets:\n  t: {}\n  public.t: {}\n", "names the same table as another entry (public.t"),
    ("version: 1\nroles:\n  deny: {}\n", "roles.deny: 'deny' is reserved"),
    ("version: 1\nsettings: {hash_key_env: 'not a name'}\n", "settings.hash_key_env: 'not a name' is not an"),
    ("roles: {}\n", "p.yaml: version: missing (add 'version: 1'"),
    ("version: 1\nroles: [a, b]\n", "p.yaml: roles: expected a mapping, got a list"),
    ("- just\n- a list\n", "p.yaml: document: expected a mapping, got a list"),
    ("", "p.yaml: document: the policy is empty"),
    ("version: 1\nroles: {a: [}\n", "p.yaml: line 2, column"),
])
def test_each_mistake_is_named_with_its_path(text: str, expected: str) -> None:
    errors = errors_of(text)
    assert any(expected in error for error in errors), errors


def test_a_key_given_twice_is_an_error_not_a_silent_override() -> None:
    text = ("version: 1\ndatasets:\n  public.t:\n    columns:\n"
            "      ssn: {sensitivity: restricted, protection: hash}\n"
            "      ssn: {sensitivity: public}\n")
    assert errors_of(text) == ["p.yaml: line 6: key 'ssn' is given twice "
                               "(remove one: a repeated key would silently replace the first)"]


def test_yaml_words_like_off_and_no_stay_words() -> None:
    role = parse_policy(with_role("fingerprints: off\ninjection: off")).roles["analyst"]
    assert (role.fingerprints, role.injection) == ("off", "off")
    dataset = parse_policy("version: 1\ndatasets:\n  public.t:\n    registered_at: 2024-03-01\n"
                           "    columns: {no: {sensitivity: public}}\n").datasets["public.t"]
    assert dataset.registered_at == "2024-03-01"
    assert "no" in dataset.columns


def test_unqualified_dataset_and_row_filter_names_mean_schema_public() -> None:
    policy = parse_policy("version: 1\nroles:\n  r: {row_filters: {users: 'region = 1'}}\n"
                          "datasets:\n  users: {columns: {id: {}}}\n")
    assert list(policy.datasets) == ["public.users"]
    assert policy.roles["r"].row_filters == {"public.users": "region = 1"}


def test_every_protection_form_builds_its_model() -> None:
    text = """
version: 1
datasets:
  s.t:
    columns:
      a: {protection: {partial: {keep_first: 2, keep_last: 3, mask_char: "#"}}}
      b: {protection: partial}
      c: {protection: {email: {}}}
      d: {protection: {generalize: month}}
      e: {protection: {generalize: {bucket: 2.5}}}
      f: {protection: {constant: 0}}
      g: {protection: {constant: "n/a"}}
      h: {protection: {constant: null}}
      i: {sensitivity: restricted}
"""
    columns = parse_policy(text).datasets["s.t"].columns
    assert columns["a"].protection == Partial(keep_first=2, keep_last=3, mask_char="#")
    assert columns["b"].protection == Partial()
    assert columns["c"].protection == Email()
    assert columns["d"].protection == Generalize(unit="month")
    assert columns["e"].protection == Generalize(bucket=2.5)
    assert columns["f"].protection == Constant(0)
    assert columns["g"].protection == Constant("n/a")
    assert columns["h"].protection == Constant(None)
    assert columns["i"].protection is None and columns["i"].effective_protection == Redact()


@pytest.mark.parametrize(("expression", "problem"), [
    ("region = 'CA'; DROP TABLE users", "contains ';'"),
    ("region = 'CA' -- and more", "contains a comment"),
    ("region = 'CA' /* hidden */", "contains a comment"),
    ("id IN (SELECT user_id FROM admins)", "contains a subquery"),
    ("EXISTS (SELECT 1)", "contains a subquery"),
    ("region = $1", "contains a parameter placeholder"),
    ("true UNION SELECT ssn FROM users", "no clauses after it"),
    ("true GROUP BY 1", "no clauses after it"),
    ("true ORDER BY 1", "no clauses after it"),
    ("region = ", "not a valid SQL boolean expression"),
    ("true) OR (true", "not a valid SQL boolean expression"),
])
def test_row_filters_must_be_one_plain_boolean_expression(expression: str, problem: str) -> None:
    quoted = "'" + expression.replace("'", "''") + "'"
    errors = errors_of(with_role(f"row_filters:\n  public.users: {quoted}"))
    where = "roles.analyst.row_filters.public.users"
    assert any(problem in error and where in error for error in errors), errors


def test_row_filters_may_use_strings_with_semicolons_and_functions() -> None:
    role = parse_policy(with_role("row_filters:\n  public.users: \"note <> 'a;b' AND lower(region) = 'ca'\""
                                  )).roles["analyst"]
    assert role.row_filters["public.users"] == "note <> 'a;b' AND lower(region) = 'ca'"


def test_elevations_are_parsed_and_checked() -> None:
    text = """
version: 1
roles:
  support: {}
elevations:
  - {role: support, users: [sven, "dev_*"], max_duration: 1h30m, approvers: [sam]}
  - {role: support, users: [x], max_duration: "30m", approver_required: false}
  - {role: ghost, users: [x], max_duration: 2h}
  - {role: support, users: [x], max_duration: forever}
  - {role: support, users: [x]}
  - {role: support, users: [x], max_duration: 1h, approvers: []}
"""
    errors = errors_of(text)
    assert any("elevations[2].role: no role named 'ghost'" in e for e in errors)
    assert any("elevations[3].max_duration: expected a duration like 30m" in e for e in errors)
    assert any("elevations[4].max_duration: missing" in e for e in errors)
    assert any("elevations[5].approvers: empty, but approver_required is true" in e for e in errors)
    assert len(errors) == 4
    good = parse_policy(text.split("  - {role: ghost")[0])
    first, second = good.elevations
    assert (first.role, first.users, first.max_duration_seconds) == ("support", ("sven", "dev_*"), 5400)
    assert (first.approver_required, first.approvers) == (True, ("sam",))
    assert (second.max_duration_seconds, second.approver_required) == (1800, False)


def test_default_role_may_name_an_existing_role() -> None:
    policy = parse_policy("version: 1\nsettings: {default_role: guest}\nroles:\n  guest: {}\n")
    assert policy.role_for_user("anyone") is policy.roles["guest"]


def test_dataset_and_column_metadata_for_the_catalog_export() -> None:
    text = """
version: 1
datasets:
  analytics.scores:
    description: Model output
    version: 2
    registered_by: ML pipeline
    registered_at: "2024-03-01T09:00:00Z"
    originating_source: sentiment-model v3
    columns:
      score: {description: Sentiment score, mode: REQUIRED, originating_source: model}
"""
    dataset = parse_policy(text).datasets["analytics.scores"]
    assert (dataset.description, dataset.version, dataset.registered_by, dataset.registered_at,
            dataset.originating_source) == ("Model output", "2", "ML pipeline", "2024-03-01T09:00:00Z",
                                             "sentiment-model v3")
    score = dataset.columns["score"]
    assert (score.description, score.mode) == ("Sentiment score", "REQUIRED")
    assert score.originating_source == "model"


def test_version_is_a_content_hash_that_ignores_comments_and_layout() -> None:
    first = parse_policy(MINIMAL)
    reformatted = parse_policy("# a comment\n" + MINIMAL.replace("[alice]", "\n      - alice"))
    changed = parse_policy(MINIMAL.replace("confidential", "restricted"))
    assert first.version == reformatted.version
    assert first.version != changed.version
    assert len(first.version) == 16


def test_hash_protection_without_its_key_does_not_load(monkeypatch: pytest.MonkeyPatch) -> None:
    text = with_column("{sensitivity: restricted, protection: hash}")
    monkeypatch.delenv("PGVEIL_HASH_KEY")
    assert errors_of(text) == [
        "p.yaml: settings.hash_key_env: environment variable PGVEIL_HASH_KEY is not set, and a column "
        "uses protection 'hash' (set PGVEIL_HASH_KEY to a secret of at least 16 bytes)"]
    monkeypatch.setenv("PGVEIL_HASH_KEY", "short-secret")
    assert any("shorter than 16 bytes" in error for error in errors_of(text))
    assert all("short-secret" not in error for error in errors_of(text))
    assert parse_policy(text, require_hash_key=False).datasets["public.t"].columns["c"].protection == Hash()


def test_hash_key_comes_from_the_named_variable_and_never_shows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REVIEWS_HASH_SECRET", "s3cr3t-value-that-is-long-enough")
    policy = parse_policy("version: 1\nsettings: {hash_key_env: REVIEWS_HASH_SECRET}\n"
                          "datasets:\n  public.t:\n    columns:\n      c: {protection: hash}\n")
    assert hash_key(policy) == b"s3cr3t-value-that-is-long-enough"
    assert "s3cr3t" not in repr(policy) and "s3cr3t" not in str(policy)
    monkeypatch.delenv("REVIEWS_HASH_SECRET")
    with pytest.raises(PolicyError) as raised:
        hash_key(policy)
    assert "REVIEWS_HASH_SECRET is not set" in str(raised.value)


def test_missing_file_is_a_policy_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError) as raised:
        load_policy(tmp_path / "nope.yaml")
    assert str(raised.value).startswith(f"{tmp_path / 'nope.yaml'}: cannot read the policy file")


def test_a_role_that_does_not_reveal_internal_has_masked_data_even_without_listed_columns() -> None:
    policy = parse_policy("version: 1\nroles:\n  outsider: {reveal: [public]}\n  insider: {}\n")
    assert policy.has_masked_columns(policy.roles["outsider"])
    assert not policy.has_masked_columns(policy.roles["insider"])


KEY_NAMES = ["version", "settings", "roles", "datasets", "elevations", "default_role", "hash_key_env",
             "members", "statements", "tables", "reveal", "row_filters", "injection", "fingerprints",
             "columns", "sensitivity", "protection", "partial", "generalize", "bucket", "keep_first",
             "mask_char", "constant", "role", "users", "max_duration", "public.users", "analyst", "ssn"]
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=True),
                    st.sampled_from(["select", "public", "email", "hash", "year", "*", "30m", "deny", "off",
                                     "restricted", "x = 1", "public.*", ""]), st.text(max_size=5))
KEYS = st.one_of(st.sampled_from(KEY_NAMES), st.integers(0, 2), st.text(max_size=3))
DOCUMENTS = st.recursive(
    SCALARS,
    lambda children: st.one_of(st.lists(children, max_size=3),
                               st.dictionaries(KEYS, children, max_size=4)),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None)
@given(document=DOCUMENTS)
def test_any_document_either_loads_or_raises_policy_error(document: object) -> None:
    text = yaml.safe_dump({"version": 1, **document} if isinstance(document, dict) else document)
    try:
        parse_policy(text, "fuzz.yaml")
    except PolicyError as error:
        assert error.errors and all(line.startswith("fuzz.yaml: ") for line in error.errors)
        assert "\n" not in str(error)
