"""OpenAI's Responses API: `POST /v1/responses`, `GET` and `DELETE /v1/responses/{id}`, which the
current OpenAI SDKs and agent kits call. A translation onto the one generation path: the input
items (and, with `previous_response_id`, the stored conversation before them) become a
GenerationRequest; the chunks become output items (a message with `output_text`, or
`function_call`s), whole or as the API's typed server-sent events (`response.created`, ...,
`response.output_text.delta`, ..., `response.completed`). Answers are stored per worker in
memory (runtime/response_store.py) unless `store: false`."""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from handlers.parsing import parse, sampling
from handlers.responses_requests import ResponsesRequest, UnsupportedInput, conversation
from hooks.request_limits import client_of
from runtime.dispatch import Context, request_body
from runtime.generation import Outcome
from runtime.response_store import StoredResponse
from runtime.types import CHAT, Chunk, Event, EventStream, GenerationRequest, HandlerError, Stream


@request_body(ResponsesRequest)
async def create(event: Event, ctx: Context) -> Any:
    body = parse(ResponsesRequest, event.body)
    model = ctx.model_for(body.model, CHAT)
    owner = client_of(ctx)
    history: list[dict[str, Any]] = []
    if body.previous_response_id:
        stored = await ctx.runtime.responses.get(body.previous_response_id, owner)
        if stored is None:
            raise HandlerError(
                404,
                f"no stored response {body.previous_response_id!r} (responses are kept per"
                " worker, the oldest dropped beyond limits.stored_responses)",
                param="previous_response_id",
                code="response_not_found",
            )
        history = stored.conversation
    try:
        turn = conversation(body)
    except UnsupportedInput as exc:
        raise HandlerError(400, str(exc), param=exc.param, code="unsupported_content") from None
    system = [{"role": "system", "content": body.instructions}] if body.instructions else []
    fmt = body.text.format if body.text else None
    request = GenerationRequest(
        model=model.id,
        messages=[*system, *history, *turn],
        tools=body.openai_tools(),
        tool_choice=body.openai_tool_choice(),
        parallel_tool_calls=body.parallel_tool_calls,
        json_mode=fmt is not None and fmt.type == "json_object",
        json_schema=fmt.schema_ if fmt is not None and fmt.type == "json_schema" else None,
        request_id=event.request_id,
        stream=body.stream,
        **sampling(model, body),
    )
    chunks, outcome = await ctx.generate(request)
    shape = Shape(f"resp_{event.request_id}", int(time.time()), body, outcome)

    async def keep(answer: dict[str, Any]) -> None:
        if body.store:
            said = [*history, *turn, _assistant_turn(outcome)]
            await ctx.runtime.responses.put(answer["id"], StoredResponse(owner, answer, said))

    if body.stream:
        return EventStream(_events(chunks, shape, keep), _error_event)
    async for _ in chunks:
        pass
    answer = shape.response()
    await keep(answer)
    return answer


async def get(event: Event, ctx: Context) -> dict[str, Any]:
    response_id = event.path_params.get("response_id", "")
    stored = await ctx.runtime.responses.get(response_id, client_of(ctx))
    if stored is None:
        raise HandlerError(
            404, f"no stored response {response_id!r}", param="response_id", code="not_found"
        )
    return stored.body


async def delete(event: Event, ctx: Context) -> dict[str, Any]:
    response_id = event.path_params.get("response_id", "")
    if not await ctx.runtime.responses.delete(response_id, client_of(ctx)):
        raise HandlerError(
            404, f"no stored response {response_id!r}", param="response_id", code="not_found"
        )
    return {"id": response_id, "object": "response.deleted", "deleted": True}


# --- answers ------------------------------------------------------------------------------------


@dataclass
class Shape:
    """Builds the response object (and its items) for one generation."""

    id: str
    created: int
    body: ResponsesRequest
    outcome: Outcome

    @property
    def message_id(self) -> str:
        return f"msg_{self.id.removeprefix('resp_')}"

    def message(self, text: str, status: str = "completed") -> dict[str, Any]:
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        return {
            "type": "message",
            "id": self.message_id,
            "status": status,
            "role": "assistant",
            "content": [part] if status == "completed" else [],
        }

    def response(self, *, done: bool = True) -> dict[str, Any]:
        outcome = self.outcome
        output: list[dict[str, Any]] = []
        status = "in_progress"
        incomplete = None
        if done:
            text = outcome.text(0)
            if text or not outcome.tool_calls.get(0):
                output.append(self.message(text))
            output += [_call_item(c.id, c.name, c.arguments) for c in outcome.tool_calls.get(0, [])]
            status = "completed"
            if outcome.finish.get(0) == "length":
                status, incomplete = "incomplete", {"reason": "max_output_tokens"}
        body = self.body
        usage = outcome.usage
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "model": outcome.model,
            "output": output,
            "error": None,
            "incomplete_details": incomplete,
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "temperature": body.temperature,
            "top_p": body.top_p,
            "tools": [t.model_dump(exclude_none=True) for t in body.tools or []],
            "tool_choice": body.openai_tool_choice() or ("auto" if body.tools else "none"),
            "parallel_tool_calls": body.parallel_tool_calls,
            "previous_response_id": body.previous_response_id,
            "store": body.store,
            "text": {"format": {"type": "text"}}
            if body.text is None or body.text.format is None
            else {"format": body.text.format.model_dump(by_alias=True, exclude_none=True)},
            "truncation": "disabled",
            "metadata": body.metadata or {},
            "user": body.user,
            "usage": {
                "input_tokens": usage.prompt_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": usage.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": usage.total_tokens,
            }
            if done
            else None,
        }


