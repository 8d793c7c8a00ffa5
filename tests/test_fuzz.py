"""Schemathesis against the OpenAPI spec of every HTTP route: generated requests (valid and
not) never get a 5xx, and every answer matches the schema the spec gives for its status.

The app is served by uvicorn on a loopback port from a thread, with the scripted test engine
(the schema is the point here, not the model); the spec it serves is the one fuzzed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hydra import initialize_config_module
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error, response_schema_conformance
from starlette.types import Receive, Scope, Send

import handlers
from runtime.app import Runtime
from runtime.config import compose
from runtime.config_schema import ModelConfig
from runtime.engines.engine import ModelSpec
from runtime.transports.http import create_app
from tests.conftest import TEST_OVERRIDES
from tests.test_openai_api import ScriptedEngines
from tests.thread_server import ThreadServer

EXAMPLES = 20
CHECKS = [not_a_server_error, response_schema_conformance]


class Lifespan:
    """Starts the Runtime in the server's own event loop (and stops it there)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.app = create_app(runtime)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        await receive()
        await self.runtime.start()
        for model in ("m1", "embedder"):
            config = ModelConfig(id=model, source="x", timeout_s=5)
            self.runtime.models.register(ModelSpec(config, Path("x"), "scripted"))
        await send({"type": "lifespan.startup.complete"})
        await receive()
        await self.runtime.stop()
        await send({"type": "lifespan.shutdown.complete"})


@pytest.fixture(scope="module")
def served_spec(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    data_dir = tmp_path_factory.mktemp("data")
    overrides = [
        # The request log (SQLite) serves /admin/usage; queue (and object_storage) the Files
        # and Batch APIs.
        "integrations=[db,database,queue]",
        f"integrations.database.settings.data_dir={data_dir}",
        f"integrations.object_storage.settings.root={data_dir}/objects",
        "server.max_body_bytes=65536",
    ]
    with initialize_config_module("conf", version_base=None):
        cfg = compose([*TEST_OVERRIDES, *overrides])
    runtime = Runtime(cfg, builtins=[*handlers.builtin_plugins(), ScriptedEngines()])
    server = ThreadServer()
    server.serve(Lifespan(runtime), "tiffin")
    try:
        yield schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    finally:
        server.stop()


@pytest.mark.parametrize("mode", list(GenerationMode), ids=lambda m: m.value)
def test_no_route_answers_5xx_or_off_schema(served_spec: Any, mode: GenerationMode) -> None:
    """Every operation, `EXAMPLES` generated requests each (positive: valid per the schema;
    negative: violating it, which the handlers must refuse with a 4xx)."""
    operations = [result.ok() for result in served_spec.get_all_operations()]
    assert len(operations) >= 15
    if mode is GenerationMode.NEGATIVE:  # only a body can be made to violate its schema
        operations = [op for op in operations if "requestBody" in op.definition.raw]
        assert len(operations) >= 7
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        def fuzz(case: schemathesis.Case) -> None:
            case.call_and_validate(checks=CHECKS, timeout=10)

        fuzz()


def test_the_spec_describes_every_route_of_the_route_table(served_spec: Any) -> None:
    spec = served_spec.raw_schema
    chat = spec["paths"]["/v1/chat/completions"]["post"]
    body = chat["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/openai_requests.ChatCompletionRequest"}
    request = spec["components"]["schemas"]["openai_requests.ChatCompletionRequest"]
    assert {"model", "messages", "temperature", "max_tokens"} <= set(request["properties"])
    assert "default" in chat["responses"]
    get = spec["paths"]["/v1/models/{model}"]["get"]
    assert get["parameters"][0]["name"] == "model"
    with initialize_config_module("conf", version_base=None):
        cfg = compose(TEST_OVERRIDES)
    for name, route in cfg.handlers.routes.items():
        if route.http is None:
            continue
        path = route.http.path.replace(":path}", "}")
        assert route.http.method.lower() in spec["paths"][path], name
