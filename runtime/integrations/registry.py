"""The one place that turns an integration's `_target_` into an object.

A target is accepted when it names a class in one of this project's packages, or a class that a
plugin registered through the `register_integrations` hook. Anything else is refused, so a config
file cannot make Tiffin import and run arbitrary code.
"""

from __future__ import annotations

import importlib

import structlog

from runtime.code_names import check_module_name
from runtime.config_schema import IntegrationConfig
from runtime.errors import ConfigError
from runtime.events import EventBus
from runtime.integrations.base import BaseIntegration

PROJECT_PACKAGES = ("runtime.", "handlers.", "hooks.")


def dotted_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class IntegrationRegistry:
    """Maps `_target_` strings (and short aliases) to integration classes."""

    def __init__(self) -> None:
        self._classes: dict[str, type[BaseIntegration]] = {}
        self._log = structlog.get_logger("tiffin.registry")

    def register(self, cls: type[BaseIntegration], alias: str | None = None) -> None:
        """Allow `cls` as a target, by its dotted path and optionally by a short alias."""
        if not (isinstance(cls, type) and issubclass(cls, BaseIntegration)):
            raise TypeError(f"{cls!r} is not a BaseIntegration subclass")
        self._classes[dotted_name(cls)] = cls
        if alias:
            self._classes[alias] = cls

    @property
    def targets(self) -> list[str]:
        return sorted(self._classes)

    def resolve(self, target: str, key: str = "_target_") -> type[BaseIntegration]:
        if target in self._classes:
            return self._classes[target]
        expected = "a BaseIntegration class of this project or one registered by a plugin"
        if not isinstance(target, str) or not target.startswith(PROJECT_PACKAGES):
            raise ConfigError(key, target, expected)
        check_module_name(key, target, expected)
        module_name, _, class_name = target.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError):
            raise ConfigError(key, target, expected) from None
        if not (isinstance(cls, type) and issubclass(cls, BaseIntegration)):
            raise ConfigError(key, target, expected)
        return cls

    def create(self, config: IntegrationConfig, bus: EventBus) -> BaseIntegration:
        cls = self.resolve(config._target_, key=f"integrations.{config.name}._target_")
        # Logged once built: building checks the settings, and a config error stays one line.
        integration = cls(config=config, bus=bus)
        self._log.debug("instantiated integration", integration=config.name, target=config._target_)
        return integration
