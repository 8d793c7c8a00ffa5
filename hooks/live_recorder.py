"""The built-in plugin that keeps the Runtime's live statistics (runtime/telemetry/live_stats.py):
the recent generation requests and the sliding-window snapshot behind `/ws/metrics`,
GraphQL's `metrics` and `generationRequests`, and `GET /metrics/live`."""

from __future__ import annotations

from typing import Any

from hooks.specs import hookimpl
from runtime.telemetry.live_stats import LiveStats


class LiveStatsRecorder:
    def __init__(self, stats: LiveStats) -> None:
        self.stats = stats

    @hookimpl(trylast=True)
    def request_started(self, event: Any, ctx: Any) -> None:
        self.stats.request_started()

    @hookimpl(trylast=True)
    def after_generate(self, request: Any, response: Any, ctx: Any) -> None:
        request_id = getattr(request, "request_id", None)
        if request_id and isinstance(response, dict):
            model = str(response.get("model") or getattr(request, "model", ""))
            provider = str(response.get("provider") or "")
            self.stats.generation_finished(str(request_id), model, provider, response)

    @hookimpl(trylast=True)
    def request_finished(
        self, event: Any, ctx: Any, status: int, seconds: float, error: Any
    ) -> None:
        self.stats.request_finished(
            event.request_id,
            event.route,
            event.transport,
            ctx.model,
            ctx.provider,
            status,
            seconds,
            key_name(event.principal),
        )


def key_name(principal: Any) -> str | None:
    """The name of the API key a request was authenticated with (a principal object or
    mapping with a `name`, or a plain string), or None."""
    if principal is None:
        return None
    if isinstance(principal, str):
        return principal
    if isinstance(principal, dict):
        name = principal.get("name")
    else:
        name = getattr(principal, "name", None)
    return str(name) if name is not None else None
