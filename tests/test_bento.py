"""`python -m runtime build` (and `--gpu`) runs `bentoml build` on the two bentofiles from the
checkout: the Bento packages the service, conf/, the monitoring files and the config `plan`
showed, and its generated Dockerfile installs what the service needs on the right base image.

One build per bentofile for the whole module (each takes ~10 s); no Docker engine needed: the
Dockerfile `bentoml containerize` uses is the Bento's env/docker/Dockerfile.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from omegaconf import OmegaConf

from tests.conftest import ROOT, cli_env, free_port

pytestmark = pytest.mark.slow

# Present in the build's environment: the baked config must keep only its reference.
SECRET = "sk-build-machine-secret-0123456789"
# Servable without anything else running: the request log in SQLite.
OVERRIDES = ["env=prod", "integrations=database", "server.http_port=3100", "server.workers=1"]


@dataclass
class Built:
    tag: str
    path: Path
    stdout: str

    @property
    def info(self) -> dict[str, Any]:
        return dict(yaml.safe_load((self.path / "bento.yaml").read_text()))

    @property
    def dockerfile(self) -> str:
        return (self.path / "env/docker/Dockerfile").read_text()


def build(home: Path, *args: str) -> Built:
    env = {**cli_env(), "BENTOML_HOME": str(home), "TIFFIN_ADMIN_KEY": SECRET}
    result = subprocess.run(
        [sys.executable, "-m", "runtime", "build", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    [next_line] = [line for line in result.stdout.splitlines() if line.startswith("next:")]
    tag = next_line.removeprefix("next: bentoml containerize ").strip()
    name, version = tag.split(":")
    return Built(tag=tag, path=home / "bentos" / name / version, stdout=result.stdout)


@pytest.fixture(scope="module")
def cpu_bento(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build(tmp_path_factory.mktemp("bentoml"), *OVERRIDES)


@pytest.fixture(scope="module")
def gpu_bento(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build(tmp_path_factory.mktemp("bentoml"), "--gpu", *OVERRIDES)


def plan_of(*overrides: str) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "runtime", "plan", *overrides],
        cwd=ROOT,
        env={**cli_env(), "TIFFIN_ADMIN_KEY": SECRET},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return dict(json.loads(result.stdout))


@pytest.mark.parametrize("kind", ["cpu", "gpu"])
def test_the_bento_packages_the_service_config_and_monitoring(
    kind: str, request: pytest.FixtureRequest
) -> None:
    bento: Built = request.getfixturevalue(f"{kind}_bento")
    info = bento.info
    assert info["service"] == "bentos.service:Tiffin"
    assert info["entry_service"] == "tiffin"
    assert info["labels"]["image"] == kind
    paths = info["schema"]["paths"]
    assert {"/integrations/status", "/integrations/health", "/integrations/{name}/status"} <= set(
        paths
    )
    src = bento.path / "src"
    for packaged in [
        "bentos/service.py",
        "runtime/app.py",
        "runtime/bake.py",
        "handlers/integrations.py",
        "hooks/specs.py",
        "conf/config.yaml",
        "conf/env/prod.yaml",
        "conf/handlers/default.yaml",
        "conf/integrations/ollama.yaml",
        "runtime/transports/graphiql/index.html",
        # The gRPC contract and the code generated from it (scripts/setup, setup.py).
        "runtime/transports/proto/tiffin/v1/inference.proto",
        "runtime/transports/proto/tiffin/v1/inference_pb2.py",
        "runtime/transports/proto/tiffin/v1/inference_pb2_grpc.py",
        "monitoring/prometheus.yml",
        "monitoring/llm_platform_rules.yml",
        "monitoring/alertmanager.yml",
        "monitoring/grafana/dashboards/tiffin-overview.json",
        "monitoring/grafana/provisioning/datasources/prometheus.yml",
    ]:
        assert (src / packaged).is_file(), packaged
    assert not (src / "tests").exists()
    assert not (src / "monitoring/tests").exists()
    # The build cleans up after itself: the checkout holds no baked config afterwards.
    assert not (ROOT / "bentos/baked").exists()


@pytest.mark.parametrize("kind", ["cpu", "gpu"])
def test_the_bento_serves_the_config_plan_showed(kind: str, request: pytest.FixtureRequest) -> None:
    bento: Built = request.getfixturevalue(f"{kind}_bento")
    baked = bento.path / "src/bentos/baked"
    overrides = [*OVERRIDES, *(["serving.api_gpus=1"] if kind == "gpu" else [])]
    assert json.loads((baked / "overrides.json").read_text()) == overrides
    expected = plan_of(*overrides)
    assert json.loads((baked / "plan.json").read_text()) == expected
    # What the build printed is that same plan, then the tag and the next command.
    printed = bento.stdout.split("\nbuilt ", 1)[0]
    assert json.loads(printed) == expected
    assert f"next: bentoml containerize {bento.tag}" in bento.stdout
    cfg = OmegaConf.load(baked / "config.yaml")
    assert cfg.server.http_port == 3100
    assert set(cfg.integrations) == {i["name"] for i in expected["integrations"]}
    # BentoML read the baked config when it imported the service (prod alone has 4 workers).
    [service] = bento.info["services"]
    assert service["config"]["workers"] == 1


def test_no_secret_of_the_build_machine_is_in_the_bento(cpu_bento: Built, gpu_bento: Built) -> None:
    for bento in (cpu_bento, gpu_bento):
        for path in bento.path.rglob("*"):
            if path.is_file():
                assert SECRET.encode() not in path.read_bytes(), path
        config = (bento.path / "src/bentos/baked/config.yaml").read_text()
        assert "${oc.env:TIFFIN_ADMIN_KEY,''}" in config


def test_the_cpu_image_installs_the_cpu_packages(cpu_bento: Built) -> None:
    dockerfile = cpu_bento.dockerfile
    assert "FROM python:3.11-slim" in dockerfile
    assert "nvidia/cuda" not in dockerfile
    assert "pip install -r $BENTO_PATH/env/python/requirements.txt" in dockerfile
    assert "ENTRYPOINT" in dockerfile and "EXPOSE 3000" in dockerfile
    assert "build-essential cmake" in dockerfile  # llama-cpp-python builds from source
    requirements = (cpu_bento.path / "env/python/requirements.txt").read_text()
    for package in ["hydra-core", "structlog", "grpcio-health-checking", "llama-cpp-python"]:
        assert package in requirements
    assert "download.pytorch.org/whl/cpu" in requirements
    assert "exllamav2" not in requirements
    assert cpu_bento.info["services"][0]["config"]["resources"] == {}


def test_the_gpu_image_is_cuda_with_exllamav2_and_a_gpu(gpu_bento: Built) -> None:
    dockerfile = gpu_bento.dockerfile
    [base] = [line for line in dockerfile.splitlines() if line.startswith("FROM ")]
    assert base.startswith("FROM nvidia/cuda:12.8.1-cudnn-runtime-"), base
    assert "python3.11" in dockerfile
    assert "ARG SKBUILD_CMAKE_ARGS=-DGGML_NATIVE=OFF;" in dockerfile
    assert "ARG NVIDIA_VISIBLE_DEVICES=all" in dockerfile
    requirements = (gpu_bento.path / "env/python/requirements.txt").read_text()
    for package in ["hydra-core", "exllamav2", "llama-cpp-python", "torch=="]:
        assert package in requirements
    assert "download.pytorch.org/whl/cu128" in requirements
    assert gpu_bento.info["name"] == "tiffin-gpu"
    assert gpu_bento.info["services"][0]["config"]["resources"] == {"gpu": 1}


def test_the_served_bento_runs_the_baked_config_with_tiffin_overrides_on_top(
    cpu_bento: Built, tmp_path: Path
) -> None:
    """`bentoml serve <tag>` is what the image's entrypoint runs; from outside the checkout it
    can only have the baked config, and the secret comes from the serving environment."""
    port, grpc_port = free_port(), free_port()
    env = {
        **cli_env(),
        "BENTOML_HOME": str(cpu_bento.path.parent.parent.parent),
        "TIFFIN_ADMIN_KEY": SECRET,
        "TIFFIN_DATA_DIR": str(tmp_path / "data"),
        "TIFFIN_OVERRIDES": f"integrations.database.priority=7 server.grpc_port={grpc_port}",
    }
    del env["PYTHONPATH"]
    bentoml = Path(sys.executable).with_name("bentoml")
    log = tmp_path / "serve.log"
    with log.open("wb") as output:  # a pipe nobody reads could fill and stall the server
        server = subprocess.Popen(
            [str(bentoml), "serve", cpu_bento.tag, "--port", str(port)],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=output,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert server.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("the Bento did not become ready in 90 s")
        assert httpx.get(f"{base}/integrations/status").status_code == 401  # prod: auth on
        status = httpx.get(
            f"{base}/integrations/status", headers={"Authorization": f"Bearer {SECRET}"}
        ).json()
        assert set(status["integrations"]) == {"database"}  # baked, not conf/'s default
        assert status["integrations"]["database"]["priority"] == 7  # TIFFIN_OVERRIDES
    finally:
        server.terminate()
        server.wait(timeout=60)
