"""Translation between protobuf messages and the OpenAI-shaped dicts the handlers speak.

A request message becomes the JSON body the handler expects (field names are OpenAI's, so the
set fields are copied as they are). A handler's dict becomes the method's response message by
field name; a stream of OpenAI chunk dicts (chat or text completion) becomes one message per
token chunk and a final message per choice with its finish reason, the last carrying the usage.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def status_code(http_status: int) -> grpc.StatusCode:
    """The gRPC code for a handler's HTTP-style status (INTERNAL for anything unlisted)."""
    return _CODES.get(http_status, grpc.StatusCode.INTERNAL)


def request_body(message: Message) -> dict[str, Any]:
    """The set fields of `message` as a JSON-like dict (ints stay ints, unlike MessageToDict)."""
    body: dict[str, Any] = {}
    for field, value in message.ListFields():
        body[field.name] = _value(field, value)
    return body


def _value(field: FieldDescriptor, value: Any) -> Any:
    if field.is_repeated:
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            return {key: _plain(item) for key, item in value.items()}
        return [_plain(item) for item in value]
    return _plain(value)


def _plain(value: Any) -> Any:
    if isinstance(value, struct_pb2.Struct | struct_pb2.ListValue | struct_pb2.Value):
        return _integral(json_format.MessageToDict(value))  # JSON itself (a tool's parameters)
    return request_body(value) if isinstance(value, Message) else value


def _integral(value: Any) -> Any:
    """A Struct's numbers are all doubles: 40 arrives as 40.0, which a JSON Schema keyword
    such as maxLength refuses. Whole numbers become ints again."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: _integral(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_integral(item) for item in value]
    return value


def response_message(result: Mapping[str, Any], message_class: type[Message]) -> Message:
    """A handler's dict as `message_class`, by field name; fields it lacks are ignored."""
    return json_format.ParseDict(dict(result), message_class(), ignore_unknown_fields=True)


async def stream_messages(
    result: AsyncIterator[Any] | Mapping[str, Any], message_class: type[Message]
) -> AsyncGenerator[Message, None]:
    """Frame a chat or text completion (a chunk stream, or a whole response from a plugin)
    as `message_class` messages: the token chunks as they come, then each choice's finish
    reason, the last message with the usage."""
    fields = message_class.DESCRIPTOR.fields_by_name
    text_field = "content" if "content" in fields else "text"
    with_role = "role" in fields
    started: set[int] = set()
    finished: dict[int, str] = {}
    usage: Mapping[str, Any] | None = None
    meta: dict[str, Any] = {}

    def message(index: int, **values: Any) -> Message:
        if with_role and index not in started:
            values["role"] = "assistant"
        started.add(index)
        return message_class(**{"index": index, **meta, **values})

    chunks = _chunks(result) if isinstance(result, Mapping) else result
    async for chunk in chunks:
        meta = {key: chunk[key] for key in ("id", "model", "created") if chunk.get(key)}
        usage = chunk.get("usage") or usage
        for choice in chunk.get("choices") or ():
            index = int(choice.get("index", 0))
            delta = choice.get("delta")
            text = (delta or {}).get("content") if delta is not None else choice.get("text")
            if text:
                yield message(index, **{text_field: text})
            calls = (delta or {}).get("tool_calls") if delta is not None else None
            if calls:
                framed = message(index)
                json_format.ParseDict({"tool_calls": calls}, framed, ignore_unknown_fields=True)
                yield framed
            if choice.get("finish_reason"):
                finished[index] = choice["finish_reason"]
    indices = sorted(finished) or sorted(started) or [0]
    for position, index in enumerate(indices):
        final = message(index, finish_reason=finished.get(index, ""))
        if usage and position == len(indices) - 1:
            json_format.ParseDict(
                {"usage": dict(usage)}, final, ignore_unknown_fields=True
            )  # only the usage field is set here
        yield final


async def _chunks(response: Mapping[str, Any]) -> AsyncIterator[Mapping[str, Any]]:
    """A whole (non-streamed) completion as the one chunk it would have been."""
    choices = []
    for choice in response.get("choices") or ():
        message = choice.get("message")
        text = message.get("content") if message else choice.get("text")
        key = "delta" if message else "text"
        calls = [
            {**call, "index": position}
            for position, call in enumerate((message or {}).get("tool_calls") or [])
        ]
        delta = {"content": text, **({"tool_calls": calls} if calls else {})}
        choices.append(
            {
                "index": choice.get("index", 0),
                key: delta if message else text,
                "finish_reason": choice.get("finish_reason"),
            }
        )
    yield {**response, "choices": choices}
