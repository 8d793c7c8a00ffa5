"""Rendering deploy/helm/tiffin with Helm's own engine (helm-python-sdk: Helm's Go SDK as a
library, from PyPI) and reading the manifests back."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy/helm/tiffin"
VALUES_FILES = ["values.yaml", "values-dev.yaml", "values-staging.yaml", "values-prod.yaml"]
RELEASE = "tiffin"


def values_file(name: str) -> dict[str, Any]:
    """The values a `-f` of `name` passes (values.yaml: none; the chart's defaults apply)."""
    if name == "values.yaml":
        return {}
    data = yaml.safe_load((CHART / name).read_text())
    assert isinstance(data, dict), name
    return data


def render(values: dict[str, Any], release: str = RELEASE) -> list[dict[str, Any]]:
    """`helm template` of the chart: every non-empty manifest."""
    with helm.Chart.load(str(CHART)) as chart:
        files = chart.render(values, name=release, namespace="tiffin")
    return [doc for text in files.values() for doc in yaml.safe_load_all(text) if doc]


def by_kind(manifests: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {m["metadata"]["name"]: m for m in manifests if m["kind"] == kind}


def containers(manifests: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(Deployment, container) for each container of each Deployment."""
    for deployment in by_kind(manifests, "Deployment").values():
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            yield deployment, container
