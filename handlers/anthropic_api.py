"""Anthropic's Messages API: `POST /v1/messages` and `POST /v1/messages/count_tokens`, so the
`anthropic` SDK and the agents built on it work against Tiffin. A translation onto the one
generation path: Anthropic's messages, system prompt, tools and tool_choice become a
GenerationRequest, and its Stream of chunks becomes Anthropic's message, or its named
server-sent events (`message_start`, `content_block_start`, `content_block_delta`, ...).
Errors take Anthropic's shape, `{"type": "error", "error": {"type", "message"}}`. The API key
may come as `x-api-key`, as Anthropic's clients send it, or as `Authorization`."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from handlers.anthropic_requests import (
    CountTokensRequest,
    ImageBlock,
    Message,
    MessagesRequest,
    TextBlock,
    ToolResultBlock,
    ToolUseBlock,
)
from handlers.parsing import parse, sampling
from runtime.dispatch import Context, errors_as, request_body
from runtime.generation import Outcome
from runtime.models import ServedModel
from runtime.tools import plan_tools, with_tools
from runtime.types import (
    CHAT,
    Chunk,
    Event,
    EventStream,
    GenerationRequest,
    HandlerError,
    Stream,
)

# HTTP status -> Anthropic's error type.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "api_error",
}
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


def anthropic_error(exc: HandlerError) -> dict[str, Any]:
    kind = ERROR_TYPES.get(
        exc.status, "api_error" if exc.status >= 500 else "invalid_request_error"
    )
    return {"type": "error", "error": {"type": kind, "message": exc.message}}


# Errors in Anthropic's shape, also for what is refused before the handler runs.
anthropic_errors = errors_as(anthropic_error)


@request_body(MessagesRequest)
@anthropic_errors
async def messages(event: Event, ctx: Context) -> Any:
    body = parse(MessagesRequest, event.body)
    model = ctx.model_for(body.model, CHAT)
    request = GenerationRequest(
        model=model.id,
        messages=_conversation(model, body),
        stop=list(body.stop_sequences or []),
        request_id=event.request_id,
        stream=body.stream,
        **_tools(body),
        **sampling(model, body),
    )
    chunks, outcome = await ctx.generate(request)
    message_id = f"msg_{event.request_id}"
    if body.stream:
        events = _events(chunks, outcome, message_id, request.stop)
        return EventStream(events, anthropic_error)
    async for _ in chunks:
        pass
    return _message(outcome, message_id, request.stop)


@request_body(CountTokensRequest)
@anthropic_errors
async def count_tokens(event: Event, ctx: Context) -> dict[str, Any]:
    """The tokens of the conversation's text as the model reads it (tools described in the
    system message, earlier calls as JSON): the chat template's own markup, a few tokens per
    turn, is not counted."""
    body = parse(CountTokensRequest, event.body)
    model = ctx.model_for(body.model, CHAT)
    conversation = _conversation(model, body)
    request = GenerationRequest(model=model.id, messages=conversation, **_tools(body))
    plan = plan_tools(request)
    if plan is not None and plan.calls:
        conversation = with_tools(conversation, plan)
    await ctx.models.load(model.id)
    texts = [str(m.get("content") or "") for m in conversation]
    return {"input_tokens": sum(len(ctx.models.tokenize(model.id, t)) for t in texts if t)}


# --- requests -----------------------------------------------------------------------------------


def _conversation(model: ServedModel, body: CountTokensRequest) -> list[dict[str, Any]]:
    """Anthropic's system prompt and messages as the generation path takes them (OpenAI's
    roles): tool_use blocks become an assistant turn's tool_calls, tool_result blocks tool
    messages."""
    out: list[dict[str, Any]] = []
    if body.system:
        out.append({"role": "system", "content": body.system_text()})
    for position, message in enumerate(body.messages):
        out += _turn(model, position, message)
    return out


def _turn(model: ServedModel, position: int, message: Message) -> list[dict[str, Any]]:
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for index, block in enumerate(message.blocks()):
        if isinstance(block, TextBlock):
            texts.append(block.text)
        elif isinstance(block, ImageBlock):
            raise HandlerError(
                400,
                f"{model.id} does not take images or documents",
                param=f"messages.{position}.content.{index}",
                code="unsupported_content",
            )
        elif isinstance(block, ToolUseBlock):
            arguments = json.dumps(block.input)
            function = {"name": block.name, "arguments": arguments}
            calls.append({"id": block.id, "type": "function", "function": function})
        elif isinstance(block, ToolResultBlock):
            content = block.text()
            prefix = "(error) " if block.is_error else ""
            results.append(
                {"role": "tool", "tool_call_id": block.tool_use_id, "content": prefix + content}
            )
    turn: dict[str, Any] = {"role": message.role, "content": "".join(texts)}
    if calls:
        turn["tool_calls"] = calls
    return [*results, turn] if turn["content"] or calls or not results else results


def _tools(body: CountTokensRequest) -> dict[str, Any]:
    """`tools` and `tool_choice` in the generation path's (OpenAI's) terms."""
    tools = [
        {
            "type": "function",
            "function": {
                "name": tool.name,
                "description": tool.description or "",
                "parameters": tool.input_schema,
            },
        }
        for tool in body.tools or []
    ]
    choice = body.tool_choice
    fields: dict[str, Any] = {"tools": tools or None}
    if choice is not None:
        fields["tool_choice"] = {
            "auto": "auto",
            "any": "required",
            "none": "none",
            "tool": {"type": "function", "function": {"name": choice.name}},
        }[choice.type]
        fields["parallel_tool_calls"] = not choice.disable_parallel_tool_use
    return fields


# --- answers ------------------------------------------------------------------------------------


def _usage(outcome: Outcome) -> dict[str, int]:
    return {
        "input_tokens": outcome.usage.prompt_tokens,
        "output_tokens": outcome.usage.completion_tokens,
    }


def _stop_reason(outcome: Outcome, stop_sequences: list[str]) -> dict[str, Any]:
    """`stop_reason` and `stop_sequence`: which of the request's stop_sequences ended the
    answer, when one did (the engines report the stop string they matched; an upstream that
    does not say is reported as `end_turn`)."""
    matched = outcome.stop_sequences.get(0)
    if outcome.finish.get(0) == "stop" and matched in stop_sequences:
        return {"stop_reason": "stop_sequence", "stop_sequence": matched}
    reason = STOP_REASONS.get(outcome.finish.get(0, "stop"), "end_turn")
    return {"stop_reason": reason, "stop_sequence": None}


def _message(outcome: Outcome, message_id: str, stop_sequences: list[str]) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    text = outcome.text(0)
    if text:
        content.append({"type": "text", "text": text})
    for call in outcome.tool_calls.get(0, []):
        content.append(
            {"type": "tool_use", "id": call.id, "name": call.name, "input": _input(call.arguments)}
        )
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": outcome.model,
        "content": content,
        **_stop_reason(outcome, stop_sequences),
        "usage": _usage(outcome),
    }


def _input(arguments: str) -> dict[str, Any]:
    """A call's arguments as an object; {} for a call max_tokens cut short."""
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


