"""The one generation path. Every handler that generates, whatever API shape it answers in,
comes here through its Context (`ctx.generate(request)`, `ctx.embed(...)`,
`ctx.model_for(...)`): the `before_generate` hook, the router's stream (traced), waiting for the
first chunk so that unknown models, full queues and over-long prompts are errors before
anything is sent, shutdown's abort, cancellation (closing the stream frees the engine), and at
the end `estimate_cost` and `after_generate`. Failures become HandlerErrors here, in OpenAI's
vocabulary, which every transport knows how to answer.

Handlers only translate: their API's request into a GenerationRequest, and the Stream of
Chunks (with its Outcome) back into their API's response.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from hooks import resolve, resolve_all
from runtime.models import ServedModel
from runtime.telemetry.genai import embedding_span, record_embeddings, trace_generation
from runtime.tool_scanner import ToolCallScanner
from runtime.tool_syntax import NativeCallParser
from runtime.tools import plan_tools, with_tools
from runtime.types import (
    Chunk,
    ContextLengthExceeded,
    Embeddings,
    EngineError,
    GenerationRequest,
    GenerationTimeout,
    HandlerError,
    ModelNotFound,
    ProviderError,
    QueueFull,
    Stream,
    TokenLogprob,
    ToolCall,
    UnsupportedRequest,
    Usage,
    close,
)

if TYPE_CHECKING:
    from runtime.dispatch import Context


def find_model(ctx: Context, model_id: str, capability: str) -> ServedModel:
    try:
        model = ctx.models.get(model_id)
    except ModelNotFound as exc:
        raise HandlerError(404, str(exc), param="model", code="model_not_found") from None
    ctx.model, ctx.provider = model.id, model.spec.provider
    if capability not in model.capabilities:
        can = ", ".join(sorted(model.capabilities))
        raise HandlerError(
            400,
            f"{model.id} does not support {capability} (it supports: {can})",
            param="model",
            code="model_not_supported",
        )
    return model


def error_for(exc: Exception) -> HandlerError:
    """A generation failure in OpenAI's vocabulary."""
    if isinstance(exc, HandlerError):
        return exc
    if isinstance(exc, ModelNotFound):
        return HandlerError(404, str(exc), param="model", code="model_not_found")
    if isinstance(exc, QueueFull):
        return HandlerError(
            429,
            str(exc),
            type="rate_limit_error",
            code="queue_full",
            headers={"retry-after": str(exc.retry_after)},
        )
    if isinstance(exc, ContextLengthExceeded):
        return HandlerError(400, str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, ProviderError):
        return HandlerError(exc.status, str(exc), type=exc.type, code=exc.code, param=exc.param)
    if isinstance(exc, UnsupportedRequest):
        return HandlerError(400, str(exc), param=exc.param, code="unsupported_parameter")
    if isinstance(exc, GenerationTimeout):
        return HandlerError(504, str(exc), type="server_error", code="timeout")
    if isinstance(exc, EngineError):
        return HandlerError(503, str(exc), type="server_error", code="model_unavailable")
    raise exc


@dataclass
class Outcome:
    """What a finished generation produced, per choice."""

    texts: dict[int, list[str]] = field(default_factory=dict)
    logprobs: dict[int, list[TokenLogprob]] = field(default_factory=dict)
    finish: dict[int, str] = field(default_factory=dict)
    stop_sequences: dict[int, str] = field(default_factory=dict)  # the stop string that ended it
    tool_calls: dict[int, list[ToolCall]] = field(default_factory=dict)  # whole calls, by choice
    usage: Usage = field(default_factory=Usage)
    model: str = ""  # the model that answered: the requested one, or one of its fallbacks
    ttft_s: float | None = None  # from the start to the first chunk
    cost: float = 0.0
    error: str | None = None

    def add(self, chunk: Chunk) -> None:
        self.texts.setdefault(chunk.index, []).append(chunk.text)
        self.logprobs.setdefault(chunk.index, []).extend(chunk.logprobs)
        if chunk.finish_reason:
            self.finish[chunk.index] = chunk.finish_reason
        if chunk.stop_sequence:
            self.stop_sequences[chunk.index] = chunk.stop_sequence
        if chunk.usage:
            self.usage = chunk.usage
        calls = self.tool_calls.setdefault(chunk.index, []) if chunk.tool_calls else []
        for piece in chunk.tool_calls:
            if piece.id:
                calls.append(replace(piece))
                continue
            for call in reversed(calls):  # more of the call with its index
                if call.index == piece.index:
                    call.arguments += piece.arguments
                    break

    def text(self, index: int) -> str:
        return "".join(self.texts.get(index, []))


