"""scripts/fuzz.py, short: every named adversarial case of issue 14 (schema bombs, lone
surrogates, bad Ollama options, non-object GraphQL bodies, a 1 MB model name...) on each
transport that carries it, plus a few random mutations, against a served `python -m runtime`
in env=prod. No input may crash a process, hang, or answer a server error."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import PYTHON, ROOT, cli_env

pytestmark = pytest.mark.slow


def test_the_fuzz_script_finds_no_crash_no_hang_and_no_5xx() -> None:
    done = subprocess.run(
        [PYTHON, str(ROOT / "scripts" / "fuzz.py"), "--count", "30", "--json"],
        cwd=ROOT,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.stdout.strip(), done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["failures"] == [], report["failures"]
    assert report["5xx"] == report["hangs"] == report["crashes"] == 0
    assert report["server_starts"] == 1 and done.returncode == 0
    # Every transport was exercised, and the bad inputs were refused, not served.
    assert set(report["by_transport"]) == {"http", "ws", "grpc"}
    assert report["4xx"] > report["ok"] > 0
