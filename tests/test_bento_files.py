"""The two bentofiles and their requirement files stay in step with each other and with
pyproject.toml (BentoML cannot follow `-r`, so the lists are spelled out). Fast: no build."""

from __future__ import annotations

import re
import tomllib
from typing import Any

import yaml

from runtime.config import compose
from tests.conftest import ROOT

TORCH_VERSION = "2.13.0"  # the version scripts/setup installs
TORCH = f"torch=={TORCH_VERSION}"


def requirements(name: str) -> tuple[list[str], list[str]]:
    """(option lines, requirement lines) of requirements/<name>."""
    lines = [line.strip() for line in (ROOT / "requirements" / name).read_text().splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    return [line for line in lines if line.startswith("-")], [
        line for line in lines if not line.startswith("-")
    ]


def bentofile(name: str) -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / name).read_text()))


def test_the_bento_requirements_are_the_project_and_its_extras() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    gpu_only = [r for r in extras["gpu"] if not r.startswith("tiffin[")]
    assert "tiffin[cpu]" in extras["gpu"]
    assert TORCH in (ROOT / "scripts/setup").read_text().replace("${TORCH_VERSION:-", "torch==")

    options, cpu = requirements("bento-cpu.txt")
    assert options == ["--extra-index-url https://download.pytorch.org/whl/cpu"]
    hint = "copy pyproject.toml's dependencies and extras into requirements/bento-*.txt"
    assert cpu == [TORCH, *project["dependencies"], *extras["cpu"]], hint

    options, gpu = requirements("bento-gpu.txt")
    assert options == ["--extra-index-url https://download.pytorch.org/whl/cu128"]
    assert gpu == [TORCH, *project["dependencies"], *extras["cpu"], *gpu_only], hint


def test_the_gpu_bentofile_is_the_cpu_one_on_cuda() -> None:
    cpu, gpu = bentofile("bentofile.yaml"), bentofile("bentofile.gpu.yaml")
    assert cpu["service"] == gpu["service"] == "bentos.service:Tiffin"
    assert cpu["include"] == gpu["include"]
    assert cpu["exclude"] == gpu["exclude"]
    for packaged in [
        "conf/**/*.yaml",
        "bentos/baked/*",
        "monitoring/*.yml",
        "monitoring/grafana/**",
    ]:
        assert packaged in cpu["include"]
    assert cpu["python"]["requirements_txt"] == "requirements/bento-cpu.txt"
    assert gpu["python"]["requirements_txt"] == "requirements/bento-gpu.txt"
    assert "cuda_version" not in cpu["docker"]
    # The CUDA build of torch on the index must match the image's CUDA (cu128 <-> 12.8.x).
    assert gpu["docker"]["cuda_version"].startswith("12.8.")
    assert {e["name"] for e in cpu["envs"]} < {e["name"] for e in gpu["envs"]}


def test_the_troubleshooting_endpoints_exist() -> None:
    page = (ROOT / "docs" / "operations.md").read_text()
    section = page.split("## Troubleshooting", 1)[1].split("\n## ", 1)[0]
    asked = re.findall(r"curl (?:-s )?localhost:3000(/\S*)", section)
    assert len(asked) >= 6
    routes = compose().handlers.routes
    served = {r.http.path for r in routes.values() if r.http is not None}
    served |= {"/readyz", "/livez", "/metrics"}  # BentoML's own
    patterns = [re.compile("^" + re.sub(r"\{[^}]+\}", "[^/]+", p) + "$") for p in served]
    for path in asked:
        assert any(p.match(path) for p in patterns), path


def test_the_deployment_page_builds_what_the_bento_test_builds() -> None:
    page = (ROOT / "docs" / "deployment.md").read_text()
    assert "python -m runtime build env=prod integrations=ollama,prometheus" in page
    assert "python -m runtime build --gpu env=prod" in page
    assert "bentoml containerize tiffin:<version>" in page
