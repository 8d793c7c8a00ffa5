"""The Engine protocol every local inference engine implements, and the types that cross it.

An engine knows one loaded model. The ModelRouter (runtime/models.py) owns engines, loads them
on demand, bounds their queues, and is the only caller. `generate()` returns an async iterator
of Chunks; closing it (or abandoning it) stops the work and frees the engine.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from runtime.config import ModelConfig
from runtime.errors import ConfigError

CHAT = "chat"
COMPLETION = "completion"
EMBEDDINGS = "embeddings"


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


@dataclass
class GenerationRequest:
    """One generation, already validated: either `prompt` (completions) or `messages` (chat)."""

    model: str
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    max_tokens: int | None = None
    # The cap when `max_tokens` is unset (limits.default_max_tokens, a model's
    # defaults.max_tokens): unlike max_tokens, a prompt that leaves less room shortens it.
    default_max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # None: off; N: the chosen token's logprob plus N alternatives
    n: int = 1
    json_schema: dict[str, Any] | None = None
    json_mode: bool = False
    tools: list[dict[str, Any]] | None = None
    request_id: str = ""
    # Whether the client reads a stream. Local engines stream either way; a remote provider
    # may answer a whole response in one call (and report exact usage).
    stream: bool = True


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    bytes: list[int] | None = None
    top: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class Chunk:
    """A piece of one choice's output. The last chunk of a choice has `finish_reason`;
    the last chunk of the whole generation carries `usage`."""

    index: int = 0
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length"
    usage: Usage | None = None
    model: str = ""  # the model that answered (set by the router; a fallback may answer)


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Embeddings:
    vectors: list[list[float]]
    prompt_tokens: int


class EngineError(Exception):
    """The engine failed; the message is safe to show a client."""


class ContextLengthExceeded(EngineError):
    def __init__(
        self, prompt_tokens: int, context_length: int, max_tokens: int | None = None
    ) -> None:
        self.prompt_tokens = prompt_tokens
        self.context_length = context_length
        self.max_tokens = max_tokens
        wanted = f" plus max_tokens {max_tokens}" if max_tokens else ""
        super().__init__(
            f"this model's maximum context length is {context_length} tokens, but the request "
            f"needs {prompt_tokens} prompt tokens{wanted}"
        )


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


class ProviderError(EngineError):
    """A remote provider refused or failed a request; its status and OpenAI-style fields are
    passed on to the client (`retryable`: worth trying again, or another provider)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "server_error",
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        self.status = status
        self.type = type
        self.code = code
        self.param = param
        super().__init__(message)

    @property
    def retryable(self) -> bool:
        return self.status >= 500 or self.status in (408, 429)


class UnsupportedRequest(EngineError):
    """The engine cannot do what was asked (a parameter it does not support)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        self.param = param
        super().__init__(message)


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
