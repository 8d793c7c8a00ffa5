"""GraphQL's batch fields: `batch(id)` (the Batch API's `GET /v1/batches/{id}`) and the
subscription `batchStatus(id)`, a batch's status and request counts each time they change
until it is final. The wire type only renames the batch object's fields."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import strawberry
from strawberry.scalars import JSON
from strawberry.types import Info

from runtime.transports.graphql_fields import FieldFactory, dispatch, stream


@strawberry.type(description="How many of a batch's requests have answered.")
class BatchRequestCounts:
    total: int
    completed: int = strawberry.field(description="Answered 2xx (lines of the output file).")
    failed: int = strawberry.field(description="Answered otherwise, or never ran.")


@strawberry.type(description="A batch of the Batch API (`/v1/batches`).")
class Batch:
    id: str
    status: str = strawberry.field(
        description="validating, in_progress, finalizing, completed, failed, expired,"
        " cancelling or cancelled"
    )
    endpoint: str
    input_file_id: str
    completion_window: str
    request_counts: BatchRequestCounts
    output_file_id: str | None
    error_file_id: str | None
    created_at: int
    expires_at: int | None
    completed_at: int | None
    errors: JSON | None
    metadata: JSON | None


def batch(shown: dict[str, Any]) -> Batch:
    counts = shown["request_counts"]
    return Batch(
        id=shown["id"],
        status=shown["status"],
        endpoint=shown["endpoint"],
        input_file_id=shown["input_file_id"],
        completion_window=shown["completion_window"],
        request_counts=BatchRequestCounts(
            total=counts["total"], completed=counts["completed"], failed=counts["failed"]
        ),
        output_file_id=shown.get("output_file_id"),
        error_file_id=shown.get("error_file_id"),
        created_at=shown["created_at"],
        expires_at=shown.get("expires_at"),
        completed_at=shown.get("completed_at"),
        errors=shown.get("errors"),
        metadata=shown.get("metadata"),
    )


def batch_query(route: str) -> Any:
    async def get_batch(info: Info, id: str) -> Batch:
        """One batch, with its request counts so far."""
        return batch(await dispatch(info, route, path={"batch_id": id}))

    return get_batch


def batch_subscription(route: str) -> Any:
    async def batch_status(
        info: Info, id: str, interval: float | None = None
    ) -> AsyncGenerator[Batch, None]:
        """The batch now, then each time its status or request counts change (looked at every
        `interval` seconds, default 1), until it is final."""
        query = {"batch_id": id} | ({} if interval is None else {"interval": str(interval)})
        async for shown in stream(info, route, query=query):
            yield batch(shown)

    return batch_status


BATCH_FIELDS: dict[str, FieldFactory] = {
    "batches.get": batch_query,
    "batches.watch": batch_subscription,
}
