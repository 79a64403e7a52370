"""Client sessions: one per accepted connection, relaying it to its own PostgreSQL connection."""

from proxy.session.observer import NullObserver, RelayCounters, RelayObserver, Traffic
from proxy.session.session import PolicyFactory, Session, SessionContext, client_tls_context

__all__ = [
    "NullObserver",
    "PolicyFactory",
    "RelayCounters",
    "RelayObserver",
    "Session",
    "SessionContext",
    "Traffic",
    "client_tls_context",
]
