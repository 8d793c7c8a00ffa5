"""Developer tools the tests run that come with the dev extras (actionlint, shellcheck, pre-commit):
they live in the venv's bin/, which need not be on PATH when pytest runs as `.venv/bin/python -m
pytest`."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from tests.binaries import in_ci

VENV_BIN = Path(sys.executable).parent


def venv_binary(name: str) -> str:
    """`name` from the venv's bin/, else from PATH; missing fails under CI=true, skips elsewhere."""
    path = shutil.which(name, path=str(VENV_BIN)) or shutil.which(name)
    if path is None:
        message = f"{name} is not installed (scripts/setup installs it with the dev extras)"
        if in_ci():
            pytest.fail(f"{message}; CI must not skip it")
        pytest.skip(message)
    return path
