"""Handlers for the integration endpoints of the platform guide:
`/integrations/status`, `/integrations/health` and `/integrations/{name}/status`."""

from __future__ import annotations

from typing import Any

from runtime.dispatch import Context
from runtime.errors import quoted
from runtime.integrations import IntegrationStatus
from runtime.telemetry.batching import batching_stats
from runtime.types import Event, HandlerError, Reply


async def status(event: Event, ctx: Context) -> dict[str, Any]:
    """Every configured integration with its status, health and (masked) settings, the
    runtime's configuration `warnings` (`[{code, message}]`, empty when there are none), and
    `models`: each model whose engine batches, with its slots busy and free, sequences running
    and requests waiting (a runner-placed model: as the runner last said)."""
    manager = ctx.integrations
    return {
        **manager.summary(),
        "integrations": {name: i.describe() for name, i in manager.integrations.items()},
        "models": batching_models(ctx),
        "warnings": ctx.runtime.warnings(),
    }


def batching_models(ctx: Context) -> dict[str, dict[str, Any]]:
    found = {}
    for model in ctx.models.describe_all():
        batching = batching_stats(model.get("stats"))
        if batching is not None:
            found[model["id"]] = {
                "provider": model["provider"],
                "state": model["state"],
                **batching.slots(),
            }
    return found


async def health(event: Event, ctx: Context) -> Reply:
    """200 when every required integration is up, 503 otherwise; the body lists each one.

    Overall `status` is `healthy` (all active), `degraded` (serving, something optional down)
    or `unhealthy` (a required integration is down). `warnings` as in `status`: this route is
    public, so an operator whose every other request gets 401 still learns why.
    """
    manager = ctx.integrations
    entries = {}
    for name, integration in manager.integrations.items():
        last = integration.last_health
        entries[name] = {
            "status": integration.status.value,
            "required": integration.config.required,
            "healthy": integration.status is IntegrationStatus.active,
            "detail": integration.describe()["last_error"] or (last.detail if last else ""),
            "checked_at": last.checked_at if last else None,
        }
    all_active = all(e["healthy"] for e in entries.values())
    overall = "healthy" if all_active else "degraded" if manager.ready else "unhealthy"
    body = {
        "status": overall,
        "ready": manager.ready,
        "integrations": entries,
        "warnings": ctx.runtime.warnings(),
    }
    return Reply(body, status=200 if manager.ready else 503)


async def get(event: Event, ctx: Context) -> dict[str, Any]:
    """One integration's status; 404 when no integration of that name is configured."""
    name = event.path_params.get("name", "")
    try:
        integration = ctx.integrations.get_integration(name)
    except KeyError:
        known = ", ".join(ctx.integrations.integrations) or "(none)"
        raise HandlerError(
            404,
            f"integration {quoted(name)} is not configured; configured: {known}",
            type="not_found_error",
            code="integration_not_found",
            param="name",
        ) from None
    return integration.describe()
