"""IntegrationManager with the scripted test integrations (tests/fakes.py, tests/conf)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

import handlers
from runtime.app import Runtime
from runtime.errors import ConfigError, StartupError
from runtime.events import BusEvent
from runtime.integrations import (
    IntegrationStatus,
    IntegrationUnavailable,
    ModelProvider,
    RequestLogSink,
    get_integration_manager,
)
from tests.conftest import RecordingSleep, eventually
from tests.fakes import Scripted

MakeRuntime = Callable[..., Runtime]


def recorder(runtime: Runtime) -> list[BusEvent]:
    events: list[BusEvent] = []
    runtime.events.subscribe("integration.*", events.append)
    return events


def names(events: list[BusEvent], kind: str) -> list[str]:
    return [e.data["name"] for e in events if e.type == kind]


def scripted(runtime: Runtime, name: str) -> Scripted:
    integration = runtime.integrations.get_integration(name)
    assert isinstance(integration, Scripted)
    return integration


def test_selecting_an_integration_enables_its_dependencies(make_runtime: MakeRuntime) -> None:
    runtime = make_runtime("integrations=dashboards")
    plan = {i["name"]: i for i in runtime.plan()["integrations"]}
    assert set(plan) == {"dashboards", "metrics"}
    assert plan["metrics"]["because"] == "dependency of dashboards"
    assert "because" not in plan["dashboards"]


def test_start_order_is_topological_with_priority_breaking_ties(make_runtime: MakeRuntime) -> None:
    runtime = make_runtime("integrations=[jobs,cache,dashboards,db,metrics]")
    # metrics (5) is ready first; that makes dashboards (1) ready, which beats db (10).
    assert runtime.integrations.order == ["metrics", "dashboards", "db", "cache", "jobs"]


def test_a_dependency_cycle_is_a_config_error(compose_test: Callable[..., object]) -> None:
    with pytest.raises(ConfigError) as raised:
        compose_test("integrations=cache", "integrations.db.dependencies=[cache]")
    assert "cache -> db -> cache" in str(raised.value)
    assert raised.value.key == "integrations.cache.dependencies"


async def test_initialize_is_retried_with_exponential_backoff(
    make_runtime: MakeRuntime, sleep: RecordingSleep
) -> None:
    runtime = make_runtime(
        "integrations=db",
        "+integrations.db.settings.fail_initialize=3",
        "integrations.db.retry_config.max_backoff=3",
    )
    await runtime.start()
    db = scripted(runtime, "db")
    assert db.status is IntegrationStatus.active
    assert db.initialize_calls == 4
    # initial_delay 1, factor 2, capped at max_backoff 3
    assert sleep.backoffs()[:3] == [1, 2, 3]


async def test_a_required_integration_that_keeps_failing_aborts_startup(
    make_runtime: MakeRuntime, sleep: RecordingSleep
) -> None:
    runtime = make_runtime(
        "integrations=db",
        "integrations.db.required=true",
        "+integrations.db.settings.fail_initialize=-1",
    )
    events = recorder(runtime)
    with pytest.raises(StartupError) as raised:
        await runtime.start()
    assert raised.value.name == "db"
    assert "cannot reach upstream (attempt 4)" in raised.value.reason
    assert scripted(runtime, "db").initialize_calls == 4  # max_retries 3 + the first try
    assert names(events, "integration.failed") == ["db"]
    assert not runtime.ready


async def test_a_required_integration_whose_dependency_fails_aborts_startup(
    make_runtime: MakeRuntime,
) -> None:
    runtime = make_runtime(
        "integrations=cache",
        "integrations.cache.required=true",
        "+integrations.db.settings.fail_initialize=-1",
        "integrations.db.retry_config.max_retries=0",
    )
    with pytest.raises(StartupError) as raised:
        await runtime.start()
    assert raised.value.name == "cache"
    assert "db: ConnectionError" in raised.value.reason
    assert scripted(runtime, "cache").initialize_calls == 0


async def test_an_optional_failure_degrades_dependents_and_serving_continues(
    make_runtime: MakeRuntime,
) -> None:
    runtime = make_runtime(
        "integrations=[dashboards,jobs]", "+integrations.metrics.settings.fail_initialize=-1"
    )
    events = recorder(runtime)
    await runtime.start()
    assert runtime.ready  # nothing required is down
    status = {n: i.status for n, i in runtime.integrations.integrations.items()}
    assert status == {
        "metrics": IntegrationStatus.error,
        "dashboards": IntegrationStatus.degraded,
        "jobs": IntegrationStatus.active,
    }
    dashboards = scripted(runtime, "dashboards")
    assert dashboards.initialize_calls == 0
    assert dashboards.last_error == "waiting for metrics"
    assert names(events, "integration.failed") == ["metrics"]
    assert names(events, "integration.started") == ["jobs"]


async def test_a_failed_optional_integration_recovers_in_the_background(
    make_runtime: MakeRuntime, sleep: RecordingSleep
) -> None:
    # 3 attempts at startup (max_retries 2) fail; the background task's 2nd attempt succeeds.
    runtime = make_runtime(
        "integrations=dashboards", "+integrations.metrics.settings.fail_initialize=4"
    )
    events = recorder(runtime)
    await runtime.start()
    metrics, dashboards = scripted(runtime, "metrics"), scripted(runtime, "dashboards")
    assert metrics.status is IntegrationStatus.error
    await eventually(lambda: dashboards.status is IntegrationStatus.active)
    assert metrics.status is IntegrationStatus.active
    assert metrics.initialize_calls == 5
    assert metrics.restarts == 1
    assert names(events, "integration.recovered") == ["metrics"]
    assert names(events, "integration.started") == ["dashboards"]
    # startup retries: 1, 3 (factor 3); background: 1, 3 again, capped at max_backoff 4
    assert sleep.backoffs()[:4] == [1, 3, 1, 3]


async def test_health_checks_mark_errors_degrade_dependents_and_recover(
    make_runtime: MakeRuntime,
) -> None:
    runtime = make_runtime("integrations=dashboards")
    events = recorder(runtime)
    await runtime.start()
    metrics, dashboards = scripted(runtime, "metrics"), scripted(runtime, "dashboards")
    assert (metrics.status, dashboards.status) == (IntegrationStatus.active,) * 2

    metrics.healthy = False
    await eventually(lambda: dashboards.status is IntegrationStatus.degraded)
    assert metrics.status is IntegrationStatus.error
    assert metrics.last_error == "upstream not answering"

    metrics.healthy = True
    await eventually(lambda: dashboards.status is IntegrationStatus.active)
    assert metrics.status is IntegrationStatus.active
    changes = [
        (e.data["name"], e.data["status"]) for e in events if e.type == "integration.health_changed"
    ]
    assert ("metrics", "error") in changes
    assert ("dashboards", "degraded") in changes
    assert changes.index(("metrics", "error")) < changes.index(("dashboards", "degraded"))
    assert names(events, "integration.recovered") == ["metrics"]


async def test_a_required_integration_failing_its_health_check_makes_the_runtime_unready(
    make_runtime: MakeRuntime,
) -> None:
    runtime = make_runtime("integrations=db", "integrations.db.required=true")
    await runtime.start()
    assert runtime.ready
    scripted(runtime, "db").healthy = False
    await eventually(lambda: not runtime.ready)
    scripted(runtime, "db").healthy = True
    await eventually(lambda: runtime.ready)


async def test_stop_shuts_down_in_reverse_start_order(make_runtime: MakeRuntime) -> None:
    runtime = make_runtime("integrations=[jobs,cache,dashboards]")
    events = recorder(runtime)
    await runtime.start()
    started = names(events, "integration.started")
    assert started == runtime.integrations.order
    await runtime.stop()
    assert names(events, "integration.stopped") == list(reversed(started))
    assert all(scripted(runtime, n).shutdown_calls == 1 for n in started)
    assert all(
        i.status is IntegrationStatus.stopped for i in runtime.integrations.integrations.values()
    )


async def test_the_platform_guide_calls(make_runtime: MakeRuntime) -> None:
    runtime = make_runtime("integrations=db")
    await runtime.start()
    manager = await get_integration_manager()
    assert manager is runtime.integrations
    assert manager.get_integration("db").name == "db"
    with pytest.raises(KeyError, match="no integration named 'ollama'; configured: db"):
        manager.get_integration("ollama")


async def test_integrations_are_found_by_type(make_runtime: MakeRuntime) -> None:
    runtime = make_runtime("integrations=[db,cache]")
    manager = runtime.integrations
    everyone = [(name, manager.get_integration(name)) for name in manager.order]
    assert manager.providing(Scripted) == everyone
    assert manager.providing(ModelProvider) == manager.providing(RequestLogSink) == []
    # Before start: there, but not running (unless the caller does not mind).
    with pytest.raises(IntegrationUnavailable) as raised:
        manager.require("db", Scripted)
    assert str(raised.value) == "the db integration is not running (inactive)"
    assert (raised.value.name, raised.value.state) == ("db", "not running (inactive)")
    assert manager.require("db", Scripted, running=False) is scripted(runtime, "db")
    await runtime.start()
    assert manager.require("db", Scripted) is scripted(runtime, "db")
    with pytest.raises(IntegrationUnavailable, match=r"^the ollama integration is not enabled$"):
        manager.require("ollama", Scripted)
    with pytest.raises(
        IntegrationUnavailable, match=r"is not a ModelProvider \(it is a Scripted\)"
    ):
        manager.require("db", ModelProvider)
    await runtime.stop()
    with pytest.raises(IntegrationUnavailable, match=r"not running \(stopped\)"):
        manager.require("db", Scripted)


@pytest.mark.parametrize(
    ("integration", "target"),
    [("rogue", "tests.fakes.NotAnIntegration"), ("outside", "subprocess.Popen")],
)
def test_the_registry_refuses_targets_that_are_not_allowed(
    make_runtime: MakeRuntime, integration: str, target: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        make_runtime(f"integrations={integration}")
    assert raised.value.key == f"integrations.{integration}._target_"
    assert raised.value.value == target


def test_a_plugin_class_is_refused_unless_the_plugin_registered_it(
    compose_test: Callable[..., object],
) -> None:
    cfg = compose_test("integrations=db", "plugins=[]")
    with pytest.raises(ConfigError, match=r"tests\.fakes\.Scripted"):
        Runtime(cfg, builtins=handlers.builtin_plugins())  # type: ignore[arg-type]
