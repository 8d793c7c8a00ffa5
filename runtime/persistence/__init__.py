"""Persistence: the request log in SQLite or PostgreSQL (SQLAlchemy 2, async), its schema kept
by the Alembic migrations beside it, and the batching writer that spools to a file while the
database is down. The database integration (runtime/integrations/database.py) owns them."""
