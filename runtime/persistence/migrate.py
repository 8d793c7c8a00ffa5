"""Alembic, run programmatically at start: the migrations ship inside the package, so an
installed Tiffin (a wheel, a Bento) upgrades its database without an alembic.ini."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
LOCK_KEY = 0x7469_6666_696E  # "tiffin": the advisory lock that serializes migrations


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def head() -> str | None:
    """The newest revision the package ships."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


async def upgrade(engine: AsyncEngine, revision: str = "head") -> str | None:
    """Bring the database to `revision` (all migrations by default); returns the revision the
    database is at afterwards."""

    def run(connection: Connection) -> str | None:
        if connection.dialect.name == "postgresql":
            # Workers starting together migrate one at a time (held until the commit).
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": LOCK_KEY})
        command.upgrade(alembic_config(connection), revision)
        return MigrationContext.configure(connection).get_current_revision()

    async with engine.begin() as connection:
        return await connection.run_sync(run)
