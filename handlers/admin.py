"""Admin handlers: load and unload a model (`POST /admin/models/{model}/load|unload`), and pull
one from the Hugging Face Hub (`POST /admin/models/pull`)."""

from __future__ import annotations

from typing import Any

from runtime.dispatch import Context, request_body
from runtime.engines.detect import ModelFormatError
from runtime.generation import error_for
from runtime.integrations import IntegrationUnavailable
from runtime.integrations.huggingface_hub import HuggingFaceHubIntegration
from runtime.integrations.huggingface_hub.hub_files import HubError, parse_source
from runtime.types import Event, HandlerError, ModelNotFound


async def load_model(event: Event, ctx: Context) -> dict[str, Any]:
    """Load a model now (it would otherwise load on first use); returns its status."""
    model_id = event.path_params.get("model", "")
    try:
        model = await ctx.models.load(model_id)
    except ModelNotFound as exc:
        raise HandlerError(404, str(exc), param="model", code="model_not_found") from None
    except Exception as exc:
        raise error_for(exc) from None
    return model.describe()


async def unload_model(event: Event, ctx: Context) -> dict[str, Any]:
    """Unload a model and free its memory; the next request loads it again."""
    model_id = event.path_params.get("model", "")
    try:
        model = await ctx.models.unload(model_id)
    except ModelNotFound as exc:
        raise HandlerError(404, str(exc), param="model", code="model_not_found") from None
    return model.describe()


@request_body(
    {
        "type": "object",
        "properties": {"source": {"type": "string", "description": "hf://org/repo[/file.gguf]"}},
        "required": ["source"],
    }
)
async def pull_model(event: Event, ctx: Context) -> dict[str, Any]:
    """Download a model from the Hugging Face Hub (`{"source": "hf://org/repo[/file.gguf]"}`)
    and make it servable; returns the model's id, engine and the file chosen."""
    body = event.body if isinstance(event.body, dict) else {}
    source = body.get("source")
    if not isinstance(source, str) or not source:
        raise HandlerError(
            400,
            'source: expected "hf://org/repo[/file.gguf]"',
            param="source",
            code="invalid_value",
        )
    try:
        parse_source(source)  # a path, another scheme or `..` is refused whatever is running
    except HubError as exc:
        raise HandlerError(exc.status, str(exc), param="source", code=exc.code) from None
    try:
        hub = ctx.integrations.require("huggingface_hub", HuggingFaceHubIntegration)
    except IntegrationUnavailable as exc:
        raise HandlerError(
            409,
            f"{exc}; start Tiffin with integrations=huggingface_hub to pull hf:// models",
            param="source",
            code="integration_unavailable",
        ) from None
    try:
        spec = await hub.pull(source)
    except HubError as exc:
        raise HandlerError(exc.status, str(exc), param="source", code=exc.code) from None
    except ModelFormatError as exc:
        raise HandlerError(422, str(exc), param="source", code="unsupported_model") from None
    return {
        "id": spec.config.id,
        "object": "model",
        "source": spec.config.source,
        "engine": spec.engine,
        "file": spec.path.name,
        "provider": spec.provider,
    }
