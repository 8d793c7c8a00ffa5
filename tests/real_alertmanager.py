"""A real Alertmanager (the Debian package's `prometheus-alertmanager`) on a free loopback port
in a temp dir, clustering off, for tests that follow alerts from a real Prometheus to Tiffin's
webhook. In CI a missing binary fails the test; elsewhere it skips (scripts/setup-system installs
it)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.binaries import require_binary, running_server
from tests.conftest import free_port


class Alertmanager:
    def __init__(self, port: int, process: subprocess.Popen[bytes], log: Path) -> None:
        self.address = f"127.0.0.1:{port}"
        self.url = f"http://{self.address}"
        self.process = process
        self.log = log

    def alerts(self) -> list[dict[str, Any]]:
        """The alerts it holds now (API v2)."""
        return list(httpx.get(f"{self.url}/api/v2/alerts", timeout=10).json())

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


@contextmanager
def running_alertmanager(workdir: Path, config: dict[str, Any]) -> Iterator[Alertmanager]:
    """Alertmanager with `config` (an alertmanager.yml as a dict), ready; stopped at the end."""
    binary = require_binary("prometheus-alertmanager")
    workdir.mkdir(parents=True, exist_ok=True)
    config_file = workdir / "alertmanager.yml"
    config_file.write_text(yaml.safe_dump(config))
    port = free_port()
    log = workdir / "alertmanager.log"
    command = [
        binary,
        f"--config.file={config_file}",
        f"--storage.path={workdir / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        f"--web.external-url=http://127.0.0.1:{port}",
        "--cluster.listen-address=",  # no gossip: one instance, no second port
    ]
    ready = f"http://127.0.0.1:{port}/-/ready"
    with running_server(command, log, ready, "alertmanager") as process:
        yield Alertmanager(port, process, log)
