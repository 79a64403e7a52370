"""Detectors: pure functions that classify one column from its name, comment, type and sampled values.

A finding carries counts only (how many sampled values matched), never a value: the caller passes the
sample in and gets back numbers and names.
"""

from __future__ import annotations

import base64
import functools
import ipaddress
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date

from proxy.policy.model import Email as EmailProtection
from proxy.policy.model import Generalize, Partial, Protection, Redact, Sensitivity
from proxy.policy.model import Hash as HashProtection

MIN_VALUES_ALONE = 5  # values alone (no telling name) never classify fewer sampled values than this

# ---------------------------------------------------------------------------------------------
# value checks (each takes one sampled value as text, returns whether it has the shape/checksum)

_EMAIL = re.compile(r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
                    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\.[A-Za-z]{2,}$")


def is_email(value: str) -> bool:
    return len(value) <= 254 and _EMAIL.match(value.strip()) is not None


def luhn_valid(digits: str) -> bool:
    total = 0
    for index, char in enumerate(reversed(digits)):
        digit = ord(char) - 48
        if index % 2 == 1:
            digit = digit * 2 - 9 if digit > 4 else digit * 2
        total += digit
    return total % 10 == 0


_CARD_SHAPE = re.compile(r"^[0-9][0-9 -]{10,22}[0-9]$")


def is_card_number(value: str) -> bool:
    """12 to 19 digits (spaces or dashes allowed), a card network's first digit, the Luhn check."""
    text = value.strip()
    if not _CARD_SHAPE.match(text):
        return False
    digits = text.replace(" ", "").replace("-", "")
    # 12 digits: Maestro; a leading 0: Maestro's 0604 range.
    return 12 <= len(digits) <= 19 and digits[0] in "023456" and luhn_valid(digits)


_IBAN_SHAPE = re.compile(r"^[A-Z]{2}[0-9]{2}[A-Z0-9]{11,30}$")


def is_iban(value: str) -> bool:
    """ISO 13616: country, two check digits, BBAN; the whole passes mod 97 == 1."""
    text = value.replace(" ", "").upper()
    if not _IBAN_SHAPE.match(text):
        return False
    rearranged = text[4:] + text[:4]
    number = "".join(str(int(char, 36)) for char in rearranged)
    return int(number) % 97 == 1


_SSN = re.compile(r"^([0-9]{3})-?([0-9]{2})-?([0-9]{4})$")
_SSN_DASHED = re.compile(r"^[0-9]{3}-[0-9]{2}-[0-9]{4}$")


def is_us_ssn(value: str) -> bool:
    """US Social Security number: area not 000, 666 or 9xx; group not 00; serial not 0000."""
    match = _SSN.match(value.strip())
    if match is None:
        return False
    area, group, serial = match.groups()
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


def is_us_ssn_dashed(value: str) -> bool:
    return _SSN_DASHED.match(value.strip()) is not None and is_us_ssn(value)


_NINO = re.compile(r"^(?!BG|GB|KN|NK|NT|TN|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z]"
                   r" ?[0-9]{2} ?[0-9]{2} ?[0-9]{2} ?[A-D]$")


def is_uk_nino(value: str) -> bool:
    """UK National Insurance number: two prefix letters (no D F I Q U V; O not second), 6 digits, A-D."""
    return _NINO.match(value.strip().upper()) is not None


def is_nl_bsn(value: str) -> bool:
    """Dutch citizen service number (BSN): 9 digits passing the 'elfproef' (weights 9..2, -1)."""
    digits = value.strip().replace(".", "").replace(" ", "")
    if len(digits) == 8:
        digits = "0" + digits
    if len(digits) != 9 or not digits.isdigit() or digits == "000000000":
        return False
    total = sum(int(d) * w for d, w in zip(digits[:8], range(9, 1, -1), strict=True)) - int(digits[8])
    return total % 11 == 0


def is_national_id(value: str) -> bool:
    return is_uk_nino(value) or is_nl_bsn(value)


_ID_TOKEN = re.compile(r"^[A-Z0-9][A-Z0-9 ./-]{4,22}[A-Z0-9]$")
_HEX_DIGEST = re.compile(r"^(?:[0-9a-f]{32}|[0-9a-f]{40}|[0-9a-f]{64}|[0-9a-f]{128})$")


def is_id_number(value: str) -> bool:
    """In a column named like an identity document: an ID-number shape (6 to 24 characters, at least
    5 digits; any country's format) or a hex digest of one (MD5/SHA), which identifies just the same."""
    text = value.strip()
    if _HEX_DIGEST.match(text.lower()):
        return True
    return _ID_TOKEN.match(text.upper()) is not None and sum(c.isdigit() for c in text) >= 5


def is_ip_address(value: str) -> bool:
    text = value.strip()
    if not text or len(text) > 49 or not (":" in text or text.count(".") == 3):
        return False
    try:
        ipaddress.ip_interface(text)
    except ValueError:
        return False
    return True


_PHONE = re.compile(r"^\+?[0-9 ().\-/]{6,24}(?: ?(?:x|ext\.?) ?[0-9]{1,6})?$", re.IGNORECASE)
_ISO_DATE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}")


