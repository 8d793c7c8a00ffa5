"""An OpenAI-compatible upstream's model behind the Engine protocol: requests go out as OpenAI
JSON, streamed answers come back as server-sent events and become Chunks.

Failures before the first token are retried (transport errors, 5xx, 429) and counted by two
circuit breakers: the upstream's counts what says it cannot be reached (connection errors,
timeouts), the model's what it answers for that model (5xx, 408, 429). An open circuit fails
fast: one model the upstream keeps failing never stops its other models, an unreachable upstream
stops them all. A 4xx is the request's fault and no failure. A failure after the first token
ends the stream with a ProviderError: what was sent cannot be taken back.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

import httpx

from runtime.engines.engine import ModelSpec
from runtime.integrations.openai_compatible.circuit import CircuitState
from runtime.integrations.token_counts import Tally, TokenCounter
from runtime.secrets import MASK, redact_text
from runtime.types import (
    CHAT,
    COMPLETION,
    EMBEDDINGS,
    Chunk,
    Embeddings,
    EngineError,
    GenerationRequest,
    ProviderError,
    TokenLogprob,
    ToolCall,
)

if TYPE_CHECKING:
    from runtime.integrations.openai_compatible.openai_compatible_integration import (
        OpenAICompatibleIntegration,
    )

# llama.cpp's knobs that OpenAI lacks; sent only when set, since strict upstreams reject them.
EXTRA_NEUTRAL = {"top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0}


def request_body(request: GenerationRequest, upstream_model: str) -> dict[str, Any]:
    """The OpenAI request for a GenerationRequest (streamed with usage when the client
    streams; whole otherwise)."""
    body: dict[str, Any] = {
        "model": upstream_model,
        "stream": request.stream,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "presence_penalty": request.presence_penalty,
        "frequency_penalty": request.frequency_penalty,
        "n": request.n,
    }
    if request.stream:
        body["stream_options"] = {"include_usage": True}
    for name, neutral in EXTRA_NEUTRAL.items():
        if getattr(request, name) != neutral:
            body[name] = getattr(request, name)
    optional = {"max_tokens": request.max_tokens, "seed": request.seed}
    body.update({k: v for k, v in optional.items() if v is not None})  # seed 0 is a seed
    if request.stop:
        body["stop"] = request.stop
    if request.messages is not None:
        body["messages"] = request.messages
        if request.logprobs is not None:
            body["logprobs"] = True
            body["top_logprobs"] = request.logprobs
        if request.json_schema is not None:
            schema = {"name": "response", "schema": request.json_schema}
            body["response_format"] = {"type": "json_schema", "json_schema": schema}
        elif request.json_mode:
            body["response_format"] = {"type": "json_object"}
        if request.tools:
            body["tools"] = request.tools
            if request.tool_choice is not None:
                body["tool_choice"] = request.tool_choice
            if not request.parallel_tool_calls:
                body["parallel_tool_calls"] = False
    else:
        body["prompt"] = request.prompt or ""
        if request.logprobs is not None:
            body["logprobs"] = request.logprobs
    return body


def chunks_of(event: dict[str, Any], secrets: Sequence[str] = ()) -> list[Chunk]:
    """The Chunks in one streamed event, or in a whole response (chat or text completion);
    its `usage`, if any, is the caller's to read (see token_counts.py)."""
    if isinstance(event.get("error"), dict):
        raise provider_error(502, event, secrets)
    found = []
    for choice in event.get("choices") or []:
        # A stream's delta, a whole chat response's message, or a text completion's text.
        message = choice.get("delta", choice.get("message"))
        text = (message or {}).get("content") if message is not None else choice.get("text")
        found.append(
            Chunk(
                index=int(choice.get("index", 0)),
                text=text or "",
                logprobs=_logprobs(choice.get("logprobs")),
                finish_reason=choice.get("finish_reason"),
                # vLLM and llama.cpp's server name the stop string that matched; OpenAI does not
                stop_sequence=_stop_string(choice.get("stop_reason")),
                tool_calls=_tool_calls((message or {}).get("tool_calls")),
            )
        )
    return found


