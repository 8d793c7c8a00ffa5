"""Prometheus metrics in-process, on the scripted engine: each family by the platform guide's
name, counted per request, generation, model load and health check, and read back from
/metrics in Prometheus' text format. The same metrics scraped by a real Prometheus from a
served process with two workers are in tests/test_prometheus.py."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hooks.metrics_recorder import served_routes
from runtime.app import Runtime
from runtime.config_schema import ModelConfig
from runtime.engines.engine import ModelSpec
from runtime.telemetry.metrics import ROUTE_ERRORS, Metrics
from runtime.transports.http import create_app
from runtime.types import Event, Stream
from tests.conftest import ROOT, cli_env
from tests.scripted_engine import batching
from tests.test_openai_api import ScriptedEngines, chat

MakeRuntime = Callable[..., Runtime]
CHAT = "chat_completions"
HELLO = {"role": "user", "content": "hi"}


class Scrape:
    """One /metrics answer, parsed: `value(name, **labels)` sums the matching samples."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples = [
            sample for family in text_string_to_metric_families(text) for sample in family.samples
        ]

    def value(self, metric: str, **labels: str) -> float:
        matching = [
            s.value
            for s in self.samples
            if s.name == metric and all(s.labels.get(k) == v for k, v in labels.items())
        ]
        return float(sum(matching))

    def has(self, metric: str, **labels: str) -> bool:
        return any(
            s.name == metric and all(s.labels.get(k) == v for k, v in labels.items())
            for s in self.samples
        )


class Api:
    def __init__(self, runtime: Runtime, http: httpx.AsyncClient, plugin: ScriptedEngines) -> None:
        self.runtime = runtime
        self.http = http
        self.plugin = plugin

    async def scrape(self) -> Scrape:
        response = await self.http.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        return Scrape(response.text)


