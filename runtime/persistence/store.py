"""Reads and writes of the request log on one SQLAlchemy async engine."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from runtime.persistence import rollups
from runtime.persistence.tables import request_log


class RequestLogStore:
    """The request log table on `engine`. The engine may be swapped (tests make the database
    unavailable that way); every call uses the current one."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def ping(self) -> None:
        """`SELECT 1`: raises when the database cannot answer."""
        async with self.engine.connect() as connection:
            await connection.execute(text("SELECT 1"))

    async def insert(self, rows: Sequence[dict[str, Any]]) -> int:
        """Insert rows and add them to the usage rollups, in one transaction. A row already
        there (same `record_id`: a spool replayed after a write that committed) is skipped and
        not counted again, so replays never duplicate. Returns how many rows were new."""
        if not rows:
            return 0
        dialect = self.engine.dialect.name
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        statement = insert(request_log).on_conflict_do_nothing().returning(request_log.c.record_id)
        async with self.engine.begin() as connection:
            result = await connection.execute(statement, list(rows))
            inserted = {row[0] for row in result}
            await rollups.add(
                connection, rollups.summed(r for r in rows if r["record_id"] in inserted)
            )
        return len(inserted)

    async def count(self) -> int:
        async with self.engine.connect() as connection:
            result = await connection.execute(select(func.count()).select_from(request_log))
            return int(result.scalar_one())

    async def rows(self, limit: int = 1000) -> list[dict[str, Any]]:
        """The newest rows first."""
        query = select(request_log).order_by(request_log.c.time.desc()).limit(limit)
        async with self.engine.connect() as connection:
            return [dict(row._mapping) for row in await connection.execute(query)]

    async def usage(
        self, since: float, until: float, by: str | None = None
    ) -> list[dict[str, Any]]:
        """Requests, errors, tokens, cost and mean latency per key and model, from the hourly
        rollups of the hours that start in [since rounded down to the hour, until); per hour
        or day too with `by`."""
        async with self.engine.connect() as connection:
            return await rollups.usage(connection, since, until, by)
