"""Load the deterministic restaurant-review data set and its demo logins into a PostgreSQL database."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPT_PATH = HERE / "reviews.sql"
"""Schema, data, logins and grants (pure SQL; md5-based pseudo-randomness, so every load is equal)."""
POLICY_PATH = HERE / "reviews.yaml"
"""The demo policy; `policies/reviews.yaml` in the repository is a link to this file."""

DEMO_DATABASE = "reviews"


@dataclass(frozen=True, slots=True)
class DemoLogin:
    """A PostgreSQL login of the demo and the article's company role the policy maps it to."""

    login: str
    password: str
    role: str


DEMO_LOGINS: tuple[DemoLogin, ...] = (
    DemoLogin("dana_scientist", "demo-dana", "data_scientist"),
    DemoLogin("sam_security", "demo-sam", "security_engineer"),
    DemoLogin("sven_engineer", "demo-sven", "software_engineer"),
    DemoLogin("mia_marketing", "demo-mia", "marketing_analyst"),
    DemoLogin("pete_product", "demo-pete", "product_manager"),
    DemoLogin("erin_exec", "demo-erin", "executive"),
)


async def load_dataset(admin_dsn: str, database: str = DEMO_DATABASE) -> None:
    """Create `database` (it must not exist) and load the data set into it as the DSN's superuser.

    The logins and the group role `reviews_demo_reader` are cluster-wide: they are created
    if missing and their passwords reset, so loading into a second database is harmless.
    """
    import asyncpg

    admin = await asyncpg.connect(admin_dsn)
    try:
        quoted = await admin.fetchval("SELECT quote_ident($1)", database)
        await admin.execute(f"CREATE DATABASE {quoted}")
    finally:
        await admin.close()
    conn = await asyncpg.connect(admin_dsn, database=database)
    try:
        await conn.execute(SCRIPT_PATH.read_text(encoding="utf-8"))
    finally:
        await conn.close()
