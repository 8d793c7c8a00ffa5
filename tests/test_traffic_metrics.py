"""BentoML's request metrics as bentos/traffic_metrics.py records them, in-process: labelled by
route template, every made-up path counted as `other`, so no client can grow /metrics. The
served BentoML process (BentoML's own per-path metrics off) is in tests/test_serve.py."""

from __future__ import annotations

from collections.abc import Callable

import httpx

from bentos.traffic_metrics import OTHER, RouteTrafficMetrics, TrafficMetrics
from runtime.app import Runtime
from runtime.transports.http import create_app
from tests.test_metrics import Scrape

MakeRuntime = Callable[..., Runtime]
TOTAL = "bentoml_service_request_total"


async def test_requests_are_labelled_by_route_and_made_up_paths_are_other(
    make_runtime: MakeRuntime,
) -> None:
    runtime = make_runtime("server.max_body_bytes=1000")
    await runtime.start()
    app = create_app(runtime)
    traffic = TrafficMetrics(runtime.metrics.registry, lambda: ("tiffin", "1.0"))
    app.add_middleware(RouteTrafficMetrics, router=app.router, metrics=traffic)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://tiffin.test") as http:
        assert (await http.get("/v1/models")).status_code == 200
        assert (await http.get("/v1/models/some/model")).status_code == 404
        assert (await http.delete("/v1/models")).status_code == 405
        too_large = await http.post("/v1/chat/completions", content=b"x" * 2000)
        assert too_large.status_code == 413
        for n in range(200):
            assert (await http.get(f"/wp-admin/{n}.php?id={n}")).status_code == 404
        assert (await http.get("/metrics")).status_code == 200  # not counted itself

    m = Scrape(runtime.metrics.exposition()[0].decode())
    service = {"service_name": "tiffin", "service_version": "1.0"}
    assert m.value(TOTAL, endpoint=OTHER, http_response_code="404", **service) == 200
    assert m.value(TOTAL, endpoint="/v1/models", http_response_code="200") == 1
    assert m.value(TOTAL, endpoint="/v1/models", http_response_code="405") == 1
    assert m.value(TOTAL, endpoint="/v1/models/{model:path}", http_response_code="404") == 1
    assert m.value(TOTAL, endpoint="/v1/chat/completions", http_response_code="413") == 1
    assert m.value("bentoml_service_request_duration_seconds_count", endpoint=OTHER) == 200
    assert m.value("bentoml_service_request_in_progress") == 0
    assert m.value(TOTAL) == 204
    # Every label value on /metrics is a route, a status, a transport: never a path sent.
    assert "wp-admin" not in m.text and "some/model" not in m.text
    endpoints = {s.labels["endpoint"] for s in m.samples if "endpoint" in s.labels}
    routes = set(runtime.settings.handlers.routes)
    templates = {"/v1/models", "/v1/models/{model:path}", "/v1/chat/completions", OTHER}
    assert endpoints <= routes | templates
