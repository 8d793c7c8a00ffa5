"""Applying the config file again while serving, two ways:

- SIGHUP: under `python -m runtime`, each worker records its pid in the run directory
  (`workers/<pid>`); the CLI passes a SIGHUP it gets to every recorded worker (not to BentoML's
  arbiter, for which SIGHUP means restarting them), and each reads the file it was started with
  (TIFFIN_CONFIG, the run directory's `config.yaml`) and applies it. An operator edits that
  file, then `kill -HUP <pid of python -m runtime>`.
- Watching (TIFFIN_CONFIG_WATCH_S, which the Helm chart sets): the file is read every so many
  seconds and applied when its content changed, e.g. when Kubernetes updates a mounted
  ConfigMap.

Either way the apply is `POST /admin/config`'s (runtime/reconfigure.py): what needs a restart
is refused and logged (`config.rejected`), the rest is applied with nothing in flight dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
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


class ConfigFileReapply:
    """This worker's SIGHUP handler and file watch; installed once its Runtime has started."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.config_file = os.environ.get("TIFFIN_CONFIG", "")
        run_dir = os.environ.get("TIFFIN_RUN_DIR", "")
        self.pid_file = worker_file(Path(run_dir), os.getpid()) if run_dir else None
        self.watch_s = float(os.environ.get("TIFFIN_CONFIG_WATCH_S") or 0)
        self.task: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None
        self._seen = ""  # the digest of the file's content last applied (or served from start)
        self._log = structlog.get_logger("tiffin.config")

    def install(self) -> None:
        if not self.config_file:
            return  # no file to read again: a baked or composed config
        self._seen = self._digest()
        loop = asyncio.get_running_loop()
        if self.watch_s > 0:
            self._watch = loop.create_task(self._watch_file(), name="tiffin:config-watch")
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may set signal handlers
        loop.add_signal_handler(signal.SIGHUP, self._reapply_soon, "SIGHUP")
        if self.pid_file is not None:
            self.pid_file.parent.mkdir(parents=True, exist_ok=True)
            self.pid_file.touch()

    async def uninstall(self) -> None:
        if self.pid_file is not None:
            self.pid_file.unlink(missing_ok=True)
        with contextlib.suppress(Exception):  # no loop, or the handler was never set
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        for task in (self._watch, self.task):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def _digest(self) -> str:
        try:
            return hashlib.sha256(Path(self.config_file).read_bytes()).hexdigest()
        except OSError:
            return self._seen  # mid-update (Kubernetes swaps a symlink): read it next time

    async def _watch_file(self) -> None:
        while True:
            await asyncio.sleep(self.watch_s)
            if self._digest() != self._seen:
                self._reapply_soon("file changed")

    def _reapply_soon(self, why: str) -> None:
        if self.task is None or self.task.done():  # one at a time; the next sees the newest
            self.task = asyncio.get_running_loop().create_task(self.reapply(why))

    async def reapply(self, why: str) -> None:
        self._log.info("applying the config file again", file=self.config_file, why=why)
        self._seen = self._digest()
        try:
            cfg = await asyncio.to_thread(load_config_file, self.config_file)
            result = await self.runtime.reconfigure.apply(cfg, wait_s=60)
        except (ConfigError, ApplyError) as error:  # logged and counted by the apply too
            self._log.error("config file not applied", reason=str(error), why=why)
            return
        self._log.info("config file applied", changes=len(result["changes"]), hash=result["hash"])
