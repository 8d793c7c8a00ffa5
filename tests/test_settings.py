"""Typed integration settings (runtime/integrations/settings.py): every integration in
conf/integrations/ declares its settings as a dataclass, its YAML and its DEFAULT_*_CONFIG
agree with it, and a wrong type, an unknown setting or a missing required one is a one-line
ConfigError before anything starts."""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from omegaconf import DictConfig, OmegaConf

import runtime.integrations
from runtime.app import Runtime, to_settings
from runtime.config_schema import IntegrationConfig
from runtime.errors import ConfigError
from runtime.integrations import IntegrationRegistry
from runtime.integrations.settings import check_settings, defaults_of
from tests.conftest import ROOT

Compose = Callable[..., DictConfig]
MakeRuntime = Callable[..., Runtime]
INTEGRATIONS = sorted(path.stem for path in (ROOT / "conf" / "integrations").glob("*.yaml"))


def integration_class(target: str) -> type[Any]:
    module, _, name = target.rpartition(".")
    cls: type[Any] = getattr(importlib.import_module(module), name)
    return cls


def schema_of(compose_test: Compose, name: str) -> type[Any]:
    target = to_settings(compose_test(f"integrations=[{name}]")).integrations[name]._target_
    schema = integration_class(target).settings_schema
    assert dataclasses.is_dataclass(schema), f"{target} declares no settings_schema"
    return typing.cast(type[Any], schema)


def typed_field(schema: type[Any]) -> str:
    """A setting whose type is a number or a bool, so a word is the wrong type for it."""
    hints = typing.get_type_hints(schema)
    return next(f.name for f in dataclasses.fields(schema) if hints[f.name] in (int, float, bool))


@pytest.mark.parametrize("name", INTEGRATIONS)
def test_a_setting_of_the_wrong_type_is_a_config_error(
    compose_test: Compose, make_runtime: MakeRuntime, name: str
) -> None:
    setting = typed_field(schema_of(compose_test, name))
    key = f"integrations.{name}.settings.{setting}"
    with pytest.raises(ConfigError) as raised:
        make_runtime(f"integrations=[{name}]", f"{key}=not-a-number")
    assert (raised.value.key, raised.value.value) == (key, "not-a-number")
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("name", INTEGRATIONS)
def test_an_unknown_setting_is_a_config_error_naming_the_close_one(
    compose_test: Compose, make_runtime: MakeRuntime, name: str
) -> None:
    setting = typed_field(schema_of(compose_test, name))
    key = f"integrations.{name}.settings.{setting}x"
    with pytest.raises(ConfigError) as raised:
        make_runtime(f"integrations=[{name}]", f"+{key}=1")
    assert raised.value.key == key
    assert raised.value.expected.endswith(f"did you mean {setting!r}?")


@pytest.mark.parametrize("name", INTEGRATIONS)
def test_the_yaml_the_default_config_and_the_schema_agree(
    compose_test: Compose, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    unresolved = OmegaConf.to_yaml(compose_test(f"integrations=[{name}]").integrations[name])
    for variable in re.findall(r"oc\.env:(\w+)", unresolved):
        monkeypatch.delenv(variable, raising=False)
    yaml = to_settings(compose_test(f"integrations=[{name}]")).integrations[name]
    cls = integration_class(yaml._target_)
    schema = cls.settings_schema
    default: IntegrationConfig = getattr(
        importlib.import_module(cls.__module__), f"DEFAULT_{cls.__name__.upper()}_CONFIG"
    )
    assert default.settings == defaults_of(schema)
    # The YAML lists every setting, with the schema's defaults.
    assert set(yaml.settings) == {f.name for f in dataclasses.fields(schema)}
    assert check_settings(schema, yaml.settings, name) == default.settings
    for config_field in dataclasses.fields(IntegrationConfig):
        if config_field.name not in ("settings", "because"):
            assert getattr(yaml, config_field.name) == getattr(default, config_field.name), (
                config_field.name
            )


def default_configs() -> dict[str, IntegrationConfig]:
    """Every DEFAULT_*_CONFIG of runtime/integrations/ (modules and packages), by its name."""
    found: dict[str, IntegrationConfig] = {}
    for info in pkgutil.walk_packages(runtime.integrations.__path__, "runtime.integrations."):
        for attribute, value in vars(importlib.import_module(info.name)).items():
            if re.fullmatch(r"DEFAULT_\w+_CONFIG", attribute):
                assert isinstance(value, IntegrationConfig), attribute
                assert found.setdefault(value.name, value) is value, f"two defaults: {value.name}"
    return found


def test_every_integration_has_its_yaml_and_a_default_config_its_target_names() -> None:
    defaults = default_configs()
    assert sorted(defaults) == INTEGRATIONS
    registry = IntegrationRegistry()
    for name, default in defaults.items():
        # `_target_` names the package (`runtime.integrations.ollama.OllamaIntegration`), whose
        # __init__ re-exports the class; the default lives beside the class.
        cls = registry.resolve(default._target_)
        module = importlib.import_module(cls.__module__)
        assert getattr(module, f"DEFAULT_{cls.__name__.upper()}_CONFIG") is default, name


def test_integrations_keep_no_defaults_of_their_own() -> None:
    """`self.settings` holds every setting, defaults filled in from the schema, so a fallback in
    the code (`settings.get("timeout", 5.0)`, `{**DEFAULT_X_CONFIG.settings, ...}`) would be a
    second default, free to drift from the schema's."""
    fallbacks = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in sorted((ROOT / "runtime" / "integrations").rglob("*.py"))
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if re.search(r"\bsettings\.get\(|DEFAULT_\w+_CONFIG\.settings", line)
    ]
    assert fallbacks == []


@dataclass
class Circuit:
    threshold: int = 5


@dataclass
class Example:
    url: str  # required: no default
    timeout: float = 1.0
    api_key: str = ""
    circuit: Circuit = field(default_factory=Circuit)
    tags: list[str] = field(default_factory=list)


def test_check_settings_converts_and_fills_in_defaults() -> None:
    checked = check_settings(Example, {"url": "http://x", "timeout": "2.5"}, "here")
    assert checked == {
        "url": "http://x",
        "timeout": 2.5,
        "api_key": "",
        "circuit": {"threshold": 5},
        "tags": [],
    }


@pytest.mark.parametrize(
    ("raw", "key", "shown", "expected"),
    [
        ({}, "here.url", "nothing", "a string (required: it has no default)"),
        ({"url": "u", "timeout": "soon"}, "here.timeout", "'soon'", "a number (float)"),
        ({"url": "u", "circuit": {"threshold": "x"}}, "here.circuit.threshold", "'x'", "int"),
        ({"url": "u", "circuit": {"treshold": 1}}, "here.circuit.treshold", "1", "'threshold'?"),
        ({"url": "u", "tags": "a"}, "here.tags", "'a'", "a list"),
        ({"url": "u", "circuit": 3}, "here.circuit", "3", "a mapping with the keys threshold"),
        # A secret is masked, a long value cut.
        ({"url": "u", "api_key": {"k": "sk-1"}}, "here.api_key", "'***'", "a string"),
        ({"url": ["x" * 200]}, "here.url", "\"['xxxxx", "a string"),
    ],
)
def test_check_settings_names_the_key_the_value_and_what_was_expected(
    raw: dict[str, Any], key: str, shown: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        check_settings(Example, raw, "here")
    assert raised.value.key == key
    assert str(raised.value).startswith(f"{key}: got {shown}")
    assert expected in raised.value.expected
    assert "sk-1" not in str(raised.value)
    assert len(str(raised.value)) < 200
