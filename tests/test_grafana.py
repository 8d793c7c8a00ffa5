"""The grafana integration's real client code against tests/fake_grafana.py (Grafana's published
HTTP API), composed with Hydra beside a real Prometheus (its dependency): the datasource, folder
and dashboards are created once, kept, corrected when they drift, and a refused key leaves Tiffin
serving without the key ever being shown."""

from __future__ import annotations

import io
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import structlog
from omegaconf import DictConfig

import handlers
from runtime.app import Runtime, to_settings
from runtime.config_schema import LogFormat, LoggingConfig
from runtime.events import BusEvent
from runtime.integrations.base import IntegrationStatus
from runtime.integrations.grafana import DEFAULT_GRAFANAINTEGRATION_CONFIG, GrafanaIntegration
from runtime.integrations.grafana.dashboards import UIDS
from runtime.integrations.grafana.panels import DATASOURCE_UID
from runtime.telemetry.logging import configure_logging
from runtime.transports.http import create_app
from tests.conftest import free_port
from tests.fake_grafana import VERSION, FakeGrafana
from tests.real_prometheus import running_prometheus

API_KEY = "glsa_tiffin_test_9f8e7d6c5b4a"
Compose = Callable[..., DictConfig]


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # Nothing to scrape: the grafana integration only needs its dependency up.
    with running_prometheus(tmp_path_factory.mktemp("prometheus"), []) as server:
        yield server.url


@pytest.fixture
def grafana(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeGrafana]:
    server = FakeGrafana(API_KEY)
    server.start()
    monkeypatch.setenv("GRAFANA_URL", server.url)
    monkeypatch.setenv("GRAFANA_API_KEY", API_KEY)
    yield server
    server.stop()


@pytest.fixture
def config(compose_test: Compose, prometheus: str) -> Callable[..., DictConfig]:
    def _config(*extra: str) -> DictConfig:
        return compose_test(
            "integrations=[grafana]",
            f"integrations.prometheus.settings.url={prometheus}",
            # A failed start is retried in the background much later than these tests run.
            "integrations.grafana.retry_config.max_retries=0",
            "integrations.grafana.retry_config.initial_delay=60",
            *extra,
        )

    return _config


@asynccontextmanager
async def started(cfg: DictConfig, events: list[BusEvent] | None = None) -> AsyncIterator[Runtime]:
    runtime = Runtime(cfg, builtins=handlers.builtin_plugins())
    if events is not None:
        runtime.events.subscribe("grafana.dashboards", events.append)
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.stop()


def grafana_of(runtime: Runtime) -> GrafanaIntegration:
    integration = runtime.integrations.get_integration("grafana")
    assert isinstance(integration, GrafanaIntegration)
    return integration


async def get(runtime: Runtime, path: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=create_app(runtime))
    async with httpx.AsyncClient(transport=transport, base_url="http://tiffin.test") as client:
        return await client.get(path)


def written(fake: FakeGrafana) -> list[tuple[str, str]]:
    return [(method, path) for method, path, _ in fake.writes]


