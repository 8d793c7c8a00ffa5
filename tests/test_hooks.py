"""Every hookspec is documented and called; plugins load from config and entry points."""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import hooks
from hooks import hookimpl, make_plugin_manager, resolve, specs
from runtime.app import Runtime
from runtime.events import BusEvent
from runtime.integrations import BaseIntegration, Health
from runtime.types import Event, Reply
from tests.conftest import eventually

ROOT = Path(__file__).resolve().parent.parent
MakeRuntime = Callable[..., Runtime]
HOOK_NAMES = sorted(
    name
    for name, fn in vars(specs).items()
    if inspect.isfunction(fn) and hasattr(fn, "tiffin_spec")
)


def test_the_expected_hooks_exist() -> None:
    assert (
        sorted(
            [
                "register_integrations",
                "register_engines",
                "register_handlers",
                "runtime_started",
                "runtime_stopping",
                "request_started",
                "authenticate",
                "before_request",
                "request_finished",
                "before_generate",
                "after_health_check",
                "after_generate",
                "on_event",
                "estimate_cost",
            ]
        )
        == HOOK_NAMES
    )


@pytest.mark.parametrize("name", HOOK_NAMES)
def test_every_hookspec_is_documented(name: str) -> None:
    fn = getattr(specs, name)
    doc = inspect.getdoc(fn) or ""
    assert doc.startswith("Called"), f"{name}: say when it is called"
    assert "Return" in doc or "return" in doc, f"{name}: say what it returns"
    if fn.tiffin_spec.get("firstresult"):
        assert "First result wins" in doc
    parameters = ", ".join(inspect.signature(fn).parameters)
    assert f"`{name}({parameters})`" in (ROOT / "docs/plugins.md").read_text()


