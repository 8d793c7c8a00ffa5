"""grafana: Tiffin's dashboards, built from code (`dashboards.py` from `panels.py`,
`engine_panels.py` and `promql.py`), imported into a Grafana through its HTTP API
(`grafana_integration.py`) or written as provisioning files (`provisioning.py`;
`python -m runtime.cli.grafana_files`)."""

from runtime.integrations.grafana.grafana_integration import (
    DEFAULT_GRAFANAINTEGRATION_CONFIG,
    GrafanaError,
    GrafanaIntegration,
    GrafanaSettings,
)

__all__ = [
    "DEFAULT_GRAFANAINTEGRATION_CONFIG",
    "GrafanaError",
    "GrafanaIntegration",
    "GrafanaSettings",
]
