"""Picks, for each module compiled with mypyc, the compiled copy if built from that exact source.

`pip install` (setup.py) copies each module in COMPILED to its native name, stamps the copy with
the SHA-256 of the source and compiles it. At import, the copy is used only when its stamp is the
hash of the source beside it, so an edited checkout runs its edits (in plain Python) until it is
reinstalled; without a compiler, or with PGVEIL_PURE_PYTHON set, everything runs as plain Python.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from pathlib import Path
from types import ModuleType

COMPILED = {
    "proxy.wire.scanner": "proxy.wire._scanner_native",
    "proxy.session.relay": "proxy.session._relay_native",
    "proxy.hitpath": "proxy._hitpath_native",
}
"""Modules compiled at install, by the name of their compiled copy."""

IMPLEMENTATIONS: dict[str, str] = {}
"""What runs for each module in COMPILED: "mypyc", or "python" with the reason."""


def pure_python_forced() -> bool:
    """PGVEIL_PURE_PYTHON is set to 1, true, yes or on."""
    return os.environ.get("PGVEIL_PURE_PYTHON", "").strip().lower() in ("1", "true", "yes", "on")


def compiled(module: ModuleType) -> ModuleType:
    """`module`'s compiled copy when it is there and current, else `module` itself."""
    name = module.__name__
    if pure_python_forced():
        IMPLEMENTATIONS[name] = "python (PGVEIL_PURE_PYTHON is set)"
        return module
    try:
        native = importlib.import_module(COMPILED[name])
    except ImportError:
        IMPLEMENTATIONS[name] = "python (not compiled)"
        return module
    if str(getattr(native, "__file__", "")).endswith(".py"):
        IMPLEMENTATIONS[name] = "python (not compiled)"
        return module
    source = hashlib.sha256(Path(str(module.__file__)).read_bytes()).hexdigest()
    if getattr(native, "SOURCE_SHA256", None) != source:
        IMPLEMENTATIONS[name] = "python (the compiled copy is stale: reinstall pgveil to rebuild it)"
        return module
    IMPLEMENTATIONS[name] = "mypyc"
    return native


def describe() -> str:
    """One line for the log: what runs for each compiled module (resolving those not used yet)."""
    for name in COMPILED:
        if name not in IMPLEMENTATIONS:
            compiled(importlib.import_module(name))
    return ", ".join(f"{name.rsplit('.', 1)[1]} {how}" for name, how in sorted(IMPLEMENTATIONS.items()))
