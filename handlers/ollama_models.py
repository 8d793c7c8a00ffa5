"""Ollama's model management on Tiffin's port: `/api/show` (what a model is and can do),
`/api/pull` (from the Hugging Face Hub, `hf.co/org/repo`, or else from the Ollama server of the
ollama integration, with Ollama's progress lines), `/api/create` (a model from a GGUF file
already on disk, with default parameters), `/api/copy` (another name for a model) and
`/api/delete` (forget such a name). Errors in Ollama's shape, as on every `/api/*` route.

Tiffin's models come from its config and platforms, so `copy` makes an alias, kept while this
process runs (per worker), and `delete` removes one; a configured model is changed in the
config, and `delete` says so rather than pretending."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from handlers.ollama_api import OPTIONS, model_entry, ollama_errors
from handlers.parsing import parse
from runtime.dispatch import Context, request_body
from runtime.engines.detect import ModelFormatError
from runtime.errors import ConfigError
from runtime.events import BusEvent
from runtime.integrations import IntegrationUnavailable
from runtime.integrations.custom_models import CustomModelsIntegration
from runtime.integrations.huggingface_hub import HuggingFaceHubIntegration
from runtime.integrations.huggingface_hub.hub_files import HubError
from runtime.integrations.ollama import OllamaIntegration
from runtime.models import ServedModel
from runtime.types import (
    CHAT,
    COMPLETION,
    EMBEDDINGS,
    Event,
    HandlerError,
    ModelNotFound,
    NdjsonStream,
    ProviderError,
)

HUB_PREFIXES = ("hf.co/", "huggingface.co/")
T = TypeVar("T")

# Tiffin's capabilities -> Ollama's names. Every local chat model calls tools (runtime/tools.py).
CAPABILITIES = {
    CHAT: ("completion", "tools"),
    COMPLETION: ("completion",),
    EMBEDDINGS: ("embedding",),
}
_OPTION_OF = {field: option for option, field in OPTIONS.items()}


class ModelName(BaseModel):
    """`model`, or `name` as older clients send it."""

    model_config = ConfigDict(extra="ignore")

    model: str = ""
    name: str = ""

    @model_validator(mode="after")
    def one_of_them(self) -> ModelName:
        self.model = self.model or self.name
        if not self.model:
            raise ValueError("model is required")
        return self


class PullRequest(ModelName):
    stream: bool = True
    insecure: bool = False  # Ollama's flag for plain-HTTP registries; nothing to do here


class CreateRequest(BaseModel):
    """Ollama's create, for a GGUF file already on disk: `from` is its path (inside the
    custom_models integration's allowed directories). Ollama's other ways of building a model
    (uploaded blobs, adapters, quantizing, a template or system prompt baked in) are refused
    by name: the models forbid what they do not declare."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=200, pattern=r"^[\w.:/-]+$")
    from_: str = Field(alias="from", min_length=1)
    parameters: dict[str, Any] | None = None
    stream: bool = True


class CopyRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    source: str = Field(min_length=1)
    destination: str = Field(min_length=1, max_length=200, pattern=r"^[\w.:/-]+$")


@request_body(ModelName)
@ollama_errors
async def show(event: Event, ctx: Context) -> dict[str, Any]:
    body = parse(ModelName, event.body)
    model = _find(ctx, body.model)
    config = model.spec.config
    parameters = "\n".join(
        f"{_OPTION_OF.get(name, name)} {value}" for name, value in config.defaults.items()
    )
    context = {f"{model.spec.engine}.context_length": config.context_length}
    return {
        "modelfile": f"# {model.id}, served by Tiffin ({model.spec.provider})\n"
        f"FROM {model.spec.path}\n"
        + "".join(f"PARAMETER {line}\n" for line in parameters.splitlines()),
        "parameters": parameters,
        "template": config.chat_format or "",
        "details": model_entry(model)["details"],
        "model_info": {"general.architecture": model.spec.engine, **context},
        "capabilities": sorted(
            {c for cap in model.capabilities for c in CAPABILITIES.get(cap, ())}
        ),
        "modified_at": datetime.fromtimestamp(model.created, UTC).isoformat(),
    }


@request_body(PullRequest)
@ollama_errors
async def pull(event: Event, ctx: Context) -> Any:
    body = parse(PullRequest, event.body)
    pattern, work, line = _puller(ctx, body.model)
    if not body.stream:
        await work()
        return {"status": "success"}
    return NdjsonStream(_progress(ctx, pattern, work, line))


