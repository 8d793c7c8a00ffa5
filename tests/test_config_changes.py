"""The change plan between two composed configs (runtime/config_changes.py): what an apply would
do, in which order, and what only a restart changes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from omegaconf import DictConfig

from runtime.config_changes import changed_keys, plan_changes
from runtime.reconfigure import resolved

Compose = Callable[..., DictConfig]
SCRIPTED = ["integrations=[db,cache,jobs]"]
GEMMA = "integrations.custom_models.settings.models.0"


def plan(compose_test: Compose, old: list[str], new: list[str]) -> list[dict[str, Any]]:
    changes = plan_changes(resolved(compose_test(*old)), resolved(compose_test(*new)))
    return [change.to_dict() for change in changes.changes]


def test_changed_keys_are_dotted_paths_and_lists_compare_whole() -> None:
    old = {"a": {"b": 1, "c": [1, 2]}, "d": 1}
    new = {"a": {"b": 2, "c": [1, 2, 3]}, "e": 1}
    assert changed_keys(old, new) == ["a.b", "a.c", "d", "e"]
    assert changed_keys(old, old) == []


def test_the_same_config_plans_nothing(compose_test: Compose) -> None:
    changes = plan_changes(resolved(compose_test(*SCRIPTED)), resolved(compose_test(*SCRIPTED)))
    assert changes.empty
    assert changes.describe() == "no changes"


def test_a_restarted_integration_takes_its_dependents_in_start_order(
    compose_test: Compose,
) -> None:
    changed = [*SCRIPTED, "+integrations.db.settings.url=postgres://elsewhere"]
    assert plan(compose_test, SCRIPTED, changed) == [
        {"kind": "integration", "name": "db", "action": "restart", "keys": ["settings.url"]},
        {"kind": "integration", "name": "cache", "action": "restart", "because": "depends on db"},
    ]


def test_integrations_removed_dependents_first_and_added_in_start_order(
    compose_test: Compose,
) -> None:
    assert plan(compose_test, SCRIPTED, ["integrations=[jobs]"]) == [
        {"kind": "integration", "name": "cache", "action": "remove"},
        {"kind": "integration", "name": "db", "action": "remove"},
    ]
    assert plan(compose_test, ["integrations=[jobs]"], SCRIPTED) == [
        {"kind": "integration", "name": "db", "action": "add"},
        {"kind": "integration", "name": "cache", "action": "add"},
    ]
    disabled = [*SCRIPTED, "integrations.jobs.enabled=false"]
    assert plan(compose_test, SCRIPTED, disabled) == [
        {"kind": "integration", "name": "jobs", "action": "remove"}
    ]


@pytest.mark.parametrize(
    ("override", "action", "keys"),
    [
        (f"{GEMMA}.engine_settings.parallel=2", "reload", ["engine_settings.parallel"]),
        (f"{GEMMA}.context_length=2048", "reload", ["context_length"]),
        (f"{GEMMA}.max_queue=3", "update", ["max_queue"]),
        (f"{GEMMA}.defaults.temperature=0.5", "update", ["defaults.temperature"]),
        (f"+{GEMMA}.prices={{prompt:1.0}}", "update", ["prices"]),
    ],
)
def test_a_local_models_change_reloads_it_only_for_its_weights_and_engine(
    compose_test: Compose, override: str, action: str, keys: list[str]
) -> None:
    base = ["integrations=[custom_models]"]
    assert plan(compose_test, base, [*base, override]) == [
        {
            "kind": "model",
            "name": "gemma-3-270m",
            "action": action,
            "keys": keys,
            "within": "custom_models",
        }
    ]


def test_local_models_added_and_removed(compose_test: Compose) -> None:
    base = ["integrations=[custom_models]"]
    one = "integrations.custom_models.settings.models=[{id:a,source:a.gguf}]"
    two = "integrations.custom_models.settings.models=[{id:b,source:b.gguf}]"
    assert plan(compose_test, [*base, one], [*base, two]) == [
        {"kind": "model", "name": "a", "action": "remove", "within": "custom_models"},
        {"kind": "model", "name": "b", "action": "add", "within": "custom_models"},
    ]


def test_keys_scopes_limits_logging_and_tracing_change_live(compose_test: Compose) -> None:
    key = "auth.keys=[{name:ops,key:secret-value,scopes:[admin]}]"
    changes = plan(
        compose_test,
        SCRIPTED,
        [
            *SCRIPTED,
            key,
            "auth.limits.requests_per_minute=5",
            "limits.max_tokens=64",
            "logging.level=ERROR",
            "telemetry.tracing=true",
            "handlers.routes.chat_completions.scope=admin",
        ],
    )
    assert changes == [
        {"kind": "logging", "name": "logging.level", "action": "update"},
        {"kind": "telemetry", "name": "telemetry.tracing", "action": "update"},
        {
            "kind": "auth",
            "name": "auth",
            "action": "update",
            "keys": ["limits.requests_per_minute", "keys[ops]"],
        },
        {"kind": "limits", "name": "limits", "action": "update", "keys": ["max_tokens"]},
        {"kind": "route", "name": "chat_completions", "action": "update", "keys": ["scope"]},
    ]
    assert "secret-value" not in repr(changes)  # keys are named, never shown


def test_ports_workers_transports_and_new_paths_need_a_restart(compose_test: Compose) -> None:
    changes = plan_changes(
        resolved(compose_test(*SCRIPTED)),
        resolved(
            compose_test(
                *SCRIPTED,
                "server.http_port=9001",
                "server.workers=2",
                "transports.websocket=false",
                "handlers.routes.chat_completions.http.path=/v2/chat",
                "limits.max_tokens=64",
            )
        ),
    )
    assert changes.restart_required == [
        "server.http_port",
        "server.workers",
        "transports.websocket",
        "handlers.routes.chat_completions.http.path",
    ]
    assert changes.to_dict()["applicable"] is False
    assert "needs a restart" in changes.describe()