async def test_the_first_start_creates_the_datasource_folder_and_dashboards(
    config: Callable[..., DictConfig], grafana: FakeGrafana, prometheus: str
) -> None:
    events: list[BusEvent] = []
    async with started(config(), events) as runtime:
        integration = grafana_of(runtime)
        assert integration.status is IntegrationStatus.active
        assert runtime.integrations.get_integration("prometheus").status is IntegrationStatus.active
        assert written(grafana) == [
            ("POST", "/api/datasources"),
            ("POST", "/api/folders"),
            *[("POST", "/api/dashboards/db")] * 4,
        ]
        datasource = grafana.datasources[DATASOURCE_UID]
        assert (datasource["type"], datasource["url"]) == ("prometheus", prometheus)
        assert datasource["jsonData"]["timeInterval"] == "15s"
        assert grafana.folders["tiffin"]["title"] == "Tiffin"
        assert set(grafana.dashboards) == set(UIDS)
        titles = {d["dashboard"]["title"] for d in grafana.dashboards.values()}
        assert titles == {
            "LLM Platform Overview",
            "Model Performance",
            "Resource Monitoring",
            "Cost Analysis",
        }
        assert {d["folderUid"] for d in grafana.dashboards.values()} == {"tiffin"}
        assert all(body["overwrite"] for _, path, body in grafana.writes if "dashboards" in path)
        assert set(grafana.authorizations) == {f"Bearer {API_KEY}"}
        [event] = events
        assert event.source == "grafana"
        assert event.data == {
            "created": list(UIDS),
            "updated": [],
            "unchanged": [],
            "provisioned": [],
        }
        # Health reports Grafana's version; the key is masked wherever status is shown.
        status = await get(runtime, "/integrations/grafana/status")
        described = status.json()
        assert described["health"]["detail"] == f"Grafana {VERSION}, database ok"
        assert described["health"]["data"]["version"] == VERSION
        assert described["version"] == VERSION
        assert described["settings"]["api_key"] == "***"
        assert described["dashboards"]["created"] == list(UIDS)
        everything = await get(runtime, "/integrations/status")
        assert API_KEY not in status.text and API_KEY not in everything.text
        # The platform guide's call: nothing to do now.
        again = await integration.import_dashboards()
        assert again.unchanged == list(UIDS) and not again.created and not again.updated
        assert len(grafana.writes) == 6


async def test_a_second_start_writes_nothing(
    config: Callable[..., DictConfig], grafana: FakeGrafana
) -> None:
    async with started(config()):
        pass
    before = list(grafana.writes)
    events: list[BusEvent] = []
    async with started(config(), events) as runtime:
        assert grafana_of(runtime).status is IntegrationStatus.active
    assert grafana.writes == before
    assert [e.data["unchanged"] for e in events] == [list(UIDS)]
    assert all(d["dashboard"]["version"] == 1 for d in grafana.dashboards.values())


async def test_what_drifted_is_put_back_and_nothing_else(
    config: Callable[..., DictConfig], grafana: FakeGrafana, prometheus: str
) -> None:
    async with started(config()):
        pass
    grafana.writes.clear()
    stale = grafana.dashboards["tiffin-cost"]["dashboard"]
    stale["tags"] = ["tiffin", "tiffin-content-000000000000"]  # an older Tiffin's dashboard
    del grafana.dashboards["tiffin-models"]  # deleted by hand
    grafana.datasources[DATASOURCE_UID]["url"] = "http://elsewhere:9090"
    grafana.folders["tiffin"]["title"] = "Renamed"
    events: list[BusEvent] = []
    async with started(config(), events):
        pass
    assert written(grafana) == [
        ("PUT", f"/api/datasources/uid/{DATASOURCE_UID}"),
        ("PUT", "/api/folders/tiffin"),
        ("POST", "/api/dashboards/db"),
        ("POST", "/api/dashboards/db"),
    ]
    assert grafana.datasources[DATASOURCE_UID]["url"] == prometheus
    assert grafana.folders["tiffin"]["title"] == "Tiffin"
    assert grafana.dashboards["tiffin-cost"]["dashboard"]["version"] == 2
    assert grafana.dashboards["tiffin-models"]["dashboard"]["version"] == 1
    [event] = events
    assert event.data["updated"] == ["tiffin-cost"] and event.data["created"] == ["tiffin-models"]
    assert event.data["unchanged"] == ["tiffin-overview", "tiffin-resources"]


async def test_what_grafana_provisions_from_files_is_left_alone(
    config: Callable[..., DictConfig], grafana: FakeGrafana
) -> None:
    grafana.datasources[DATASOURCE_UID] = grafana._datasource(
        DATASOURCE_UID,
        {"name": "Tiffin Prometheus", "type": "prometheus", "url": "http://prometheus:9090"},
        1,
        version=1,
    )
    grafana.datasources[DATASOURCE_UID]["readOnly"] = True
    grafana.folders["tiffin"] = grafana._folder("tiffin", "Tiffin", 2, version=1)
    for uid in UIDS:
        model = {"uid": uid, "title": uid, "version": 1, "id": 3, "tags": ["tiffin"]}
        grafana.dashboards[uid] = {"dashboard": model, "folderUid": "tiffin", "provisioned": True}
    async with started(config()) as runtime:
        integration = grafana_of(runtime)
        assert integration.status is IntegrationStatus.active
        assert integration.datasource == "read-only"
        assert integration.last_import is not None
        assert integration.last_import.provisioned == list(UIDS)
    assert grafana.writes == []


