"""System binaries the tests run for real (Prometheus, Alertmanager, ...): missing one is a skip
on a developer's machine and a failure in CI (`CI=true`), where scripts/setup-system installs
them."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence

import pytest

INSTALL_HINT = "scripts/setup-system installs it"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def require_binary(name: str) -> str:
    """The path of `name` on PATH; if it is missing, fail under CI=true and skip elsewhere."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed ({INSTALL_HINT})"
        if in_ci():
            pytest.fail(f"{message}; CI must not skip it")
        pytest.skip(message)
    return path


def run_binary(name: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run `name args...`, failing the test with its whole output unless it exits 0."""
    result = run_binary_unchecked(name, args, timeout=timeout)
    if result.returncode != 0:
        pytest.fail(
            f"{name} {' '.join(args)} exited {result.returncode}:\n{result.stdout}{result.stderr}"
        )
    return result


def run_binary_unchecked(
    name: str, args: Sequence[str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_binary(name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
