"""Capture the catalog queries psql sends for its backslash commands into benign/psql_catalog.sql.

    /work/venv/bin/python tests/corpus/build_psql_catalog.py

Runs the embedded PostgreSQL 18's own psql with -E (ECHO_HIDDEN), which prints every hidden
query between `/******** QUERY *********/` markers. The generated file is committed.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from proxy.embedded import EmbeddedPostgres, bin_dir

OUTPUT = Path(__file__).parent / "benign" / "psql_catalog.sql"
COMMANDS = [r"\d", r"\dt", r"\df", r"\l", r"\dn", r"\du", r"\dv", r"\di", r"\d pg_class", r"\d+ pg_namespace"]


def main() -> int:
    queries: list[str] = []
    with EmbeddedPostgres.start() as server:
        for command in COMMANDS:
            result = subprocess.run([str(bin_dir() / "psql"), "-X", "-E", "-d", server.dsn(), "-c", command],
                                    capture_output=True, text=True, check=True)
            for chunk in result.stdout.split("/******** QUERY *********/")[1:]:
                query = chunk.split("/************************/")[0].strip()
                queries.append(f"-- psql {command}\n{query}")
    OUTPUT.write_text("\n\n".join(dict.fromkeys(queries)) + "\n")
    print(f"{len(queries)} queries -> {OUTPUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
