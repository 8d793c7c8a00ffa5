"""A real Prometheus (the Debian package's binary) on a free loopback port in a temp dir, for
tests that check what it scrapes from a served Tiffin. In CI a missing binary fails the test;
elsewhere it skips (scripts/setup-system installs it)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.binaries import require_binary, running_server
from tests.conftest import free_port


class Prometheus:
    def __init__(self, url: str, process: subprocess.Popen[bytes], log: Path) -> None:
        self.url = url
        self.process = process
        self.log = log

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query; raises with Prometheus' own message when it refuses the query."""
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = response.json()
        if body.get("status") != "success":
            raise AssertionError(f"{expr}: {body.get('error')}")
        return list(body["data"]["result"])

    def value(self, expr: str) -> float | None:
        """The single value of a query answering one series (or a scalar), else None."""
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        data = response.json()["data"]
        if data["resultType"] == "scalar":
            return float(data["result"][1])
        return float(data["result"][0]["value"][1]) if len(data["result"]) == 1 else None

    def wait_until(self, condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            time.sleep(0.5)
        raise AssertionError(f"{what} not seen in {timeout}s; log: {self.log.read_text()[-2000:]}")

    def targets_up(self, job: str) -> int:
        return sum(1 for r in self.query(f'up{{job="{job}"}}') if r["value"][1] == "1")


@contextmanager
def running_prometheus(
    workdir: Path,
    targets: Sequence[str],
    *,
    job: str = "llm-platform",
    interval: str = "1s",
    rule_files: Sequence[Path] = (),
    extra: dict[str, Any] | None = None,
) -> Iterator[Prometheus]:
    """Prometheus scraping `targets` (host:port) every `interval`; stopped at the end."""
    binary = require_binary("prometheus")
    workdir.mkdir(parents=True, exist_ok=True)
    config = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "scrape_configs": [
            {"job_name": job, "metrics_path": "/metrics", "static_configs": [{"targets": targets}]}
        ],
        "rule_files": [str(path) for path in rule_files],
        **(extra or {}),
    }
    config_file = workdir / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config))
    port = free_port()
    log = workdir / "prometheus.log"
    command = [
        binary,
        f"--config.file={config_file}",
        f"--storage.tsdb.path={workdir / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--web.enable-lifecycle",
    ]
    url = f"http://127.0.0.1:{port}"
    with running_server(command, log, f"{url}/-/ready", "prometheus") as process:
        yield Prometheus(url, process, log)
