"""Rule `comment-truncation`: comments that cut off the rest of a query or hide inside it.

Injection ends its payload with `--` or `/*` so that the remainder of the application's SQL
(`' AND active`) is ignored: `... WHERE name = 'x' OR 1=1-- ' AND active`.
Caught: a statement text that ends inside a `--` comment (no newline after it), for every role;
for application roles also any comment between two tokens of the query
(`SELECT/**/name/**/FROM ...`, `... = 1 -- x\\n AND ...`) and a trailing `--` comment.
Let through: comments before the query or a `/* ... */` after it (ORMs and sqlcommenter tag
queries that way), comments anywhere in queries from roles that are not applications when a
newline ends them (psql and BI tools send people's comments).
"""

from __future__ import annotations

from proxy.firewall.facts import DatabaseFacts
from proxy.firewall.statement import Finding, SubmittedSql
from proxy.policy.model import Role

RULE = "comment-truncation"
COMMENT_TOKENS = frozenset({"SQL_COMMENT", "C_COMMENT"})


def find_comment_truncation(submitted: SubmittedSql, role: Role, facts: DatabaseFacts) -> Finding | None:
    if "--" not in submitted.sql and "/*" not in submitted.sql:
        return None
    tokens = submitted.tokens
    if not tokens:
        return None
    last = tokens[-1]
    if last.name == "SQL_COMMENT" and "\n" not in submitted.sql[last.end + 1:]:
        comment = _excerpt(submitted, last.start, last.end)
        return Finding(RULE, f"the query ends inside the comment `{comment}`, which cuts off whatever "
                             "followed it (comment truncation); end the query before the comment")
    if not role.application:
        return None
    code = [index for index, token in enumerate(tokens) if token.name not in COMMENT_TOKENS]
    if not code:
        return None
    first, final = code[0], code[-1]
    for index, token in enumerate(tokens):
        if token.name not in COMMENT_TOKENS:
            continue
        if first < index < final or (index > final and token.name == "SQL_COMMENT"):
            return Finding(RULE, f"the application's query carries the comment "
                                 f"`{_excerpt(submitted, token.start, token.end)}` inside or after its SQL, "
                                 "which injected SQL uses to hide or cut off code; send it without comments")
    return None


def _excerpt(submitted: SubmittedSql, start: int, end: int) -> str:
    text = submitted.sql[start:end + 1]
    return text if len(text) <= 40 else text[:37] + "..."
