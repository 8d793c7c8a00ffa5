"""A scriptable engine for tests of the router and handlers (never of an engine itself):
`enqueue(["Hel", "lo"])` sets what the next generation yields (an exception in the list is raised
at that point, as an engine failing mid-stream would); `gate` can hold a generation open so tests
can fill queues or time out deterministically. `extra_stats` is merged into `stats()`, so a test
can make it report what a batching engine reports (slots, KV cells, decode steps)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

from runtime.engines.engine import ModelSpec
from runtime.types import CHAT, COMPLETION, Chunk, Embeddings, EngineError, GenerationRequest, Usage


class ScriptedEngine:
    capabilities = frozenset({CHAT, COMPLETION})

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.script: list[list[str | Exception]] = []
        self.loaded = False
        self.loads = 0
        self.requests: list[GenerationRequest] = []
        self.gate: asyncio.Event | None = None
        self.closed = 0
        self.fail_load: str | None = None
        self.extra_stats: dict[str, Any] = {}

    def enqueue(self, pieces: list[str | Exception]) -> None:
        self.script.append(pieces)

    async def load(self) -> None:
        if self.fail_load:
            raise EngineError(self.fail_load)
        self.loaded = True
        self.loads += 1

    async def unload(self) -> None:
        self.loaded = False

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        self.requests.append(request)
        pieces: list[str | Exception] = self.script.pop(0) if self.script else ["ok"]
        try:
            for piece in pieces:
                if self.gate is not None:
                    await self.gate.wait()
                if isinstance(piece, Exception):
                    raise piece
                yield Chunk(text=piece)
            yield Chunk(finish_reason="stop", usage=Usage(3, len(pieces)))
        finally:
            self.closed += 1

    async def embed(self, texts: Sequence[str]) -> Embeddings:
        if self.gate is not None:
            await self.gate.wait()
        return Embeddings([[float(len(t))] for t in texts], sum(len(t) for t in texts))

    def tokenize(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def stats(self) -> dict[str, Any]:
        return {"engine": "scripted", "requests": len(self.requests), **self.extra_stats}


def batching(**changes: Any) -> dict[str, Any]:
    """What a batching engine's `stats()` adds (issue 15's contract), with `changes` applied: 8
    slots, 3 busy; 2 requests waiting; 10 decode steps so far, 4 of one sequence and 6 of three."""
    return {
        "parallel": 8,
        "slots_busy": 3,
        "slots_free": 5,
        "running": 3,
        "waiting": 2,
        "kv_cells_used": 1200,
        "kv_cells_total": 4096,
        "prompt_cache_hit_tokens": 100,
        "prompt_tokens_evaluated": 40,
        "steps": 10,
        "sequences_per_step": {"1": 4, "3": 6},
        **changes,
    }
