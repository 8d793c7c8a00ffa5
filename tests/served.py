"""A real `python -m runtime` in a subprocess on a free loopback port, for tests about processes
and for clients (the official `openai` package) that talk to a served Tiffin."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil

from tests.conftest import PYTHON, ROOT, cli_env, free_port


class Served:
    def __init__(self, process: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.process = process
        self.url = f"http://127.0.0.1:{port}"
        self.log = log

    @classmethod
    def start_default_models(cls, workdir: Path, *overrides: str) -> Served:
        """The default config's packaged models (env=test), with the assembled GGUF kept in
        `workdir` and no models_dir to scan."""
        return cls.start(
            workdir,
            "env=test",
            f"integrations.custom_models.settings.cache_dir={workdir / 'models'}",
            f"integrations.custom_models.settings.models_dir={workdir / 'none'}",
            *overrides,
        )

    @classmethod
    def start(cls, workdir: Path, *overrides: str) -> Served:
        """Serve with `overrides` on a free port, logging to a file in `workdir`."""
        port = free_port()
        log = workdir / f"serve-{port}.log"
        process = subprocess.Popen(
            [
                PYTHON,
                "-m",
                "runtime",
                f"server.http_port={port}",
                f"server.run_dir={workdir / 'runs'}",
                "logging.level=INFO",
                *overrides,
            ],
            cwd=ROOT,
            env=cli_env(),
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            # Its own process group, so that kill() reaches the `bentoml serve` it starts too
            # (a SIGKILL to `python -m runtime` alone leaves that running, holding its port).
            start_new_session=True,
        )
        return cls(process, port, log)

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

    def kill(self) -> None:
        """SIGKILL the CLI, BentoML's arbiter and its workers (which run in sessions of their
        own, so neither the CLI's death nor its process group reaches them)."""
        family: list[psutil.Process] = []
        with contextlib.suppress(psutil.NoSuchProcess):
            family = psutil.Process(self.process.pid).children(recursive=True)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        for process in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        psutil.wait_procs(family, timeout=10)
        self.process.wait()


@contextmanager
def serving_default_models(workdir: Path, *overrides: str) -> Iterator[Served]:
    """A served process with the default models, ready; stopped cleanly (exit 0) at the end."""
    served = Served.start_default_models(workdir, *overrides)
    try:
        served.wait_for("/readyz", 200, timeout=180)
        yield served
    finally:
        assert served.stop() == 0
