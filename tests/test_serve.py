"""`python -m runtime` serving for real: BentoML workers, /readyz, signals, startup failure."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import PYTHON, ROOT, TEST_OVERRIDES, cli_env, free_port

pytestmark = pytest.mark.slow


class Served:
    def __init__(self, process: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.process = process
        self.url = f"http://127.0.0.1:{port}"
        self.log = log

    def wait_for(self, path: str, status: int, timeout: float = 90) -> httpx.Response:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited: {self.log.read_text()[-3000:]}")
            try:
                response = httpx.get(self.url + path, timeout=5)
                if response.status_code == status:
                    return response
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"{path} never answered {status}: {self.log.read_text()[-3000:]}")

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[object]:
    started: list[Served] = []

    def _serve(*overrides: str) -> Served:
        port = free_port()
        log = tmp_path / f"serve-{port}.log"
        process = subprocess.Popen(
            [
                PYTHON,
                "-m",
                "runtime",
                *TEST_OVERRIDES,
                f"server.http_port={port}",
                f"server.run_dir={tmp_path / 'runs'}",
                "logging.level=INFO",
                *overrides,
            ],
            cwd=ROOT,
            env=cli_env(),
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        served = Served(process, port, log)
        started.append(served)
        return served

    yield _serve
    for served in started:
        if served.process.poll() is None:
            served.process.kill()
            served.process.wait()


def test_serves_integrations_and_stops_cleanly_on_sigterm(serve: object, tmp_path: Path) -> None:
    served = serve("integrations=dashboards")  # type: ignore[operator]
    served.wait_for("/readyz", 200)
    assert httpx.get(served.url + "/livez").status_code == 200
    status = httpx.get(served.url + "/integrations/status").json()
    assert {n: i["status"] for n, i in status["integrations"].items()} == {
        "metrics": "active",
        "dashboards": "active",
    }
    assert "hunter2" not in str(status)
    missing = httpx.get(served.url + "/integrations/ollama/status")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "integration_not_found"
    assert httpx.get(served.url + "/nowhere").json()["error"]["type"] == "not_found_error"
    assert "bentoml_service_request_total" in httpx.get(served.url + "/metrics").text

    run_dir = next((tmp_path / "runs").iterdir())
    assert (run_dir / "config.yaml").stat().st_mode & 0o077 == 0
    assert "dashboards" in (run_dir / "plan.json").read_text()

    assert served.stop() == 0
    log = served.log.read_text()
    assert log.index("integration.stopped") < log.rindex("integration.stopped")
    stopped = [line for line in log.splitlines() if "integration.stopped" in line]
    assert "name=dashboards" in stopped[0] and "name=metrics" in stopped[1]
    assert "hunter2" not in log


def test_readyz_is_503_while_a_required_integration_is_unhealthy(serve: object) -> None:
    served = serve(
        "integrations=db",
        "integrations.db.required=true",  # type: ignore[operator]
        "+integrations.db.settings.healthy=false",
    )
    response = served.wait_for("/readyz", 503)
    assert "not ready" in response.text
    health = httpx.get(served.url + "/integrations/health")
    assert health.status_code == 503
    assert health.json()["integrations"]["db"]["status"] == "error"
    assert served.stop() == 0


def test_a_failing_required_integration_stops_the_server_with_its_reason(serve: object) -> None:
    served = serve(
        "integrations=db",
        "integrations.db.required=true",  # type: ignore[operator]
        "+integrations.db.settings.fail_initialize=-1",
        "integrations.db.retry_config.max_retries=1",
        "integrations.db.retry_config.initial_delay=0.1",
    )
    assert served.process.wait(timeout=90) == 1
    log = served.log.read_text()
    assert "tiffin: required integration 'db' failed to start: ConnectionError: cannot reach" in log
