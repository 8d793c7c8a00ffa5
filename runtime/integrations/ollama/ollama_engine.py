"""An Ollama server's model behind the Engine protocol: requests go out as Ollama's `/api/chat`
(or `/api/generate` with `raw` for plain prompts), NDJSON lines come back and become Chunks."""

from __future__ import annotations

import json
import uuid
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
    ToolCall,
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


def ollama_message(message: dict[str, Any]) -> dict[str, Any]:
    """A chat message as Ollama takes it: an assistant turn's calls with their arguments as an
    object (OpenAI's `tool_call_id` has no place in Ollama's message and is left out)."""
    calls = message.get("tool_calls")
    if not calls:
        return {k: v for k, v in message.items() if k != "tool_call_id"}
    converted = []
    for call in calls:
        function = call.get("function") or {}
        try:
            arguments = json.loads(function.get("arguments") or "{}")
        except json.JSONDecodeError:
            arguments = {}
        converted.append({"function": {"name": function.get("name", ""), "arguments": arguments}})
    return {**message, "tool_calls": converted}


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
        body["messages"] = [ollama_message(m) for m in request.messages]
        if request.tools and request.tool_choice != "none":
            body["tools"] = request.tools
    else:
        body["prompt"] = request.prompt or ""
        body["raw"] = True
    if request.json_schema is not None:
        body["format"] = request.json_schema
    elif request.json_mode:
        body["format"] = "json"
    return body


def tool_calls(calls: Any, before: int) -> list[ToolCall]:
    """Ollama's whole calls (`arguments` an object) as OpenAI's: numbered after the `before`
    calls already made, with an id Ollama does not give, the arguments as JSON text."""
    if not isinstance(calls, list):
        return []
    made: list[ToolCall] = []
    for call in calls:
        function = (call or {}).get("function") or {}
        made.append(
            ToolCall(
                index=before + len(made),
                id=f"call_{uuid.uuid4().hex[:24]}",
                name=str(function.get("name") or ""),
                arguments=json.dumps(function.get("arguments") or {}),
            )
        )
    return made


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
        if request.tools and request.tool_choice not in (None, "auto", "none"):
            raise UnsupportedRequest(
                "Ollama decides by itself whether to call a tool: tool_choice may be 'auto'"
                " or 'none' through it",
                param="tool_choice",
            )
        if request.n != 1:
            raise ProviderError(400, "Ollama answers one choice per request (n=1)", param="n")
        path = "/api/chat" if request.messages is not None else "/api/generate"
        response = await self._open(path, ollama_body(request, self.ollama_model))
        tally = Tally()
        calls = 0
        try:
            async for line in response.aiter_lines():
                if not line.strip():
                    continue
                record = json.loads(line)
                if record.get("error"):
                    raise ProviderError(502, str(record["error"]), code="upstream_error")
                message = record.get("message") or {}
                text = message.get("content") if "message" in record else record.get("response")
                made = tool_calls(message.get("tool_calls"), calls)
                calls += len(made)
                if text or made:
                    chunk = Chunk(text=text or "", tool_calls=made)
                    tally.add(chunk)
                    yield chunk
                if record.get("done"):
                    tally.report(record.get("prompt_eval_count"), record.get("eval_count"))
                    finish = "length" if record.get("done_reason") == "length" else "stop"
                    yield Chunk(
                        finish_reason="tool_calls" if calls and finish == "stop" else finish,
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