def is_phone_number(value: str) -> bool:
    """7 to 15 digits with the punctuation phone numbers are written with (an extension allowed)."""
    text = value.strip()
    if not _PHONE.match(text) or _ISO_DATE.match(text):
        return False
    main = re.split(r"(?i) ?(?:x|ext\.?) ?", text)[0]
    count = sum(char.isdigit() for char in main)
    return bool(7 <= count <= 15)


def is_e164_phone(value: str) -> bool:
    text = value.strip()
    return text.startswith("+") and is_phone_number(text)


def parse_date(value: str) -> date | None:
    match = _ISO_DATE.match(value.strip())
    if match is None:
        return None
    try:
        return date.fromisoformat(match.group(0))
    except ValueError:
        return None


def is_birth_date(value: str, today: date | None = None) -> bool:
    """A date between 0 and 120 years before today."""
    parsed = parse_date(value)
    if parsed is None:
        return False
    today = today or date.today()
    return date(today.year - 120, 1, 1) <= parsed <= today


_NAME_TOKEN = re.compile(r"^[^\W\d_][^\W\d_'\u2019.-]*(?:['\u2019.-][^\W\d_]*)*\.?$")


def is_person_name(value: str) -> bool:
    """1 to 7 words of letters (apostrophes, hyphens, initials, particles), one with a capital letter."""
    words = value.split()
    if not 1 <= len(words) <= 7 or len(value) > 100:
        return False
    return all(_NAME_TOKEN.match(word) for word in words) and any(w[0].isupper() for w in words)


def is_postal_address(value: str) -> bool:
    """Has a house number and a word, and is long enough to be more than a code."""
    text = value.strip()
    return len(text) >= 8 and any(c.isdigit() for c in text) and sum(c.isalpha() for c in text) >= 4 \
        and " " in text


_POSTAL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 -]{1,9}$")


def is_postal_code(value: str) -> bool:
    text = value.strip()
    return _POSTAL.match(text) is not None and any(c.isdigit() for c in text)


GENDER_VALUES = frozenset({"m", "f", "male", "female", "man", "woman", "x", "other", "nonbinary",
                           "non-binary", "diverse", "d", "u", "unknown", "w", "männlich", "weiblich",
                           "homme", "femme", "h", "prefer not to say"})


def is_gender(value: str) -> bool:
    return value.strip().lower() in GENDER_VALUES


def is_age(value: str) -> bool:
    text = value.strip()
    return text.isdigit() and 0 <= int(text) <= 120


def is_free_text(value: str) -> bool:
    """Prose: at least 20 characters and 4 words."""
    return len(value) >= 20 and len(value.split()) >= 4


_PASSWORD_HASH = re.compile(
    r"^(?:\$2[abxy]?\$[0-9]{2}\$[./A-Za-z0-9]{53}"          # bcrypt
    r"|\$argon2(?:id|i|d)\$v=[0-9]+\$m=[0-9]+,t=[0-9]+,p=[0-9]+\$[A-Za-z0-9+/]+\$[A-Za-z0-9+/]+"  # argon2
    r"|\$scrypt\$[^\s]+|\$7\$[./A-Za-z0-9]{11,}[^\s]*"         # scrypt (passlib, libxcrypt)
    r"|\$(?:pbkdf2(?:-sha(?:1|256|512))?)\$[0-9]+\$[^\s]+"    # passlib pbkdf2
    r"|pbkdf2_sha(?:1|256)\$[0-9]+\$[^\s]+\$[^\s]+"          # Django
    r"|\$[56]\$(?:rounds=[0-9]+\$)?[./A-Za-z0-9]{1,16}\$[./A-Za-z0-9]{43,86}"  # sha256/512-crypt
    r"|SCRAM-SHA-256\$[0-9]+:[^\s]+)$")
