"""A small Ollama server for tests, written from Ollama's published API documentation
(docs/api.md): `/api/version`, `/api/tags`, `/api/ps`, `/api/pull` (NDJSON progress),
`/api/chat` and `/api/generate` (NDJSON streams, `done` lines with counts), `/api/embed`,
`/api/show` (context length and capabilities), and errors as `{"error": "..."}`. Answers come
from a real model (the packaged Gemma on llama-cpp-python), not canned text; a pulled name is
served by the same weights. A chat with `tools` is answered as Ollama answers a model whose
template knows tools: one line whose `message.tool_calls` calls the first tool, its `arguments`
an object the model wrote under that tool's schema, then the `done` line."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import iterate_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.thread_server import ThreadServer

KNOWN_REMOTE = {"tinyllama:1b"}  # names /api/pull can find in the "registry"


class FakeOllama(ThreadServer):
    def __init__(self, gguf: Path, port: int | None = None) -> None:
        from llama_cpp import Llama

        self.llm = Llama(str(gguf), n_ctx=1024, n_threads=2, chat_format="gemma", verbose=False)
        self.lock = threading.Lock()  # one generation at a time, as one Ollama runner does
        self.models = {"gemma3:270m": gguf.stat().st_size}
        super().__init__(port)
        self.requests: list[dict[str, Any]] = []
        # Ollama releases before ollama/ollama#5371 left prompt_eval_count out of the final
        # line when the prompt was cached; False answers like them.
        self.report_prompt_eval_count = True

    def start(self) -> None:
        self.serve(self.app(), "fake Ollama")

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/api/version", self.version),
                Route("/api/tags", self.tags),
                Route("/api/ps", self.ps),
                Route("/api/pull", self.pull, methods=["POST"]),
                Route("/api/chat", self.chat, methods=["POST"]),
                Route("/api/generate", self.generate, methods=["POST"]),
                Route("/api/embed", self.embed, methods=["POST"]),
                Route("/api/show", self.show, methods=["POST"]),
            ]
        )

    # --- endpoints ----------------------------------------------------------------------------

    async def version(self, request: Request) -> Response:
        return JSONResponse({"version": "0.12.3"})

    async def tags(self, request: Request) -> Response:
        return JSONResponse({"models": [self._entry(name) for name in sorted(self.models)]})

    async def ps(self, request: Request) -> Response:
        models = [{**self._entry(name), "size_vram": 0} for name in sorted(self.models)]
        return JSONResponse({"models": models})

    async def show(self, request: Request) -> Response:
        """What Ollama says of a model: its context length from the GGUF (as Ollama reads it
        into `model_info`) and its capabilities."""
        name = (await request.json()).get("model")
        if name not in self.models:
            return self._not_found(name)
        trained = int(self.llm.metadata["gemma3.context_length"])
        info = {"general.architecture": "gemma3", "gemma3.context_length": trained}
        return JSONResponse(
            {
                "modelfile": f"FROM {name}",
                "parameters": "",
                "template": "{{ .Prompt }}",
                "details": self._entry(name)["details"],
                "model_info": info,
                "capabilities": ["completion"],
            }
        )

    async def pull(self, request: Request) -> Response:
        name = (await request.json())["model"]

        def progress() -> Iterator[bytes]:
            yield _line({"status": "pulling manifest"})
            if name not in KNOWN_REMOTE:
                yield _line({"error": "pull model manifest: file does not exist"})
                return
            total = 4 * 1024 * 1024
            for completed in range(0, total + 1, total // 4):
                status = {"status": "pulling abc123", "digest": "sha256:abc123"}
                yield _line({**status, "total": total, "completed": completed})
            yield _line({"status": "verifying sha256 digest"})
            yield _line({"status": "writing manifest"})
            self.models[name] = total
            yield _line({"status": "success"})

        return StreamingResponse(progress(), media_type="application/x-ndjson")

    async def chat(self, request: Request) -> Response:
        return await self._answer(request, "message")

    async def generate(self, request: Request) -> Response:
        return await self._answer(request, "response")

    async def embed(self, request: Request) -> Response:
        body = await request.json()
        if body["model"] not in self.models:
            return self._not_found(body["model"])
        texts = [body["input"]] if isinstance(body["input"], str) else body["input"]
        # The documented shape; vectors from the model's token statistics, deterministic.
        vectors = []
        for text in texts:
            tokens = self.llm.tokenize(text.encode(), add_bos=False)
            vectors.append([len(tokens) / 10, sum(tokens) % 997 / 997, len(text) / 100])
        count = sum(len(self.llm.tokenize(t.encode(), add_bos=False)) for t in texts)
        return JSONResponse(
            {"model": body["model"], "embeddings": vectors, "prompt_eval_count": count}
        )

    # --- generation ---------------------------------------------------------------------------

    async def _answer(self, request: Request, field: str) -> Response:
        body = await request.json()
        self.requests.append(body)
        if body.get("model") not in self.models:
            return self._not_found(body.get("model"))
        stream = body.get("stream", True)
        lines = iterate_in_threadpool(self._generate(body, field))
        if stream:
            return StreamingResponse(_encoded(lines), media_type="application/x-ndjson")
        text, last, calls = "", {}, []
        async for line in lines:
            text += line["message"]["content"] if field == "message" else line["response"]
            calls += line.get("message", {}).get("tool_calls", [])
            last = line
        answer: Any = {"role": "assistant", "content": text} if field == "message" else text
        if calls:
            answer["tool_calls"] = calls
        return JSONResponse({**last, field: answer})

    def _generate(self, body: dict[str, Any], field: str) -> Iterator[dict[str, Any]]:
        options = body.get("options") or {}
        knobs = {
            "max_tokens": options.get("num_predict", 128),
            "temperature": options.get("temperature", 0.8),
            "top_p": options.get("top_p", 0.9),
            "top_k": options.get("top_k", 40),
            "seed": options.get("seed"),
            "stop": options.get("stop"),
            "stream": True,
        }
        started = time.perf_counter_ns()
        if field == "message" and body.get("tools"):
            yield from self._call(body, knobs, started)
            return
        with self.lock:
            if field == "message":
                pieces = self.llm.create_chat_completion(messages=body["messages"], **knobs)
                texts = (p["choices"][0]["delta"].get("content") for p in pieces)  # type: ignore[index]
            else:
                pieces = self.llm.create_completion(prompt=body["prompt"], **knobs)
                texts = (p["choices"][0]["text"] for p in pieces)  # type: ignore[index]
            count = 0
            for text in texts:
                if not text:
                    continue
                count += 1
                yield self._line(body, field, text, done=False)
        prompt = body.get("prompt") or " ".join(m["content"] for m in body.get("messages", []))
        final = self._line(body, field, "", done=True)
        final.update(
            done_reason="length" if count >= knobs["max_tokens"] else "stop",
            total_duration=time.perf_counter_ns() - started,
            prompt_eval_count=len(self.llm.tokenize(prompt.encode())),
            eval_count=count,
        )
        if not self.report_prompt_eval_count:
            del final["prompt_eval_count"]
        yield final

    def _call(
        self, body: dict[str, Any], knobs: dict[str, Any], started: int
    ) -> Iterator[dict[str, Any]]:
        function = body["tools"][0]["function"]
        schema = function.get("parameters") or {"type": "object"}
        with self.lock:
            answer = self.llm.create_chat_completion(
                messages=body["messages"],
                response_format={"type": "json_object", "schema": schema},
                **{**knobs, "stream": False},
            )
        arguments = json.loads(answer["choices"][0]["message"]["content"] or "{}")  # type: ignore[index]
        line = self._line(body, "message", "", done=False)
        line["message"]["tool_calls"] = [
            {"function": {"name": function["name"], "arguments": arguments}}
        ]
        yield line
        final = self._line(body, "message", "", done=True)
        final.update(
            done_reason="stop",
            total_duration=time.perf_counter_ns() - started,
            prompt_eval_count=1,
            eval_count=answer["usage"]["completion_tokens"],  # type: ignore[index]
        )
        yield final

    def _line(self, body: dict[str, Any], field: str, text: str, done: bool) -> dict[str, Any]:
        value: Any = {"role": "assistant", "content": text} if field == "message" else text
        return {"model": body["model"], "created_at": _now(), field: value, "done": done}

    def _entry(self, name: str) -> dict[str, Any]:
        details = {"format": "gguf", "family": "gemma3", "parameter_size": "268M"}
        return {
            "name": name,
            "model": name,
            "modified_at": _now(),
            "size": self.models[name],
            "digest": "abc123",
            "details": {**details, "quantization_level": "Q4_K_M"},
        }

    def _not_found(self, name: Any) -> Response:
        return JSONResponse({"error": f'model "{name}" not found, try pulling it first'}, 404)


def _line(record: dict[str, Any]) -> bytes:
    return json.dumps(record).encode() + b"\n"


async def _encoded(lines: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    async for line in lines:
        yield _line(line)


def _now() -> str:
    return datetime.now(UTC).isoformat()
