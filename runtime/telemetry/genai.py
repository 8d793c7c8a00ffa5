"""Generation and embedding spans in the OpenTelemetry GenAI semantic conventions
(https://opentelemetry.io/docs/specs/semconv/gen-ai/gen-ai-spans/): named `{operation} {model}`,
with the request's parameters when it starts and the usage, finish reasons and answering model
when it ends. Prompts and completions are never recorded.

The attribute names are spelled here, not imported: the semantic-conventions package marks its
GenAI constants deprecated (they moved to a repository of their own).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

from opentelemetry.trace import Span

from runtime.telemetry.tracing import SpanStream, Tracing
from runtime.types import Chunk, Embeddings, GenerationRequest, Usage

OPERATION = "gen_ai.operation.name"
PROVIDER = "gen_ai.provider.name"
REQUEST_MODEL = "gen_ai.request.model"
RESPONSE_MODEL = "gen_ai.response.model"
INPUT_TOKENS = "gen_ai.usage.input_tokens"
OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
FINISH_REASONS = "gen_ai.response.finish_reasons"

CHAT = "chat"
TEXT_COMPLETION = "text_completion"
EMBEDDINGS = "embeddings"


def request_attributes(request: GenerationRequest, provider: str) -> dict[str, Any]:
    """What a generation span knows when it starts."""
    operation = CHAT if request.messages is not None else TEXT_COMPLETION
    attributes: dict[str, Any] = {
        OPERATION: operation,
        REQUEST_MODEL: request.model,
        PROVIDER: provider,
        "gen_ai.request.temperature": request.temperature,
        "gen_ai.request.top_p": request.top_p,
    }
    if request.max_tokens is not None:
        attributes["gen_ai.request.max_tokens"] = request.max_tokens
    if request.seed is not None:
        attributes["gen_ai.request.seed"] = request.seed
    if request.json_mode or request.json_schema:
        attributes["gen_ai.output.type"] = "json"
    if request.stream:
        attributes["tiffin.stream"] = True
    if request.top_k:
        attributes["gen_ai.request.top_k"] = request.top_k
    if request.presence_penalty:
        attributes["gen_ai.request.presence_penalty"] = request.presence_penalty
    if request.frequency_penalty:
        attributes["gen_ai.request.frequency_penalty"] = request.frequency_penalty
    if request.stop:
        attributes["gen_ai.request.stop_sequences"] = list(request.stop)
    if request.n != 1:
        attributes["gen_ai.request.choice.count"] = request.n
    return attributes


class TracedGeneration(SpanStream[Chunk]):
    """The router's chunks for one generation, inside its span. The span is current while
    the first chunk is awaited (that is when a model loads, a queue is waited in, an upstream
    is called: their spans nest under it), and ends when the stream ends, fails or is closed,
    with what the chunks said (response model, finish reasons, usage)."""

    def __init__(
        self,
        tracing: Tracing,
        request: GenerationRequest,
        stream: AsyncIterator[Chunk],
        provider: str,
    ) -> None:
        operation = CHAT if request.messages is not None else TEXT_COMPLETION
        span = tracing.start_span(f"{operation} {request.model}")
        if span.is_recording():  # (not sampled: no attribute work at all)
            span.set_attributes(request_attributes(request, provider))
        super().__init__(stream, span)
        self._first = True
        self._started = time.perf_counter()
        self._finish: dict[int, str] = {}
        self._usage: Usage | None = None
        self._model = ""

    async def __anext__(self) -> Chunk:
        if self._first:
            self._first = False
            with Tracing.current(self._span):
                chunk = await super().__anext__()
            self._span.set_attribute(
                "tiffin.time_to_first_chunk_s", time.perf_counter() - self._started
            )
        else:
            chunk = await super().__anext__()
        if chunk.finish_reason:
            self._finish[chunk.index] = chunk.finish_reason
        if chunk.usage is not None:
            self._usage = chunk.usage
        if chunk.model:
            self._model = chunk.model
        return chunk

    async def _ended(self, error: BaseException | None) -> None:
        span = self._span
        if span.is_recording():
            if self._model:
                span.set_attribute(RESPONSE_MODEL, self._model)
            if self._finish:
                span.set_attribute(FINISH_REASONS, [self._finish[i] for i in sorted(self._finish)])
            if self._usage is not None:
                span.set_attribute(INPUT_TOKENS, self._usage.prompt_tokens)
                span.set_attribute(OUTPUT_TOKENS, self._usage.completion_tokens)
        await super()._ended(error)


def trace_generation(
    tracing: Tracing, request: GenerationRequest, stream: AsyncIterator[Chunk], provider: str
) -> AsyncIterator[Chunk]:
    """`stream` in a generation span when tracing is on, else `stream` itself."""
    if not tracing.enabled:
        return stream
    return TracedGeneration(tracing, request, stream, provider)


@contextmanager
def embedding_span(tracing: Tracing, model: str, provider: str) -> Iterator[Span]:
    """An `embeddings {model}` span around a block; call `record_embeddings` with the result."""
    attributes = {OPERATION: EMBEDDINGS, REQUEST_MODEL: model, PROVIDER: provider}
    with tracing.span(f"{EMBEDDINGS} {model}", attributes) as span:
        yield span


def record_embeddings(span: Span, model: str, result: Embeddings) -> None:
    if span.is_recording():
        span.set_attribute(RESPONSE_MODEL, model)
        span.set_attribute(INPUT_TOKENS, result.prompt_tokens)
        span.set_attribute(
            "gen_ai.embeddings.dimension.count", len(result.vectors[0]) if result.vectors else 0
        )