_API_KEY = re.compile(
    r"^(?:AKIA|ASIA)[0-9A-Z]{16}$|^(?:sk|rk|pk)_(?:live|test)_[0-9A-Za-z]{16,}$|^gh[pousr]_[0-9A-Za-z]{36,}$"
    r"|^github_pat_[0-9A-Za-z_]{40,}$|^xox[abpr]-[0-9A-Za-z-]{10,}$|^AIza[0-9A-Za-z_-]{35}$"
    r"|^glpat-[0-9A-Za-z_-]{20,}$|^sk-[0-9A-Za-z_-]{20,}$")
_JWT = re.compile(r"^eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$")


def is_jwt(value: str) -> bool:
    text = value.strip()
    if _JWT.match(text) is None:
        return False
    header = text.split(".", 1)[0]
    try:
        decoded = json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(decoded, dict) and "alg" in decoded


def is_credential_shape(value: str) -> bool:
    """A password hash (bcrypt, argon2, scrypt, pbkdf2, sha-crypt, SCRAM), a known API-key shape or a JWT."""
    text = value.strip()
    return _PASSWORD_HASH.match(text) is not None or _API_KEY.match(text) is not None or is_jwt(text)


def entropy_bits_per_char(text: str) -> float:
    counts: dict[str, int] = {}
    for char in text:
        counts[char] = counts.get(char, 0) + 1
    return -sum(n / len(text) * math.log2(n / len(text)) for n in counts.values()) if text else 0.0


def is_secret(value: str) -> bool:
    """In a column named like a secret: a credential shape, or any single token (a plain password)."""
    text = value.strip()
    return is_credential_shape(text) or (len(text) >= 6 and " " not in text)


# ---------------------------------------------------------------------------------------------
# detectors

TEXT_TYPES = ("text", "character", "char", "citext", "name", "json")
DATE_TYPES = ("date", "timestamp")


@dataclass(frozen=True, slots=True)
class Detector:
    """One kind of sensitive data: how its column names and its values look, and the suggestion."""

    kind: str
    values_are: str                  # "812 of 1,000 sampled values <values_are>"
    sensitivity: Sensitivity
    name_pattern: re.Pattern[str]    # searched in "_word_word_" forms of the column name/comment
    check: Callable[[str], bool]     # a value matches, when the name or comment also says so
    alone: Callable[[str], bool] | None = None  # a value matches with no telling name (checksums)
    with_name_fraction: float = 0.5  # share of values that must match when the name says so
    alone_fraction: float = 0.8      # ... when only the values say so
    quasi_identifier: bool = False
    identifier: bool = False         # suggest joinable: false
    types: tuple[str, ...] = ()      # column type must start with one of these (empty: any)


def _words(*alternatives: str) -> re.Pattern[str]:
    return re.compile("_(?:" + "|".join(alternatives) + ")_")


