"""Ollama's model management on Tiffin's port: `/api/show` (what a model is and can do),
`/api/copy` (another name for a model) and `/api/delete` (forget such a name). Errors in
Ollama's shape, as on every `/api/*` route.

Tiffin's models come from its config and platforms, so `copy` makes an alias, kept while this
process runs (per worker), and `delete` removes one; a configured model is changed in the
config, and `delete` says so rather than pretending."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from handlers.ollama_api import OPTIONS, model_entry, ollama_errors
from handlers.parsing import parse
from runtime.dispatch import Context, request_body
from runtime.models import ServedModel
from runtime.types import CHAT, COMPLETION, EMBEDDINGS, Event, HandlerError, ModelNotFound

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
