"""OpenAI's Files API for batch input and output: `POST /v1/files` (multipart: `file`,
`purpose=batch`), `GET /v1/files`, `GET /v1/files/{file_id}`, `GET /v1/files/{file_id}/content`
and `DELETE /v1/files/{file_id}`. Files live in the object_storage integration; an upload is a
JSONL batch input, checked line by line (400 naming the first bad line). A key sees and deletes
only its own files; an admin key sees every one."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from hooks.request_limits import client_of
from runtime.batches.batch_input import BadLine, read_lines
from runtime.batches.batch_records import FileRecord, new_id
from runtime.batches.batch_store import BatchStore
from runtime.dispatch import Context
from runtime.integrations.object_storage.object_stores import ObjectNotFound
from runtime.types import Event, FileBody, HandlerError, UploadedFile

T = TypeVar("T")
PURPOSES = ("batch",)
_FORM_FIELDS = {"file", "purpose", "expires_after"}


def store_of(ctx: Context) -> BatchStore:
    store = ctx.runtime.batches.store()
    if store is None:
        raise HandlerError(
            503,
            "files need the object_storage integration running (integrations=object_storage)",
            type="server_error",
            code="object_storage_unavailable",
        )
    return store


def sees_all(ctx: Context) -> bool:
    """An admin key sees every client's files and batches."""
    principal = ctx.principal
    return principal is not None and "admin" in getattr(principal, "scopes", ())


def visible(ctx: Context, owner: str) -> bool:
    return owner == client_of(ctx) or sees_all(ctx)


def page(
    event: Event, items: Sequence[T], id_of: Callable[[T], str], *, default_limit: int
) -> dict[str, Any]:
    """OpenAI's list shape, newest first (`order=asc` oldest), `limit` and `after` an id."""
    query = event.query
    limit_text = query.get("limit", str(default_limit))
    if not limit_text.isdigit() or not 1 <= int(limit_text) <= 10_000:
        raise HandlerError(400, "limit must be an integer from 1 to 10000", param="limit")
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise HandlerError(400, "order must be 'asc' or 'desc'", param="order")
    ordered = list(items) if order == "asc" else list(reversed(items))
    after = query.get("after")
    if after:
        ids = [id_of(item) for item in ordered]
        if after not in ids:
            raise HandlerError(400, f"after: no such id {after!r}", param="after")
        ordered = ordered[ids.index(after) + 1 :]
    chosen = ordered[: int(limit_text)]
    data = [item.shown() if hasattr(item, "shown") else item for item in chosen]
    return {
        "object": "list",
        "data": data,
        "first_id": id_of(chosen[0]) if chosen else None,
        "last_id": id_of(chosen[-1]) if chosen else None,
        "has_more": len(ordered) > len(chosen),
    }


async def create(event: Event, ctx: Context) -> dict[str, Any]:
    body = event.body
    if not isinstance(body, dict) or not isinstance(body.get("file"), UploadedFile):
        raise HandlerError(
            400,
            "POST /v1/files takes multipart/form-data with a `file` part and `purpose`",
            param="file",
            code="missing_file",
        )
    unknown = sorted(set(body) - _FORM_FIELDS)
    if unknown:
        raise HandlerError(400, f"unknown field {unknown[0]!r}", param=unknown[0])
    if "expires_after" in body:
        raise HandlerError(
            400,
            "expires_after is not supported: files are kept until deleted",
            param="expires_after",
            code="unsupported_parameter",
        )
    purpose = body.get("purpose")
    if purpose not in PURPOSES:
        raise HandlerError(
            400,
            f"purpose {purpose!r} is not supported: only 'batch' (batch input files)",
            param="purpose",
        )
    upload: UploadedFile = body["file"]
    try:
        read_lines(upload.content, ctx.runtime.settings.batch.max_lines)
    except BadLine as exc:
        raise HandlerError(400, f"file {exc}", param="file", code="invalid_file") from None
    store = store_of(ctx)
    record = FileRecord(
        id=new_id("file-"),
        owner=client_of(ctx),
        bytes=len(upload.content),
        filename=upload.filename,
        purpose=str(purpose),
    )
    await store.put_file(record, upload.content)
    return record.shown()


async def list_files(event: Event, ctx: Context) -> dict[str, Any]:
    purpose = event.query.get("purpose")
    files = [
        f
        for f in await store_of(ctx).files()
        if visible(ctx, f.owner) and (purpose is None or f.purpose == purpose)
    ]
    files.sort(key=lambda f: (f.created_at, f.id))
    return page(event, files, lambda f: f.id, default_limit=10_000)


async def _own_file(event: Event, ctx: Context) -> tuple[BatchStore, FileRecord]:
    file_id = event.path_params.get("file_id", "")
    store = store_of(ctx)
    record = await store.file(file_id)
    if record is None or not visible(ctx, record.owner):
        raise HandlerError(404, f"no file {file_id!r}", param="file_id", code="file_not_found")
    return store, record


async def get(event: Event, ctx: Context) -> dict[str, Any]:
    return (await _own_file(event, ctx))[1].shown()


async def content(event: Event, ctx: Context) -> FileBody:
    store, record = await _own_file(event, ctx)
    try:
        data = await store.file_content(record.id)
    except ObjectNotFound:
        raise HandlerError(404, f"no file {record.id!r}", code="file_not_found") from None
    return FileBody(data, "application/jsonl")


async def delete(event: Event, ctx: Context) -> dict[str, Any]:
    store, record = await _own_file(event, ctx)
    await store.delete_file(record.id)
    return {"id": record.id, "object": "file", "deleted": True}
