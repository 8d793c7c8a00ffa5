"""The release's deploy step (scripts/deploy) and its smoke test (scripts/smoke_test.py). The
smoke test fails, saying why, against a broken deployment (it passes against a real served Tiffin
in tests/test_openai_client.py); the deploy script hands Helm the environment's values and the
image, then smoke-tests through kubectl's port-forward (helm and kubectl stand-ins record what
they were asked)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.conftest import ROOT
from tests.thread_server import ThreadServer

SMOKE = ROOT / "scripts" / "smoke_test.py"


def smoke(
    base: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SMOKE), base, *args],
        capture_output=True,
        text=True,
        timeout=200,
        check=False,
        env={**os.environ, **(env or {})},
    )


class Stub:
    """A deployment as the smoke test sees it: /readyz and one chat completion, scripted."""

    def __init__(self) -> None:
        self.ready = 200
        self.reply: dict[str, Any] = {
            "choices": [{"message": {"role": "assistant", "content": "Hello"}}]
        }
        self.authorization: list[str | None] = []

    async def readyz(self, request: Request) -> JSONResponse:
        return JSONResponse({"status": "ready" if self.ready == 200 else "starting"}, self.ready)

    async def chat(self, request: Request) -> JSONResponse:
        self.authorization.append(request.headers.get("authorization"))
        body = await request.json()
        assert body["model"] == "gemma-3-270m" and body["messages"]
        return JSONResponse(self.reply)


@pytest.fixture
def stub() -> Iterator[tuple[Stub, ThreadServer]]:
    state = Stub()
    server = ThreadServer()
    routes = [
        Route("/readyz", state.readyz),
        Route("/v1/chat/completions", state.chat, methods=["POST"]),
    ]
    server.serve(Starlette(routes=routes), "deployment stub")
    try:
        yield state, server
    finally:
        server.stop()


def test_the_smoke_test_sends_the_api_key(stub: tuple[Stub, ThreadServer]) -> None:
    state, server = stub
    result = smoke(server.url, env={"TIFFIN_API_KEY": "tfn_secret"})
    assert result.returncode == 0, result.stderr
    assert state.authorization == ["Bearer tfn_secret"]


def test_the_smoke_test_fails_when_never_ready(stub: tuple[Stub, ThreadServer]) -> None:
    state, server = stub
    state.ready = 503
    result = smoke(server.url, "--wait", "1")
    assert result.returncode == 1
    assert "/readyz not ready after 1s (last: 503" in result.stderr
    assert state.authorization == []  # no chat before it is ready


def test_the_smoke_test_fails_on_a_reply_without_a_message(
    stub: tuple[Stub, ThreadServer],
) -> None:
    state, server = stub
    state.reply = {"choices": []}
    result = smoke(server.url)
    assert result.returncode == 1
    assert "chat completion has no choices[0].message" in result.stderr


def fake_tools(bin_dir: Path, record: Path) -> None:
    """helm and kubectl stand-ins: each appends its arguments to `record`; kubectl then stays up
    as a port-forward does until the deploy script ends it."""
    bin_dir.mkdir()
    for name, then in (("helm", "exit 0"), ("kubectl", "exec sleep 60")):
        tool = bin_dir / name
        tool.write_text(f'#!/bin/sh\necho "{name} $*" >> "{record}"\n{then}\n')
        tool.chmod(0o755)


def deploy(
    environment: str, tmp_path: Path, port: int
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    record = tmp_path / "calls"
    fake_tools(tmp_path / "bin", record)
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "deploy"), environment, "ghcr.io/acme/tiffin", "v1.2.3"],
        env={
            **os.environ,
            "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
            "TIFFIN_SMOKE_PORT": str(port),
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    calls = record.read_text().splitlines() if record.exists() else []
    return result, calls


@pytest.mark.parametrize(
    ("environment", "values"),
    [("staging", "values-staging.yaml"), ("production", "values-prod.yaml")],
)
def test_deploy_installs_the_chart_then_smoke_tests_it(
    environment: str, values: str, stub: tuple[Stub, ThreadServer], tmp_path: Path
) -> None:
    _, server = stub
    result, calls = deploy(environment, tmp_path, server.port)
    assert result.returncode == 0, result.stdout + result.stderr
    assert calls[0] == (
        "helm upgrade --install tiffin deploy/helm/tiffin --namespace tiffin --create-namespace"
        f" --values deploy/helm/tiffin/{values} --set-string image.repository=ghcr.io/acme/tiffin"
        " --set-string image.tag=v1.2.3 --set-string gpu.image.repository=ghcr.io/acme/tiffin"
        " --set-string gpu.image.tag=v1.2.3-gpu --atomic --wait --timeout 15m"
    )
    assert calls[1] == f"kubectl --namespace tiffin port-forward service/tiffin {server.port}:http"
    assert "smoke: gemma-3-270m answered 'Hello'" in result.stdout
    assert f"is live in {environment}" in result.stdout


def test_deploy_fails_when_the_smoke_test_does(
    stub: tuple[Stub, ThreadServer], tmp_path: Path
) -> None:
    state, server = stub
    state.reply = {"error": {"message": "no such model"}}
    result, calls = deploy("staging", tmp_path, server.port)
    assert result.returncode == 1
    assert "deploy: smoke test failed" in result.stderr
    assert len(calls) == 2  # helm ran, the port-forward was started (and stopped)


def test_deploy_refuses_an_unknown_environment(tmp_path: Path) -> None:
    result, calls = deploy("qa", tmp_path, 1)
    assert result.returncode == 2
    assert "unknown environment 'qa' (expected staging or production)" in result.stderr
    assert calls == []