async def test_a_refused_key_is_a_clear_error_and_tiffin_keeps_serving(
    config: Callable[..., DictConfig],
    grafana: FakeGrafana,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    wrong = "glsa_wrong_key_5a5a5a5a5a"
    monkeypatch.setenv("GRAFANA_API_KEY", wrong)
    stream = io.StringIO()
    configure_logging(LoggingConfig(level="DEBUG", format=LogFormat.json), stream=stream)
    caplog.set_level(logging.DEBUG)
    try:
        async with started(config()) as runtime:
            integration = grafana_of(runtime)
            assert integration.status is IntegrationStatus.error
            assert runtime.ready  # grafana is optional
            assert integration.last_error is not None
            assert "refused the API key (401 on GET /api/datasources/uid/" in integration.last_error
            assert "GRAFANA_API_KEY" in integration.last_error
            served = await get(runtime, "/v1/models")
            assert served.status_code == 200
            health = await get(runtime, "/integrations/health")
            assert health.status_code == 200
            shown = [
                await get(runtime, "/integrations/status"),
                await get(runtime, "/integrations/grafana/status"),
            ]
            assert shown[1].json()["status"] == "error"
            assert "refused the API key" in shown[1].json()["last_error"]
    finally:
        structlog.contextvars.clear_contextvars()
        configure_logging(LoggingConfig(level="WARNING"))
    assert grafana.writes == [] and grafana.dashboards == {}
    logged = stream.getvalue()
    assert "integration.failed" in logged and "refused the API key" in logged
    for text in (logged, caplog.text, *(r.text for r in shown)):
        assert wrong not in text and API_KEY not in text


async def test_no_key_for_a_grafana_that_needs_one(
    config: Callable[..., DictConfig], grafana: FakeGrafana, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GRAFANA_API_KEY")
    async with started(config()) as runtime:
        integration = grafana_of(runtime)
        assert integration.status is IntegrationStatus.error
        assert "requires an API key" in (integration.last_error or "")
    assert set(grafana.authorizations) == {None}


async def test_an_unreachable_grafana_is_named_in_the_error(
    config: Callable[..., DictConfig], prometheus: str
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    async with started(config(f"integrations.grafana.settings.url={url}")) as runtime:
        integration = grafana_of(runtime)
        assert integration.status is IntegrationStatus.error
        assert f"Grafana at {url} cannot be reached: ConnectError" in (integration.last_error or "")


def test_the_default_config_matches_the_yaml(
    compose_test: Compose, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("GRAFANA_URL", "GRAFANA_API_KEY", "PROMETHEUS_URL"):
        monkeypatch.delenv(name, raising=False)
    composed = to_settings(compose_test("integrations=[grafana]")).integrations["grafana"]
    default = DEFAULT_GRAFANAINTEGRATION_CONFIG
    assert composed.dependencies == default.dependencies == ["prometheus"]
    assert (composed._target_, composed.type, composed.priority) == (
        default._target_,
        default.type,
        default.priority,
    )
    assert composed.settings == default.settings
    assert composed.settings["url"] == "http://localhost:3001"


def test_the_fake_keeps_grafanas_version_rule(grafana: FakeGrafana) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    model: dict[str, Any] = {"uid": "x", "title": "X", "id": None}
    with httpx.Client(base_url=grafana.url, headers=headers) as client:
        created = client.post("/api/dashboards/db", json={"dashboard": model}).json()
        assert created["status"] == "success" and created["version"] == 1
        assert created["url"] == "/d/x/x" and created["slug"] == "x"
        stale = client.post("/api/dashboards/db", json={"dashboard": {**model, "version": 0}})
        assert stale.status_code == 412 and stale.json()["status"] == "version-mismatch"
        current = client.post("/api/dashboards/db", json={"dashboard": {**model, "version": 1}})
        assert current.json()["version"] == 2
        assert client.get("/api/dashboards/uid/nope").status_code == 404
        assert httpx.get(grafana.url + "/api/datasources").status_code == 401
