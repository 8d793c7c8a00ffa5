"""`bentoml build` succeeds from the checkout and packages what the service needs."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, cli_env

pytestmark = pytest.mark.slow


def test_bentoml_build_packages_the_service(tmp_path: Path) -> None:
    env = {**cli_env(), "BENTOML_HOME": str(tmp_path / "bentoml")}
    bentoml = Path(__import__("sys").executable).with_name("bentoml")
    result = subprocess.run(
        [str(bentoml), "build", "--output", "tag"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    [bento] = [p for p in (tmp_path / "bentoml/bentos/tiffin").iterdir() if p.name != "latest"]
    info = yaml.safe_load((bento / "bento.yaml").read_text())
    assert info["service"] == "bentos.service:Tiffin"
    assert info["entry_service"] == "tiffin"
    paths = info["schema"]["paths"]
    assert {"/integrations/status", "/integrations/health", "/integrations/{name}/status"} <= set(
        paths
    )
    src = bento / "src"
    for packaged in [
        "bentos/service.py",
        "runtime/app.py",
        "handlers/integrations.py",
        "hooks/specs.py",
        "conf/config.yaml",
        "conf/env/prod.yaml",
        "conf/handlers/default.yaml",
        # The gRPC contract and the code generated from it (scripts/setup, setup.py).
        "runtime/transports/proto/tiffin/v1/inference.proto",
        "runtime/transports/proto/tiffin/v1/inference_pb2.py",
        "runtime/transports/proto/tiffin/v1/inference_pb2_grpc.py",
    ]:
        assert (src / packaged).is_file(), packaged
    assert not (src / "tests").exists()
    requirements = (bento / "env/python/requirements.txt").read_text()
    assert "hydra-core" in requirements and "structlog" in requirements
    assert "grpcio-health-checking" in requirements