def _call_item(
    call_id: str, name: str, arguments: str, status: str = "completed"
) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": f"fc_{call_id.removeprefix('call_')}",
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def _assistant_turn(outcome: Outcome) -> dict[str, Any]:
    """The answer as the conversation's next assistant message (for previous_response_id)."""
    turn: dict[str, Any] = {"role": "assistant", "content": outcome.text(0)}
    calls = outcome.tool_calls.get(0)
    if calls:
        turn["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in calls
        ]
    return turn


def _error_event(exc: HandlerError) -> dict[str, Any]:
    return {"type": "error", "code": exc.code, "message": exc.message, "param": exc.param}


async def _events(
    chunks: Stream[Chunk], shape: Shape, keep: Callable[[dict[str, Any]], Awaitable[None]]
) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """The API's stream: the response created and in progress, each output item added, filled
    (text deltas, or a call's argument deltas) and done, then the response completed."""
    numbers = itertools.count()

    def event(kind: str, **data: Any) -> tuple[str, dict[str, Any]]:
        return kind, {"type": kind, "sequence_number": next(numbers), **data}

    yield event("response.created", response=shape.response(done=False))
    yield event("response.in_progress", response=shape.response(done=False))
    items: list[dict[str, Any]] = []  # the output items opened so far
    text: list[str] = []

    def close_last() -> list[tuple[str, dict[str, Any]]]:
        if not items or items[-1]["status"] == "completed":
            return []
        item, index = items[-1], len(items) - 1
        item["status"] = "completed"
        if item["type"] == "message":
            part = {"type": "output_text", "text": "".join(text), "annotations": [], "logprobs": []}
            item["content"] = [part]
            where = {"item_id": item["id"], "output_index": index, "content_index": 0}
            return [
                event("response.output_text.done", **where, text=part["text"], logprobs=[]),
                event("response.content_part.done", **where, part=part),
                event("response.output_item.done", output_index=index, item=dict(item)),
            ]
        return [
            event(
                "response.function_call_arguments.done",
                item_id=item["id"],
                output_index=index,
                arguments=item["arguments"],
            ),
            event("response.output_item.done", output_index=index, item=dict(item)),
        ]

    try:
        async for chunk in chunks:
            if chunk.index != 0:
                continue
            if chunk.text:
                if not items or items[-1]["type"] != "message":
                    for closing in close_last():
                        yield closing
                    items.append(shape.message("", status="in_progress"))
                    index = len(items) - 1
                    yield event("response.output_item.added", output_index=index, item=items[-1])
                    part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
                    where = {"item_id": shape.message_id, "output_index": index}
                    yield event("response.content_part.added", **where, content_index=0, part=part)
                text.append(chunk.text)
                where = {"item_id": shape.message_id, "output_index": len(items) - 1}
                delta = {"content_index": 0, "delta": chunk.text, "logprobs": []}
                yield event("response.output_text.delta", **where, **delta)
            for piece in chunk.tool_calls:
                if piece.id:
                    for closing in close_last():
                        yield closing
                    items.append(_call_item(piece.id, piece.name, "", status="in_progress"))
                    added = dict(items[-1])
                    yield event(
                        "response.output_item.added", output_index=len(items) - 1, item=added
                    )
                if piece.arguments:
                    items[-1]["arguments"] += piece.arguments
                    yield event(
                        "response.function_call_arguments.delta",
                        item_id=items[-1]["id"],
                        output_index=len(items) - 1,
                        delta=piece.arguments,
                    )
        for closing in close_last():
            yield closing
    finally:
        await chunks.aclose()
    final = shape.response()
    await keep(final)
    kind = "response.completed" if final["status"] == "completed" else "response.incomplete"
    yield event(kind, response=final)
