"""Alembic migrations of Tiffin's database, applied at start by `migrate.upgrade`."""