@pytest.fixture
async def api(make_runtime: MakeRuntime) -> AsyncIterator[Api]:
    plugin = ScriptedEngines()
    runtime = make_runtime("integrations=db", builtins=[plugin])
    prices = {"prompt_per_1k": 2.0, "completion_per_1k": 10.0}
    for config in (
        ModelConfig(id="m1", source="x", prices=prices, timeout_s=5),
        ModelConfig(id="embedder", source="x"),
        ModelConfig(id="broken", source="x"),
    ):
        runtime.models.register(ModelSpec(config, Path("x"), "scripted", provider="local"))
    await runtime.start()
    transport = httpx.ASGITransport(app=create_app(runtime), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://tiffin.test") as http:
        yield Api(runtime, http, plugin)


async def test_requests_are_counted_by_route_transport_model_and_status(api: Api) -> None:
    for _ in range(3):
        assert (await api.http.post("/v1/chat/completions", json=chat())).status_code == 200
    streamed = await api.http.post("/v1/chat/completions", json=chat(stream=True))
    assert streamed.status_code == 200 and streamed.text.endswith("data: [DONE]\n\n")
    assert (await api.http.post("/v1/chat/completions", json=chat(model="nope"))).status_code == 404
    assert (await api.http.post("/v1/chat/completions", json={"model": 1})).status_code == 400
    assert (await api.http.get("/v1/models")).status_code == 200

    m = await api.scrape()
    ok = {"endpoint": CHAT, "transport": "http", "status": "200"}
    assert m.value("llm_requests_total", **ok, model="m1", provider="local") == 4
    assert m.value("llm_request_duration_seconds_count", **ok, model="m1") == 4
    # An unknown model is not a label value: user text never becomes a series.
    assert m.value("llm_requests_total", endpoint=CHAT, status="404", model="") == 1
    assert not m.has("llm_requests_total", model="nope")
    assert m.value("llm_requests_total", endpoint=CHAT, status="400") == 1
    assert m.value("llm_requests_total", endpoint="models_list", status="200") == 1
    assert m.value("llm_requests_total") == 7
    assert m.value("llm_errors_total", endpoint=CHAT, status="404") == 1
    assert m.value("llm_errors_total", type="invalid_request_error") == 2
    assert m.value("llm_requests_in_flight") == 0


# The families the platform guide names, that dashboards and alerts query. The GPU's exists
# only where NVML finds a GPU; durations from the first request (a quantile of none is no data).
GUIDE_FAMILIES_FROM_THE_START = (
    "llm_requests_total",
    "llm_model_loads_total",
    "llm_active_models",
    "llm_cpu_usage_percent",
    "llm_errors_total",
    "llm_cost_total",
)


async def test_a_fresh_runtime_shows_every_series_at_zero(api: Api) -> None:
    """Before any request: what dashboards and alerts query exists at 0, not "no data", and
    the first request or error is an increase from 0 that rate() can see."""
    m = await api.scrape()
    for family in GUIDE_FAMILIES_FROM_THE_START:
        assert m.has(family), family
    for endpoint, transports in served_routes(api.runtime.settings).items():
        for transport in transports:
            route = {"endpoint": endpoint, "transport": transport}
            assert m.has("llm_requests_total", **route, status="200"), route
            assert m.has("llm_requests_in_flight", **route), route
            for status, kind in ROUTE_ERRORS:
                assert m.has("llm_errors_total", **route, status=str(status), type=kind)
    assert m.has("llm_errors_total", endpoint=CHAT, transport="graphql", type="rate_limit_error")
    for model in ("m1", "embedder", "broken"):
        labels = {"model": model, "provider": "local"}
        for kind in ("prompt", "completion"):
            assert m.has("llm_tokens_total", **labels, kind=kind)
        assert m.has("llm_cost_total", **labels)
        assert m.has("llm_time_to_first_token_seconds_count", **labels)
        assert m.has("llm_time_per_output_token_seconds_count", **labels)
    for family in ("llm_requests_total", "llm_errors_total", "llm_tokens_total", "llm_cost_total"):
        assert m.value(family) == 0
    # Bounded: routes x transports x a fixed set of errors, never more.
    errors = [s for s in m.samples if s.name == "llm_errors_total"]
    pairs = sum(len(t) for t in served_routes(api.runtime.settings).values())
    assert len(errors) == pairs * len(ROUTE_ERRORS)


async def test_a_4xx_counts_with_its_status_and_type(api: Api) -> None:
    not_json = await api.http.post("/v1/chat/completions", content=b"{")
    assert not_json.status_code == 400
    unknown = await api.http.post("/api/chat", json={"model": "nope", "messages": [HELLO]})
    assert unknown.status_code == 404 and "error" in unknown.json()  # Ollama's shape
    m = await api.scrape()
    bad = {"endpoint": CHAT, "transport": "http", "status": "400"}
    assert m.value("llm_requests_total", **bad) == 1
    assert m.value("llm_errors_total", **bad, type="invalid_request_error") == 1
    missing = {"endpoint": "ollama_chat", "status": "404", "type": "invalid_request_error"}
    assert m.value("llm_errors_total", **missing) == 1
    assert m.value("llm_errors_total") == 2


async def test_generations_record_tokens_latency_and_cost(api: Api) -> None:
    engine = api.plugin
    await api.runtime.models.load("m1")
    engine.built["m1"].enqueue(["a", "b", "c", "d"])  # usage: 3 prompt, 4 completion tokens
    assert (await api.http.post("/v1/chat/completions", json=chat())).status_code == 200

    m = await api.scrape()
    labels = {"model": "m1", "provider": "local"}
    assert m.value("llm_tokens_total", **labels, kind="prompt") == 3
    assert m.value("llm_tokens_total", **labels, kind="completion") == 4
    assert m.value("llm_time_to_first_token_seconds_count", **labels) == 1
    assert m.value("llm_time_per_output_token_seconds_count", **labels) == 1
    # 3 prompt tokens at 2.0 per 1k, 4 completion tokens at 10.0 per 1k.
    assert m.value("llm_cost_total", **labels) == pytest.approx(0.046)


async def test_model_loads_and_failures_are_counted(api: Api) -> None:
    await api.runtime.models.load("m1")
    api.plugin.build = _failing(api.plugin.build, "broken")
    response = await api.http.post("/v1/chat/completions", json=chat(model="broken"))
    assert response.status_code == 503

    m = await api.scrape()
    assert m.value("llm_model_loads_total", model="m1", status="success") == 1
    assert m.value("llm_model_loads_total", model="broken", status="failure") == 1
    assert m.value("llm_active_models") == 1
    assert m.value("llm_errors_total", endpoint=CHAT, status="503", type="server_error") == 1


def _failing(build: Callable[[ModelSpec], Any], model: str) -> Callable[[ModelSpec], Any]:
    def wrapped(spec: ModelSpec) -> Any:
        engine = build(spec)
        if spec.config.id == model:
            engine.fail_load = "out of memory"
        return engine

    return wrapped


async def test_a_stream_is_in_flight_until_it_ends_and_a_closed_one_is_a_499(api: Api) -> None:
    engine = await _loaded(api, "m1")
    engine.enqueue(["one", "two", "three"])
    event = Event(body=chat(stream=True), transport="http")
    stream = await api.runtime.dispatcher.dispatch(CHAT, event)
    assert isinstance(stream, Stream)
    await anext(stream)
    assert (await api.scrape()).value("llm_requests_in_flight", endpoint=CHAT) == 1
    await stream.aclose()  # the client went away mid-stream

    m = await api.scrape()
    assert m.value("llm_requests_in_flight", endpoint=CHAT) == 0
    assert m.value("llm_requests_total", endpoint=CHAT, status="499") == 1
    assert m.value("llm_errors_total", endpoint=CHAT, status="499", type="cancelled") == 1
    assert engine.closed == 1  # closing the request stopped the generation


async def _loaded(api: Api, model: str) -> Any:
    await api.runtime.models.load(model)
    return api.plugin.built[model]


async def test_integrations_and_resources_are_sampled(api: Api) -> None:
    m = await api.scrape()
    assert m.value("integration_up", name="db") == 1
    assert m.value("integration_health_check_duration_seconds_count", name="db") >= 1
    assert m.has("integration_restarts_total", name="db")
    assert 0 <= m.value("llm_cpu_usage_percent") <= 100
    assert m.value("llm_process_resident_memory_bytes") > 10_000_000
    assert m.has("llm_queue_depth", model="m1")
    # Load counters exist at 0 before any load, so a first failure is an increase.
    assert m.has("llm_model_loads_total", model="m1", status="failure")
    assert m.value("llm_model_loads_total", model="m1") == 0
    # No GPU here: no GPU series, and no error either.
    assert not m.has("llm_gpu_memory_usage_bytes")


async def test_metrics_can_be_turned_off(make_runtime: MakeRuntime) -> None:
    runtime = make_runtime("telemetry.metrics=false")
    await runtime.start()
    await runtime.dispatcher.dispatch("models_list", Event())
    body, _ = runtime.metrics.exposition()
    assert b"llm_requests_total{" not in body


def test_each_runtime_has_its_own_registry() -> None:
    first, second = Metrics(), Metrics()  # would raise "Duplicated timeseries" on a shared one
    first.model_load("m", "local", ok=True)
    assert b'llm_model_loads_total{model="m"' in first.exposition()[0]
    assert b'llm_model_loads_total{model="m"' not in second.exposition()[0]


async def test_exposition_adds_up_every_worker_under_multiprocess_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What BentoML's workers do: each process writes to PROMETHEUS_MULTIPROC_DIR; one scrape
    sums them. Two child processes stand in for two workers."""
    script = (
        "from runtime.telemetry.metrics import Metrics, RequestRecord\n"
        "m = Metrics()\n"
        "for _ in range({n}):\n"
        "    m.request_started('chat_completions', 'http')\n"
        "    record = RequestRecord('chat_completions', 'http', 200, 0.1, 'm1', 'local')\n"
        "    m.request_finished(record)\n"
    )
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    for n in (2, 3):
        process = await asyncio.create_subprocess_exec(
            _python(), "-c", script.format(n=n), env=env, cwd=str(Path(__file__).parent.parent)
        )
        assert await process.wait() == 0
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    body, _ = Metrics().exposition()
    m = Scrape(body.decode())
    assert m.value("llm_requests_total", endpoint=CHAT, status="200") == 5
    assert m.value("llm_request_duration_seconds_count", endpoint=CHAT) == 5


async def test_a_fresh_worker_writes_its_zero_series_under_multiprocess_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under BentoML's workers, a series exists on /metrics only once a worker has written it
    to PROMETHEUS_MULTIPROC_DIR: a worker that starts and serves nothing writes its zeros."""
    script = (
        "import asyncio, handlers\n"
        "from runtime.app import compose_runtime\n"
        "async def main():\n"
        "    runtime = compose_runtime(['env=test', '~integrations'],"
        " builtins=handlers.builtin_plugins())\n"
        "    await runtime.start()\n"
        "    await runtime.stop()\n"
        "asyncio.run(main())\n"
    )
    env = {**cli_env(), "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    process = await asyncio.create_subprocess_exec(_python(), "-c", script, env=env, cwd=str(ROOT))
    assert await asyncio.wait_for(process.wait(), timeout=120) == 0
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    m = Scrape(Metrics().exposition()[0].decode())
    for family in ("llm_requests_total", "llm_errors_total", "llm_active_models"):
        assert m.has(family), family
    assert m.has("llm_errors_total", endpoint=CHAT, transport="http", status="401")
    assert m.has("llm_requests_in_flight", endpoint=CHAT, transport="ws")
    assert m.value("llm_requests_total") == 0 and m.value("llm_errors_total") == 0


def _python() -> str:
    import sys

    return sys.executable


class FakeNvml:
    """pynvml's calls that ResourceReader makes, as NVML documents them, for two GPUs."""

    class NVMLError(Exception):
        pass

    def __init__(self) -> None:
        self.shut_down = False

    def nvmlInit(self) -> None:
        return None

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        from types import SimpleNamespace

        return SimpleNamespace(used=(handle + 1) * 2**30, total=80 * 2**30, free=0)

    def nvmlShutdown(self) -> None:
        self.shut_down = True


async def test_gpu_memory_comes_from_nvml_when_there_is_a_gpu(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hooks.metrics_recorder import MetricsRecorder
    from runtime.telemetry.resources import ResourceReader

    nvml = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    plugin = api.runtime.plugins.get_plugin("tiffin.builtin.MetricsRecorder")
    assert isinstance(plugin, MetricsRecorder)
    plugin._reader = ResourceReader()  # the reader of a process that has a GPU
    plugin.sample()
    m = await api.scrape()
    assert m.value("llm_gpu_memory_usage_bytes", gpu="0") == 2**30
    assert m.value("llm_gpu_memory_usage_bytes", gpu="1") == 2 * 2**30
    assert m.value("llm_gpu_memory_total_bytes", gpu="1") == 80 * 2**30
    await api.runtime.stop()
    assert nvml.shut_down


@pytest.mark.gpu
def test_gpu_memory_is_read_from_the_real_device() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from runtime.telemetry.resources import ResourceReader

    reader = ResourceReader()
    try:
        gpus = reader.gpu_memory()
        assert len(gpus) == torch.cuda.device_count()
        assert all(0 < gpu.used_bytes <= gpu.total_bytes for gpu in gpus)
    finally:
        reader.close()


async def test_an_integration_waiting_for_its_dependency_is_not_up(
    make_runtime: MakeRuntime,
) -> None:
    # tests/conf: `cache` depends on `db`; db failing to start leaves cache degraded, waiting.
    runtime = make_runtime(
        "integrations=[db,cache]", "+integrations.db.settings.fail_initialize=-1"
    )
    await runtime.start()
    assert runtime.integrations.get_integration("cache").status.value == "degraded"
    body, _ = runtime.metrics.exposition()
    scrape = Scrape(body.decode())
    assert scrape.value("integration_up", name="db") == 0
    assert scrape.value("integration_up", name="cache") == 0


# --- batching engines (issue 15) ------------------------------------------------------------------


def _sample(api: Api) -> None:
    from hooks.metrics_recorder import MetricsRecorder

    plugin = api.runtime.plugins.get_plugin("tiffin.builtin.MetricsRecorder")
    assert isinstance(plugin, MetricsRecorder)
    plugin.sample()


async def test_a_batching_engine_is_sampled_into_the_engine_families(api: Api) -> None:
    engine = await _loaded(api, "m1")
    engine.extra_stats = batching()
    _sample(api)
    m = await api.scrape()
    labels = {"model": "m1", "provider": "local"}
    assert m.value("llm_engine_sequences_running", **labels) == 3
    assert m.value("llm_engine_requests_waiting", **labels) == 2
    assert m.value("llm_engine_slots_busy", **labels) == 3
    assert m.value("llm_engine_slots_total", **labels) == 8
    assert m.value("llm_engine_kv_cells_used", **labels) == 1200
    assert m.value("llm_engine_kv_cells_total", **labels) == 4096
    assert m.value("llm_engine_prompt_cache_hit_tokens_total", **labels) == 100
    assert m.value("llm_engine_prompt_tokens_evaluated_total", **labels) == 40
    assert m.value("llm_engine_sequences_per_step_count", **labels) == 10
    assert m.value("llm_engine_sequences_per_step_bucket", **labels, le="1.0") == 4
    assert m.value("llm_engine_sequences_per_step_bucket", **labels, le="2.0") == 4
    assert m.value("llm_engine_sequences_per_step_bucket", **labels, le="4.0") == 10
    assert m.value("llm_engine_sequences_per_step_sum", **labels) == 22

    engine.extra_stats = batching(
        slots_busy=8,
        slots_free=0,
        prompt_cache_hit_tokens=160,
        prompt_tokens_evaluated=90,
        sequences_per_step={"1": 4, "3": 6, "8": 2},
    )
    _sample(api)
    _sample(api)  # a second reading of the same counts adds nothing
    m = await api.scrape()
    assert m.value("llm_engine_slots_busy", **labels) == 8
    assert m.value("llm_engine_prompt_cache_hit_tokens_total", **labels) == 160
    assert m.value("llm_engine_prompt_tokens_evaluated_total", **labels) == 90
    assert m.value("llm_engine_sequences_per_step_count", **labels) == 12
    assert m.value("llm_engine_sequences_per_step_bucket", **labels, le="8.0") == 12
    assert m.value("llm_engine_sequences_per_step_sum", **labels) == 38
    # Engines that do not batch have no engine series (m1's only).
    assert {s.labels["model"] for s in m.samples if s.name.startswith("llm_engine_")} == {"m1"}

    await api.runtime.models.unload("m1")
    _sample(api)
    m = await api.scrape()
    assert m.value("llm_engine_slots_total", **labels) == 0
    assert m.value("llm_engine_sequences_running", **labels) == 0
    assert m.value("llm_engine_prompt_cache_hit_tokens_total", **labels) == 160

    reloaded = await _loaded(api, "m1")
    assert reloaded is not engine
    reloaded.extra_stats = batching(prompt_cache_hit_tokens=5, sequences_per_step={"2": 1})
    _sample(api)
    m = await api.scrape()
    assert m.value("llm_engine_slots_total", **labels) == 8
    assert m.value("llm_engine_prompt_cache_hit_tokens_total", **labels) == 165
    assert m.value("llm_engine_sequences_per_step_count", **labels) == 13


async def test_a_runner_placed_model_and_a_failing_engine_add_no_engine_series(api: Api) -> None:
    """A runner's stats reach every API worker as a copy: each would add them again."""
    engine = await _loaded(api, "m1")
    engine.extra_stats = {"placement": "runner", "runner": batching()}
    embedder = await _loaded(api, "embedder")

    def broken() -> dict[str, Any]:
        raise RuntimeError("the scheduler thread died")

    embedder.stats = broken  # type: ignore[method-assign]
    _sample(api)
    m = await api.scrape()
    assert not [s for s in m.samples if s.name.startswith("llm_engine_")]
    assert m.value("llm_queue_depth", model="embedder") == 0


async def test_engine_families_add_up_every_worker_under_multiprocess_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers, each with its own engine of m1: slots and counts add up in one scrape."""
    script = (
        "from runtime.telemetry.batching import batching_stats\n"
        "from runtime.telemetry.metrics import Metrics\n"
        "from tests.scripted_engine import batching\n"
        "m = Metrics()\n"
        "m.engines.observe('m1', 'local', object(), batching_stats(batching(slots_busy={n})))\n"
    )
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    for n in (2, 3):
        process = await asyncio.create_subprocess_exec(
            _python(), "-c", script.format(n=n), env=env, cwd=str(ROOT)
        )
        assert await process.wait() == 0
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    m = Scrape(Metrics().exposition()[0].decode())
    assert m.value("llm_engine_slots_busy", model="m1") == 5
    assert m.value("llm_engine_slots_total", model="m1") == 16
    assert m.value("llm_engine_kv_cells_total", model="m1") == 2 * 4096
    assert m.value("llm_engine_prompt_cache_hit_tokens_total", model="m1") == 200
    assert m.value("llm_engine_sequences_per_step_count", model="m1") == 20
