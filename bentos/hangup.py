"""SIGHUP applies the config file again: under `python -m runtime`, each worker records its pid
in the run directory (`workers/<pid>`), the CLI forwards a SIGHUP it gets to every recorded
worker (not to BentoML's arbiter, which would restart them), and each worker reads the file it
was started with (`TIFFIN_CONFIG`, the run directory's `config.yaml`) and applies it like
`POST /admin/config` does (runtime/reconfigure.py). An operator edits that file, then
`kill -HUP <pid of python -m runtime>`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
from pathlib import Path

import structlog

from runtime.app import Runtime
from runtime.config import load_config_file
from runtime.errors import ConfigError
from runtime.reconfigure import ApplyError
from runtime.run_dir import worker_file


class ReapplyOnHangup:
    """This worker's SIGHUP handler; installed once its Runtime has started."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.config_file = os.environ.get("TIFFIN_CONFIG", "")
        run_dir = os.environ.get("TIFFIN_RUN_DIR", "")
        self.pid_file = worker_file(Path(run_dir), os.getpid()) if run_dir else None
        self.task: asyncio.Task[None] | None = None
        self._log = structlog.get_logger("tiffin.config")

    def install(self) -> None:
        if not self.config_file or threading.current_thread() is not threading.main_thread():
            return  # no file to read again (a baked or composed config), or not the main thread
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._on_hangup)
        if self.pid_file is not None:
            self.pid_file.parent.mkdir(parents=True, exist_ok=True)
            self.pid_file.touch()

    def uninstall(self) -> None:
        if self.pid_file is not None:
            self.pid_file.unlink(missing_ok=True)
        with contextlib.suppress(Exception):  # no loop, or the handler was never set
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)

    def _on_hangup(self) -> None:
        if self.task is None or self.task.done():  # a second SIGHUP meanwhile waits for it
            self.task = asyncio.get_running_loop().create_task(self.reapply())

    async def reapply(self) -> None:
        self._log.info("SIGHUP: applying the config file again", file=self.config_file)
        try:
            cfg = await asyncio.to_thread(load_config_file, self.config_file)
            result = await self.runtime.reconfigure.apply(cfg, wait_s=60)
        except (ConfigError, ApplyError) as error:  # logged and counted by the apply too
            self._log.error("SIGHUP: config not applied", reason=str(error))
            return
        self._log.info(
            "SIGHUP: config applied", changes=len(result["changes"]), hash=result["hash"]
        )
