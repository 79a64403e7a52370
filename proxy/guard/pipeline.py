"""The guard pipeline: the ordered passes one Query/Parse message goes through, listed in one place.

    gate (pglast parse) -> classify -> resolve (catalog + search_path) -> RULES, in order
    -> agreement (sqlglot, masked roles) -> mask rewrite (table substitution) -> re-gate -> verdict

Every pass is a plain function in its own module. A rule is `Rule = Callable[[GuardStatement,
GuardContext], Refuse | None]` (see `proxy.guard.statement`); to add one, append it to `RULES`.
Rules whose decision depends on the value of a literal must call
`statement.mark_literal_dependent()` so the verdict cache never reuses their verdict for other
literal values.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from proxy.firewall import passes as firewall
from proxy.guard import rules, settings
from proxy.guard.agreement import parsers_agree
from proxy.guard.classify import classify
from proxy.guard.gate import gate
from proxy.guard.lexical import backslash_in_plain_string
from proxy.guard.mask import Edit, rewrite_statements
from proxy.guard.normalize import normalized_sql
from proxy.guard.positions import Splices
from proxy.guard.regate import regate
from proxy.guard.resolve import resolve
from proxy.guard.statement import GuardContext, GuardStatement, Rule
from proxy.guard.verdict import Allow, Refuse, Rewrite, StatementInfo, Verdict

RULES: list[Rule] = [
    rules.statement_class_allowed,
    rules.table_allow_list,
    rules.policy_out_of_date,
    rules.catalog_side_doors,
    rules.partition_bounds,
    rules.pgveil_schema,
    rules.function_side_doors,
    rules.unlisted_functions,
    rules.unlisted_views,
    rules.tablesample_on_protected,
    rules.explain_over_row_filter,
    rules.ddl_over_protected_data,
    rules.procedural_code,
    rules.write_to_masked_table,
    settings.session_settings,
    backslash_in_plain_string,
    firewall.injection_rules,
    firewall.join_on_sensitive_key,
    firewall.quasi_identifier_concentration,
]
"""Checks run on every statement, in order; the first Refuse wins."""


@dataclass(frozen=True, slots=True)
class Analysis:
    """The verdict for one message plus what the verdict cache needs to reuse it."""

    verdict: Verdict
    statements: tuple[GuardStatement, ...] = ()
    edits: tuple[Edit, ...] = ()  # splices applied to the message text, in text order
    literal_dependent: bool = False


def guard(sql: str, context: GuardContext) -> Verdict:
    """Decide about one Query/Parse message: Allow, Rewrite (masked) or Refuse."""
    return analyse(sql, context).verdict


def analyse(sql: str, context: GuardContext) -> Analysis:
    try:
        return _analyse(sql, context)
    except (RecursionError, MemoryError):
        return Analysis(Refuse("too-complex", "the statement is nested too deeply to analyse; simplify it"))
    except Exception as exc:  # fail closed: a guard bug must never let a statement through
        why = f"pgveil could not analyse the statement ({type(exc).__name__})"
        return Analysis(Refuse("analysis-failed", why))


def _analyse(sql: str, context: GuardContext) -> Analysis:
    gated = gate(sql)
    if isinstance(gated, Refuse):  # PostgreSQL's own error: its position and words follow the literals
        return Analysis(gated, literal_dependent=gated.native)
    statements = tuple(gated)
    literal_dependent = False
    for statement in statements:
        classify(statement)
        refusal = resolve(statement, context)
        if refusal is None:
            for rule in RULES:
                refusal = rule(statement, context)
                if refusal is not None:
                    break
        if refusal is None and context.masked:
            refusal = parsers_agree(statement)
        literal_dependent = literal_dependent or statement.literal_dependent
        if refusal is not None:
            return Analysis(
                replace(refusal, info=statement_info(statement, ())),
                statements,
                literal_dependent=literal_dependent or refusal.position > 0,  # positions move with literals
            )
    rewritten = rewrite_statements(statements, context)
    if isinstance(rewritten, Refuse):
        info = _message_info(statements, ())
        return Analysis(replace(rewritten, info=info), statements, literal_dependent=literal_dependent)
    edits, masks = rewritten
    info = _message_info(statements, masks)
    if not edits:
        return Analysis(Allow(sql, info), statements, (), literal_dependent)
    text = apply_edits(sql, edits)
    refusal = regate(text, statements, edits, context)
    if refusal is not None:
        return Analysis(replace(refusal, info=info), statements, literal_dependent=literal_dependent)
    splices = Splices([(edit.start, edit.end, len(edit.text)) for edit in edits])
    return Analysis(Rewrite(text, info, splices), statements, tuple(edits), literal_dependent)


def apply_edits(sql: str, edits: list[Edit] | tuple[Edit, ...]) -> str:
    pieces: list[str] = []
    cursor = 0
    for edit in edits:
        pieces.append(sql[cursor : edit.start])
        pieces.append(edit.text)
        cursor = edit.end
    pieces.append(sql[cursor:])
    return "".join(pieces)


def statement_info(statement: GuardStatement, masks: tuple[str, ...]) -> StatementInfo:
    normalized = normalized_sql(statement.text)
    relations = tuple(dict.fromkeys(ref.qualified for ref in statement.relations if ref.qualified))
    return StatementInfo(
        kind=statement.statement_class,
        fingerprint=statement.fingerprint,
        normalized_sql=normalized,
        relations=relations,
        columns=statement.columns_read,
        masks=masks,
        findings=tuple(statement.findings),
        reads_definitions=statement.reads_definitions,
    )


def _message_info(statements: tuple[GuardStatement, ...], masks: tuple[str, ...]) -> StatementInfo:
    if len(statements) == 1:
        return statement_info(statements[0], masks)
    infos = [statement_info(statement, ()) for statement in statements]
    return StatementInfo(
        kind=",".join(info.kind for info in infos),
        fingerprint=",".join(info.fingerprint for info in infos),
        normalized_sql="; ".join(info.normalized_sql for info in infos),
        relations=tuple(dict.fromkeys(r for info in infos for r in info.relations)),
        columns=tuple(dict.fromkeys(c for info in infos for c in info.columns)),
        masks=masks,
        findings=tuple(dict.fromkeys(f for info in infos for f in info.findings)),
        reads_definitions=any(info.reads_definitions for info in infos),
    )
