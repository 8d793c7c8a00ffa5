"""System binaries the tests run for real (Prometheus, Alertmanager, ...): missing one is a skip
on a developer's machine and a failure in CI (`CI=true`), where scripts/setup-system installs
them."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx
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


@contextmanager
def running_server(
    command: Sequence[str], log: Path, ready_url: str, name: str, timeout: float = 30
) -> Iterator[subprocess.Popen[bytes]]:
    """Start `command` (output to `log`), wait until `ready_url` answers 200, and always stop
    it at the end (terminate, then kill). Failures quote the end of the log."""

    def tail() -> str:
        return log.read_text(errors="replace")[-2000:]

    with log.open("wb") as out:
        process = subprocess.Popen(list(command), stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise AssertionError(f"{name} exited: {tail()}")
            try:
                if httpx.get(ready_url, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} not ready: {tail()}")
            time.sleep(0.2)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
