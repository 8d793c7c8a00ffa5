"""The documentation site (mkdocs.yml, docs/) and the README that points into it: every Grafana
panel is described on the observability page, every page is in the nav, and the README's links
stay inside the repository. `mkdocs build --strict` (scripts/lint) checks links between pages."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT

DOCS = ROOT / "docs"
DASHBOARDS = sorted((ROOT / "monitoring" / "grafana" / "dashboards").glob("*.json"))


def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, rows and the panels a collapsed row holds included."""
    for panel in items:
        yield panel
        yield from panels(panel.get("panels", []))


def test_there_are_dashboards_to_document() -> None:
    assert len(DASHBOARDS) >= 4


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_panel_of_the_dashboard_is_on_the_observability_page(path: Path) -> None:
    page = (DOCS / "observability.md").read_text()
    dashboard = json.loads(path.read_text())
    assert f"### {dashboard['title']}\n" in page
    section = page.split(f"### {dashboard['title']}\n", 1)[1].split("\n## ", 1)[0]
    section = section.split("\n### ", 1)[0]
    assert path.name in section
    titles = [p["title"] for p in panels(dashboard["panels"])]
    assert titles
    missing = [t for t in titles if f"| {t} |" not in section]
    assert not missing, f"{path.name}: panels missing from docs/observability.md: {missing}"


def test_every_page_is_in_the_nav() -> None:
    # A regex, not a YAML load: mkdocs.yml has a !!python/name tag that safe_load refuses.
    config = (ROOT / "mkdocs.yml").read_text()
    nav = config.split("\nnav:\n", 1)[1]
    listed = set(re.findall(r":\s*(\S+\.md)\s*$", nav, flags=re.MULTILINE))
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert listed == pages


def test_the_readme_starts_with_the_two_commands() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert lines[:3] == ["# Tiffin", "", "```bash"]
    assert lines[3].startswith("scripts/setup && .venv/bin/python -m runtime ")
    assert lines[4].startswith("scripts/setup-system && scripts/setup && scripts/test ")
    assert lines[5] == "```"


def test_the_readme_links_to_files_in_the_repository() -> None:
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    local = [link for link in links if "://" not in link]
    assert any(link.startswith("docs/") for link in local)
    for link in local:
        target = (ROOT / link).resolve()
        assert target.is_relative_to(ROOT.resolve()), link
        assert target.exists(), link
