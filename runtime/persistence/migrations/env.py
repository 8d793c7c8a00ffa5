"""Alembic's environment: Tiffin runs migrations programmatically on a connection it opened
(`runtime/persistence/migrate.py` passes it in `config.attributes["connection"]`)."""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from runtime.persistence.tables import metadata


def run_on(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=metadata)
    with context.begin_transaction():
        context.run_migrations()


connection = context.config.attributes.get("connection")
if not isinstance(connection, Connection):
    raise RuntimeError("Tiffin's migrations run through runtime.persistence.migrate.upgrade")
run_on(connection)
