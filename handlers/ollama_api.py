"""Ollama's API on Tiffin's port (`/api/tags`, `/api/chat`, `/api/generate`, `/api/embed`,
`/api/ps`, `/api/version`), so tools written for Ollama work against Tiffin. The same router
and generation path as the OpenAI handlers; only the shapes differ: Ollama's `options`,
NDJSON streaming (`stream` defaults to true), final lines with `done` and timings in
nanoseconds, and errors as `{"error": "..."}`."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from handlers.openai_requests import INT32_MAX, Sampling
from handlers.parsing import model_defaults, parse
from runtime.dispatch import Context, errors_as, request_body
from runtime.engines.schema_limits import SchemaTooComplex, check_schema
from runtime.generation import Outcome
from runtime.models import ModelState, ServedModel
from runtime.types import (
    CHAT,
    COMPLETION,
    EMBEDDINGS,
    Event,
    GenerationRequest,
    HandlerError,
    NdjsonStream,
    close,
)

# The Ollama API version Tiffin answers for (clients check it before using newer endpoints).
OLLAMA_API_VERSION = "0.11.0"
# Ollama's option names -> GenerationRequest fields.
OPTIONS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repeat_penalty": "repeat_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "seed": "seed",
    "num_predict": "max_tokens",
}


class Options(Sampling):
    """Ollama's `options`, in the ranges of the OpenAI fields they become
    (handlers/openai_requests.py). Options Tiffin does not use (mirostat, num_thread, ...) are
    ignored, as Ollama ignores the ones it does not know and as the OpenAI API ignores unknown
    fields; a number that is not finite is refused anywhere in the body when it is decoded."""

    # Ollama's -1 ("infinite") and -2 ("fill the context") both mean: until the context is full.
    num_predict: Annotated[int, Field(ge=-2, le=INT32_MAX)] | None = None
    num_ctx: Annotated[int, Field(ge=1, le=INT32_MAX)] | None = None  # checked, not used
    stop: str | list[str] | None = None

    @field_validator("num_predict")
    @classmethod
    def some_tokens(cls, value: int | None) -> int | None:
        if value == 0:
            raise ValueError("expected at least 1 token, or -1 or -2 for up to the context length")
        return value


class Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    stream: bool = True
    options: Options | None = None
    format: Literal["json"] | dict[str, Any] | None = None
    keep_alive: str | int | float | None = None

    @field_validator("format")
    @classmethod
    def schema_within_limits(cls, value: Any) -> Any:
        if isinstance(value, dict):
            try:
                check_schema(value)
            except SchemaTooComplex as exc:  # a 400 in Ollama's shape, before any engine
                raise ValueError(str(exc)) from None
        return value


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    # An assistant turn's calls, in Ollama's shape: [{"function": {"name", "arguments": {...}}}]
    tool_calls: list[dict[str, Any]] | None = None
    tool_name: str | None = None  # a tool result's function
    images: list[str] | None = None  # refused: no model here takes images yet

    def rendered(self, position: int) -> dict[str, Any]:
        """As the generation path takes messages (OpenAI's shape)."""
        message: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = [
                {
                    "id": f"call_{position}_{i}",
                    "type": "function",
                    "function": {
                        "name": call.get("function", {}).get("name", ""),
                        "arguments": json.dumps(call.get("function", {}).get("arguments", {})),
                    },
                }
                for i, call in enumerate(self.tool_calls)
            ]
        if self.role == "tool":
            message["tool_call_id"] = self.tool_name or "a tool"
        return message


class ChatRequest(Request):
    messages: list[Message] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None  # OpenAI's tool shape; Ollama always means "auto"


class GenerateRequest(Request):
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    images: list[str] | None = None  # refused: no model here takes images yet


class EmbedRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    input: str | list[str] = Field(min_length=1)


class LegacyEmbeddingsRequest(BaseModel):
    """`/api/embeddings`, Ollama's older endpoint: one `prompt`, one `embedding`."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    prompt: str = Field(min_length=1)


def ollama_error(exc: HandlerError) -> dict[str, Any]:
    """An error in Ollama's shape."""
    return {"error": exc.message}


# Errors in Ollama's shape, `{"error": "message"}` with the same status, also for what the
# transport refuses before the handler runs.
ollama_errors = errors_as(ollama_error)


@ollama_errors
async def version(event: Event, ctx: Context) -> dict[str, Any]:
    return {"version": OLLAMA_API_VERSION}


@ollama_errors
async def tags(event: Event, ctx: Context) -> dict[str, Any]:
    """Every servable model, as Ollama lists its local models."""
    return {"models": [model_entry(m) for m in ctx.models.models.values()]}


@ollama_errors
async def ps(event: Event, ctx: Context) -> dict[str, Any]:
    """The models loaded now."""
    loaded = [m for m in ctx.models.models.values() if m.state is ModelState.loaded]
    return {"models": [{**model_entry(m), "expires_at": None, "size_vram": 0} for m in loaded]}


@request_body(ChatRequest)
@ollama_errors
async def chat(event: Event, ctx: Context) -> Any:
    body = parse(ChatRequest, event.body)
    model = ctx.model_for(body.model, CHAT)
    for position, message in enumerate(body.messages):
        if message.images:
            _no_images(model, f"messages.{position}.images")
    messages = [m.rendered(i) for i, m in enumerate(body.messages)]
    request = _request(model, body, messages=messages, tools=body.tools or None)
    return await _answer(ctx, request, body.stream, "message")


@request_body(GenerateRequest)
@ollama_errors
async def generate(event: Event, ctx: Context) -> Any:
    """A prompt: templated as a user turn (after `system`) unless `raw`, as Ollama does."""
    body = parse(GenerateRequest, event.body)
    if body.images:
        _no_images(ctx.model_for(body.model, COMPLETION if body.raw else CHAT), "images")
    if body.raw:
        model = ctx.model_for(body.model, COMPLETION)
        request = _request(model, body, prompt=body.prompt)
    else:
        model = ctx.model_for(body.model, CHAT)
        system = [{"role": "system", "content": body.system}] if body.system else []
        messages = [*system, {"role": "user", "content": body.prompt}]
        request = _request(model, body, messages=messages)
    return await _answer(ctx, request, body.stream, "response")


@request_body(EmbedRequest)
@ollama_errors
async def embed(event: Event, ctx: Context) -> dict[str, Any]:
    body = parse(EmbedRequest, event.body)
    model = ctx.model_for(body.model, EMBEDDINGS)
    started = time.perf_counter_ns()
    texts = [body.input] if isinstance(body.input, str) else list(body.input)
    result = await ctx.embed(model, texts)
    return {
        "model": model.id,
        "embeddings": result.vectors,
        "total_duration": time.perf_counter_ns() - started,
        "prompt_eval_count": result.prompt_tokens,
    }


@request_body(LegacyEmbeddingsRequest)
@ollama_errors
async def embeddings(event: Event, ctx: Context) -> dict[str, Any]:
    body = parse(LegacyEmbeddingsRequest, event.body)
    model = ctx.model_for(body.model, EMBEDDINGS)
    result = await ctx.embed(model, [body.prompt])
    return {"embedding": result.vectors[0]}


# --- shared -----------------------------------------------------------------------------------


def _no_images(model: ServedModel, param: str) -> None:
    raise HandlerError(
        400, f"{model.id} does not take images", param=param, code="unsupported_content"
    )


def model_entry(model: ServedModel) -> dict[str, Any]:
    spec = model.spec
    size = spec.path.stat().st_size if spec.path.is_file() else 0
    return {
        "name": model.id,
        "model": model.id,
        "modified_at": datetime.fromtimestamp(model.created, UTC).isoformat(),
        "size": size,
        "digest": "",
        "details": {
            "format": "gguf" if spec.path.suffix == ".gguf" else spec.engine,
            "family": spec.engine,
            "families": [spec.engine],
            "parameter_size": "",
            "quantization_level": "",
        },
    }


def _request(model: ServedModel, body: Request, **fields: Any) -> GenerationRequest:
    values = {**model_defaults(model), **fields}
    options = body.options or Options()
    for option, name in OPTIONS.items():
        value = getattr(options, option)
        if value is not None:
            values[name] = value
    if options.num_predict is not None and options.num_predict < 0:
        # Ollama's -1 (no limit) and -2 (fill the context): no cap but the context's end.
        values["max_tokens"], values["default_max_tokens"] = None, 0
    if options.stop:
        values["stop"] = [options.stop] if isinstance(options.stop, str) else list(options.stop)
    if body.format == "json":
        values["json_mode"] = True
    elif isinstance(body.format, dict):
        values["json_schema"] = body.format
    known = set(GenerationRequest.__dataclass_fields__)
    try:
        return GenerationRequest(
            model=model.id, stream=body.stream, **{k: v for k, v in values.items() if k in known}
        )
    except TypeError as exc:
        raise HandlerError(400, f"options: {exc}", code="invalid_value") from None


async def _answer(
    ctx: Context, request: GenerationRequest, stream: bool, field: Literal["message", "response"]
) -> Any:
    started = time.perf_counter_ns()
    chunks, outcome = await ctx.generate(request)

    def piece(text: str, done: bool, calls: bool = False) -> dict[str, Any]:
        answer: dict[str, Any] = {"role": "assistant", "content": text}
        if calls:
            answer["tool_calls"] = _tool_calls(outcome)
        line: dict[str, Any] = {
            "model": outcome.model,
            "created_at": datetime.now(UTC).isoformat(),
            field: answer if field == "message" else text,
            "done": done,
        }
        if done:
            line.update(_final(outcome, time.perf_counter_ns() - started))
        return line

    if not stream:
        async for _ in chunks:
            pass
        return piece(outcome.text(0), done=True, calls=bool(outcome.tool_calls.get(0)))

    async def lines() -> AsyncIterator[dict[str, Any]]:
        try:
            async for chunk in chunks:
                if chunk.index == 0 and chunk.text:
                    yield piece(chunk.text, done=False)
            if outcome.tool_calls.get(0):  # whole calls, once made, as Ollama sends them
                yield piece("", done=False, calls=True)
            yield piece("", done=True)
        finally:
            await close(chunks)  # frees the engine at once

    return NdjsonStream(lines())


def _tool_calls(outcome: Outcome) -> list[dict[str, Any]]:
    """The first choice's calls in Ollama's shape, arguments as an object. A call that
    num_predict cut short (done_reason "length") has no object to give and is left out."""
    calls = []
    for i, call in enumerate(outcome.tool_calls.get(0, [])):
        try:
            arguments = json.loads(call.arguments)
        except json.JSONDecodeError:
            continue
        calls.append({"function": {"index": i, "name": call.name, "arguments": arguments}})
    return calls


def _final(outcome: Outcome, elapsed_ns: int) -> dict[str, Any]:
    finish = outcome.finish.get(0, "stop")
    return {
        "done_reason": "stop" if finish == "tool_calls" else finish,  # Ollama has no other
        "total_duration": elapsed_ns,
        "load_duration": 0,
        "prompt_eval_count": outcome.usage.prompt_tokens,
        "eval_count": outcome.usage.completion_tokens,
    }
