"""Reads and writes of the request log on one SQLAlchemy async engine."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, insert, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

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

    async def insert(self, rows: Sequence[dict[str, Any]]) -> None:
        """Insert rows in one transaction. A row already there (same `record_id`: a spool
        replayed after a write that committed) is skipped, so replays never duplicate."""
        if not rows:
            return
        dialect = self.engine.dialect.name
        if dialect == "postgresql":
            statement: Any = postgresql.insert(request_log).on_conflict_do_nothing()
        elif dialect == "sqlite":
            statement = sqlite.insert(request_log).on_conflict_do_nothing()
        else:
            statement = insert(request_log)
        async with self.engine.begin() as connection:
            await connection.execute(statement, list(rows))

    async def count(self) -> int:
        async with self.engine.connect() as connection:
            result = await connection.execute(select(func.count()).select_from(request_log))
            return int(result.scalar_one())

    async def rows(self, limit: int = 1000) -> list[dict[str, Any]]:
        """The newest rows first."""
        query = select(request_log).order_by(request_log.c.time.desc()).limit(limit)
        async with self.engine.connect() as connection:
            return [dict(row._mapping) for row in await connection.execute(query)]

    async def usage(self, since: float, until: float) -> list[dict[str, Any]]:
        """Requests, errors, tokens, cost and mean latency per key and model, for requests that
        arrived in [since, until)."""
        c = request_log.c
        errors = func.sum(func.cast(c.status >= 400, request_log.c.prompt_tokens.type))
        query = (
            select(
                c.key_name,
                c.model,
                func.count().label("requests"),
                errors.label("errors"),
                func.sum(c.prompt_tokens).label("prompt_tokens"),
                func.sum(c.completion_tokens).label("completion_tokens"),
                func.sum(c.cost).label("cost"),
                func.avg(c.latency_s).label("latency_avg_s"),
                func.min(c.time).label("first"),
                func.max(c.time).label("last"),
            )
            .where(c.time >= since, c.time < until)
            .group_by(c.key_name, c.model)
            .order_by(c.key_name, c.model)
        )
        async with self.engine.connect() as connection:
            result = await connection.execute(query)
            return [_usage_row(dict(row._mapping)) for row in result]


def _usage_row(row: dict[str, Any]) -> dict[str, Any]:
    for name in ("requests", "errors", "prompt_tokens", "completion_tokens"):
        row[name] = int(row[name] or 0)
    for name in ("cost", "latency_avg_s", "first", "last"):
        row[name] = float(row[name] or 0.0)
    return row
