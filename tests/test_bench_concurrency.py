"""scripts/bench_concurrency.py at tiny settings: Tiffin, llama-cpp-python's server and the
direct batched decode each answer waves of 1 and 2 streams, and the JSON line has the shape the
figures in docs/models.md come from. Behaviour only; the figures themselves are the benchmark's."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import PYTHON, ROOT, cli_env

pytestmark = pytest.mark.slow

SYSTEMS = ["tiffin", "server", "direct"]


def test_every_system_streams_tokens_at_every_concurrency() -> None:
    command = [PYTHON, str(ROOT / "scripts" / "bench_concurrency.py"), "--json"]
    command += ["--concurrency", "1,2", "--max-tokens", "8", "--repeats", "1"]
    done = subprocess.run(
        command, cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout[-2000:]  # --json: the line alone
    report = json.loads(lines[0])

    assert report["settings"]["concurrency"] == [1, 2]
    assert report["settings"]["endpoint"] == "/v1/completions"
    cells = {(row["system"], row["concurrency"]): row for row in report["results"]}
    assert set(cells) == {(system, size) for system in SYSTEMS for size in (1, 2)}
    for (system, size), row in cells.items():
        assert row["busy"] is False and row["waves"] == 1
        assert row["requests"] == size, (system, row)
        # Every request streamed tokens, none past max_tokens; direct ignores EOS.
        assert 0 < row["tokens_per_request"] <= 8, (system, row)
        assert row["agg_tok_s"] > 0 and row["ttft_p50_ms"] > 0, (system, row)
        assert row["ttft_p50_ms"] <= row["ttft_p95_ms"]
        assert row["itl_p50_ms"] is not None and row["itl_p50_ms"] <= row["itl_p95_ms"]
    assert cells[("direct", 2)]["tokens"] == 16

    for size in ("1", "2"):
        ratios = report["ratios"][size]
        assert ratios["tiffin_vs_direct"] > 0 and ratios["tiffin_vs_server"] > 0
    for system in SYSTEMS:
        load = report["load_avg_1m"][system]
        assert {"start", "end", "max"} <= set(load) and load["max"] >= 0
    assert report["busy"] == {}
