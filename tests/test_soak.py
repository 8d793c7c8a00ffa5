"""scripts/soak.py in its CI mode (`--short`): a served `python -m runtime` with the packaged
model and the database integration, streaming clients on every transport (some disconnecting,
some refused by a small queue), then the request log read back row by row. The script's own
exit code says whether the targets held; this checks that and the report's shape."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import PYTHON, ROOT, cli_env

pytestmark = pytest.mark.slow

TRANSPORTS = ["http", "grpc", "ws", "graphql"]


def test_the_short_soak_meets_its_targets() -> None:
    done = subprocess.run(
        [PYTHON, str(ROOT / "scripts" / "soak.py"), "--short", "--json"],
        cwd=ROOT,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.stdout.strip(), done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    failed = {name: v for name, v in report["verdicts"].items() if v["enforced"] and not v["ok"]}
    assert done.returncode == 0, (failed, report["errors"], done.stderr[-2000:])
    assert report["ok"] is True and not failed
    total = report["total"]
    assert total["served"] > 0
    assert total["failed"] == total["unanswered"] == 0
    # Every outcome is one of the five kinds, and every transport was exercised.
    kinds = ("served", "disconnected", "refused", "failed", "unanswered")
    assert sum(total[kind] for kind in kinds) == total["requests"]
    assert list(report["by_transport"]) == TRANSPORTS
    assert all(row["requests"] > 0 for row in report["by_transport"].values())
    assert set(report["statuses"]) <= {"200", "429", "503", "disconnected"}
    # Every answered request has its row in the request log, with its own transport.
    log = report["request_log"]
    assert log["lost_rows"] == 0 and log["wrong_transport"] == 0 and log["unknown_rows"] == 0
    assert log["expected"] == total["requests"] and log["rows"] == total["requests"]
    # Short mode measures RSS but leaves the growth target to the long run.
    rss = report["rss"]
    assert rss["end_mb"] > 100 and len(rss["series_mb"]) > 3
    assert report["verdicts"]["rss_growth_under_10pct"]["enforced"] is False
    assert report["server_exit_code"] == 0
