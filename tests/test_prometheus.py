"""A real Prometheus scrapes a served Tiffin with two BentoML workers: the request counter it
stores equals the requests sent (both workers' counts add up in one scrape, through
prometheus_client's multiprocess mode), and every PromQL expression of the four Grafana
dashboards returns data from it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from omegaconf import DictConfig

import handlers
from runtime.app import Runtime
from runtime.integrations.grafana.dashboards import build_dashboards, promql_expressions
from runtime.integrations.prometheus import PrometheusIntegration
from tests.real_prometheus import Prometheus, running_prometheus
from tests.served import Served, serving_default_models

pytestmark = pytest.mark.slow

MODEL = "gemma-3-270m"
CHATS = 8


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    workdir = tmp_path_factory.mktemp("two-workers")
    with serving_default_models(
        workdir, "server.workers=2", "telemetry.sample_interval_s=1"
    ) as served:
        yield served


@pytest.fixture(scope="module")
def prometheus(served: Served, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    target = served.url.removeprefix("http://")
    with running_prometheus(tmp_path_factory.mktemp("prometheus"), [target]) as prometheus:
        prometheus.wait_until(lambda: prometheus.targets_up("llm-platform") == 1, "a scrape")
        yield prometheus


@pytest.fixture(scope="module")
def traffic(served: Served, prometheus: Prometheus) -> int:
    """Chats from several clients at once (so both workers take some), a stream, a text
    completion, embeddings and an unknown model; returns the number of chats answered."""

    def chat(i: int) -> int:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": f"Count to {i + 3}."}],
            "max_tokens": 8,
            "temperature": 0,
        }
        return httpx.post(served.url + "/v1/chat/completions", json=body, timeout=120).status_code

    with ThreadPoolExecutor(max_workers=4) as pool:
        statuses = list(pool.map(chat, range(CHATS)))
    assert statuses == [200] * CHATS
    stream = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 8,
        "stream": True,
    }
    with httpx.stream("POST", served.url + "/v1/chat/completions", json=stream, timeout=120) as r:
        assert r.status_code == 200 and "[DONE]" in r.read().decode()
    completion = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 8}
    assert httpx.post(served.url + "/v1/completions", json=completion, timeout=120).is_success
    embed = {"model": "all-minilm-l6-v2", "input": ["a", "b"]}
    assert httpx.post(served.url + "/v1/embeddings", json=embed, timeout=120).is_success
    missing = {"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}
    assert httpx.post(served.url + "/v1/chat/completions", json=missing).status_code == 404
    return CHATS + 1


def test_the_request_counter_equals_the_requests_sent(
    traffic: int, prometheus: Prometheus, served: Served
) -> None:
    # The unknown model's 404 was the last request: once it shows, the scrape has them all.
    every = 'sum(llm_requests_total{endpoint="chat_completions"})'
    prometheus.wait_until(lambda: prometheus.value(every) == traffic + 1, f"{every} == {traffic}+1")
    chats = 'sum(llm_requests_total{endpoint="chat_completions",status="200"})'
    assert prometheus.value(chats) == traffic
    assert prometheus.value('sum(llm_errors_total{status="404"})') == 1
    # Both workers were scraped through one target: their files add up in one exposition.
    text = httpx.get(served.url + "/metrics").text
    assert "llm_requests_total" in text and "bentoml_service_request_total" in text


def test_every_dashboard_expression_returns_data(traffic: int, prometheus: Prometheus) -> None:
    expressions = promql_expressions()
    assert len(build_dashboards()) == 4 and len(expressions) >= 20
    # rate() needs two samples after the traffic: wait for the completion tokens to show, and
    # for the error series (created by the last request of the traffic).
    tokens = 'sum(rate(llm_tokens_total{kind="completion"}[1m]))'
    prometheus.wait_until(lambda: (prometheus.value(tokens) or 0) > 0, tokens)
    errors = "sum(rate(llm_errors_total[1m]))"
    prometheus.wait_until(lambda: bool(prometheus.query(errors)), errors)
    # Durations are observed as requests end: with batching the traffic can end within one
    # scrape interval, and the histogram's first series then needs a second scrape too.
    durations = "sum(rate(llm_request_duration_seconds_count[1m]))"
    prometheus.wait_until(lambda: bool(prometheus.query(durations)), durations)
    # GPU series exist only where NVML finds a GPU; without one their panels say "No data".
    gpu = bool(prometheus.query("llm_gpu_memory_total_bytes"))
    empty = [
        expr
        for expr in expressions
        if (gpu or "llm_gpu_" not in expr) and not prometheus.query(expr)
    ]
    assert empty == [], f"no data for: {empty}"


async def test_the_prometheus_integration_sees_the_scrape(
    traffic: int, prometheus: Prometheus, compose_test: Callable[..., DictConfig]
) -> None:
    cfg = compose_test(
        "integrations=prometheus", f"integrations.prometheus.settings.url={prometheus.url}"
    )
    runtime = Runtime(cfg, builtins=handlers.builtin_plugins())
    await runtime.start()
    try:
        integration = runtime.integrations.get_integration("prometheus")
        assert isinstance(integration, PrometheusIntegration)
        assert integration.status.value == "active"
        health = await integration.health_check()
        assert health.healthy and health.data == {"job": "llm-platform", "targets": 1, "up": 1}
        assert await integration.query("sum(llm_requests_total)")
    finally:
        await runtime.stop()