async def start_generation(
    ctx: Context, request: GenerationRequest, on_done: Callable[[Outcome], None] | None = None
) -> tuple[Stream[Chunk], Outcome]:
    """Run `before_generate`, open the model's stream and wait for its first chunk, so that
    unknown models, full queues and over-long prompts become errors before anything is sent.
    The returned iterator fills the Outcome as it goes; `after_generate` runs when it ends."""
    if request.default_max_tokens is None:
        # A request that names no max_tokens stops here rather than at the end of the context
        # (limits.default_max_tokens; 0: no cap). limits.max_tokens, when set, caps it further.
        request.default_max_tokens = ctx.runtime.settings.limits.default_max_tokens or None
    replaced = await resolve(ctx.hooks.before_generate(request=request, ctx=ctx))
    if isinstance(replaced, GenerationRequest):
        request = replaced
    if ctx.background:
        request.background = True
    scan = await _tool_calls(ctx, request)
    stream = trace_generation(
        ctx.tracer, request, ctx.models.generate(request), _provider(ctx, request.model)
    )
    outcome = Outcome()
    started = time.perf_counter()
    wait = _AbortableWait(ctx)
    try:
        first = await wait.next(stream)
    except Exception as exc:
        await close(stream)
        raise error_for(exc) from None
    outcome.model = first.model if first is not None and first.model else request.model
    if first is not None:
        outcome.ttft_s = time.perf_counter() - started

    async def end(_: BaseException | None) -> None:
        await close(stream)
        await _finish(ctx, request, outcome, time.perf_counter() - started)
        if on_done is not None:
            on_done(outcome)

    async def chunks() -> AsyncGenerator[Chunk, None]:
        try:
            if first is not None:
                shaped = scan(first)
                outcome.add(shaped)
                yield shaped
            while True:
                chunk = await wait.next(stream)
                if ctx.abort.is_set():  # shutting down: end every open choice with "abort"
                    for index in range(request.n):
                        if index not in outcome.finish:
                            outcome.finish[index] = "abort"
                            yield Chunk(index=index, finish_reason="abort")
                    return
                if chunk is None:
                    return
                shaped = scan(chunk)
                outcome.add(shaped)
                yield shaped
        except Exception as exc:
            outcome.error = str(exc)
            raise error_for(exc) from None

    generation = Stream(chunks(), end)  # however it ends, `end` runs once
    ctx.closers.append(generation.aclose)
    return generation, outcome