class Recorder:
    """A plugin implementing every hook, recording the calls; some answers are awaitables."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    @hookimpl
    def register_integrations(self, register: Callable[..., None]) -> None:
        self.calls.append("register_integrations")
        register(Echo, alias="echo")

    @hookimpl
    def register_engines(self, register: Callable[..., None]) -> None:
        self.calls.append("register_engines")
        register("echo-engine", lambda model: model)

    @hookimpl
    def register_handlers(self, register: Callable[..., None]) -> None:
        self.calls.append("register_handlers")

        async def custom_status(event: Event, ctx: Any) -> dict[str, str]:
            return {"replaced": "by plugin"}

        register("integrations.status", custom_status)

    @hookimpl
    async def runtime_started(self, runtime: Runtime) -> None:
        self.calls.append("runtime_started")

    @hookimpl
    def runtime_stopping(self, runtime: Runtime) -> None:
        self.calls.append("runtime_stopping")

    @hookimpl
    async def before_request(self, event: Event, ctx: Any) -> Reply | None:
        self.calls.append("before_request")
        return Reply({"teapot": True}, status=418) if event.headers.get("x-teapot") else None

    @hookimpl
    def request_started(self, event: Event, ctx: Any) -> None:
        self.calls.append("request_started")

    @hookimpl
    async def authenticate(self, event: Event, ctx: Any) -> None:
        self.calls.append("authenticate")

    @hookimpl
    async def request_finished(
        self, event: Event, ctx: Any, status: int, seconds: float, error: Any
    ) -> None:
        self.calls.append(f"request_finished:{event.route}:{status}")

    @hookimpl
    def after_health_check(self, name: str, health: Health) -> None:
        self.calls.append(f"after_health_check:{name}")

    @hookimpl
    async def before_generate(self, request: dict[str, Any], ctx: Any) -> dict[str, Any]:
        self.calls.append("before_generate")
        return {**request, "max_tokens": 8}

    @hookimpl
    def after_generate(self, request: Any, response: Any, ctx: Any) -> None:
        self.calls.append("after_generate")

    @hookimpl
    def on_event(self, event: BusEvent) -> None:
        self.calls.append(f"on_event:{event.type}")

    @hookimpl
    def estimate_cost(
        self, model: str, prompt_tokens: int, completion_tokens: int, prices: Any
    ) -> float | None:
        self.calls.append("estimate_cost")
        return 42.0 if model == "priced-by-plugin" else None


class Echo(BaseIntegration):
    async def initialize(self) -> None:
        return None

    async def health_check(self) -> Health:
        return Health(True, "echo")


async def test_every_hook_is_called(make_runtime: MakeRuntime) -> None:
    plugin = Recorder()
    runtime = make_runtime("integrations=db", builtins=[plugin])
    assert plugin.calls[:3] == ["register_integrations", "register_handlers", "register_engines"]
    assert runtime.registry.resolve("echo") is Echo
    assert "echo-engine" in runtime.engine_factories
    assert await runtime.handlers["integrations.status"](Event(), None) == {"replaced": "by plugin"}

    await runtime.start()
    assert "runtime_started" in plugin.calls
    await eventually(lambda: "on_event:integration.started" in plugin.calls)

    teapot = await runtime.dispatcher.dispatch(
        "integrations_health", Event(headers={"x-teapot": "1"})
    )
    assert isinstance(teapot, Reply) and teapot.status == 418
    passed = await runtime.dispatcher.dispatch("integrations_health", Event())
    assert isinstance(passed, Reply) and passed.status == 200
    assert plugin.calls.count("before_request") == 2
    assert plugin.calls.count("request_started") == 2
    assert plugin.calls.count("authenticate") == 2
    assert "request_finished:integrations_health:418" in plugin.calls
    assert "request_finished:integrations_health:200" in plugin.calls
    assert "after_health_check:db" in plugin.calls

    ctx = runtime.dispatcher.context(Event())
    request = {"model": "m", "max_tokens": 100}
    assert await runtime.call_first("before_generate", request=request, ctx=ctx) == {
        "model": "m",
        "max_tokens": 8,
    }
    await hooks.resolve_all(
        runtime.plugins.hook.after_generate(request=request, response={"text": "hi"}, ctx=ctx)
    )
    assert "after_generate" in plugin.calls
    cost = await runtime.call_first(
        "estimate_cost", model="priced-by-plugin", prompt_tokens=1, completion_tokens=1, prices=None
    )
    assert cost == 42.0

    await runtime.stop()
    assert "runtime_stopping" in plugin.calls


async def test_the_builtin_cost_plugin_prices_from_config_and_yields_to_plugins(
    make_runtime: MakeRuntime,
) -> None:
    runtime = make_runtime(builtins=[Recorder()])
    prices = {"prompt_per_1k": 0.5, "completion_per_1k": 1.5}
    cost = await runtime.call_first(
        "estimate_cost", model="m", prompt_tokens=2000, completion_tokens=1000, prices=prices
    )
    assert cost == pytest.approx(2.5)
    assert (
        await runtime.call_first(
            "estimate_cost",
            model="priced-by-plugin",
            prompt_tokens=1,
            completion_tokens=1,
            prices=prices,
        )
        == 42.0
    )


async def test_resolve_accepts_values_and_awaitables() -> None:
    async def later() -> int:
        return 2

    assert await resolve(1) == 1
    assert await resolve(later()) == 2


def test_plugins_load_from_the_config(make_runtime: MakeRuntime) -> None:
    runtime = make_runtime("integrations=dashboards")  # _target_: scripted, via tests.fakes
    assert runtime.plugins.get_plugin("tests.fakes") is not None


def test_a_missing_plugin_module_is_a_config_error(make_runtime: MakeRuntime) -> None:
    from runtime.errors import ConfigError

    with pytest.raises(ConfigError, match=r"plugins: got 'no_such\.plugin'"):
        make_runtime("plugins=[no_such.plugin]")


def test_plugins_load_from_the_tiffin_entry_point_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "entry_plugin_for_test.py").write_text(
        "from hooks import hookimpl\n"
        "@hookimpl\n"
        "def register_engines(register):\n"
        "    register('from-entry-point', object)\n"
    )
    dist = tmp_path / "entry_plugin_for_test-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: entry-plugin-for-test\nVersion: 0.1\n"
    )
    (dist / "entry_points.txt").write_text("[tiffin]\nsample = entry_plugin_for_test\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        found: dict[str, object] = {}
        pm = make_plugin_manager(load_entrypoints=True)
        pm.hook.register_engines(register=found.setdefault)
        assert "from-entry-point" in found
        found.clear()
        make_plugin_manager(load_entrypoints=False).hook.register_engines(register=found.setdefault)
        assert found == {}
    finally:
        sys.modules.pop("entry_plugin_for_test", None)