def _stop_string(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None  # vLLM gives a token id for EOS


def _tool_calls(calls: Any) -> list[ToolCall]:
    """A message's tool calls (whole) or a delta's pieces of them, as the upstream sent them:
    a call's first piece has its id and name, later ones more arguments."""
    if not isinstance(calls, list):
        return []
    found = []
    for position, call in enumerate(calls):
        if not isinstance(call, dict):
            continue
        function = call.get("function") or {}
        found.append(
            ToolCall(
                index=int(call.get("index", position)),
                id=str(call.get("id") or ""),
                name=str(function.get("name") or "") if call.get("id") else "",
                arguments=str(function.get("arguments") or ""),
            )
        )
    return found


def report_usage(event: dict[str, Any], tally: Tally) -> None:
    """Note the counts an event's `usage` holds (some servers report only part of it)."""
    usage = event.get("usage")
    if isinstance(usage, dict):
        tally.report(usage.get("prompt_tokens"), usage.get("completion_tokens"))


def _logprobs(value: Any) -> list[TokenLogprob]:
    if not isinstance(value, dict):
        return []
    if isinstance(value.get("content"), list):  # chat
        return [
            TokenLogprob(
                token=item["token"],
                logprob=float(item["logprob"]),
                bytes=item.get("bytes"),
                top=[(t["token"], float(t["logprob"])) for t in item.get("top_logprobs") or []],
            )
            for item in value["content"]
        ]
    tokens = value.get("tokens") or []  # text completions
    logprobs = value.get("token_logprobs") or []
    tops = value.get("top_logprobs") or [None] * len(tokens)
    return [
        TokenLogprob(token=t, logprob=float(lp or 0.0), top=list((top or {}).items()))
        for t, lp, top in zip(tokens, logprobs, tops, strict=False)
    ]


def provider_error(status: int, body: Any, secrets: Sequence[str] = ()) -> ProviderError:
    """An upstream's error body (OpenAI's shape, FastAPI's `detail`, or text) as ProviderError.

    The upstream's message reaches Tiffin's client, so credentials are scrubbed from it (an
    upstream may echo the key it was sent); an upstream's own 500 is a 502 here (Tiffin did
    not fail, its upstream did)."""
    if status >= 500 and status not in (503, 504):
        status = 502
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return ProviderError(
            status,
            _scrub(str(error.get("message") or error), secrets),
            type=str(error.get("type") or _type_for(status)),
            code=error.get("code"),
            param=error.get("param"),
        )
    detail = body.get("detail") if isinstance(body, dict) else body
    message = _scrub(str(detail or f"HTTP {status}"), secrets)[:500]
    return ProviderError(status, message, type=_type_for(status))


def _scrub(text: str, secrets: Sequence[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, MASK)
    return redact_text(text)


def _type_for(status: int) -> str:
    return "invalid_request_error" if 400 <= status < 500 else "server_error"


class UpstreamEngine:
    """One model of an OpenAI-compatible upstream."""

    capabilities = frozenset({CHAT, COMPLETION, EMBEDDINGS})

    def __init__(
        self, spec: ModelSpec, upstream: OpenAICompatibleIntegration, upstream_model: str
    ) -> None:
        self.spec = spec
        self.upstream = upstream
        self.upstream_model = upstream_model  # the upstream's own id for the model
        # This model's breaker (the upstream keeps one per model), beside upstream.circuit.
        self.circuit = upstream.model_circuit(upstream_model)
        # Counts the upstream leaves out of an answer's usage.
        self.counter = TokenCounter(spec.config.id, spec.config.engine_settings, upstream.log)

    async def load(self) -> None:
        await self.counter.load()  # the upstream holds the weights; a tokenizer may be named

    async def unload(self) -> None:
        return None

    def tokenize(self, text: str) -> list[int]:
        tokenizer = self.counter.tokenizer
        if tokenizer is None:
            raise EngineError(
                f"{self.spec.config.id} is served by {self.upstream.name}; no tokenizer"
            )
        return list(tokenizer.encode(text, add_special_tokens=False).ids)

    def stats(self) -> dict[str, Any]:
        return {
            "provider": self.upstream.name,
            "circuit": self.upstream.circuit.state.value,
            "model_circuit": self.circuit.state.value,
            "missing_usage_counted_by": self.counter.method,
        }

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        path = "/chat/completions" if request.messages is not None else "/completions"
        secrets = self.upstream.secrets
        response = await self._open(path, request_body(request, self.upstream_model))
        tally = Tally()
        try:
            if not request.stream:
                whole = json.loads(await response.aread())
                for chunk in chunks_of(whole, secrets):
                    tally.add(chunk)
                    yield chunk
                report_usage(whole, tally)
                yield Chunk(usage=self.counter.usage(request, tally))
                return
            done = False
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                for chunk in chunks_of(event, secrets):
                    tally.add(chunk)
                    yield chunk
                report_usage(event, tally)  # include_usage: a last event, `choices: []`
            if not done:  # the connection closed cleanly, but the answer is cut off
                raise httpx.RemoteProtocolError("the stream ended before [DONE]")
            # Servers that ignore include_usage send no counts: token_counts fills them in.
            yield Chunk(usage=self.counter.usage(request, tally))
        except (httpx.HTTPError, json.JSONDecodeError) as exc:
            # A broken connection is the upstream's failure; a garbled answer, this model's.
            broken = isinstance(exc, httpx.HTTPError)
            (self.upstream.circuit if broken else self.circuit).failure()
            raise ProviderError(
                502,
                f"{self.upstream.name} failed mid-stream: {type(exc).__name__}: {exc}",
                code="upstream_error",
            ) from None
        finally:
            await response.aclose()

    async def embed(self, texts: Sequence[str]) -> Embeddings:
        body = {"model": self.upstream_model, "input": list(texts)}
        response = await self._open("/embeddings", body)
        try:
            payload = json.loads(await response.aread())
            data = sorted(payload["data"], key=lambda d: d["index"])
            vectors = [item["embedding"] for item in data]
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            raise ProviderError(
                502, f"{self.upstream.name} sent no usable embeddings: {exc}", code="upstream_error"
            ) from None
        finally:
            await response.aclose()
        usage = payload.get("usage")
        reported = usage.get("prompt_tokens") if isinstance(usage, dict) else None
        if not isinstance(reported, int) or reported <= 0:
            reported = sum(self.counter.count(text) for text in texts)
        return Embeddings(vectors=vectors, prompt_tokens=reported)

    async def _open(self, path: str, body: dict[str, Any]) -> httpx.Response:
        """Send the request and return the response once its status is a success, retrying
        what is worth retrying. Raises ProviderError."""
        upstream = self.upstream
        attempts = upstream.max_retries + 1
        for attempt in range(attempts):
            self._admit()
            try:
                client = upstream.client
                outgoing = client.build_request("POST", path, json=body)
                response = await client.send(outgoing, stream=True)
            except BaseException as exc:
                if not isinstance(exc, httpx.HTTPError):  # cancelled (or a bug of ours)
                    # A half-open circuit's trial must end in a verdict, even when the client
                    # went away mid-connect; otherwise a cancellation is nobody's failure.
                    for circuit in (upstream.circuit, self.circuit):
                        if circuit.state is CircuitState.half_open:
                            circuit.failure()
                    raise
                upstream.circuit.failure()  # unreachable: every model's requests would fail
                self.circuit.release()  # and nothing is known about this one
                error = ProviderError(
                    503,
                    f"{upstream.name} cannot be reached: {type(exc).__name__}: {exc}",
                    code="upstream_unavailable",
                )
            else:
                upstream.circuit.success()  # it answered
                if response.is_success:
                    self.circuit.success()
                    return response
                error = await _error_of(response, upstream.secrets)
                if not error.retryable:
                    self.circuit.success()  # the request was at fault, not the model
                    raise error
                self.circuit.failure()  # failing this model; the others may be fine
            if attempt + 1 < attempts:
                await asyncio.sleep(upstream.retry_backoff_s * 2**attempt)
        raise error

    def _admit(self) -> None:
        """Raise ProviderError (503) while the upstream's or this model's circuit is open."""
        upstream = self.upstream
        if not upstream.circuit.allow():
            raise ProviderError(
                503,
                f"{upstream.name} is unavailable (circuit open after repeated failures; "
                f"next try in {upstream.circuit.retry_in:.0f}s)",
                code="upstream_unavailable",
            )
        if not self.circuit.allow():
            upstream.circuit.release()  # a trial it let through never went out
            raise ProviderError(
                503,
                f"{self.spec.config.id} is unavailable: {upstream.name} failed it "
                f"{self.circuit.failures} times in a row (circuit open; next try in "
                f"{self.circuit.retry_in:.0f}s)",
                code="upstream_unavailable",
            )


async def _error_of(response: httpx.Response, secrets: Sequence[str]) -> ProviderError:
    """An upstream's error response as a ProviderError (also when its body breaks off)."""
    try:
        raw = await response.aread()
    except httpx.HTTPError:
        raw = b""
    finally:
        await response.aclose()
    try:
        parsed: Any = json.loads(raw)
    except ValueError:
        parsed = raw.decode(errors="replace")
    return provider_error(response.status_code, parsed, secrets)
