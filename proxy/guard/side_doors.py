"""Functions that run SQL given as text, read whole tables, schemas or files, or large objects."""

from __future__ import annotations

SIDE_DOOR_FUNCTIONS = frozenset({
    "current_query", "ts_stat", "ts_rewrite", "pg_stat_file", "pg_current_logfile", "loread",
    "lowrite", "connectby", "pg_stat_statements", "pg_stat_statements_info",
})
SIDE_DOOR_PREFIXES = (
    "query_to_xml", "table_to_xml", "schema_to_xml", "database_to_xml", "cursor_to_xml", "dblink",
    "pg_read_", "pg_ls_", "pg_file_", "lo_", "pg_logical_slot_", "pg_replication_slot", "crosstab",
    "pg_get_wal_", "get_raw_page", "heap_page_item", "tuple_data_split", "bt_page_items", "brin_page_items",
    "gin_leafpage_items", "hash_page_items", "gist_page_items",
)


def is_side_door(name: str) -> bool:
    """`name` (a function's last name part) is one of the side doors above."""
    return name in SIDE_DOOR_FUNCTIONS or name.startswith(SIDE_DOOR_PREFIXES)
