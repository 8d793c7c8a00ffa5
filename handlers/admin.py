"""Admin handlers: load and unload a model (`POST /admin/models/{model}/load|unload`)."""

from __future__ import annotations

from typing import Any

from handlers.generation import error_for
from runtime.dispatch import Context, Event, HandlerError
from runtime.models import ModelNotFound


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
