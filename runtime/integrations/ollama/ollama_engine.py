"""An Ollama server's model behind the Engine protocol: requests go out as Ollama's `/api/chat`
(or `/api/generate` with `raw` for plain prompts), NDJSON lines come back and become Chunks."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

import httpx

from runtime.engines.engine import ModelSpec
from runtime.integrations.token_counts import Tally, TokenCounter
from runtime.types import (
    CHAT,
    COMPLETION,
    EMBEDDINGS,
    Chunk,
    Embeddings,
    EngineError,
    GenerationRequest,
    ProviderError,
    UnsupportedRequest,
)

if TYPE_CHECKING:
    from runtime.integrations.ollama.ollama_integration import OllamaIntegration

# GenerationRequest fields -> Ollama's option names, with the values that mean "off".
OPTIONS = {
    "temperature": ("temperature", None),
    "top_p": ("top_p", 1.0),
    "top_k": ("top_k", 0),
    "min_p": ("min_p", 0.0),
    "repeat_penalty": ("repeat_penalty", 1.0),
    "presence_penalty": ("presence_penalty", 0.0),
    "frequency_penalty": ("frequency_penalty", 0.0),
    "seed": ("seed", None),
    "max_tokens": ("num_predict", None),
}


def ollama_body(request: GenerationRequest, model: str) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for field, (option, off) in OPTIONS.items():
        value = getattr(request, field)
        if value is not None and value != off:
            options[option] = value
    if request.stop:
        options["stop"] = list(request.stop)
    body: dict[str, Any] = {"model": model, "stream": True, "options": options}
    if request.messages is not None:
        body["messages"] = request.messages
        if request.tools:
            body["tools"] = request.tools
    else:
        body["prompt"] = request.prompt or ""
        body["raw"] = True
    if request.json_schema is not None:
        body["format"] = request.json_schema
    elif request.json_mode:
        body["format"] = "json"
    return body


def ollama_error(status: int, raw: bytes) -> ProviderError:
    """Ollama answers errors as `{"error": "message"}`."""
    try:
        message = str(json.loads(raw).get("error") or raw[:500].decode(errors="replace"))
    except (ValueError, AttributeError):
        message = raw[:500].decode(errors="replace") or f"HTTP {status}"
    kind = "invalid_request_error" if 400 <= status < 500 else "server_error"
    code = "model_not_found" if status == 404 else None
    return ProviderError(status, message, type=kind, code=code)


class OllamaEngine:
    """One model of an Ollama server."""

    capabilities = frozenset({CHAT, COMPLETION, EMBEDDINGS})

    def __init__(self, spec: ModelSpec, ollama: OllamaIntegration, ollama_model: str) -> None:
        self.spec = spec
        self.ollama = ollama
        self.ollama_model = ollama_model
        # Counts Ollama leaves out (older releases drop prompt_eval_count for a cached prompt).
        self.counter = TokenCounter(spec.config.id, spec.config.engine_settings, ollama.log)

    async def load(self) -> None:
        await self.counter.load()  # Ollama loads on first use (and keep_alive unloads)

    async def unload(self) -> None:
        return None

    def tokenize(self, text: str) -> list[int]:
        raise EngineError(f"{self.spec.config.id} is served by Ollama; no tokenizer here")

    def stats(self) -> dict[str, Any]:
        return {"provider": self.ollama.name, "model": self.ollama_model}

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        if request.tools:
            # Chunks cannot carry tool calls yet: refuse rather than drop them silently.
            raise UnsupportedRequest("tools are not supported through Ollama yet", param="tools")
        if request.n != 1:
            raise ProviderError(400, "Ollama answers one choice per request (n=1)", param="n")
        path = "/api/chat" if request.messages is not None else "/api/generate"
        response = await self._open(path, ollama_body(request, self.ollama_model))
        tally = Tally()
        try:
            async for line in response.aiter_lines():
                if not line.strip():
                    continue
                record = json.loads(line)
                if record.get("error"):
                    raise ProviderError(502, str(record["error"]), code="upstream_error")
                message = record.get("message") or {}
                text = message.get("content") if "message" in record else record.get("response")
                if text:
                    chunk = Chunk(text=text)
                    tally.add(chunk)
                    yield chunk
                if record.get("done"):
                    tally.report(record.get("prompt_eval_count"), record.get("eval_count"))
                    yield Chunk(
                        finish_reason="length" if record.get("done_reason") == "length" else "stop",
                        usage=self.counter.usage(request, tally),
                    )
                    return
            raise httpx.RemoteProtocolError("the stream ended before done")
        except (httpx.HTTPError, json.JSONDecodeError) as exc:
            raise ProviderError(
                502, f"Ollama failed mid-stream: {type(exc).__name__}: {exc}", code="upstream_error"
            ) from None
        finally:
            await response.aclose()

    async def embed(self, texts: Sequence[str]) -> Embeddings:
        payload = await self.ollama.request_json(
            "/api/embed", {"model": self.ollama_model, "input": list(texts)}
        )
        return Embeddings(
            vectors=payload["embeddings"], prompt_tokens=int(payload.get("prompt_eval_count", 0))
        )

    async def _open(self, path: str, body: dict[str, Any]) -> httpx.Response:
        client = self.ollama.client
        try:
            response = await client.send(client.build_request("POST", path, json=body), stream=True)
        except httpx.HTTPError as exc:
            raise ProviderError(
                503,
                f"Ollama cannot be reached: {type(exc).__name__}: {exc}",
                code="upstream_unavailable",
            ) from None
        if not response.is_success:
            try:
                raw = await response.aread()
            except httpx.HTTPError:
                raw = b""  # the error body broke off; the status still says what happened
            finally:
                await response.aclose()
            raise ollama_error(response.status_code, raw)
        return response
