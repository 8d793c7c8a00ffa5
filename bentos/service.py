"""The BentoML service that serves a Tiffin Runtime.

Which config it serves: the file named by `TIFFIN_CONFIG` (what `python -m runtime` writes into
its run directory); else the config `python -m runtime build` baked into the Bento
(runtime/bake.py), with `TIFFIN_ENV` (where it names another env) and `TIFFIN_OVERRIDES`
(space-separated Hydra overrides) on top; else `conf/` composed with those two.

Each BentoML worker imports this module and so builds its own Runtime (no I/O at import);
integrations start in the on_startup hook and stop, in reverse order, in on_shutdown.
`/readyz` is ready once every required integration is up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bentoml
import structlog
from omegaconf import DictConfig

import handlers
from bentos.config_file import ConfigFileReapply
from bentos.runner import RunnerProxyClient, build_runner
from bentos.traffic_metrics import RouteTrafficMetrics, TrafficMetrics
from runtime.app import Runtime
from runtime.bake import is_baked, load_baked
from runtime.config import compose, load_config_file
from runtime.config_schema import ServingConfig, Topology
from runtime.errors import STARTUP_FAILURE_FILE, StartupError
from runtime.telemetry.logging import configure_logging
from runtime.transports.grpc import GrpcServer
from runtime.transports.http import create_app


def load_config() -> DictConfig:
    """The config this process serves (see the module docstring)."""
    path = os.environ.get("TIFFIN_CONFIG")
    if path:
        return load_config_file(path)
    if is_baked():
        return load_baked(os.environ.get("TIFFIN_OVERRIDES", ""), env=os.environ.get("TIFFIN_ENV"))
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


async def wait_for_runner(proxy: Any, serving: ServingConfig) -> None:
    """Wait until the runner service answers ready (its preloaded models are loaded)."""
    is_ready = getattr(proxy, "is_ready", None)
    if is_ready is None:  # resolved in-process, outside `bentoml serve`
        return
    deadline = time.monotonic() + serving.runner_ready_timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):  # not listening yet
            if await is_ready(timeout=5):
                return
        await asyncio.sleep(0.5)
    raise StartupError(
        "tiffin-runner", f"the runner service was not ready in {serving.runner_ready_timeout_s}s"
    )


class Drain:
    """Graceful shutdown's first step, started by the signal itself.

    On SIGTERM uvicorn closes its listening socket, lets open connections finish for BentoML's
    `graceful_timeout_s`, cancels what is left (a stream then ends without `[DONE]`), and only
    then runs on_shutdown: too late to drain there, and a new connection meanwhile waits in
    the arbiter's backlog until it is reset. So `install` puts a handler in front of
    uvicorn's: the signal starts `runtime.drain()` while uvicorn keeps serving (new requests
    get 503, /readyz not ready), and uvicorn's own handler runs once the drain is over. A second
    signal goes to uvicorn at once. on_shutdown awaits the drain (or drains where no signal came).
    """

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.task: asyncio.Task[int] | None = None
        self.signalled = False

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may set signal handlers; on_shutdown drains then
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(signum)
            if not callable(previous):
                continue

            def on_signal(number: int, frame: Any, previous: Any = previous) -> None:
                if self.signalled:
                    previous(number, frame)
                    return
                self.signalled = True
                loop.call_soon_threadsafe(self.start, lambda: previous(number, None))

            signal.signal(signum, on_signal)

    def start(self, then: Callable[[], None] | None = None) -> None:
        if self.task is None:
            self.task = asyncio.ensure_future(self.runtime.drain())
            if then is not None:
                self.task.add_done_callback(lambda _: then())

    async def wait(self) -> None:
        self.start()
        assert self.task is not None
        await self.task


def build_service(cfg: DictConfig) -> Any:
    """A BentoML service class bound to a Runtime built from `cfg`."""
    runtime = Runtime(cfg, builtins=handlers.builtin_plugins())
    server = runtime.settings.server
    app = create_app(runtime)
    # BentoML's own traffic metrics label by raw path (unbounded): off below, these instead.
    context = bentoml.server_context
    traffic = TrafficMetrics(
        runtime.metrics.registry, lambda: (context.bento_name, context.bento_version)
    )
    app.add_middleware(RouteTrafficMetrics, router=app.router, metrics=traffic)
    log = structlog.get_logger("tiffin.service")
    split = runtime.settings.serving.topology is Topology.split
    runner = build_runner(runtime) if split else None
    # BentoML 1.4 cannot serve gRPC itself: each worker runs this server (SO_REUSEPORT).
    grpc_server = GrpcServer(runtime) if runtime.settings.transports.grpc else None
    drain = Drain(runtime)
    config_file = ConfigFileReapply(runtime)

    api_gpus = runtime.settings.serving.api_gpus
    server_logging = runtime.settings.logging

    @bentoml.service(
        name="tiffin",
        workers=server.workers,
        resources={"gpu": api_gpus} if api_gpus else {},
        traffic={"timeout": int(server.request_timeout_s)},
        endpoints={"livez": "/livez", "readyz": "/readyz"},
        # Its per-path request metrics grow with every made-up path (bentos/traffic_metrics.py
        # records the same families by route); /metrics is then the app's own.
        metrics={"enabled": False, "namespace": "bentoml_service"},
        # BentoML's OpenTelemetry middleware makes a span for every chunk a stream sends, with a
        # provider that samples none of them (Tiffin traces with its own: telemetry/tracing.py):
        # pure cost on the event loop, so it is off for every path.
        tracing={"excluded_urls": [".*"]},
        logging={"access": {"enabled": server_logging.access_log}},
    )
    @bentoml.asgi_app(app, path="/")
    class Tiffin:
        """Serves the Runtime's HTTP app (and its gRPC server when `transports.grpc`);
        BentoML adds /livez and /readyz."""

        if runner is not None:
            # Its own process (and GPU); BentoML starts it with this service.
            gpu_runner = bentoml.depends(runner)

        def __init__(self) -> None:
            self.runtime = runtime

        @bentoml.on_startup
        async def start_runtime(self) -> None:
            configure_logging(runtime.settings.logging)
            try:
                if runner is not None:
                    await wait_for_runner(self.gpu_runner, runtime.settings.serving)
                    runtime.use_runner(RunnerProxyClient(self.gpu_runner))
                await runtime.start()
                drain.install()
                config_file.install()
                if grpc_server is not None:
                    await grpc_server.start()
            except StartupError as error:
                log.error("startup failed", integration=error.name, reason=error.reason)
                await runtime.stop()
                report_startup_failure(error)
                raise

        @bentoml.on_shutdown
        async def stop_runtime(self) -> None:
            await config_file.uninstall()
            await drain.wait()
            if grpc_server is not None:
                await grpc_server.stop(server.graceful_timeout_s)
            await runtime.stop()

        async def __is_ready__(self) -> bool:
            return runtime.ready

    return Tiffin


Tiffin = build_service(load_config())
