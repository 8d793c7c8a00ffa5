"""What the Files and Batch APIs keep: a file's metadata, a batch's record and one line's
result, as stored (JSON, with the owner) and as OpenAI's API shows them (without it)."""

from __future__ import annotations

import secrets
import time
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any


class BatchStatus(StrEnum):
    """OpenAI's batch statuses, in the order a batch may pass through them."""

    validating = "validating"
    failed = "failed"
    in_progress = "in_progress"
    finalizing = "finalizing"
    completed = "completed"
    expired = "expired"
    cancelling = "cancelling"
    cancelled = "cancelled"


FINAL = frozenset(
    {BatchStatus.failed, BatchStatus.completed, BatchStatus.expired, BatchStatus.cancelled}
)
# What a batch line may call: the endpoints OpenAI's Batch API takes that Tiffin serves.
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")
# How long each completion window is, in seconds.
WINDOWS = {"24h": 24 * 3600, "1h": 3600, "10m": 600, "1m": 60}


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


@dataclass
class FileRecord:
    id: str
    owner: str  # the client (API key name) that uploaded it; never shown
    bytes: int
    filename: str
    purpose: str  # batch (uploads), batch_output (a batch's output and error files)
    created_at: int = field(default_factory=lambda: int(time.time()))

    def shown(self) -> dict[str, Any]:
        """OpenAI's file object."""
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "expires_at": None,
            "status_details": None,
        }


@dataclass
class BatchRecord:
    id: str
    owner: str
    scopes: list[str]  # the owner's scopes when it was made: its lines run with them
    endpoint: str
    input_file_id: str
    completion_window: str
    total: int = 0
    status: BatchStatus = BatchStatus.validating
    metadata: dict[str, str] | None = None
    created_at: int = field(default_factory=lambda: int(time.time()))
    expires_at: int = 0
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    completed: int = 0  # lines answered 2xx (kept up to date when final)
    failed: int = 0
    errors: list[dict[str, Any]] | None = None  # why validation failed: code, message, line

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BatchRecord:
        data = dict(data)
        data["status"] = BatchStatus(data["status"])
        return cls(**data)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def mark(self, status: BatchStatus) -> None:
        """Move to `status`, stamping its `<status>_at`."""
        self.status = status
        stamp = f"{status.value}_at"
        if hasattr(self, stamp):
            setattr(self, stamp, int(time.time()))

    def shown(self, completed: int | None = None, failed: int | None = None) -> dict[str, Any]:
        """OpenAI's batch object; `completed`/`failed` are the live counts while it runs."""
        done = self.completed if completed is None else completed
        bad = self.failed if failed is None else failed
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "errors": None if self.errors is None else {"object": "list", "data": self.errors},
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status.value,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self.created_at,
            "in_progress_at": self.in_progress_at,
            "expires_at": self.expires_at,
            "finalizing_at": self.finalizing_at,
            "completed_at": self.completed_at,
            "failed_at": self.failed_at,
            "expired_at": self.expired_at,
            "cancelling_at": self.cancelling_at,
            "cancelled_at": self.cancelled_at,
            "request_counts": {"total": self.total, "completed": done, "failed": bad},
            "metadata": self.metadata,
        }


@dataclass
class BatchLine:
    """One line of a batch: what the queue carries (everything a worker needs to run it)."""

    batch_id: str
    index: int  # its 0-based line number among the batch's requests
    custom_id: str
    body: dict[str, Any]
    expires_at: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BatchLine:
        return cls(**data)


def result_line(
    custom_id: str,
    request_id: str,
    status: int | None,
    body: Any,
    error: dict[str, str] | None = None,
) -> dict[str, Any]:
    """One line of an output or error file, in OpenAI's shape: the response (status code,
    request id, body) of a request that ran, or an `error` for one that never ran."""
    response = (
        None if status is None else {"status_code": status, "request_id": request_id, "body": body}
    )
    return {
        "id": f"batch_req_{request_id}",
        "custom_id": custom_id,
        "response": response,
        "error": error,
    }
