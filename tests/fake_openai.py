"""A small OpenAI-compatible upstream for tests, written from OpenAI's published API reference:
`GET /v1/models`, `POST /v1/chat/completions` and `/v1/completions`, answered whole or streamed
as server-sent events ending with `data: [DONE]`, and errors as
`{"error": {"message", "type", "param", "code"}}`.

With `stream_options: {"include_usage": true}`, every streamed chunk carries `"usage": null` and
one more chunk follows the last choice, with `"choices": []` and the request's `usage`, as
OpenAI documents it. `honour_include_usage = False` makes it a server that ignores the option
and reports no usage at all (whole answers included), as some OpenAI-compatible servers do.

Its tokens are words: an answer repeats the last message (or the prompt) word by word, one word
a streamed chunk, up to `max_tokens`; usage counts the words. A chat with `tools` (and a
`tool_choice` other than "none") calls the named tool, else the first, with
`{"said": <the last message>}`, streamed as OpenAI streams calls: the id, type and name first,
then the arguments in pieces, and `finish_reason: "tool_calls"`. `failures` maps a model id to the
HTTP status every request for that model gets (404: unknown model, 5xx: a failing backend).
"""

from __future__ import annotations

import json
import time
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.thread_server import ThreadServer


class FakeOpenAI(ThreadServer):
    def __init__(self, models: tuple[str, ...] = ("alpha", "beta"), port: int | None = None):
        super().__init__(port)
        self.models = list(models)
        self.honour_include_usage = True
        self.failures: dict[str, int] = {}
        self.requests: list[dict[str, Any]] = []

    def start(self) -> None:
        routes = [
            Route("/v1/models", self.list_models),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
        ]
        self.serve(Starlette(routes=routes), "fake OpenAI upstream")

    def calls_for(self, model: str) -> int:
        return sum(1 for body in self.requests if body.get("model") == model)

    async def list_models(self, request: Request) -> Response:
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in self.models]
        return JSONResponse({"object": "list", "data": data})

    async def chat(self, request: Request) -> Response:
        return await self._answer(request, chat=True)

    async def completions(self, request: Request) -> Response:
        return await self._answer(request, chat=False)

    async def _answer(self, request: Request, chat: bool) -> Response:
        body = await request.json()
        self.requests.append(body)
        model = body.get("model")
        if model in self.failures or model not in self.models:
            return _error(self.failures.get(model, 404), model)
        if chat:
            messages = body["messages"]
            prompt_words = sum(len(str(m.get("content") or "").split()) for m in messages)
            words = str(messages[-1].get("content") or "").split()
        else:
            prompt_words = len(str(body["prompt"]).split())
            words = str(body["prompt"]).split()
        words = words[: body.get("max_tokens") or len(words)]
        finish = "length" if body.get("max_tokens") == len(words) else "stop"
        usage = {
            "prompt_tokens": prompt_words,
            "completion_tokens": len(words),
            "total_tokens": prompt_words + len(words),
        }
        head = {"id": "fake-1", "created": int(time.time()), "model": model}
        if chat and body.get("tools") and body.get("tool_choice") != "none":
            return self._call(body, head, usage)
        if not body.get("stream"):
            text = " ".join(words)
            if chat:
                choice = {"index": 0, "message": {"role": "assistant", "content": text}}
                answer = {**head, "object": "chat.completion"}
            else:
                choice = {"index": 0, "text": text, "logprobs": None}
                answer = {**head, "object": "text_completion"}
            answer["choices"] = [{**choice, "finish_reason": finish}]
            if self.honour_include_usage:
                answer["usage"] = usage
            return JSONResponse(answer)
        include_usage = self.honour_include_usage and bool(
            (body.get("stream_options") or {}).get("include_usage")
        )
        kind = "chat.completion.chunk" if chat else "text_completion"
        events = []
        for position, word in enumerate(words):
            piece = word if position == 0 else " " + word
            delta = {"delta": {"content": piece}} if chat else {"text": piece}
            events.append({"choices": [{"index": 0, **delta, "finish_reason": None}]})
        end = {"delta": {}} if chat else {"text": ""}
        events.append({"choices": [{"index": 0, **end, "finish_reason": finish}]})
        frames = []
        for event in events:
            event = {**head, "object": kind, **event}
            if include_usage:
                event["usage"] = None
            frames.append(event)
        if include_usage:
            frames.append({**head, "object": kind, "choices": [], "usage": usage})
        text = "".join(f"data: {json.dumps(frame)}\n\n" for frame in frames)
        return Response(text + "data: [DONE]\n\n", media_type="text/event-stream")

    def _call(self, body: dict[str, Any], head: dict[str, Any], usage: dict[str, int]) -> Response:
        choice = body.get("tool_choice")
        name = (
            choice["function"]["name"]
            if isinstance(choice, dict)
            else body["tools"][0]["function"]["name"]
        )
        arguments = json.dumps({"said": body["messages"][-1].get("content") or ""})
        call = {"id": "call_fake1", "type": "function", "function": {"name": name}}
        if not body.get("stream"):
            message = {
                "role": "assistant",
                "content": None,
                "tool_calls": [{**call, "function": {"name": name, "arguments": arguments}}],
            }
            choices = [{"index": 0, "message": message, "finish_reason": "tool_calls"}]
            return JSONResponse(
                {**head, "object": "chat.completion", "choices": choices, "usage": usage}
            )
        half = len(arguments) // 2
        deltas = [
            {"tool_calls": [{"index": 0, **call, "function": {"name": name, "arguments": ""}}]},
            {"tool_calls": [{"index": 0, "function": {"arguments": arguments[:half]}}]},
            {"tool_calls": [{"index": 0, "function": {"arguments": arguments[half:]}}]},
        ]
        frames = [
            {
                **head,
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": d, "finish_reason": None}],
            }
            for d in deltas
        ]
        end = {"index": 0, "delta": {}, "finish_reason": "tool_calls"}
        frames.append({**head, "object": "chat.completion.chunk", "choices": [end], "usage": usage})
        text = "".join(f"data: {json.dumps(frame)}\n\n" for frame in frames)
        return Response(text + "data: [DONE]\n\n", media_type="text/event-stream")


def _error(status: int, model: Any) -> Response:
    if status == 404:
        error = {
            "message": f"The model `{model}` does not exist or you do not have access to it.",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    else:
        message = "The server had an error while processing your request."
        error = {"message": message, "type": "server_error", "param": None, "code": None}
    return JSONResponse({"error": error}, status_code=status)
