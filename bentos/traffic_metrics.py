"""BentoML's HTTP traffic metrics (`bentoml_service_request_*`), labelled by route, not by path.

BentoML's own middleware labels its series with the raw URL path, so every path a client makes
up (a scanner tries thousands) adds series to every worker's multiprocess files: /metrics and
the server's memory grow without bound. bentos/service.py therefore turns BentoML's metrics
off (`metrics: {enabled: false}`) and installs `RouteTrafficMetrics` in the Runtime's app. It
keeps BentoML's family and label names, but `endpoint` is the template of the route that
matched (`/v1/models/{model:path}`), or `other` for a path no route serves. With BentoML's
/metrics route gone, the app's own /metrics answers, from the same multiprocess files.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.routing import Match, Router
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from runtime.transports.http import FALLBACK_PATH

NAMESPACE = "bentoml_service"  # BentoML's, so dashboards built on its metrics keep working
OTHER = "other"
LABELS = ("endpoint", "service_name", "service_version", "http_response_code")
Identity = Callable[[], tuple[str, str]]


class TrafficMetrics:
    """BentoML's request families, on the Runtime's registry. `identity` gives the values of
    `service_name` and `service_version` (BentoML's: the Bento's name and version, known only
    once its worker runs)."""

    def __init__(self, registry: CollectorRegistry, identity: Identity) -> None:
        self.identity = identity
        self.total = Counter(
            f"{NAMESPACE}_request_total",
            "Total number of HTTP requests, by route template (`other`: no route).",
            LABELS,
            registry=registry,
        )
        self.duration = Histogram(
            f"{NAMESPACE}_request_duration_seconds",
            "API HTTP request duration in seconds, by route template.",
            LABELS,
            registry=registry,
        )
        self.in_progress = Gauge(
            f"{NAMESPACE}_request_in_progress",
            "HTTP requests in progress now, by route template.",
            LABELS[:3],
            registry=registry,
            multiprocess_mode="livesum",
        )

    def finished(self, endpoint: str, status: int, seconds: float) -> None:
        labels = (endpoint, *self.identity(), str(status))
        self.total.labels(*labels).inc()
        self.duration.labels(*labels).observe(seconds)


class RouteTrafficMetrics:
    """ASGI middleware: count each HTTP request under its route's template. /metrics itself is
    not counted (BentoML did not count it either)."""

    def __init__(self, app: ASGIApp, router: Router, metrics: TrafficMetrics) -> None:
        self.app = app
        self.router = router
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == "/metrics":
            await self.app(scope, receive, send)
            return
        endpoint = self.endpoint(scope)
        started = time.perf_counter()
        status = 500  # what the client gets if the app fails before it answers

        async def counting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        in_progress = self.metrics.in_progress.labels(endpoint, *self.metrics.identity())
        in_progress.inc()
        try:
            await self.app(scope, receive, counting_send)
        finally:
            in_progress.dec()
            self.metrics.finished(endpoint, status, time.perf_counter() - started)

    def endpoint(self, scope: Scope) -> str:
        """The template of the first route whose path matches (a wrong method is still that
        route's request), else `other`."""
        for route in self.router.routes:
            match, _ = route.matches(scope)
            if match is not Match.NONE:
                path = str(getattr(route, "path", OTHER))
                return OTHER if path == FALLBACK_PATH else path
        return OTHER
