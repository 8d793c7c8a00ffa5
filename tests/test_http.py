"""The HTTP transport in-process (httpx ASGITransport): integration endpoints and JSON errors."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from hooks import hookimpl
from runtime.app import Runtime
from runtime.config_schema import ModelConfig
from runtime.engines.engine import ModelSpec
from runtime.transports.http import create_app, encode
from runtime.types import Event, Reply
from tests.conftest import eventually
from tests.fakes import Scripted

MakeRuntime = Callable[..., Runtime]


async def client_for(runtime: Runtime) -> httpx.AsyncClient:
    await runtime.start()
    transport = httpx.ASGITransport(app=create_app(runtime), raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://tiffin.test")


@pytest.fixture
async def client(make_runtime: MakeRuntime) -> AsyncIterator[httpx.AsyncClient]:
    runtime = make_runtime("integrations=[dashboards,db]", "integrations.db.required=true")
    async with await client_for(runtime) as http:
        yield http


def assert_openai_error(response: httpx.Response, status: int, type_: str) -> dict[str, Any]:
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == type_
    return dict(error)


async def test_status_lists_every_integration_with_secrets_masked(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/integrations/status")
    assert response.status_code == 200
    body = response.json()
    assert body["ready"] is True
    assert body["warnings"] == []
    assert set(body["integrations"]) == {"metrics", "dashboards", "db"}
    dashboards = body["integrations"]["dashboards"]
    assert dashboards["status"] == "active"
    assert dashboards["dependencies"] == ["metrics"]
    assert body["integrations"]["metrics"]["because"] == "dependency of dashboards"
    assert dashboards["settings"] == {
        "url": "http://admin:***@127.0.0.1:9/grafana",
        "api_key": "***",
    }
    assert "hunter2" not in response.text and "sk-dashboards-secret" not in response.text


async def test_status_shows_the_slots_of_each_batching_model(make_runtime: MakeRuntime) -> None:
    from tests.scripted_engine import batching
    from tests.test_openai_api import ScriptedEngines  # here: that module imports this one

    engines = ScriptedEngines()
    runtime = make_runtime(builtins=[engines])
    for model_id in ("m1", "m2", "m3"):
        config = ModelConfig(id=model_id, source="x")
        runtime.models.register(ModelSpec(config, Path("x"), "scripted", provider="local"))
    async with await client_for(runtime) as http:
        assert (await http.get("/integrations/status")).json()["models"] == {}
        for model_id in ("m1", "m2"):
            await runtime.models.load(model_id)
        engines.built["m1"].extra_stats = batching(slots_busy=1, slots_free=7, running=1)
        body = (await http.get("/integrations/status")).json()
    assert body["models"] == {  # m2 does not batch, m3 is not loaded
        "m1": {
            "provider": "local",
            "state": "loaded",
            "slots_busy": 1,
            "slots_free": 7,
            "running": 1,
            "waiting": 2,
        }
    }


async def test_one_integration_status_and_404_for_unknown(client: httpx.AsyncClient) -> None:
    response = await client.get("/integrations/db/status")
    assert response.status_code == 200
    assert response.json()["name"] == "db"
    assert response.json()["health"]["healthy"] is True
    error = assert_openai_error(
        await client.get("/integrations/ollama/status"), 404, "not_found_error"
    )
    assert error["code"] == "integration_not_found"
    assert "ollama" in error["message"]


async def test_health_is_503_when_a_required_integration_is_down(make_runtime: MakeRuntime) -> None:
    runtime = make_runtime("integrations=[dashboards,db]", "integrations.db.required=true")
    async with await client_for(runtime) as http:
        healthy = await http.get("/integrations/health")
        assert healthy.status_code == 200
        assert healthy.json()["status"] == "healthy"

        metrics = runtime.integrations.get_integration("metrics")
        assert isinstance(metrics, Scripted)
        metrics.healthy = False  # optional: degraded, still 200
        await eventually(
            lambda: runtime.integrations.get_integration("dashboards").status.value == "degraded"
        )
        degraded = await http.get("/integrations/health")
        assert degraded.status_code == 200
        assert degraded.json()["status"] == "degraded"
        assert degraded.json()["integrations"]["metrics"]["detail"] == "upstream not answering"

        db = runtime.integrations.get_integration("db")
        assert isinstance(db, Scripted)
        db.healthy = False  # required: unhealthy, 503
        await eventually(lambda: not runtime.ready)
        unhealthy = await http.get("/integrations/health")
        assert unhealthy.status_code == 503
        assert unhealthy.json()["status"] == "unhealthy"
        assert unhealthy.json()["integrations"]["db"] == {
            "status": "error",
            "required": True,
            "healthy": False,
            "detail": "upstream not answering",
            "checked_at": unhealthy.json()["integrations"]["db"]["checked_at"],
        }


async def test_unknown_paths_and_methods_answer_in_json(client: httpx.AsyncClient) -> None:
    error = assert_openai_error(await client.get("/nowhere"), 404, "not_found_error")
    assert error["message"] == "no route for GET /nowhere"
    response = await client.post("/integrations/status", json={})
    assert_openai_error(response, 405, "invalid_request_error")
    assert response.headers["allow"] == "GET"


async def test_request_ids_are_echoed_or_made(client: httpx.AsyncClient) -> None:
    given = await client.get("/integrations/status", headers={"x-request-id": "abc-123"})
    assert given.headers["x-request-id"] == "abc-123"
    unsafe = await client.get("/integrations/status", headers={"x-request-id": "a b\x01"})
    assert unsafe.headers["x-request-id"] != "a b\x01"
    assert len(unsafe.headers["x-request-id"]) == 32


async def test_bodies_over_the_limit_get_413(make_runtime: MakeRuntime) -> None:
    runtime = make_runtime(
        "server.max_body_bytes=100", "handlers.routes.integrations_status.http.method=POST"
    )
    async with await client_for(runtime) as http:
        response = await http.post("/integrations/status", content=b"x" * 101)
        error = assert_openai_error(response, 413, "invalid_request_error")
        assert error["code"] == "request_too_large"

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(5):
                yield b"y" * 40

        streamed = await http.post("/integrations/status", content=chunks())
        assert_openai_error(streamed, 413, "invalid_request_error")


class Failing:
    """Plugin whose handler raises an unexpected error that mentions a secret."""

    @hookimpl
    def register_handlers(self, register: Callable[..., None]) -> None:
        async def boom(event: Event, ctx: Any) -> None:
            raise RuntimeError("database password=hunter2 rejected")

        register("integrations.status", boom)


async def test_an_unexpected_error_is_a_json_500_that_leaks_nothing(
    make_runtime: MakeRuntime,
) -> None:
    runtime = make_runtime(builtins=[Failing()])
    async with await client_for(runtime) as http:
        response = await http.get("/integrations/status", headers={"x-request-id": "req-1"})
        error = assert_openai_error(response, 500, "server_error")
        assert error["message"] == "internal server error (request id req-1)"
        assert "hunter2" not in response.text


async def test_invalid_json_is_a_400(make_runtime: MakeRuntime) -> None:
    class EchoBody:
        @hookimpl
        def register_handlers(self, register: Callable[..., None]) -> None:
            async def echo(event: Event, ctx: Any) -> Any:
                return {"body": event.body}

            register("integrations.status", echo)

    runtime = make_runtime(
        "handlers.routes.integrations_status.http.method=POST", builtins=[EchoBody()]
    )
    async with await client_for(runtime) as http:
        ok = await http.post("/integrations/status", json={"a": 1})
        assert ok.json() == {"body": {"a": 1}}
        bad = await http.post(
            "/integrations/status",
            content=b"{not json",
            headers={"content-type": "application/json"},
        )
        error = assert_openai_error(bad, 400, "invalid_request_error")
        assert error["code"] == "invalid_json"


async def test_openai_api_enabled_false_turns_the_v1_routes_off(make_runtime: MakeRuntime) -> None:
    runtime = make_runtime("transports.openai_api=false")
    async with await client_for(runtime) as http:
        assert_openai_error(await http.get("/v1/models"), 404, "not_found_error")
        assert (await http.get("/integrations/status")).status_code == 200


def test_json_answers_carry_the_stdlibs_values_and_fall_back_for_what_orjson_refuses() -> None:
    body = {
        "floats": [1e-05, 0.1, -0.0, 1e16, 1 / 3, 0.012345678918063641],
        "text": "naïve ☃ \u2028",
        "nested": {"a": [None, True, 7]},
    }
    answer = encode(Reply(body, status=201, headers={"x-tiffin-cost": "0.1"}))
    assert answer.status_code == 201
    assert answer.headers["content-type"] == "application/json"
    assert answer.headers["x-tiffin-cost"] == "0.1"
    assert json.loads(bytes(answer.body)) == body
    # orjson takes only string keys and 64-bit integers: the stdlib renders these as before.
    odd = {1: "an integer key", "big": 2**70}
    assert json.loads(bytes(encode(odd).body)) == {"1": "an integer key", "big": 2**70}
    with pytest.raises(TypeError):
        encode({"not JSON": object(), 1: "forces the stdlib"})
