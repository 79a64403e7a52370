"""Audit: records of every access written before the statement runs, hash-chained, to a sink."""

from proxy.audit.chain import ChainState, HashChain
from proxy.audit.file import (
    DEFAULT_FSYNC_INTERVAL,
    FSYNC_MODES,
    FsyncMode,
    JsonLinesFileSink,
    fsync_interval_of,
)
from proxy.audit.sink import AuditError, AuditRecord, AuditSink, GroupCommit, MappingWrites, Unsealed
from proxy.audit.stream import StdoutSink
from proxy.audit.verify import verify

__all__ = [
    "DEFAULT_FSYNC_INTERVAL",
    "FSYNC_MODES",
    "AuditError",
    "AuditRecord",
    "AuditSink",
    "ChainState",
    "FsyncMode",
    "GroupCommit",
    "HashChain",
    "JsonLinesFileSink",
    "MappingWrites",
    "StdoutSink",
    "Unsealed",
    "fsync_interval_of",
    "verify",
]
