"""Builders for Grafana's dashboard JSON model: targets, panels, rows, template variables.

Panels are built without positions; `layout()` places them left to right in Grafana's 24-column
grid, row by row, and numbers them. `dashboard()` stamps a content marker (a tag holding a hash of
everything else), so an integration can tell whether the copy stored in Grafana is this one
without comparing JSON that Grafana rewrites on save.

Every query goes to the Prometheus datasource chosen by the `datasource` variable, whose default
is the datasource Tiffin provisions (uid `tiffin-prometheus`).
"""

from __future__ import annotations

import hashlib
import json
import string
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

Json = dict[str, Any]

DATASOURCE_UID = "tiffin-prometheus"
DATASOURCE_NAME = "Tiffin Prometheus"
PROMETHEUS: Json = {"type": "prometheus", "uid": "${datasource}"}
SCHEMA_VERSION = 39
GRID_WIDTH = 24
CONTENT_TAG_PREFIX = "tiffin-content-"


# --- targets and panels ---------------------------------------------------------------------------


def target(expr: str, legend: str = "", *, instant: bool = False, table: bool = False) -> Json:
    """One PromQL query of a panel (its refId is set by the panel)."""
    return {
        "datasource": PROMETHEUS,
        "editorMode": "code",
        "expr": expr,
        "format": "table" if table else "time_series",
        "instant": instant or table,
        "legendFormat": legend or "__auto",
        "range": not (instant or table),
    }


def _panel(
    kind: str,
    title: str,
    targets: Sequence[Json],
    *,
    description: str,
    width: int,
    height: int,
    defaults: Json,
    options: Json,
) -> Json:
    if not 0 < width <= GRID_WIDTH:
        raise ValueError(f"panel {title!r}: width {width}, expected 1..{GRID_WIDTH}")
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": PROMETHEUS,
        "gridPos": {"h": height, "w": width, "x": 0, "y": 0},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options,
        "targets": [{**t, "refId": string.ascii_uppercase[i]} for i, t in enumerate(targets)],
    }


def thresholds(*steps: tuple[float, str]) -> Json:
    """Colour steps: green below the first value, then each (value, colour) upwards."""
    return {
        "mode": "absolute",
        "steps": [{"color": "green", "value": None}]
        + [{"color": colour, "value": value} for value, colour in steps],
    }


def timeseries(
    title: str,
    targets: Sequence[Json],
    *,
    unit: str = "short",
    description: str = "",
    width: int = 12,
    height: int = 8,
    stacked: bool = False,
    bars: bool = False,
) -> Json:
    """A graph over time; one line (or bar) per series."""
    custom = {
        "drawStyle": "bars" if bars else "line",
        "fillOpacity": 60 if bars else (25 if stacked else 10),
        "lineWidth": 1,
        "showPoints": "never",
        "spanNulls": False,
        "stacking": {"group": "A", "mode": "normal" if stacked else "none"},
    }
    options = {
        "legend": {"calcs": [], "displayMode": "list", "placement": "bottom", "showLegend": True},
        "tooltip": {"mode": "multi", "sort": "desc"},
    }
    defaults = {"custom": custom, "min": 0, "unit": unit}
    return _panel(
        "timeseries",
        title,
        targets,
        description=description,
        width=width,
        height=height,
        defaults=defaults,
        options=options,
    )


def stat(
    title: str,
    targets: Sequence[Json],
    *,
    unit: str = "short",
    description: str = "",
    width: int = 4,
    height: int = 4,
    colours: Json | None = None,
    decimals: int | None = None,
) -> Json:
    """One number (the latest value) with a sparkline."""
    defaults: Json = {"thresholds": colours or thresholds(), "unit": unit}
    if decimals is not None:
        defaults["decimals"] = decimals
    options = {
        "colorMode": "value",
        "graphMode": "area",
        "justifyMode": "auto",
        "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        "textMode": "auto",
    }
    return _panel(
        "stat",
        title,
        targets,
        description=description,
        width=width,
        height=height,
        defaults=defaults,
        options=options,
    )


def gauge(
    title: str,
    targets: Sequence[Json],
    *,
    unit: str = "percent",
    maximum: float = 100,
    description: str = "",
    width: int = 6,
    height: int = 6,
    colours: Json | None = None,
) -> Json:
    """A dial from 0 to `maximum`, coloured by `colours`."""
    defaults = {"max": maximum, "min": 0, "thresholds": colours or thresholds(), "unit": unit}
    options = {
        "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        "showThresholdLabels": False,
        "showThresholdMarkers": True,
    }
    return _panel(
        "gauge",
        title,
        targets,
        description=description,
        width=width,
        height=height,
        defaults=defaults,
        options=options,
    )


