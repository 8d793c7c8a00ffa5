"""OpenAI's response shapes, built from engine chunks: model cards, chat and text completions,
whole or as stream chunks (with the role first, `finish_reason` last, and the optional usage
chunk), and logprobs in each API's own layout."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from runtime.generation import Outcome
from runtime.models import ServedModel
from runtime.telemetry.batching import batching_stats
from runtime.types import Chunk, TokenLogprob, ToolCall, Usage, close


@dataclass(frozen=True)
class Meta:
    id: str
    created: int
    model: str


def model_card(model: ServedModel) -> dict[str, Any]:
    """OpenAI's model object, plus Tiffin's fields; `slots_busy` and `slots_free` only where
    the engine batches (and is loaded)."""
    described = model.describe()
    batching = batching_stats(described["stats"])
    return {
        "id": model.id,
        "object": "model",
        "created": model.created,
        "owned_by": model.spec.provider,
        **{
            k: described[k]
            for k in ("provider", "engine", "state", "capabilities", "aliases", "context_length")
        },
        **(
            {}
            if batching is None
            else {"slots_busy": batching.slots_busy, "slots_free": batching.slots_free}
        ),
    }


def usage(value: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": value.prompt_tokens,
        "completion_tokens": value.completion_tokens,
        "total_tokens": value.total_tokens,
    }


# --- chat ---------------------------------------------------------------------------------------


def chat_logprobs(items: Sequence[TokenLogprob]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": t.token,
                "logprob": t.logprob,
                "bytes": t.bytes,
                "top_logprobs": [
                    {"token": tok, "logprob": lp, "bytes": list(tok.encode())} for tok, lp in t.top
                ],
            }
            for t in items
        ]
    }


def tool_calls(calls: Sequence[ToolCall]) -> list[dict[str, Any]]:
    """Whole calls as a message's `tool_calls`."""
    return [
        {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        for c in calls
    ]


def tool_call_deltas(pieces: Sequence[ToolCall]) -> list[dict[str, Any]]:
    """Pieces of calls as a stream's `delta.tool_calls`: a call's first piece has its id,
    type and name; later ones only more of its arguments."""
    deltas: list[dict[str, Any]] = []
    for piece in pieces:
        if piece.id:
            function = {"name": piece.name, "arguments": piece.arguments}
            deltas.append(
                {"index": piece.index, "id": piece.id, "type": "function", "function": function}
            )
        else:
            deltas.append({"index": piece.index, "function": {"arguments": piece.arguments}})
    return deltas


def chat_message(outcome: Outcome, index: int) -> dict[str, Any]:
    calls = outcome.tool_calls.get(index)
    if calls:  # text the model wrote around its calls stays content
        text = outcome.text(index) or None
        return {"role": "assistant", "content": text, "tool_calls": tool_calls(calls)}
    return {"role": "assistant", "content": outcome.text(index)}


def chat_response(outcome: Outcome, meta: Meta, n: int, *, with_logprobs: bool) -> dict[str, Any]:
    choices = [
        {
            "index": i,
            "message": chat_message(outcome, i),
            "logprobs": chat_logprobs(outcome.logprobs.get(i, [])) if with_logprobs else None,
            "finish_reason": outcome.finish.get(i, "stop"),
        }
        for i in range(n)
    ]
    return {
        "id": meta.id,
        "object": "chat.completion",
        "created": meta.created,
        "model": meta.model,
        "choices": choices,
        "usage": usage(outcome.usage),
        "system_fingerprint": None,
    }


async def chat_stream(
    chunks: AsyncIterator[Chunk], outcome: Outcome, meta: Meta, n: int, include_usage: bool
) -> AsyncIterator[dict[str, Any]]:
    def frame(
        index: int, delta: dict[str, Any], finish: str | None = None, logprobs: Any = None
    ) -> dict[str, Any]:
        body = {
            "id": meta.id,
            "object": "chat.completion.chunk",
            "created": meta.created,
            "model": meta.model,
            "system_fingerprint": None,
            "choices": [
                {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            ],
        }
        if include_usage:
            body["usage"] = None
        return body

    try:
        for index in range(n):
            yield frame(index, {"role": "assistant", "content": ""})
        async for chunk in chunks:
            logprobs = chat_logprobs(chunk.logprobs) if chunk.logprobs else None
            if chunk.text or logprobs:
                yield frame(chunk.index, {"content": chunk.text}, logprobs=logprobs)
            if chunk.tool_calls:
                yield frame(chunk.index, {"tool_calls": tool_call_deltas(chunk.tool_calls)})
            if chunk.finish_reason:
                yield frame(chunk.index, {}, chunk.finish_reason)
    finally:
        await close(chunks)  # a client gone frees the engine now
    if include_usage:
        yield {
            "id": meta.id,
            "object": "chat.completion.chunk",
            "created": meta.created,
            "model": meta.model,
            "system_fingerprint": None,
            "choices": [],
            "usage": usage(outcome.usage),
        }


# --- text completions ---------------------------------------------------------------------------

Run = tuple[int, str, tuple[AsyncIterator[Chunk], Outcome]]


def completion_logprobs(items: Sequence[TokenLogprob], offset: int) -> dict[str, Any]:
    offsets, position = [], offset
    for item in items:
        offsets.append(position)
        position += len(item.token)
    return {
        "tokens": [t.token for t in items],
        "token_logprobs": [t.logprob for t in items],
        "top_logprobs": [dict(t.top) for t in items],
        "text_offset": offsets,
    }


def completion_response(
    runs: Sequence[Run], meta: Meta, n: int, echo: bool, with_logprobs: bool
) -> dict[str, Any]:
    choices, total = [], Usage()
    for base, prompt, (_, outcome) in runs:
        total.prompt_tokens += outcome.usage.prompt_tokens
        total.completion_tokens += outcome.usage.completion_tokens
        for i in range(n):
            prefix = prompt if echo else ""
            choices.append(
                {
                    "index": base + i,
                    "text": prefix + outcome.text(i),
                    "logprobs": completion_logprobs(outcome.logprobs.get(i, []), len(prefix))
                    if with_logprobs
                    else None,
                    "finish_reason": outcome.finish.get(i, "stop"),
                }
            )
    return {
        "id": meta.id,
        "object": "text_completion",
        "created": meta.created,
        "model": meta.model,
        "choices": choices,
        "usage": usage(total),
        "system_fingerprint": None,
    }


async def completion_stream(
    runs: Sequence[Run], meta: Meta, echo: bool, include_usage: bool
) -> AsyncIterator[dict[str, Any]]:
    def frame(
        index: int, text: str, finish: str | None = None, logprobs: Any = None
    ) -> dict[str, Any]:
        body = {
            "id": meta.id,
            "object": "text_completion",
            "created": meta.created,
            "model": meta.model,
            "system_fingerprint": None,
            "choices": [
                {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
            ],
        }
        if include_usage:
            body["usage"] = None
        return body

    total = Usage()
    try:
        for base, prompt, (chunks, outcome) in runs:
            echoed: set[int] = set()
            async for chunk in chunks:
                index = base + chunk.index
                text = chunk.text
                if echo and index not in echoed:
                    echoed.add(index)
                    text = prompt + text
                logprobs = completion_logprobs(chunk.logprobs, 0) if chunk.logprobs else None
                if text or logprobs or chunk.finish_reason:
                    yield frame(index, text, chunk.finish_reason, logprobs)
            total.prompt_tokens += outcome.usage.prompt_tokens
            total.completion_tokens += outcome.usage.completion_tokens
    finally:
        for _, _, (chunks, _) in runs:  # a client gone frees every prompt's engine now
            await close(chunks)
    if include_usage:
        yield {
            "id": meta.id,
            "object": "text_completion",
            "created": meta.created,
            "model": meta.model,
            "choices": [],
            "usage": usage(total),
        }
