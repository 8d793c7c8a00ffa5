"""The OpenAI-compatible API: `/v1/models`, `/v1/chat/completions`, `/v1/completions`,
`/v1/embeddings`. Each handler validates, asks the router (`ctx.models`), and answers in
OpenAI's shapes; a streamed answer is an async iterator of chunk dicts (the transport frames it)."""

from __future__ import annotations

import base64
import struct
import time
from typing import Any

from handlers import openai_responses as shapes
from handlers.openai_requests import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    EmbeddingRequest,
)
from handlers.parsing import parse, sampling
from runtime.dispatch import Context, request_body
from runtime.types import (
    CHAT,
    COMPLETION,
    EMBEDDINGS,
    Event,
    GenerationRequest,
    HandlerError,
    ModelNotFound,
    Reply,
)

COST_HEADER = "x-tiffin-cost"


async def list_models(event: Event, ctx: Context) -> dict[str, Any]:
    """Every servable model, with Tiffin's details (provider, state, capabilities) beside
    OpenAI's fields."""
    return {"object": "list", "data": [shapes.model_card(m) for m in ctx.models.models.values()]}


async def get_model(event: Event, ctx: Context) -> dict[str, Any]:
    model_id = event.path_params.get("model", "")
    try:
        return shapes.model_card(ctx.models.get(model_id))
    except ModelNotFound as exc:
        raise HandlerError(404, str(exc), param="model", code="model_not_found") from None


@request_body(ChatCompletionRequest)
async def chat_completions(event: Event, ctx: Context) -> Any:
    body = parse(ChatCompletionRequest, event.body)
    model = ctx.model_for(body.model, CHAT)
    for position, message in enumerate(body.messages):
        for part in message.image_parts():
            raise HandlerError(
                400,
                f"{model.id} does not take images; send text content parts only",
                param=f"messages.{position}.content.{part}",
                code="unsupported_content",
            )
    values = sampling(model, body)
    if body.max_completion_tokens is not None:
        values["max_tokens"] = body.max_completion_tokens
    fmt = body.response_format
    request = GenerationRequest(
        model=model.id,
        messages=[chat_message(m) for m in body.messages],
        stop=body.stop_list(),
        n=body.n,
        logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        json_mode=fmt is not None and fmt.type == "json_object",
        json_schema=fmt.json_schema.schema_
        if fmt and fmt.json_schema and fmt.type == "json_schema"
        else None,
        tools=body.tools,
        tool_choice=body.tool_choice,
        parallel_tool_calls=body.parallel_tool_calls,
        request_id=event.request_id,
        stream=body.stream,
        **values,
    )
    chunks, outcome = await ctx.generate(request)
    meta = shapes.Meta(f"chatcmpl-{event.request_id}", int(time.time()), outcome.model)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return shapes.chat_stream(chunks, outcome, meta, body.n, include_usage)
    async for _ in chunks:
        pass
    answer = shapes.chat_response(outcome, meta, body.n, with_logprobs=body.logprobs)
    return Reply(answer, headers=cost_header(outcome.cost))


@request_body(CompletionRequest)
async def completions(event: Event, ctx: Context) -> Any:
    body = parse(CompletionRequest, event.body)
    model = ctx.model_for(body.model, COMPLETION)
    values = sampling(model, body)
    prompts = body.prompts()
    runs = []
    for offset, prompt in enumerate(prompts):
        request = GenerationRequest(
            model=model.id,
            prompt=prompt,
            stop=body.stop_list(),
            n=body.n,
            logprobs=body.logprobs,
            request_id=event.request_id,
            stream=body.stream,
            **values,
        )
        runs.append((offset * body.n, prompt, await ctx.generate(request)))
    answered = runs[0][2][1].model  # the requested model, or the fallback that answered
    meta = shapes.Meta(f"cmpl-{event.request_id}", int(time.time()), answered)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return shapes.completion_stream(runs, meta, body.echo, include_usage)
    for _, _, (chunks, _) in runs:
        async for _ in chunks:
            pass
    answer = shapes.completion_response(runs, meta, body.n, body.echo, body.logprobs is not None)
    return Reply(answer, headers=cost_header(sum(outcome.cost for _, _, (_, outcome) in runs)))


def chat_message(message: ChatMessage) -> dict[str, Any]:
    """A message as chat templates take it: role and text, and the tool calls of an assistant
    turn or the call a tool result answers."""
    rendered: dict[str, Any] = {"role": message.role, "content": message.text()}
    if message.name:
        rendered["name"] = message.name
    if message.tool_calls:
        rendered["tool_calls"] = message.tool_calls
    if message.tool_call_id:
        rendered["tool_call_id"] = message.tool_call_id
    return rendered


def cost_header(cost: float) -> dict[str, str]:
    """The generation's cost beside OpenAI's body (whose shape has no place for it), as
    LiteLLM's proxy reports it: a response header. Other transports read it from the Reply."""
    return {COST_HEADER: f"{cost:.8f}"}


@request_body(EmbeddingRequest)
async def embeddings(event: Event, ctx: Context) -> dict[str, Any]:
    body = parse(EmbeddingRequest, event.body)
    model = ctx.model_for(body.model, EMBEDDINGS)
    if body.dimensions is not None:
        raise HandlerError(
            400,
            "dimensions is not supported by this model",
            param="dimensions",
            code="unsupported_parameter",
        )
    result = await ctx.embed(model, body.inputs())
    data = []
    for index, vector in enumerate(result.vectors):
        embedding: Any = vector
        if body.encoding_format == "base64":
            embedding = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    usage = {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}
    return {"object": "list", "data": data, "model": model.id, "usage": usage}