def table(
    title: str,
    targets: Sequence[Json],
    *,
    value_text: Mapping[str, tuple[str, str]] | None = None,
    unit: str = "short",
    description: str = "",
    width: int = 12,
    height: int = 8,
) -> Json:
    """The instant values of `targets` as rows; `value_text` maps a value to (text, colour)."""
    mappings = []
    if value_text:
        options_map = {
            value: {"color": colour, "index": i, "text": text}
            for i, (value, (text, colour)) in enumerate(sorted(value_text.items()))
        }
        mappings.append({"options": options_map, "type": "value"})
    defaults = {
        "custom": {"cellOptions": {"type": "color-background" if value_text else "auto"}},
        "mappings": mappings,
        "unit": unit,
    }
    options = {"cellHeight": "sm", "showHeader": True}
    built = _panel(
        "table",
        title,
        targets,
        description=description,
        width=width,
        height=height,
        defaults=defaults,
        options=options,
    )
    built["transformations"] = [
        {"id": "organize", "options": {"excludeByName": {"Time": True}, "renameByName": {}}}
    ]
    return built


def row(title: str) -> Json:
    return {"type": "row", "title": title, "collapsed": False, "panels": []}


def layout(sections: Iterable[tuple[str, Sequence[Json]]]) -> list[Json]:
    """Rows and their panels, placed in the 24-column grid and numbered from 1."""
    placed: list[Json] = []
    y = 0
    for title, panels in sections:
        placed.append({**row(title), "gridPos": {"h": 1, "w": GRID_WIDTH, "x": 0, "y": y}})
        y += 1
        x, line_height = 0, 0
        for panel in panels:
            size = panel["gridPos"]
            if x + size["w"] > GRID_WIDTH:
                x, y, line_height = 0, y + line_height, 0
            placed.append({**panel, "gridPos": {**size, "x": x, "y": y}})
            x += size["w"]
            line_height = max(line_height, size["h"])
        y += line_height
    return [{**panel, "id": i} for i, panel in enumerate(placed, start=1)]


# --- variables and dashboards -------------------------------------------------------------------


def datasource_variable() -> Json:
    """`$datasource`: any Prometheus datasource, defaulting to the one Tiffin provisions."""
    return {
        "current": {"selected": False, "text": DATASOURCE_NAME, "value": DATASOURCE_UID},
        "hide": 0,
        "includeAll": False,
        "label": "Prometheus",
        "multi": False,
        "name": "datasource",
        "options": [],
        "query": "prometheus",
        "refresh": 1,
        "regex": "",
        "type": "datasource",
    }


def label_variable(name: str, label: str, metric: str) -> Json:
    """A multi-select variable over the values of label `name` of `metric` (All = `.*`)."""
    query = f"label_values({metric}, {name})"
    return {
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "datasource": PROMETHEUS,
        "definition": query,
        "hide": 0,
        "includeAll": True,
        "label": label,
        "multi": True,
        "name": name,
        "options": [],
        "query": {"qryType": 1, "query": query, "refId": "PrometheusVariableQueryEditor"},
        "refresh": 2,
        "regex": "",
        "sort": 1,
        "type": "query",
    }


def dashboard(
    uid: str,
    title: str,
    description: str,
    sections: Iterable[tuple[str, Sequence[Json]]],
    *,
    variables: Sequence[Json] = (),
    tags: Sequence[str] = (),
) -> Json:
    """A whole dashboard model, tagged `tiffin` and stamped with its content marker."""
    model: Json = {
        "annotations": {"list": []},
        "description": description,
        "editable": True,
        "graphTooltip": 1,  # shared crosshair
        "id": None,
        "links": [
            {
                "asDropdown": False,
                "icon": "external link",
                "includeVars": False,
                "keepTime": True,
                "tags": ["tiffin"],
                "targetBlank": False,
                "title": "Tiffin",
                "type": "dashboards",
            }
        ],
        "panels": layout(sections),
        "refresh": "30s",
        "schemaVersion": SCHEMA_VERSION,
        "tags": ["tiffin", *tags],
        "templating": {"list": [datasource_variable(), *variables]},
        "time": {"from": "now-6h", "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "title": title,
        "uid": uid,
    }
    model["tags"].append(CONTENT_TAG_PREFIX + content_hash(model))
    return model


def content_hash(model: Mapping[str, Any]) -> str:
    """A short hash of a dashboard's content, ignoring the marker itself and what Grafana
    manages (id, version)."""
    content = {k: v for k, v in model.items() if k not in ("id", "version")}
    content["tags"] = [t for t in model.get("tags", []) if not t.startswith(CONTENT_TAG_PREFIX)]
    encoded = json.dumps(content, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(encoded).hexdigest()[:12]


def content_marker(model: Mapping[str, Any]) -> str | None:
    """The content marker tag of a dashboard (as stored in Grafana), if it has one."""
    tags = model.get("tags") or []
    return next((t for t in tags if str(t).startswith(CONTENT_TAG_PREFIX)), None)


# --- PromQL ---------------------------------------------------------------------------------------


def panel_expressions(model: Mapping[str, Any]) -> list[str]:
    """Every target expression of a dashboard, as written (with Grafana variables)."""
    panels: list[Json] = []
    for panel in model.get("panels", []):
        panels += [panel, *panel.get("panels", [])]
    return [t["expr"] for p in panels for t in p.get("targets", []) if t.get("expr")]
