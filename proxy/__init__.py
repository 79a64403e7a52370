"""pgveil: a PostgreSQL wire-protocol proxy that enforces data-protection policy on every query."""

__version__ = "0.1.0"
