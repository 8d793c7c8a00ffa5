"""bentos/config_file.py: a worker applies its config file again when it changes (the Helm
chart's watch of a mounted ConfigMap) or on SIGHUP, and refuses what needs a restart."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf

from bentos.config_file import ConfigFileReapply
from runtime.app import Runtime
from runtime.run_dir import worker_pids
from tests.conftest import eventually

Compose = Callable[..., DictConfig]
BASE = ["integrations=[db]"]


async def test_a_changed_file_is_applied_and_a_restart_only_change_is_not(
    make_runtime: Callable[..., Runtime],
    compose_test: Compose,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config_file = tmp_path / "config.yaml"
    config_file.write_text(OmegaConf.to_yaml(compose_test(*BASE)))
    monkeypatch.setenv("TIFFIN_CONFIG", str(config_file))
    monkeypatch.setenv("TIFFIN_CONFIG_WATCH_S", "0.05")
    monkeypatch.setenv("TIFFIN_RUN_DIR", str(tmp_path))
    runtime = make_runtime(*BASE)
    await runtime.start()
    watch = ConfigFileReapply(runtime)
    watch.install()
    try:
        assert worker_pids(tmp_path) == [os.getpid()]  # where the CLI sends a SIGHUP
        config_file.write_text(OmegaConf.to_yaml(compose_test(*BASE, "limits.max_tokens=64")))
        await eventually(lambda: runtime.settings.limits.max_tokens == 64, within=10)

        restart = compose_test(*BASE, "limits.max_tokens=32", "server.workers=4")
        config_file.write_text(OmegaConf.to_yaml(restart))
        rejected = runtime.metrics.config_applies.labels("rejected")
        await eventually(lambda: rejected._value.get() == 1, within=10)
        assert runtime.settings.limits.max_tokens == 64  # refused as a whole

        config_file.write_text(OmegaConf.to_yaml(compose_test(*BASE, "limits.max_tokens=16")))
        os.kill(os.getpid(), signal.SIGHUP)  # the same, at once
        await eventually(lambda: runtime.settings.limits.max_tokens == 16, within=10)
    finally:
        await watch.uninstall()
    assert worker_pids(tmp_path) == []
