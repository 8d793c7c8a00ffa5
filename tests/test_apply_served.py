"""Live reconfiguration of a served `python -m runtime`: `python -m runtime apply` and
`plan --diff` against it, and SIGHUP after its config file changed, while streams run on all
four transports (the soak test's clients): an upstream added and removed, a key added and
revoked, the model's threads changed, the log level, tracing; a refused and a failing apply.
Nothing the clients send fails or is cut short."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from websockets.sync.client import connect

from scripts.soak_clients import TRANSPORTS, BackToBack, Target
from tests.conftest import PYTHON, ROOT, cli_env, free_port
from tests.fake_openai import FakeOpenAI
from tests.served import Served

pytestmark = pytest.mark.slow

KEY = "k-ops"
OPS = f"{{name:ops,key:{KEY},scopes:[admin,inference]}}"
GEMMA = "integrations.custom_models.settings.models.0"


def cli(*words: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "runtime", *words],
        cwd=ROOT,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def chat_status(url: str, model: str) -> int:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    headers = {"authorization": f"Bearer {KEY}"}
    return httpx.post(url + "/v1/chat/completions", json=body, headers=headers).status_code


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    server = FakeOpenAI(models=("alpha",))
    server.start()
    yield server
    server.stop()


def test_applies_and_sighup_under_load_on_every_transport(
    tmp_path: Path, upstream: FakeOpenAI
) -> None:
    grpc_port = free_port()
    mine = ["transports.grpc=true", f"server.grpc_port={grpc_port}", f"auth.keys=[{OPS}]"]
    served = Served.start_default_models(tmp_path, *mine)
    opened = contextlib.ExitStack()
    try:
        served.wait_for("/readyz", 200, timeout=180)
        port = served.url.rsplit(":", 1)[1]
        # What the served process composed, to which each apply adds its change.
        base = [
            f"server.http_port={port}",
            f"server.run_dir={tmp_path / 'runs'}",
            "logging.level=INFO",
            "env=test",
            f"integrations.custom_models.settings.cache_dir={tmp_path / 'models'}",
            f"integrations.custom_models.settings.models_dir={tmp_path / 'none'}",
            *mine,
        ]
        to = ["--to", served.url, "--key", KEY]
        events = opened.enter_context(
            connect(
                served.url.replace("http://", "ws://") + "/ws/models",
                additional_headers={"authorization": f"Bearer {KEY}"},
            )
        )
        target = Target(served.url, f"127.0.0.1:{grpc_port}", "gemma-3-270m", 24, 120, KEY)
        load = BackToBack(target)
        load.start()
        time.sleep(2)

        # An upstream and a key added, and the model's threads changed: it loads again beside
        # the old one.
        two = f"auth.keys=[{OPS},{{name:app,key:k-app}}]"
        up = [
            "+integrations=openai_compatible",
            f"integrations.openai_compatible.settings.base_url={upstream.url}/v1",
            "integrations.openai_compatible.settings.model_prefix=up/",
        ]
        threads = f"+{GEMMA}.engine_settings.n_threads=1"
        done = cli("apply", *to, *base, *up, two, threads)
        assert done.returncode == 0, done.stderr
        assert "add      integration openai_compatible" in done.stdout
        assert "reload   model gemma-3-270m (engine_settings.n_threads)" in done.stdout
        assert "update   auth auth (keys[app])" in done.stdout
        app = {"authorization": "Bearer k-app"}
        assert httpx.get(served.url + "/v1/models", headers=app).status_code == 200
        assert chat_status(served.url, "up/alpha") == 200

        # The plan of a change that needs a restart; its apply is refused as a whole.
        planned = cli("plan", "--diff", *to, *base, two, "server.workers=2")
        assert planned.returncode == 0, planned.stderr
        assert "server.workers" in planned.stdout and "needs a restart" in planned.stdout
        refused = cli("apply", *to, *base, two, "server.workers=2", "limits.max_tokens=5")
        assert refused.returncode == 1 and "server.workers" in refused.stderr

        # The model's file moved to one that does not exist: nothing changes.
        ghost = f"{GEMMA}.source=ghost.gguf"
        failed = cli("apply", *to, *base, two, ghost, "limits.max_tokens=5")
        assert failed.returncode == 1 and "nothing changed" in failed.stderr, failed.stderr

        # The upstream removed, the log level changed, tracing turned on.
        later = ["logging.level=ERROR", "telemetry.tracing=true"]
        done = cli("apply", *to, *base, two, threads, *later)
        assert done.returncode == 0, done.stderr
        assert "remove   integration openai_compatible" in done.stdout
        assert "update   telemetry telemetry.tracing" in done.stdout
        assert chat_status(served.url, "up/alpha") == 404

        # SIGHUP reads the run directory's config.yaml again: the app key revoked there.
        config_file = next((tmp_path / "runs").glob("*/config.yaml"))
        config = yaml.safe_load(config_file.read_text())
        config["limits"]["max_tokens"] = 77
        config_file.write_text(yaml.safe_dump(config))
        served.process.send_signal(signal.SIGHUP)
        admin = {"authorization": f"Bearer {KEY}"}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            shown = httpx.get(served.url + "/admin/config", headers=admin).json()
            if shown["config"]["limits"]["max_tokens"] == 77:
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"SIGHUP not applied: {served.log.read_text()[-2000:]}")
        assert httpx.get(served.url + "/v1/models", headers=app).status_code == 401

        time.sleep(2)
        load.stopping.set()
        load.join(timeout=180)
        kinds = Counter((o.transport, o.kind) for o in load.outcomes)
        bad = [o for o in load.outcomes if o.kind != "served"]
        assert not bad, (kinds, [(o.transport, o.kind, o.detail) for o in bad[:5]])
        assert all(kinds[(t, "served")] >= 2 for t in TRANSPORTS), kinds

        seen = []
        while True:
            try:
                seen.append(json.loads(events.recv(timeout=1)).get("type"))
            except TimeoutError:
                break
        assert seen.count("config.applied") == 3 and seen.count("config.rejected") == 2, seen
        metrics = httpx.get(served.url + "/metrics").text
        assert 'llm_config_applies_total{result="applied"} 3.0' in metrics
    finally:
        opened.close()
        assert served.stop() == 0
