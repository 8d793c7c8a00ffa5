"""The BentoML service that serves a Tiffin Runtime.

Which config it serves: the file named by `TIFFIN_CONFIG` (what `python -m runtime` writes into
its run directory, and what `build` bakes into a Bento), else `conf/` composed with `TIFFIN_ENV`
and `TIFFIN_OVERRIDES` (space-separated Hydra overrides).

Each BentoML worker imports this module and so builds its own Runtime (no I/O at import);
integrations start in the on_startup hook and stop, in reverse order, in on_shutdown.
`/readyz` is ready once every required integration is up.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
from pathlib import Path
from typing import Any

import bentoml
import structlog
from omegaconf import DictConfig

import handlers
from runtime.app import Runtime
from runtime.config import compose, load_config_file
from runtime.errors import STARTUP_FAILURE_FILE, StartupError
from runtime.telemetry.logging import configure_logging
from runtime.transports.http import create_app


def load_config() -> DictConfig:
    """The config this process serves (see the module docstring)."""
    path = os.environ.get("TIFFIN_CONFIG")
    if path:
        return load_config_file(path)
    overrides = shlex.split(os.environ.get("TIFFIN_OVERRIDES", ""))
    env = os.environ.get("TIFFIN_ENV")
    return compose([*([f"env={env}"] if env else []), *overrides])


def report_startup_failure(error: StartupError) -> None:
    """Under `python -m runtime` (which sets TIFFIN_RUN_DIR): record why a required integration
    failed and stop the BentoML arbiter (this worker's parent), so the CLI exits with the reason
    instead of BentoML respawning a worker that cannot start."""
    run_dir = os.environ.get("TIFFIN_RUN_DIR")
    if not run_dir:
        return
    record = {"integration": error.name, "reason": error.reason, "message": str(error)}
    (Path(run_dir) / STARTUP_FAILURE_FILE).write_text(json.dumps(record))
    os.kill(os.getppid(), signal.SIGTERM)


def build_service(cfg: DictConfig) -> Any:
    """A BentoML service class bound to a Runtime built from `cfg`."""
    runtime = Runtime(cfg, builtins=handlers.builtin_plugins())
    server = runtime.settings.server
    app = create_app(runtime)
    log = structlog.get_logger("tiffin.service")

    @bentoml.service(
        name="tiffin",
        workers=server.workers,
        traffic={"timeout": int(server.request_timeout_s)},
        endpoints={"livez": "/livez", "readyz": "/readyz"},
    )
    @bentoml.asgi_app(app, path="/")
    class Tiffin:
        """Serves the Runtime's HTTP app; BentoML adds /livez, /readyz and /metrics."""

        def __init__(self) -> None:
            self.runtime = runtime

        @bentoml.on_startup
        async def start_runtime(self) -> None:
            configure_logging(runtime.settings.logging)
            try:
                await runtime.start()
            except StartupError as error:
                log.error("startup failed", integration=error.name, reason=error.reason)
                await runtime.stop()
                report_startup_failure(error)
                raise

        @bentoml.on_shutdown
        async def stop_runtime(self) -> None:
            await runtime.stop()

        async def __is_ready__(self) -> bool:
            return runtime.ready

    return Tiffin


Tiffin = build_service(load_config())
