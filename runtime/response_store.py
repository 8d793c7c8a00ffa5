"""The Responses API's stored answers (`store: true`, the default): what `previous_response_id`
continues from and `GET /v1/responses/{id}` returns, each visible only to the client that made
it, the oldest dropped beyond `limits.stored_responses`. In the database with
`integrations=database` (runtime/persistence/stored_responses.py: every worker, across
restarts), else here, in memory per worker."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass
class StoredResponse:
    owner: str  # the client (API key name) that made it
    body: dict[str, Any]  # the response object as the API returned it
    conversation: list[dict[str, Any]]  # every message up to and including this answer


class ResponseStore(Protocol):
    """Where answers are kept: MemoryResponses below, or the database's."""

    async def put(self, response_id: str, stored: StoredResponse) -> None: ...

    async def get(self, response_id: str, owner: str) -> StoredResponse | None: ...

    async def delete(self, response_id: str, owner: str) -> bool: ...


class MemoryResponses:
    """This worker's answers, in memory."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()

    async def put(self, response_id: str, stored: StoredResponse) -> None:
        if self.capacity <= 0:
            return
        self._items[response_id] = stored
        self._items.move_to_end(response_id)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    async def get(self, response_id: str, owner: str) -> StoredResponse | None:
        return self._get(response_id, owner)

    def _get(self, response_id: str, owner: str) -> StoredResponse | None:
        stored = self._items.get(response_id)
        return stored if stored is not None and stored.owner == owner else None

    async def delete(self, response_id: str, owner: str) -> bool:
        if self._get(response_id, owner) is None:
            return False
        del self._items[response_id]
        return True