DETECTORS: tuple[Detector, ...] = (
    Detector("email", "are e-mail addresses", Sensitivity.CONFIDENTIAL,
             _words("e_?mail", "e_?mail_?address", "mail_?address", "mail"), is_email, alone=is_email,
             identifier=True),
    Detector("payment_card", "are valid card numbers (Luhn)", Sensitivity.RESTRICTED,
             _words("card", "cc", "pan", "credit_?card", "card_?number", "card_?no", "ccn"),
             is_card_number, alone=is_card_number, identifier=True),
    Detector("iban", "are valid IBANs (mod 97)", Sensitivity.RESTRICTED,
             _words("iban", "bank_?account", "account_?number"), is_iban, alone=is_iban, identifier=True),
    Detector("us_ssn", "are well-formed US SSNs", Sensitivity.RESTRICTED,
             _words("ssn", "social_?security(?:_?number)?", "sozialversicherungsnummer"), is_us_ssn,
             alone=is_us_ssn_dashed, identifier=True),
    Detector("national_id", "are UK National Insurance numbers or valid Dutch BSNs (elfproef)",
             Sensitivity.RESTRICTED,
             _words("nino", "ni_?number", "national_?insurance(?:_?number)?", "national_?id", "bsn",
                    "burgerservicenummer", "sofi(?:_?nummer)?", "citizen_?id", "id_?number"),
             is_national_id, alone=is_uk_nino, identifier=True),
    Detector("id_document", "are ID-number shaped or digests of one", Sensitivity.RESTRICTED,
             _words("national_?id", "passport(?:_?(?:number|no))?",
                    "drivers?_?licen[cs]e(?:_?(?:number|no))?",
                    "document_?(?:number|no)(?:_?hash)?", "tax_?id", "tin", "id_?card(?:_?number)?",
                    "personalausweis(?:nummer)?", "identity_?number"),
             is_id_number, identifier=True),
    Detector("phone", "are phone numbers", Sensitivity.CONFIDENTIAL,
             _words("phone", "phone_?number", "mobile", "cell", "tel", "telephone", "fax", "msisdn",
                    "telefon", "telefoonnummer"), is_phone_number, alone=is_e164_phone,
             alone_fraction=0.9, identifier=True),
    Detector("ip_address", "are IP addresses", Sensitivity.CONFIDENTIAL,
             _words("ip", "ip_?addr(?:ess)?", "client_?addr(?:ess)?", "remote_?addr(?:ess)?", "inet"),
             is_ip_address, alone=is_ip_address),
    Detector("secret", "are password hashes, API keys or tokens (JWT)", Sensitivity.RESTRICTED,
             _words("password", "passwd", "pwd", "pass_?hash", "password_?hash", "secret", "token",
                    "api_?key", "access_?key", "secret_?key", "private_?key", "client_?secret",
                    "credentials?", "otp_?secret", "refresh_?token", "access_?token", "session_?token"),
             is_secret, alone=is_credential_shape),
    Detector("date_of_birth", "are dates 0 to 120 years ago", Sensitivity.CONFIDENTIAL,
             _words("dob", "birth_?date", "date_?of_?birth", "birth_?day", "birthday", "born(?:_?on)?",
                    "geburtsdatum", "geboortedatum"), is_birth_date, quasi_identifier=True,
             types=DATE_TYPES + TEXT_TYPES),
    Detector("person_name", "look like person names", Sensitivity.CONFIDENTIAL,
             _words("first_?name", "last_?name", "given_?name", "family_?name", "sur_?name",
                    "full_?name", "middle_?name", "maiden_?name", "fore_?name", "contact_?name",
                    "customer_?name", "person_?name", "display_?name", "vorname", "nachname",
                    "(?:card_?|account_?)?holder(?:_?name)?", "cardholder(?:_?name)?",
                    "achternaam", "voornaam", "nom", "prenom"), is_person_name, types=TEXT_TYPES),
    Detector("postal_address", "look like street addresses", Sensitivity.CONFIDENTIAL,
             _words("address", "addr", "street", "street_?address", "address_?line_?[0-9]?",
                    "address_?[0-9]", "home_?address", "mailing_?address", "strasse", "adresse"),
             is_postal_address, types=TEXT_TYPES),
    Detector("postal_code", "look like ZIP or postal codes", Sensitivity.CONFIDENTIAL,
             _words("zip", "zip_?code", "zipcode", "postal_?code", "post_?code", "postcode", "plz",
                    "postleitzahl"), is_postal_code, quasi_identifier=True),
    Detector("gender", "are gender values", Sensitivity.INTERNAL,
             _words("gender", "sex", "geschlecht"), is_gender, with_name_fraction=0.8,
             quasi_identifier=True, types=TEXT_TYPES),
    Detector("age", "are ages (0 to 120)", Sensitivity.INTERNAL, _words("age", "age_?years", "alter"),
             is_age, with_name_fraction=0.9, quasi_identifier=True,
             types=("smallint", "integer", "bigint", "numeric", *TEXT_TYPES)),
    Detector("free_text", "are free text (4 or more words)", Sensitivity.CONFIDENTIAL,
             _words("notes?", "comments?", "remarks?", "memo", "message", "bio", "feedback",
                    "complaint", "diagnosis", "free_?text", "body", "reason", "annotation"),
             is_free_text, with_name_fraction=0.3, types=TEXT_TYPES),
)

# Words that turn a telling name into a statistic or a flag about the thing: card_count, email_verified.
_NEGATING_WORDS = frozenset({
    "count", "counts", "cnt", "num", "total", "sum", "avg", "mean", "min", "max", "flag", "is", "has",
    "len", "length", "type", "kind", "status", "valid", "verified", "enabled", "format", "pattern",
    "template", "changed", "updated", "created", "expires", "expiry", "expired", "at", "policy",
    "rule", "version", "hint", "attempts", "fingerprint", "domain", "provider", "brand", "country",
    "exp", "last4", "last_four", "opt", "optin", "consent", "reset", "sent", "bounced", "prefix",
})
# Tables whose bare `name` column is a person's name.
_PEOPLE_TABLES = _words("users?", "customers?", "employees?", "persons?", "people", "patients?",
                        "members?", "contacts?", "staff", "students?", "authors?", "reviewers?",
                        "clients?", "accounts?", "applicants?", "candidates?", "donors?", "guests?")
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_SPLIT = re.compile(r"[^a-z0-9]+")


@functools.lru_cache(maxsize=65536)
def name_words(name: str) -> tuple[str, ...]:
    return tuple(word for word in _SPLIT.split(_CAMEL.sub("_", name).lower()) if word)


