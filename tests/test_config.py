"""Composition of `conf/` through Hydra's compose API, and the one-line config errors."""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf

from runtime.app import to_settings
from runtime.config import compose, config_groups, group_options, load_config_file
from runtime.config_schema import IntegrationType, LogFormat
from runtime.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
Compose = Callable[..., DictConfig]


def every_group_option() -> list[tuple[str, str]]:
    return [(group, option) for group, options in config_groups().items() for option in options]


def test_every_group_has_options() -> None:
    groups = config_groups()
    assert set(groups) >= {"env", "handlers", "integrations"}
    assert groups["env"] == ["dev", "prod", "staging", "test"]


@pytest.mark.parametrize(("group", "option"), every_group_option())
def test_every_option_of_every_group_composes_and_validates(
    hydra_conf: None, group: str, option: str
) -> None:
    override = f"{group}=[{option}]" if group == "integrations" else f"{group}={option}"
    settings = to_settings(compose([override]))
    if group == "env":
        assert settings.env == option


@pytest.mark.parametrize(
    ("env", "log_format", "auth", "workers"),
    [
        ("dev", LogFormat.console, False, 1),
        ("test", LogFormat.console, False, 1),
        ("staging", LogFormat.json, True, 2),
        ("prod", LogFormat.json, True, 4),
    ],
)
def test_env_overlays(
    hydra_conf: None, env: str, log_format: LogFormat, auth: bool, workers: int
) -> None:
    settings = to_settings(compose([f"env={env}"]))
    assert (settings.logging.format, settings.auth.required, settings.server.workers) == (
        log_format,
        auth,
        workers,
    )


def test_environment_variables_are_read_through_interpolation(
    hydra_conf: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOG_LEVEL", "ERROR")
    monkeypatch.setenv("PROMETHEUS_ENABLED", "false")
    settings = to_settings(compose(["env=prod"]))
    assert settings.logging.level == "ERROR"
    assert settings.telemetry.metrics is False
    monkeypatch.delenv("LOG_LEVEL")
    assert to_settings(compose(["env=prod"])).logging.level == "INFO"


def test_any_key_can_be_overridden(hydra_conf: None) -> None:
    settings = to_settings(compose(["server.http_port=9000", "logging.format=json"]))
    assert settings.server.http_port == 9000
    assert settings.logging.format is LogFormat.json


@pytest.mark.parametrize(
    "selection",
    [
        ["integrations=db,jobs"],
        ["integrations=[db,jobs]"],
        ["integrations=db", "+integrations=jobs"],
        ["+integrations=[db,jobs]"],
        ["integrations=[db,jobs,metrics]", "~integrations=metrics"],
    ],
)
def test_every_form_of_the_integration_selection(
    compose_test: Compose, selection: list[str]
) -> None:
    assert set(compose_test(*selection).integrations) == {"db", "jobs"}


def test_a_pulled_in_dependency_says_why_and_takes_its_overrides(compose_test: Compose) -> None:
    cfg = compose_test("integrations=dashboards", "integrations.metrics.priority=7")
    assert cfg.integrations.metrics.because == "dependency of dashboards"
    assert cfg.integrations.metrics.priority == 7
    assert cfg.integrations.dashboards.because is None


def test_integration_types_accept_the_platform_guide_spelling(compose_test: Compose) -> None:
    cfg = compose_test("integrations=db", "integrations.db.type=MODEL_PLATFORM")
    assert to_settings(cfg).integrations["db"].type is IntegrationType.model_platform


@pytest.mark.parametrize(
    ("overrides", "key", "value", "expected"),
    [
        (["integrations=nope"], "integrations", "nope", "cache, custom_models, dashboards"),
        (["env=nope"], "env", "nope", "one of: dev, prod, staging, test"),
        (["server.http_port=abc"], "server.http_port", "abc", "a value of type Integer"),
        (["server.nope=1"], "server.nope", "nope", "a key that ServerConfig defines"),
        (["server.http_prot=1"], "server.http_prot", "http_prot", "did you mean 'http_port'?"),
        (
            ["integrations=db", "integrations.cache.priority=1"],
            "integrations.cache.priority",
            "cache",
            "a selected integration (selected: db); select it with +integrations=cache",
        ),
        (["logging.format=xml"], "logging.format", "xml", "one of: console, json"),
        (
            ["integrations=db", "integrations.db.type=cloud"],
            "integrations.db.type",
            "cloud",
            "one of: model_platform, monitoring, api, external_service, dev_tool",
        ),
        (
            ["integrations=db", "integrations.db.dependencies=[ghost]"],
            "integrations.db.dependencies",
            "ghost",
            "the name of a configured integration",
        ),
        (
            ["integrations=dashboards", "integrations.metrics.enabled=false"],
            "integrations.dashboards.dependencies",
            "metrics",
            "an integration with enabled=true",
        ),
        (
            ["integrations=cache", "integrations.db.dependencies=[cache]"],
            "integrations.cache.dependencies",
            "cache -> db -> cache",
            "dependencies without a cycle",
        ),
        (
            ["integrations=db", "integrations.db.name=other"],
            "integrations.db.name",
            "other",
            "'db'",
        ),
    ],
)
def test_invalid_configs_name_the_key_the_value_and_what_was_expected(
    compose_test: Compose, overrides: list[str], key: str, value: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        compose_test(*overrides)
    assert (raised.value.key, raised.value.value) == (key, value)
    assert expected in raised.value.expected
    assert "\n" not in str(raised.value)


def test_a_written_config_loads_back_validated(compose_test: Compose, tmp_path: Path) -> None:
    cfg = compose_test("integrations=dashboards", "server.http_port=9100")
    path = tmp_path / "config.yaml"
    path.write_text(OmegaConf.to_yaml(cfg))
    loaded = to_settings(load_config_file(path))
    assert loaded.server.http_port == 9100
    assert loaded.integrations["metrics"].because == "dependency of dashboards"
    path.write_text("server:\n  http_port: not-a-port\n")
    with pytest.raises(ConfigError, match=r"server\.http_port"):
        load_config_file(path)


def test_group_options_see_the_search_path(hydra_conf: None) -> None:
    from tests.conftest import SEARCHPATH

    assert "dashboards" in group_options("integrations", [SEARCHPATH])
    assert "dashboards" not in group_options("integrations")


def test_bento_requirements_match_the_project_dependencies() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    lines = (ROOT / "requirements/bento.txt").read_text().splitlines()
    bento = [line for line in lines if line and not line.startswith("#")]
    assert bento == project
