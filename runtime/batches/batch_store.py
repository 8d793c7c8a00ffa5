"""The Files and Batch APIs' data in the object store (the object_storage integration), so that
every worker and replica that shares the store sees the same files and batches:

    files/<file id>.json            a file's metadata (FileRecord)
    files/<file id>.data            its bytes
    batches/<batch id>.json         a batch's record (BatchRecord)
    batches-active/<batch id>       a marker while the batch is not final (one listing finds them)
    batch-results/<batch id>/<line>.ok | .err   one result a line (an output or error file line)

A line's result is written once: a line run again (redelivered after a worker died) finds its
result there and is not stored twice, so every line ends with exactly one result."""

from __future__ import annotations

import json
from typing import Any

from runtime.batches.batch_records import BatchRecord, FileRecord
from runtime.integrations.object_storage.object_stores import ObjectNotFound, ObjectStore


class BatchStore:
    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    # --- files ----------------------------------------------------------------------------------

    async def put_file(self, record: FileRecord, content: bytes) -> None:
        """The bytes first, then the metadata: a file is listed only once it is whole."""
        await self.store.put(f"files/{record.id}.data", content)
        await self._put_json(f"files/{record.id}.json", record.__dict__)

    async def file(self, file_id: str) -> FileRecord | None:
        data = await self._get_json(f"files/{file_id}.json") if _safe(file_id) else None
        return None if data is None else FileRecord(**data)

    async def file_content(self, file_id: str) -> bytes:
        return await self.store.get(f"files/{file_id}.data")

    async def files(self) -> list[FileRecord]:
        found = []
        for key in await self.store.keys("files/"):
            if key.endswith(".json") and (data := await self._get_json(key)) is not None:
                found.append(FileRecord(**data))
        return found

    async def delete_file(self, file_id: str) -> None:
        await self.store.delete(f"files/{file_id}.json")
        await self.store.delete(f"files/{file_id}.data")

    # --- batches --------------------------------------------------------------------------------

    async def put_batch(self, record: BatchRecord) -> None:
        await self._put_json(f"batches/{record.id}.json", record.to_json())

    async def activate(self, batch_id: str) -> None:
        await self.store.put(f"batches-active/{batch_id}", b"")

    async def deactivate(self, batch_id: str) -> None:
        await self.store.delete(f"batches-active/{batch_id}")

    async def active(self) -> list[str]:
        return [key.rpartition("/")[2] for key in await self.store.keys("batches-active/")]

    async def batch(self, batch_id: str) -> BatchRecord | None:
        data = await self._get_json(f"batches/{batch_id}.json") if _safe(batch_id) else None
        return None if data is None else BatchRecord.from_json(data)

    async def batches(self) -> list[BatchRecord]:
        found = []
        for key in await self.store.keys("batches/"):
            if key.endswith(".json") and (data := await self._get_json(key)) is not None:
                found.append(BatchRecord.from_json(data))
        return found

    # --- results --------------------------------------------------------------------------------

    async def has_result(self, batch_id: str, index: int) -> bool:
        prefix = f"batch-results/{batch_id}/{index:07d}"
        for suffix in (".ok", ".err"):
            if await self.store.stat(prefix + suffix) is not None:
                return True
        return False

    async def put_result(self, batch_id: str, index: int, ok: bool, line: dict[str, Any]) -> None:
        suffix = "ok" if ok else "err"
        await self._put_json(f"batch-results/{batch_id}/{index:07d}.{suffix}", line)

    async def result_keys(self, batch_id: str) -> dict[int, bool]:
        """Line number -> whether it succeeded, for every line with a result (one listing)."""
        found: dict[int, bool] = {}
        for key in await self.store.keys(f"batch-results/{batch_id}/"):
            stem, _, suffix = key.rpartition("/")[2].partition(".")
            if stem.isdigit() and suffix in ("ok", "err"):
                found.setdefault(int(stem), suffix == "ok")  # the first written wins
        return found

    async def result(self, batch_id: str, index: int, ok: bool) -> dict[str, Any] | None:
        suffix = "ok" if ok else "err"
        line = await self._get_json(f"batch-results/{batch_id}/{index:07d}.{suffix}")
        return line if isinstance(line, dict) else None

    async def drop_results(self, batch_id: str) -> None:
        for key in await self.store.keys(f"batch-results/{batch_id}/"):
            await self.store.delete(key)

    # ---

    async def _put_json(self, key: str, data: Any) -> None:
        await self.store.put(key, json.dumps(data).encode(), "application/json")

    async def _get_json(self, key: str) -> Any:
        try:
            return json.loads(await self.store.get(key))
        except ObjectNotFound:
            return None


def _safe(object_id: str) -> bool:
    """An id a client sent is used in a key only if it could be one of ours."""
    return (
        bool(object_id)
        and len(object_id) <= 64
        and object_id.replace("-", "").replace("_", "").isalnum()
    )
