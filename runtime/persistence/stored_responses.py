"""The Responses API's stored answers in the database (`integrations=database`), so that
`previous_response_id` and `GET /v1/responses/{id}` work on every worker and replica and across
restarts. The same interface as the in-memory store (runtime/response_store.py)."""

from __future__ import annotations

import json
import time

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncEngine

from runtime.persistence.tables import responses
from runtime.response_store import StoredResponse


class DatabaseResponses:
    def __init__(self, engine: AsyncEngine, capacity: int) -> None:
        self.engine = engine
        self.capacity = capacity

    async def put(self, response_id: str, stored: StoredResponse) -> None:
        if self.capacity <= 0:
            return
        row = {
            "id": response_id,
            "owner": stored.owner,
            "created_at": time.time(),
            "body": json.dumps(stored.body),
            "conversation": json.dumps(stored.conversation),
        }
        newest = select(responses.c.id).order_by(responses.c.created_at.desc())
        async with self.engine.begin() as connection:
            await connection.execute(delete(responses).where(responses.c.id == response_id))
            await connection.execute(responses.insert().values(**row))
            kept = newest.limit(self.capacity).scalar_subquery()
            await connection.execute(delete(responses).where(responses.c.id.not_in(kept)))

    async def get(self, response_id: str, owner: str) -> StoredResponse | None:
        query = select(responses.c.body, responses.c.conversation).where(
            responses.c.id == response_id, responses.c.owner == owner
        )
        async with self.engine.connect() as connection:
            row = (await connection.execute(query)).first()
        if row is None:
            return None
        return StoredResponse(owner, json.loads(row.body), json.loads(row.conversation))

    async def delete(self, response_id: str, owner: str) -> bool:
        statement = delete(responses).where(
            responses.c.id == response_id, responses.c.owner == owner
        )
        async with self.engine.begin() as connection:
            result = await connection.execute(statement)
        return bool(result.rowcount)
