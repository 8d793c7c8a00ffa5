"""Request limits (`limits:` in the config), a built-in plugin, on every transport: a cap on
`max_tokens` and on the streams one client may hold open at once. Each refusal is a
HandlerError, which every transport answers in its own error shape (HTTP status, gRPC code,
WebSocket error frame).

Counts are per process (per BentoML worker). The body size limit is the transports' own
(`server.max_body_bytes`: HTTP 413, gRPC's max receive message length, WebSocket frame size).
"""

from __future__ import annotations

from typing import Any

from hooks.specs import hookimpl
from runtime.config_schema import LimitsConfig
from runtime.types import GenerationRequest, HandlerError

ANONYMOUS = "anonymous"


def client_of(ctx: Any) -> str:
    """Who a request counts against: the auth principal's name, else one anonymous bucket."""
    principal = getattr(ctx, "principal", None)
    if principal is None:
        return ANONYMOUS
    return str(getattr(principal, "name", None) or principal)


class RequestLimits:
    """Enforces `limits.max_tokens` and `limits.max_concurrent_streams` before a generation
    starts. `tryfirst` on `before_generate` (which stops at the first result) so that a plugin
    replacing requests cannot skip the limits; it never returns a result itself."""

    def __init__(self, limits: LimitsConfig) -> None:
        self.limits = limits
        self.holders: dict[int, str] = {}  # id(ctx) -> the client whose stream slot it holds
        self.open: dict[str, int] = {}  # client -> streams open

    @hookimpl(trylast=True)
    def request_finished(
        self, event: Any, ctx: Any, status: int, seconds: float, error: Any
    ) -> None:
        client = self.holders.pop(id(ctx), None)
        if client is not None:
            left = self.open.get(client, 1) - 1
            if left > 0:
                self.open[client] = left
            else:
                self.open.pop(client, None)

    @hookimpl(tryfirst=True)
    def before_generate(self, request: Any, ctx: Any) -> None:
        if not isinstance(request, GenerationRequest):
            return
        self._cap_tokens(request)
        if request.stream and self.limits.max_concurrent_streams > 0:
            self._take_stream_slot(ctx)

    def _cap_tokens(self, request: GenerationRequest) -> None:
        cap = self.limits.max_tokens
        if cap <= 0:
            return
        if request.max_tokens is None:
            request.max_tokens = cap  # unset: at most the cap, not the whole context
        elif request.max_tokens > cap:
            raise HandlerError(
                400,
                f"max_tokens: {request.max_tokens} is more than this server's limit of {cap}",
                param="max_tokens",
                code="max_tokens_too_large",
            )

    def _take_stream_slot(self, ctx: Any) -> None:
        key = id(ctx)
        if key in self.holders:  # a request with several generations holds one slot
            return
        client = client_of(ctx)
        limit = self.limits.max_concurrent_streams
        if self.open.get(client, 0) >= limit:
            raise HandlerError(
                429,
                f"{client} already has {limit} streams open, the limit per client"
                " (limits.max_concurrent_streams)",
                type="rate_limit_error",
                code="too_many_streams",
                headers={"retry-after": str(self.limits.retry_after_s)},
            )
        self.open[client] = self.open.get(client, 0) + 1
        self.holders[key] = client
