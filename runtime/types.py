"""The vocabulary every layer shares: what a request is on its way in (`Event`), what a
generation is asked for and gives back (`GenerationRequest`, `Chunk`, `Usage`, `Embeddings`),
the errors a request can end with, and `Stream`, the one async-iterator wrapper with one close
path.

Transports build Events and read Replies and Streams; handlers turn Events into
GenerationRequests; runtime/generation.py runs them through the router (runtime/models.py) to
an engine. Errors raised before anything is served (configuration, startup) are in
runtime/errors.py.
"""

from __future__ import annotations

import difflib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from runtime.errors import SHOWN_CHARS, quoted

T = TypeVar("T")

# What a model can do (its `capabilities`).
CHAT = "chat"
COMPLETION = "completion"
EMBEDDINGS = "embeddings"


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
    # "none", "auto", "required" or {"type": "function", "function": {"name": ...}}
    # (runtime/tools.py); with tools and no choice, "auto".
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    request_id: str = ""
    # Whether the client reads a stream. Local engines stream either way; a remote provider
    # may answer a whole response in one call (and report exact usage).
    stream: bool = True
    # Batch work (a Batch API line): a batching engine decodes it only in steps where no
    # live sequence runs, and admits live requests waiting before it.
    background: bool = False


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    bytes: list[int] | None = None
    top: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class ToolCall:
    """A function call the model made, or a piece of one while it streams: the first piece of
    a call has its `id` and `name`, later ones only more `arguments` (JSON text)."""

    index: int  # which call of the choice
    id: str
    name: str
    arguments: str


@dataclass
class Chunk:
    """A piece of one choice's output. The last chunk of a choice has `finish_reason`;
    the last chunk of the whole generation carries `usage`."""

    index: int = 0
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "tool_calls"
    stop_sequence: str | None = None  # with "stop": the stop string that ended it, if one did
    usage: Usage | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
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


# --- errors a request can end with -------------------------------------------------------


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


class ModelNotFound(LookupError):
    def __init__(self, model: str, known: Iterable[str]) -> None:
        self.model = model
        close: list[str] = []
        if len(model) <= 4 * SHOWN_CHARS:  # a longer name is no typo of an id (nor worth difflib)
            close = difflib.get_close_matches(model, list(known), n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        super().__init__(f"the model {quoted(model)} does not exist{hint}")


class QueueFull(Exception):
    def __init__(self, model: str, limit: int, retry_after: int) -> None:
        self.model = model
        self.limit = limit
        self.retry_after = retry_after
        super().__init__(f"{model} has {limit} requests waiting; try again in {retry_after}s")


class GenerationTimeout(EngineError):
    """The model's `timeout_s` ran out before the generation ended."""


# --- transports and handlers ------------------------------------------------------------


@dataclass
class Event:
    """One request, whatever transport it came in on."""

    body: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)
    path_params: Mapping[str, str] = field(default_factory=dict)
    query: Mapping[str, str] = field(default_factory=dict)
    transport: str = "http"
    route: str = ""
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    principal: Any = None


@dataclass
class UploadedFile:
    """A file part of a multipart/form-data body (the Files API's upload), which the HTTP
    transport puts in `Event.body` under its field name beside the form's text fields."""

    filename: str
    content: bytes
    content_type: str = "application/octet-stream"


@dataclass
class FileBody:
    """A handler result that is a file's bytes, not JSON (GET /v1/files/{id}/content)."""

    content: bytes
    media_type: str = "application/octet-stream"


@dataclass
class Reply:
    """A handler result with an explicit status (e.g. 503 from a health check)."""

    body: Any
    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    # The error an error status answers, when the handler turned one into its own shape
    # (Ollama's API): `request_finished` gets it, so metrics count its type.
    error: HandlerError | None = None


@dataclass
class NdjsonStream:
    """A streamed result framed as newline-delimited JSON (Ollama's API) rather than the
    server-sent events a bare async iterator gets. Items are dicts; a HandlerError raised
    mid-stream becomes a final `{"error": message}` line."""

    items: AsyncIterator[Any]


@dataclass
class EventStream:
    """A streamed result framed as server-sent events that each name their type (`event:`),
    as Anthropic's Messages API and OpenAI's Responses API send them, with no `[DONE]`. Items
    are (event name, data dict); a HandlerError raised mid-stream becomes one last `error`
    event whose data `render_error` makes."""

    items: AsyncIterator[tuple[str, Any]]
    render_error: Callable[[HandlerError], Any]


class HandlerError(Exception):
    """An expected failure, in OpenAI's error vocabulary; transports map `status` to theirs."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = dict(headers or {})

    def to_dict(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


# --- streams ---------------------------------------------------------------------------


class Closed(Exception):
    """How a Stream ended when it was closed before it ran out (a client gone, a cancel)."""


CLOSED = Closed("closed before the end")


class Stream(AsyncIterator[T]):
    """The one stream wrapper: iterates `source` and awaits `on_end(error)` exactly once,
    however the stream ends: it ran out (`None`), raised (the exception), or was closed early
    (`CLOSED`). Closing it closes `source`, which stops the work behind it (a generation, a
    subscription). A class, not an async generator: a generator closed before its first
    `anext` never runs its `finally`, and would leave the work running."""

    def __init__(
        self,
        source: AsyncIterator[T],
        on_end: Callable[[BaseException | None], Awaitable[None]] | None = None,
    ) -> None:
        self._source = source
        self._on_end = on_end
        self.ended = False

    def __aiter__(self) -> Stream[T]:
        return self

    async def __anext__(self) -> T:
        if self.ended:
            raise StopAsyncIteration
        try:
            return await anext(self._source)
        except StopAsyncIteration:
            await self._end(None)
            raise
        except BaseException as exc:
            await self._end(exc)
            raise

    async def aclose(self) -> None:
        try:
            await close(self._source)
        finally:
            await self._end(CLOSED)

    async def _end(self, error: BaseException | None) -> None:
        if self.ended:
            return
        self.ended = True
        if self._on_end is not None:
            await self._on_end(error)


async def close(stream: AsyncIterator[Any]) -> None:
    """Close an async iterator that can be closed (a generator, a Stream); others need not be."""
    aclose: Callable[[], Awaitable[object]] | None = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()
