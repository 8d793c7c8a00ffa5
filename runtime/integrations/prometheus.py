"""prometheus: the Prometheus server that scrapes Tiffin's `/metrics`.

Tiffin's metrics themselves live in `runtime/telemetry/metrics.py` and are recorded whether or
not this integration is selected. This one checks that the server is ready (`/-/ready`), reports
whether it is scraping Tiffin (the `up` series of the configured job), and gives dependents
(grafana's datasource) the server's URL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import httpx

from runtime.config_schema import IntegrationConfig, IntegrationType, RetryConfig
from runtime.events import EventBus
from runtime.integrations.base import BaseIntegration, Health
from runtime.integrations.settings import defaults_of


@dataclass
class PrometheusSettings:
    """`integrations.prometheus.settings`."""

    url: str = "http://localhost:9090"  # the Prometheus server (PROMETHEUS_URL)
    timeout: float = 5.0  # seconds for one call to its API
    job: str = "llm-platform"  # the scrape job that targets Tiffin


DEFAULT_PROMETHEUSINTEGRATION_CONFIG = IntegrationConfig(
    _target_="runtime.integrations.prometheus.PrometheusIntegration",
    name="prometheus",
    type=IntegrationType.monitoring,
    priority=20,
    health_check_interval=30.0,
    retry_config=RetryConfig(max_retries=2, backoff_factor=2.0, max_backoff=60.0),
    settings=defaults_of(PrometheusSettings),
)


class PrometheusIntegration(BaseIntegration):
    """Health of the Prometheus server, and whether it scrapes Tiffin."""

    settings_schema: ClassVar[type[Any]] = PrometheusSettings

    def __init__(self, config: IntegrationConfig, bus: EventBus | None = None) -> None:
        super().__init__(config, bus)
        self.url = str(self.settings["url"]).rstrip("/")
        self.job = str(self.settings["job"])
        self.timeout = float(self.settings["timeout"])
        self._client: httpx.AsyncClient | None = None

    async def initialize(self) -> None:
        self._client = httpx.AsyncClient(base_url=self.url, timeout=self.timeout)
        try:
            await self._ready()
        except Exception:
            await self.shutdown()
            raise

    async def health_check(self) -> Health:
        await self._ready()
        targets = await self.scrape_targets()
        up = sum(1 for t in targets if t.get("value") == "1")
        detail = f"ready; job {self.job}: {up}/{len(targets)} targets up"
        return Health(True, detail, data={"job": self.job, "targets": len(targets), "up": up})

    async def shutdown(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query through the HTTP API: the `result` list of a vector answer."""
        response = await self._http().get("/api/v1/query", params={"query": promql})
        response.raise_for_status()
        body = response.json()
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus query failed: {body.get('error', body)}")
        return list(body["data"]["result"])

    async def scrape_targets(self) -> list[dict[str, Any]]:
        """The `up` samples of the configured job: one per scraped Tiffin process."""
        result = await self.query(f'up{{job="{self.job}"}}')
        return [{"instance": r["metric"].get("instance"), "value": r["value"][1]} for r in result]

    async def _ready(self) -> None:
        response = await self._http().get("/-/ready")
        if response.status_code != 200:
            raise RuntimeError(f"prometheus at {self.url} is not ready ({response.status_code})")

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            raise RuntimeError("the prometheus integration is not initialized")
        return self._client
