"""Rule `char-obfuscation`: strings spelled character by character or decoded from hex/base64.

Injected SQL builds strings so that no quote appears and filters do not see words:
`CHR(113)||CHR(122)||CHR(106)`, `concat(chr(97), chr(100))`,
`convert_from(decode('7573657273', 'hex'), 'UTF8')`.
Caught: two or more `chr()` calls in one concatenation (`||`, `concat`, `concat_ws`);
`convert_from(decode(...))`.
Let through: a single `chr(10)` as a separator (`string_agg(x, chr(10))`), `replace(x, chr(13), '')`,
`decode`/`encode` of columns for storage (`encode(digest, 'hex')`).
"""

from __future__ import annotations

from pglast import ast

from proxy.firewall.facts import DatabaseFacts
from proxy.firewall.statement import Finding, SubmittedSql, quote
from proxy.firewall.tree import concatenation_operands, function_name, is_concatenation
from proxy.policy.model import Role

RULE = "char-obfuscation"
CONCAT_FUNCTIONS = frozenset({"concat", "concat_ws"})


def find_char_obfuscation(submitted: SubmittedSql, role: Role, facts: DatabaseFacts) -> Finding | None:
    for node in submitted.nodes:
        if is_concatenation(node):
            operands = concatenation_operands(node)
        elif isinstance(node, ast.FuncCall) and function_name(node) in CONCAT_FUNCTIONS:
            operands = list(node.args or ())
        elif isinstance(node, ast.FuncCall) and function_name(node) == "convert_from" and node.args:
            argument = node.args[0]
            if isinstance(argument, ast.FuncCall) and function_name(argument) == "decode":
                return Finding(RULE, f"`{quote(node)}` decodes a string from hex or base64, which "
                                     "hides SQL from review (obfuscation); use a literal or a parameter")
            continue
        else:
            continue
        if sum(1 for operand in operands if _is_chr(operand)) >= 2:
            return Finding(RULE, f"`{quote(node)}` spells a string with chr() calls, which hides quotes "
                                 "and words (obfuscation); write the string as a literal or parameter")
    return None


def _is_chr(node: ast.Node | None) -> bool:
    while isinstance(node, ast.TypeCast):
        node = node.arg
    return isinstance(node, ast.FuncCall) and function_name(node) == "chr"
