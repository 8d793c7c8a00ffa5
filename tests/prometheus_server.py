"""A real Prometheus (the Debian package's binary) on a free loopback port in a temp dir, and the
rule for binaries from Debian packages: missing is a failure in CI (`CI=true`), a skip elsewhere."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port


def debian_binary(name: str, package: str = "prometheus") -> str:
    path = shutil.which(name) or next(
        (str(p) for p in (Path("/usr/bin") / name,) if p.exists()), None
    )
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is missing: install the Debian package `{package}`")
        pytest.skip(f"{name} is not installed (Debian package `{package}`)")
    return path


class PrometheusServer:
    """`prometheus` with an empty scrape config, listening on 127.0.0.1 only."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> None:
        config = self.root / "prometheus.yml"
        config.write_text("global:\n  scrape_interval: 15s\nscrape_configs: []\n")
        self._process = subprocess.Popen(
            [
                debian_binary("prometheus"),
                f"--config.file={config}",
                f"--storage.tsdb.path={self.root / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"prometheus did not become ready on {self.url}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None
