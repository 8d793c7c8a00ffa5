"""`serving.topology=split`: models of the GPU engines run in a runner service of their own.

Both halves live here, with the line format between them:

- `RunnerHost` is the runner's side: a ModelRouter of its own over the local models whose engine
  is in `serving.runner_engines`, answering `generate` as newline-delimited JSON records.
- `RemoteEngine` is the API side: an Engine whose work happens in the runner, so the API's
  router, queues, handlers and transports treat it like any local engine. Closing its stream
  closes the runner's stream, which cancels the job there.

The transport between them is a `RunnerClient`; `bentos/runner.py` hands in the BentoML
dependency (`bentoml.depends`), tests may hand in a RunnerHost itself. Nothing here imports
BentoML.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict
from typing import Any, Protocol

from runtime.engines.engine import ModelSpec
from runtime.integrations.custom_models import CustomModelsIntegration
from runtime.models import ModelRouter
from runtime.types import (
    CHAT,
    COMPLETION,
    EMBEDDINGS,
    Chunk,
    ContextLengthExceeded,
    Embeddings,
    EngineError,
    GenerationRequest,
    ModelNotFound,
    QueueFull,
    TokenLogprob,
    UnsupportedRequest,
    Usage,
    close,
)

# --- the line format ---------------------------------------------------------------------------


def chunk_line(chunk: Chunk, stats: dict[str, Any] | None = None) -> str:
    record: dict[str, Any] = {"chunk": asdict(chunk)}
    if stats is not None:
        record["stats"] = stats
    return json.dumps(record, separators=(",", ":")) + "\n"


def error_line(exc: Exception) -> str:
    error: dict[str, Any] = {"kind": "engine", "message": str(exc)}
    if isinstance(exc, ContextLengthExceeded):
        error = {
            "kind": "context_length",
            "prompt_tokens": exc.prompt_tokens,
            "context_length": exc.context_length,
            "max_tokens": exc.max_tokens,
        }
    elif isinstance(exc, UnsupportedRequest):
        error = {"kind": "unsupported", "message": str(exc), "param": exc.param}
    elif isinstance(exc, QueueFull):
        error = {
            "kind": "queue_full",
            "model": exc.model,
            "limit": exc.limit,
            "retry_after": exc.retry_after,
        }
    return json.dumps({"error": error}) + "\n"


def chunk_from_record(record: dict[str, Any]) -> Chunk:
    usage = record.get("usage")
    return Chunk(
        index=int(record["index"]),
        text=str(record["text"]),
        logprobs=[
            TokenLogprob(
                token=item["token"],
                logprob=item["logprob"],
                bytes=item.get("bytes"),
                top=[(str(token), float(logprob)) for token, logprob in item.get("top", [])],
            )
            for item in record.get("logprobs", [])
        ],
        finish_reason=record.get("finish_reason"),
        usage=Usage(**usage) if usage else None,
        model=str(record.get("model", "")),
    )


def error_from_record(error: dict[str, Any]) -> Exception:
    kind = error.get("kind")
    if kind == "context_length":
        return ContextLengthExceeded(
            int(error["prompt_tokens"]), int(error["context_length"]), error.get("max_tokens")
        )
    if kind == "unsupported":
        return UnsupportedRequest(str(error["message"]), error.get("param"))
    if kind == "queue_full":
        return QueueFull(str(error["model"]), int(error["limit"]), int(error["retry_after"]))
    return EngineError(str(error.get("message", "the runner failed")))


def request_from_body(body: dict[str, Any]) -> GenerationRequest:
    try:
        return GenerationRequest(**body)
    except TypeError as exc:
        raise EngineError(f"the runner got a malformed request: {exc}") from None


# --- the runner's side ----------------------------------------------------------------------------


class RunnerHost:
    """Serves the runner-placed local models of one config (built from an unstarted Runtime:
    its plugins' engines and its custom_models declarations)."""

    def __init__(self, runtime: Any) -> None:
        serving = runtime.settings.serving
        self.engines = set(serving.runner_engines)
        self.models = ModelRouter(runtime.events, runtime.engine_factories)
        self._sources = [
            integration
            for integration in runtime.integrations.integrations.values()
            if isinstance(integration, CustomModelsIntegration)
        ]

    async def start(self) -> None:
        for source in self._sources:
            await source.initialize()  # resolves model files; loads nothing
            self.models.register_all(s for s in source.models() if s.engine in self.engines)
        await self.models.start()

    async def stop(self) -> None:
        await self.models.stop()

    async def generate(self, request: dict[str, Any]) -> AsyncIterator[str]:
        """Newline-delimited records: `{"chunk": ...}` per chunk (the last with the engine's
        stats), or one `{"error": ...}` in place of what could not be done."""
        stream: AsyncIterator[Chunk] | None = None
        try:
            parsed = request_from_body(request)
            model = self.models.get(parsed.model)
            stream = self.models.generate(parsed)
            async for chunk in stream:
                final = chunk.usage is not None and model.engine is not None
                yield chunk_line(chunk, model.engine.stats() if final and model.engine else None)
        except (EngineError, ModelNotFound, QueueFull) as exc:
            yield error_line(exc)
        finally:
            if stream is not None:
                await close(stream)

    async def load_model(self, model: str) -> dict[str, Any]:
        try:
            return (await self.models.load(model)).describe()
        except (EngineError, ModelNotFound) as exc:
            return {"error": json.loads(error_line(exc))["error"]}

    async def unload_model(self, model: str) -> dict[str, Any]:
        try:
            return (await self.models.unload(model)).describe()
        except ModelNotFound as exc:
            return {"error": json.loads(error_line(exc))["error"]}

    async def embed(self, model: str, texts: list[str]) -> dict[str, Any]:
        try:
            result = await self.models.embed(model, texts)
        except (EngineError, ModelNotFound, QueueFull) as exc:
            return {"error": json.loads(error_line(exc))["error"]}
        return {"vectors": result.vectors, "prompt_tokens": result.prompt_tokens}


# --- the API's side -------------------------------------------------------------------------------


class RunnerClient(Protocol):
    """What RemoteEngine needs of the runner: RunnerHost's methods, called by keyword."""

    def generate(self, *, request: dict[str, Any]) -> AsyncIterator[str]: ...

    async def load_model(self, *, model: str) -> dict[str, Any]: ...

    async def unload_model(self, *, model: str) -> dict[str, Any]: ...

    async def embed(self, *, model: str, texts: list[str]) -> dict[str, Any]: ...


class RemoteEngine:
    """A model that runs in the runner service, behind the Engine protocol."""

    def __init__(self, spec: ModelSpec, client: RunnerClient) -> None:
        self.spec = spec
        self.id = spec.config.id
        self.client = client
        embeds = spec.engine == "embeddings"
        self.capabilities = frozenset({EMBEDDINGS} if embeds else {CHAT, COMPLETION})
        self._stats: dict[str, Any] = {}

    async def load(self) -> None:
        described = await self._call(self.client.load_model(model=self.id))
        self._stats = described.get("stats") or {}

    async def unload(self) -> None:
        await self._call(self.client.unload_model(model=self.id))

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        lines = self.client.generate(request=asdict(request))
        buffered = ""
        try:
            async for piece in _guarded(lines):
                buffered += piece
                *records, buffered = buffered.split("\n")
                for line in records:
                    if not line:
                        continue
                    record = json.loads(line)
                    if record.get("error"):
                        raise error_from_record(record["error"])
                    if "stats" in record:
                        self._stats = record["stats"]
                    yield chunk_from_record(record["chunk"])
        finally:
            await close(lines)  # the runner sees the stream end and cancels its job

    async def embed(self, texts: Sequence[str]) -> Embeddings:
        result = await self._call(self.client.embed(model=self.id, texts=list(texts)))
        return Embeddings(vectors=result["vectors"], prompt_tokens=int(result["prompt_tokens"]))

    def tokenize(self, text: str) -> list[int]:
        raise EngineError(f"{self.id} runs in the runner service; tokenize it there")

    def stats(self) -> dict[str, Any]:
        return {"placement": "runner", "engine": self.spec.engine, "runner": self._stats}

    async def _call(self, pending: Any) -> dict[str, Any]:
        try:
            result: dict[str, Any] = await pending
        except Exception as exc:  # the transport's own errors: runner down, timeout...
            raise EngineError(f"the runner service failed: {type(exc).__name__}: {exc}") from exc
        if result.get("error"):  # a model's description has "error": None
            raise error_from_record(result["error"])
        return result


async def _guarded(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The runner's stream, with transport failures turned into EngineErrors."""
    try:
        async for piece in lines:
            yield piece
    except Exception as exc:
        raise EngineError(f"the runner service failed: {type(exc).__name__}: {exc}") from exc