async def _events(
    chunks: Stream[Chunk], outcome: Outcome, message_id: str, stop_sequences: list[str]
) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """Anthropic's stream: the message, then each content block (text, or a tool_use whose
    input arrives as JSON pieces) opened, filled and closed, then the stop reason and usage."""
    start: dict[str, Any] = {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": outcome.model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 0, "output_tokens": 0},
    }
    yield "message_start", {"type": "message_start", "message": start}
    blocks = 0  # content blocks opened
    open_kind = ""  # "text", "tool_use" or "" when no block is open
    try:
        async for chunk in chunks:
            if chunk.index != 0:
                continue
            if chunk.text:
                if open_kind != "text":
                    if open_kind:
                        yield _stop(blocks - 1)
                    yield _start(blocks, {"type": "text", "text": ""})
                    blocks, open_kind = blocks + 1, "text"
                delta = {"type": "text_delta", "text": chunk.text}
                yield _delta(blocks - 1, delta)
            for piece in chunk.tool_calls:
                if piece.id:
                    if open_kind:
                        yield _stop(blocks - 1)
                    block = {"type": "tool_use", "id": piece.id, "name": piece.name, "input": {}}
                    yield _start(blocks, block)
                    blocks, open_kind = blocks + 1, "tool_use"
                if piece.arguments:
                    delta = {"type": "input_json_delta", "partial_json": piece.arguments}
                    yield _delta(blocks - 1, delta)
        if open_kind:
            yield _stop(blocks - 1)
    finally:
        await chunks.aclose()
    yield (
        "message_delta",
        {
            "type": "message_delta",
            "delta": _stop_reason(outcome, stop_sequences),
            "usage": _usage(outcome),
        },
    )
    yield "message_stop", {"type": "message_stop"}


def _start(index: int, block: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return "content_block_start", {
        "type": "content_block_start",
        "index": index,
        "content_block": block,
    }


def _delta(index: int, delta: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}


def _stop(index: int) -> tuple[str, dict[str, Any]]:
    return "content_block_stop", {"type": "content_block_stop", "index": index}