def _puller(
    ctx: Context, name: str
) -> tuple[str, Callable[[], Awaitable[None]], Callable[[BusEvent], dict[str, Any]]]:
    """Where `name` comes from: the bus events its progress is in, the pull itself, and how
    one event reads as Ollama's progress line."""
    if name.startswith(HUB_PREFIXES):
        repo, _, tag = name.split("/", 1)[1].partition(":")
        if tag and tag != "latest":
            raise HandlerError(
                400,
                f"a tag ({tag}) picks nothing here: the file is chosen by"
                " integrations.huggingface_hub.settings.prefer_quant",
                param="model",
                code="invalid_value",
            )
        hub = _require(ctx, "huggingface_hub", HuggingFaceHubIntegration, name)

        async def from_hub() -> None:
            try:
                await hub.pull(f"hf://{repo}")
            except HubError as exc:
                raise HandlerError(exc.status, str(exc), param="model", code=exc.code) from None

        return "huggingface_hub.download", from_hub, _hub_line
    ollama = _require(ctx, "ollama", OllamaIntegration, name)

    async def from_ollama() -> None:
        try:
            await ollama.pull_model(name)
        except ProviderError as exc:
            # Ollama reports a pull's failure as an error line of a 200 answer: a name its
            # registry does not have is the caller's mistake (404), anything else the server's.
            status = exc.status if exc.status < 500 else 502
            if "does not exist" in str(exc) or "not found" in str(exc):
                status = 404
            raise HandlerError(status, str(exc), param="model", code="pull_failed") from None

    return "ollama.pull", from_ollama, _ollama_line


def _require(ctx: Context, integration: str, kind: type[T], name: str) -> T:
    try:
        return ctx.integrations.require(integration, kind)
    except IntegrationUnavailable as exc:
        where = "hf.co/ models" if integration == "huggingface_hub" else name
        raise HandlerError(
            409,
            f"{exc}; start Tiffin with integrations={integration} to pull {where}",
            param="model",
            code="integration_unavailable",
        ) from None


def _hub_line(event: BusEvent) -> dict[str, Any]:
    data = event.data
    done = data.get("completed", data.get("size", 0) if data.get("phase") == "finish" else 0)
    return {
        "status": f"pulling {data.get('file', '')}",
        "digest": str(data.get("file", "")),
        "total": data.get("total") or data.get("size"),
        "completed": done,
    }


def _ollama_line(event: BusEvent) -> dict[str, Any]:
    return {k: v for k, v in event.data.items() if k != "model"}


async def _progress(
    ctx: Context,
    pattern: str,
    work: Callable[[], Awaitable[None]],
    line: Callable[[BusEvent], dict[str, Any]],
) -> AsyncIterator[dict[str, Any]]:
    """Ollama's progress lines while `work` runs, from the events it publishes; a failure is
    the stream's last line (`{"error": ...}`)."""
    queue: asyncio.Queue[BusEvent] = asyncio.Queue()
    unsubscribe = ctx.events.subscribe(pattern, queue.put_nowait)
    task = asyncio.ensure_future(work())
    try:
        yield {"status": "pulling manifest"}
        while not task.done() or not queue.empty():
            if queue.empty():
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    continue
                yield line(getter.result())
            else:
                yield line(queue.get_nowait())
        task.result()  # a failure raises here, after the progress it made
        yield {"status": "verifying sha256 digest"}
        yield {"status": "writing manifest"}
        yield {"status": "success"}
    finally:
        unsubscribe()
        if not task.done():
            task.cancel()


@request_body(CreateRequest)
@ollama_errors
async def create(event: Event, ctx: Context) -> Any:
    body = parse(CreateRequest, event.body)
    if not body.from_.lower().endswith(".gguf"):
        raise HandlerError(
            400,
            f"from: {body.from_!r} is no .gguf file; Tiffin creates models from a GGUF already on"
            " disk (another name for a model is /api/copy)",
            param="from",
            code="invalid_value",
        )
    defaults: dict[str, Any] = {}
    for option, value in (body.parameters or {}).items():
        if option not in OPTIONS:
            known = ", ".join(sorted(OPTIONS))
            raise HandlerError(
                400,
                f"parameters.{option} is not supported (supported: {known})",
                param=f"parameters.{option}",
                code="invalid_value",
            )
        defaults[OPTIONS[option]] = value
    files = _require(ctx, "custom_models", CustomModelsIntegration, body.model)
    raw = {"id": body.model, "source": body.from_, "defaults": defaults}
    try:
        await files.add(raw)
    except (ConfigError, ModelFormatError) as exc:
        raise HandlerError(400, str(exc), param="from", code="invalid_value") from None
    if not body.stream:
        return {"status": "success"}

    async def lines() -> AsyncIterator[dict[str, Any]]:
        for status in ("parsing GGUF", "writing manifest", "success"):
            yield {"status": status}

    return NdjsonStream(lines())


@request_body(CopyRequest)
@ollama_errors
async def copy(event: Event, ctx: Context) -> dict[str, Any]:
    body = parse(CopyRequest, event.body)
    try:
        ctx.models.add_alias(body.destination, body.source)
    except ModelNotFound as exc:
        raise HandlerError(404, str(exc), param="source", code="model_not_found") from None
    except ValueError as exc:
        raise HandlerError(400, str(exc), param="destination", code="invalid_value") from None
    return {}


@request_body(ModelName)
@ollama_errors
async def delete(event: Event, ctx: Context) -> dict[str, Any]:
    body = parse(ModelName, event.body)
    if ctx.models.remove_alias(body.model):
        return {}
    model = _find(ctx, body.model)
    raise HandlerError(
        400,
        f"{model.id} comes from the {model.spec.provider} integration's config; remove it there"
        " (only names made with /api/copy can be deleted)",
        param="model",
        code="invalid_value",
    )


def _find(ctx: Context, name: str) -> ServedModel:
    try:
        return ctx.models.get(name)
    except ModelNotFound as exc:
        raise HandlerError(404, str(exc), param="model", code="model_not_found") from None
