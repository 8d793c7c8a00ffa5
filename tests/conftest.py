"""Shared fixtures: Hydra composition with the test config search path, a recording sleep for
the manager's retries, and runtimes that are always stopped."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path

import pytest
from hydra import initialize_config_module
from omegaconf import DictConfig

import handlers
from runtime.app import Runtime
from runtime.config import compose

ROOT = Path(__file__).resolve().parent.parent
TEST_CONF = Path(__file__).resolve().parent / "conf"
SEARCHPATH = f"hydra.searchpath=[file://{TEST_CONF}]"
TEST_OVERRIDES = ["env=test", SEARCHPATH, "plugins=[tests.fakes]", "~integrations"]


@pytest.fixture
def hydra_conf() -> Iterator[None]:
    """Hydra's compose API on the `conf` package, as the house rules ask."""
    with initialize_config_module("conf", version_base=None):
        yield


@pytest.fixture
def compose_test(hydra_conf: None) -> Callable[..., DictConfig]:
    """Compose `conf/` plus the test integrations in tests/conf (env=test, tests.fakes plugin)."""

    def _compose(*overrides: str) -> DictConfig:
        return compose([*TEST_OVERRIDES, *overrides])

    return _compose


class RecordingSleep:
    """Stands in for asyncio.sleep in the manager: records each requested delay and only
    yields briefly, so backoff schedules are asserted without waiting them out."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        await asyncio.sleep(0.001)

    def backoffs(self, interval: float = 0.01) -> list[float]:
        """The delays that were not health-check intervals."""
        return [d for d in self.delays if d != interval]


@pytest.fixture
def sleep() -> RecordingSleep:
    return RecordingSleep()


@pytest.fixture
async def make_runtime(
    compose_test: Callable[..., DictConfig], sleep: RecordingSleep
) -> AsyncIterator[Callable[..., Runtime]]:
    """Build runtimes from overrides; every one built is stopped at the end of the test."""
    built: list[Runtime] = []

    def _make(*overrides: str, builtins: Sequence[object] = ()) -> Runtime:
        runtime = Runtime(
            compose_test(*overrides),
            builtins=[*handlers.builtin_plugins(), *builtins],
            sleep=sleep,
        )
        built.append(runtime)
        return runtime

    yield _make
    for runtime in built:
        await runtime.stop()


async def eventually(condition: Callable[[], bool], within: float = 5.0) -> None:
    """Wait until `condition()` holds (background tasks need a few loop turns)."""
    deadline = asyncio.get_running_loop().time() + within
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cli_env() -> dict[str, str]:
    """Environment for `python -m runtime` subprocesses run from the project root."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TIFFIN_", "HYDRA_"))}
    env["PYTHONPATH"] = str(ROOT)
    env["BENTOML_DO_NOT_TRACK"] = "true"
    return env


PYTHON = sys.executable
