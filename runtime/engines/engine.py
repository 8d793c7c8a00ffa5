"""The Engine protocol every local inference engine implements, the spec of a servable model,
and the helpers engines share (the token budget, the `parallel` setting). What crosses the
protocol (GenerationRequest, Chunk, Embeddings, EngineError...) is in runtime/types.py.

An engine knows one loaded model. The ModelRouter (runtime/models.py) owns engines, loads them
on demand, bounds their queues, and is the only caller. `generate()` returns an async iterator
of Chunks; closing it (or abandoning it) stops the work and frees the engine.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from runtime.config_schema import ModelConfig
from runtime.errors import ConfigError
from runtime.types import Chunk, ContextLengthExceeded, Embeddings, GenerationRequest


@dataclass
class ModelSpec:
    """A servable model: its config, its files (local models), and the engine that serves it.
    A model-platform integration's models bring their own engine `factory` (a client of the
    platform); local ones are built by the engine registered under `engine`."""

    config: ModelConfig
    path: Path
    engine: str
    provider: str = "custom_models"
    factory: Callable[[ModelSpec], Engine] | None = None
    # What it can do before it is loaded (a platform knows; for local ones the engine says).
    capabilities: frozenset[str] | None = None


def token_budget(request: GenerationRequest, prompt_tokens: int, context_length: int) -> int:
    """How many tokens a local engine may generate for `request`: its max_tokens (refused when
    the context has no room for it), else its default_max_tokens or the context's room."""
    room = context_length - prompt_tokens
    if room <= 0 or (request.max_tokens is not None and request.max_tokens > room):
        raise ContextLengthExceeded(prompt_tokens, context_length, request.max_tokens)
    if request.max_tokens is not None:
        return request.max_tokens
    if request.default_max_tokens is not None and request.default_max_tokens > 0:
        return min(room, request.default_max_tokens)
    return room


def parallel_setting(
    settings: Mapping[str, Any],
    default: int,
    where: str = "engine_settings",
    name: str = "parallel",
) -> int:
    """`engine_settings.parallel`: how many sequences an engine decodes together, an integer
    of at least 1; anything else is a ConfigError naming `{where}.{name}`."""
    value = settings.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}.{name}", value, "an integer >= 1 (sequences decoded together)")
    return value


@runtime_checkable
class Engine(Protocol):
    """A loaded (or loadable) model behind one interface."""

    capabilities: frozenset[str]

    async def load(self) -> None: ...

    async def unload(self) -> None: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]: ...

    async def embed(self, texts: Sequence[str]) -> Embeddings: ...

    def tokenize(self, text: str) -> list[int]: ...

    def stats(self) -> dict[str, Any]: ...
