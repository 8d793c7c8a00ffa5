"""scripts/bench_embeddings.py at tiny settings: sentence-transformers called directly and Tiffin's
/v1/embeddings each answer waves of 1 and 2 requests, and the JSON line has the shape the
figures in docs/models.md come from. Behaviour only; the figures themselves are the benchmark's."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import PYTHON, ROOT, cli_env

pytestmark = pytest.mark.slow

SYSTEMS = ["direct", "tiffin"]


def test_direct_and_served_embeddings_answer_at_every_concurrency() -> None:
    command = [PYTHON, str(ROOT / "scripts" / "bench_embeddings.py"), "--json"]
    command += ["--concurrency", "1,2", "--sentences", "4", "--repeats", "1", "--waves", "1"]
    done = subprocess.run(
        command, cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout[-2000:]  # --json: the line alone
    report = json.loads(lines[0])

    assert report["settings"]["concurrency"] == [1, 2]
    assert report["settings"]["sentences"] == 4
    assert report["endpoint"] == "/v1/embeddings"
    threads = report["torch_threads"]
    assert threads["direct"] == threads["tiffin"] >= 1  # the direct call matches the engine
    cells = {(row["system"], row["concurrency"]): row for row in report["results"]}
    assert set(cells) == {(system, size) for system in SYSTEMS for size in (1, 2)}
    for (system, size), row in cells.items():
        assert row["repeats"] == 1 and row["requests"] == size, (system, row)
        assert row["sentences_per_s"] > 0, (system, row)
        assert 0 < row["latency_p50_ms"] <= row["latency_p95_ms"], (system, row)
        assert row["vs_direct"] > 0 and row["vs_direct_one_request"] > 0, (system, row)
    # Every served request's texts reached the engine, in no more batches than requests.
    for size in (1, 2):
        served = cells[("tiffin", size)]
        assert served["engine_texts"] == size * 4
        assert 1 <= served["engine_batches"] <= size
    for size in ("1", "2"):
        ratios = report["ratios"][size]
        assert ratios["tiffin_vs_direct"] > 0 and ratios["tiffin_vs_direct_one_request"] > 0
    for when in ("at_start", "at_end", "max"):
        assert report[f"load_avg_1m_{when}"] >= 0
