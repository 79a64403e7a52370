"""Audit: records of every access written before the statement runs, hash-chained, to a sink."""

from proxy.audit.chain import ChainState, HashChain
from proxy.audit.file import FSYNC_MODES, FsyncMode, JsonLinesFileSink
from proxy.audit.sink import AuditError, AuditRecord, AuditSink, GroupCommit
from proxy.audit.stream import StdoutSink
from proxy.audit.verify import verify

__all__ = [
    "FSYNC_MODES",
    "AuditError",
    "AuditRecord",
    "AuditSink",
    "ChainState",
    "FsyncMode",
    "GroupCommit",
    "HashChain",
    "JsonLinesFileSink",
    "StdoutSink",
    "verify",
]
