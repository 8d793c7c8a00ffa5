"""A batch input file, checked line by line: each non-blank line is one request,
`{"custom_id": ..., "method": "POST", "url": "/v1/chat/completions", "body": {...}}`, with a
custom_id unique in the file. An upload is refused at its first bad line (400 naming it); a
batch whose lines call another endpoint than its own fails with OpenAI's per-line errors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from runtime import client_json
from runtime.batches.batch_records import ENDPOINTS


@dataclass
class InputLine:
    number: int  # 1-based line number in the file (blank lines count)
    custom_id: str
    url: str
    body: dict[str, Any]


class BadLine(ValueError):
    def __init__(self, number: int, message: str) -> None:
        super().__init__(f"line {number}: {message}")
        self.number = number
        self.reason = message


def read_lines(content: bytes, max_lines: int) -> list[InputLine]:
    """Every request of a JSONL batch file; BadLine at the first line that is not one."""
    lines: list[InputLine] = []
    seen: set[str] = set()
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as exc:
        number = content[: exc.start].count(b"\n") + 1
        raise BadLine(number, "is not UTF-8 text") from None
    for number, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        line = _one(number, raw)
        if line.custom_id in seen:
            raise BadLine(number, f"custom_id {line.custom_id!r} is used by an earlier line")
        seen.add(line.custom_id)
        lines.append(line)
        if len(lines) > max_lines:
            raise BadLine(number, f"more than {max_lines} requests (batch.max_lines)")
    if not lines:
        raise BadLine(1, "the file has no request (one JSON object a line)")
    return lines


def _one(number: int, raw: str) -> InputLine:
    try:
        item = client_json.decode(raw)
    except client_json.InvalidJson as exc:
        where = f" at {exc.path}" if exc.path else ""
        raise BadLine(number, f"is not valid JSON{where}: {exc.reason}") from None
    if not isinstance(item, dict):
        raise BadLine(number, "is not a JSON object")
    unknown = sorted(set(item) - {"custom_id", "method", "url", "body"})
    if unknown:
        raise BadLine(number, f"unknown field {unknown[0]!r} (custom_id, method, url, body)")
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > 512:
        raise BadLine(number, "custom_id must be a non-empty string (at most 512 characters)")
    if item.get("method") != "POST":
        raise BadLine(number, f"method must be 'POST', not {item.get('method')!r}")
    url = item.get("url")
    if url not in ENDPOINTS:
        raise BadLine(number, f"url {url!r} is not one of {', '.join(ENDPOINTS)}")
    body = item.get("body")
    if not isinstance(body, dict):
        raise BadLine(number, "body must be a JSON object (the request)")
    if body.get("stream"):
        raise BadLine(number, "body.stream is not supported in a batch (each answer is whole)")
    if not isinstance(body.get("model"), str):
        raise BadLine(number, "body.model must name a model")
    return InputLine(number, custom_id, str(url), body)