@functools.lru_cache(maxsize=65536)
def _name_form(name: str) -> str:
    return "_" + "_".join(name_words(name)) + "_"


@dataclass(frozen=True, slots=True)
class ColumnFacts:
    """What the catalog says about a column, and its sample (values as text; never printed)."""

    table: str          # relation name, unqualified
    name: str
    type_sql: str
    comment: str = ""


@dataclass(frozen=True, slots=True)
class Finding:
    """One detector's verdict on one column: counts and names only."""

    kind: str
    confidence: float
    sensitivity: Sensitivity
    quasi_identifier: bool
    identifier: bool
    evidence: tuple[str, ...]
    matched: int
    sampled: int


def name_says(detector: Detector, facts: ColumnFacts) -> str:
    """Why the column's name or comment points at this detector ('' if it does not)."""
    words = name_words(facts.name)
    if detector.name_pattern.search(_name_form(facts.name)) and not set(words) & _NEGATING_WORDS:
        return f"column name '{facts.name}' suggests {detector.kind}"
    if (detector.kind == "person_name" and words == ("name",)
            and _PEOPLE_TABLES.search(_name_form(facts.table))):
        return f"column 'name' of a table named '{facts.table}' suggests {detector.kind}"
    if facts.comment and detector.name_pattern.search(_name_form(facts.comment)):
        return f"the column's comment mentions {detector.kind}"
    return ""


def _type_fits(detector: Detector, type_sql: str) -> bool:
    if not detector.types:
        return not type_sql.startswith("boolean")
    return type_sql.startswith(detector.types)


def _count(values: Sequence[str], check: Callable[[str], bool]) -> int:
    return sum(1 for value in values if check(value))


def detect(detector: Detector, facts: ColumnFacts, values: Sequence[str]) -> Finding | None:
    """Apply one detector; `values` are the column's sampled non-NULL values as text."""
    if not _type_fits(detector, facts.type_sql):
        return None
    reason = name_says(detector, facts)
    sampled = len(values)
    if reason:
        if sampled == 0:
            return Finding(detector.kind, 0.5, detector.sensitivity, detector.quasi_identifier,
                           detector.identifier, (reason, "no values sampled: classified by name only"),
                           0, 0)
        matched = _count(values, detector.check)
        share = matched / sampled
        if share < detector.with_name_fraction:
            return None  # the values contradict the name (card_count holding small integers)
        confidence = round(0.6 + 0.39 * share, 2)
        return Finding(detector.kind, confidence, detector.sensitivity, detector.quasi_identifier,
                       detector.identifier,
                       (reason, f"{matched:,} of {sampled:,} sampled values {detector.values_are}"),
                       matched, sampled)
    if detector.alone is None or sampled < MIN_VALUES_ALONE:
        return None
    matched = _count(values, detector.alone)
    share = matched / sampled
    if share < detector.alone_fraction:
        return None
    confidence = round(0.5 + 0.45 * share, 2)
    return Finding(detector.kind, confidence, detector.sensitivity, detector.quasi_identifier,
                   detector.identifier,
                   (f"{matched:,} of {sampled:,} sampled values {detector.values_are}",
                    "the column name says nothing: classified by its values"),
                   matched, sampled)


def classify(facts: ColumnFacts, values: Sequence[str]) -> list[Finding]:
    """Every detector's finding on the column, strongest first (sensitivity, then confidence)."""
    found = [finding for detector in DETECTORS if (finding := detect(detector, facts, values))]
    found.sort(key=lambda f: (f.sensitivity, f.confidence), reverse=True)
    return found


def suggested_protection(kind: str, type_sql: str) -> Protection | None:
    """A protection that fits the column's type (None: leave unmasked, e.g. a quasi-identifier)."""
    is_text = type_sql.startswith(TEXT_TYPES)
    is_date = type_sql.startswith(DATE_TYPES)
    if kind == "email":
        return EmailProtection() if is_text else Redact()
    if kind in ("payment_card", "iban"):
        return Partial(keep_last=4) if is_text or type_sql.startswith(("bigint", "numeric")) else Redact()
    if kind == "phone":
        return Partial(keep_last=2) if is_text else Redact()
    if kind in ("us_ssn", "national_id", "id_document", "ip_address"):
        return HashProtection()
    if kind == "date_of_birth":
        return Generalize(unit="year") if is_date else Redact()
    if kind == "person_name":
        return Partial(keep_first=1)
    if kind == "postal_code":
        return Partial(keep_first=3) if is_text else Redact()
    if kind in ("gender", "age"):
        return None
    return Redact()
