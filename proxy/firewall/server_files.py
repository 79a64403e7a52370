"""Rule `server-side-file`: statements that run programs or touch files on the database server.

Caught: `COPY ... TO/FROM PROGRAM '...'` (for every role: it runs a shell command as the server);
for roles not allowed `admin` statements also `COPY t FROM '/etc/passwd'`, `COPY t TO '/tmp/x'`
and the functions that read, list or write server files or reach other servers: `pg_read_file`,
`pg_read_binary_file`, `pg_ls_dir` (and the other `pg_ls_*`), `pg_stat_file`, `lo_import`,
`lo_export`, `dblink*`, and `CREATE FUNCTION ... LANGUAGE C` (it loads a library file from the
server's disk: `AS '/lib/libc.so.6', 'sleep'`, sqlmap's stacked sleep).
Let through: `COPY ... TO STDOUT` / `FROM STDIN` (the client's own data), large-object calls that
do not name server files (`lo_get`, `lo_put`).
"""

from __future__ import annotations

from pglast import ast

from proxy.firewall.facts import DatabaseFacts
from proxy.firewall.statement import Finding, SubmittedSql, quote
from proxy.firewall.tree import function_name
from proxy.policy.model import Role

RULE = "server-side-file"

SERVER_FILE_FUNCTIONS = frozenset({
    "pg_read_file", "pg_read_binary_file", "pg_ls_dir", "pg_ls_logdir", "pg_ls_waldir",
    "pg_ls_tmpdir", "pg_ls_archive_statusdir", "pg_ls_logicalsnapdir", "pg_ls_logicalmapdir",
    "pg_ls_replslotdir", "pg_stat_file", "lo_import", "lo_export", "pg_file_write",
    "pg_file_rename", "pg_file_unlink", "pg_file_sync", "pg_logdir_ls", "dblink", "dblink_exec",
    "dblink_connect", "dblink_connect_u", "dblink_send_query", "dblink_open",
})


def find_server_side_file(submitted: SubmittedSql, role: Role, facts: DatabaseFacts) -> Finding | None:
    administrator = role.may_run("admin")
    if not administrator and any(isinstance(node, ast.CreateFunctionStmt) and _language(node) == "c"
                                 for node in submitted.nodes_of(ast.CreateFunctionStmt)):
        return Finding(RULE, "CREATE FUNCTION ... LANGUAGE C loads a library file from the database "
                             "server's disk and runs it; only administrators may")
    for node in submitted.nodes:
        if isinstance(node, ast.CopyStmt) and node.filename is not None:
            if node.is_program:
                return Finding(RULE, f"COPY ... PROGRAM '{node.filename}' runs a command on the database "
                                     "server; use COPY ... TO STDOUT / FROM STDIN and process data on the "
                                     "client")
            if not administrator:
                return Finding(RULE, f"COPY with the server file '{node.filename}' reads or writes files on "
                                     "the database server; use COPY ... TO STDOUT / FROM STDIN")
        if (not administrator and isinstance(node, ast.FuncCall)
                and function_name(node) in SERVER_FILE_FUNCTIONS):
            return Finding(RULE, f"`{quote(node)}` touches server files or other servers; "
                                 "only administrators may, and not through this role")
    return None


def _language(function: ast.CreateFunctionStmt) -> str:
    for option in function.options or ():
        if option.defname == "language" and isinstance(option.arg, ast.String):
            return str(option.arg.sval).lower()
    return ""