class _AbortableWait:
    """Waits for a model's next chunk in a way a shutdown's abort can interrupt: the waiting
    task is cancelled (which ends the model's stream and frees the engine) and that one
    cancellation becomes the end of the stream. Costs no task while nothing is aborted."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.waiting: asyncio.Task[Any] | None = None
        self.interrupted = False
        ctx.on_abort.append(self.interrupt)

    def interrupt(self) -> None:
        if self.waiting is not None and not self.interrupted:
            self.interrupted = True
            self.waiting.cancel()

    async def next(self, stream: AsyncIterator[Chunk]) -> Chunk | None:
        """The next chunk, or None at the end of the stream or once aborted."""
        if self.ctx.abort.is_set():
            return None
        task = self.waiting = asyncio.current_task()
        try:
            return await anext(stream, None)
        except asyncio.CancelledError:
            if self.interrupted and task is not None and task.uncancel() == 0:
                return None  # only the abort cancelled it
            raise
        finally:
            self.waiting = None


async def embed_texts(ctx: Context, model: ServedModel, texts: list[str]) -> Embeddings:
    """Embed `texts` on `model` (in an `embeddings <model>` span when tracing is on); a
    failure becomes a HandlerError."""
    with embedding_span(ctx.tracer, model.id, model.spec.provider) as span:
        try:
            result = await ctx.models.embed(model.id, texts, background=ctx.background)
        except Exception as exc:
            raise error_for(exc) from None
        record_embeddings(span, model.id, result)
    return result


async def _tool_calls(ctx: Context, request: GenerationRequest) -> Callable[[Chunk], Chunk]:
    """Check the request's tools and return what turns each choice's output into tool calls
    and content (else chunks pass as they are). Under "auto", a model whose chat template
    teaches a tool-call syntax answers in it (runtime/tool_syntax.py); otherwise the model
    decodes under the tools' JSON schema (runtime/tools.py)."""
    model = ctx.models.models.get(request.model)
    if model is None or model.spec.factory is not None:
        return _unchanged  # a platform's model: the platform takes the tools itself
    plan = plan_tools(request)
    if plan is None or not plan.calls:
        return _unchanged
    if plan.choice == "auto" and request.json_schema is None and not request.json_mode:
        try:
            await model.ensure_loaded()  # its template says which syntax it speaks
        except Exception as exc:
            raise error_for(exc) from None
        syntax = model.tool_syntax
        if syntax is not None:
            parsers: dict[int, NativeCallParser] = {}

            def native(chunk: Chunk) -> Chunk:
                return parsers.setdefault(chunk.index, NativeCallParser(syntax)).feed(chunk)

            return native
    if request.json_schema is not None or request.json_mode:
        raise HandlerError(
            400,
            "response_format cannot be combined with tools the model may call "
            '(use tool_choice "none", or leave response_format out)',
            param="response_format",
            code="invalid_value",
        )
    request.json_schema = plan.schema()
    if request.messages is not None:
        request.messages = with_tools(request.messages, plan)
    scanners: dict[int, ToolCallScanner] = {}

    def scan(chunk: Chunk) -> Chunk:
        return scanners.setdefault(chunk.index, ToolCallScanner(plan.layout)).feed(chunk)

    return scan


def _unchanged(chunk: Chunk) -> Chunk:
    return chunk


def _provider(ctx: Context, model_id: str) -> str:
    """Which provider serves `model_id` (for traces); "" for a model that is not there."""
    model = ctx.models.models.get(model_id)
    return model.spec.provider if model is not None else ""


async def _finish(
    ctx: Context, request: GenerationRequest, outcome: Outcome, seconds: float
) -> None:
    # The model that answered (a fallback's prices apply); a platform may have dropped it since.
    model = ctx.models.models.get(outcome.model or request.model)
    cost = await ctx.runtime.call_first(
        "estimate_cost",
        model=outcome.model or request.model,
        prompt_tokens=outcome.usage.prompt_tokens,
        completion_tokens=outcome.usage.completion_tokens,
        prices=model.spec.config.prices if model is not None else {},
    )
    outcome.cost = float(cost or 0.0)
    response = {
        "usage": outcome.usage,
        "finish_reasons": outcome.finish,
        "cost": outcome.cost,
        "error": outcome.error,
        "seconds": seconds,
        "ttft_s": outcome.ttft_s,
        "model": outcome.model or request.model,
        "provider": model.spec.provider if model is not None else ctx.provider,
    }
    await resolve_all(ctx.hooks.after_generate(request=request, response=response, ctx=ctx))
