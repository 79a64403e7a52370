"""How audit and metrics learn which role and policy version a connection policy acts under now."""

from __future__ import annotations

from collections.abc import Callable


def role_name_of(policy: object) -> str | None:
    """`policy.role_name` if it says, else the name of `policy.role()` (the guard's GuardedConnection,
    which includes an elevation in force), else None."""
    named = getattr(policy, "role_name", None)
    if isinstance(named, str):
        return named
    role = getattr(policy, "role", None)
    if callable(role):
        current = role()
        name = getattr(current, "name", None)
        return name if isinstance(name, str) else None
    return None


def policy_version_of(policy: object) -> str | None:
    """`policy.policy_version` if it says, else the version of the guard's enforcement policy."""
    version = getattr(policy, "policy_version", None)
    if isinstance(version, str):
        return version
    enforcement = getattr(policy, "enforcement", None)
    loaded = getattr(enforcement, "policy", None)
    version = getattr(loaded, "version", None)
    return version if isinstance(version, str) else None


def role_reader(policy: object) -> Callable[[], str | None]:
    """A function giving `role_name_of(policy)` now, with the attribute look-ups that find how
    worked out once (a policy's kind does not change; its role and version do)."""
    if isinstance(getattr(policy, "role_name", None), str):
        return lambda: role_name_of(policy)
    role = getattr(policy, "role", None)
    if callable(role):
        def current() -> str | None:
            name = getattr(role(), "name", None)
            return name if isinstance(name, str) else None
        return current
    return lambda: role_name_of(policy)


def policy_version_reader(policy: object) -> Callable[[], str | None]:
    """A function giving `policy_version_of(policy)` now (see `role_reader`)."""
    if isinstance(getattr(policy, "policy_version", None), str):
        return lambda: policy_version_of(policy)
    enforcement = getattr(policy, "enforcement", None)
    if enforcement is not None:
        def current() -> str | None:
            version = getattr(getattr(enforcement, "policy", None), "version", None)
            return version if isinstance(version, str) else None
        return current
    return lambda: policy_version_of(policy)
