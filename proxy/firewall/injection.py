"""The injection rules in the order they run, and how a role's `injection:` mode applies them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from proxy.firewall.catalog_probe import find_catalog_probe
from proxy.firewall.comments import find_comment_truncation
from proxy.firewall.error_based import find_error_based_extraction
from proxy.firewall.facts import DatabaseFacts
from proxy.firewall.inference import find_inference_probe
from proxy.firewall.obfuscation import find_char_obfuscation
from proxy.firewall.server_files import find_server_side_file
from proxy.firewall.sort_key import find_sort_key_probe
from proxy.firewall.stacked import find_stacked_statements
from proxy.firewall.statement import Finding, SubmittedSql
from proxy.firewall.tautology import find_tautology
from proxy.firewall.timing import find_time_based_probe
from proxy.firewall.union import find_union_extraction
from proxy.policy.model import Role

InjectionRule = Callable[[SubmittedSql, Role, DatabaseFacts], Finding | None]

# Cheapest and most certain first: enforce mode stops at the first finding.
INJECTION_RULES: tuple[InjectionRule, ...] = (
    find_stacked_statements,
    find_comment_truncation,
    find_server_side_file,
    find_time_based_probe,
    find_char_obfuscation,
    find_union_extraction,
    find_error_based_extraction,
    find_catalog_probe,
    find_sort_key_probe,
    find_tautology,
    find_inference_probe,
)


@dataclass(frozen=True, slots=True)
class Screening:
    """Result of the injection rules for one submission under one role's mode."""

    refusal: Finding | None = None  # set in `enforce` mode when a rule matched
    findings: tuple[Finding, ...] = ()  # every match (in `alert` mode: all of them, nothing refused)

    @property
    def rule_names(self) -> tuple[str, ...]:
        return tuple(finding.rule for finding in self.findings)


def screen_injection(submitted: SubmittedSql, role: Role, facts: DatabaseFacts | None = None) -> Screening:
    """Apply the injection rules as the role's `injection:` mode says (enforce | alert | off).

    Without `facts` (no catalog and policy) the rules that need them (sensitive columns, NOT NULL)
    see nothing to match."""
    known = facts if facts is not None else DatabaseFacts()
    if role.injection == "off":
        return Screening()
    if role.injection == "enforce":
        for rule in INJECTION_RULES:
            finding = rule(submitted, role, known)
            if finding is not None:
                return Screening(refusal=finding, findings=(finding,))
        return Screening()
    findings = tuple(finding for rule in INJECTION_RULES
                     if (finding := rule(submitted, role, known)) is not None)
    return Screening(findings=findings)
