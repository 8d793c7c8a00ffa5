"""Hooks: the pluggy plugin manager and helpers to call hooks that may return awaitables."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterable
from typing import Any

import pluggy

from hooks import specs
from hooks.specs import PROJECT, hookimpl, hookspec
from runtime.code_names import check_import_origin, check_module_name
from runtime.errors import ConfigError

__all__ = ["PROJECT", "hookimpl", "hookspec", "make_plugin_manager", "resolve", "resolve_all"]


def make_plugin_manager(
    builtins: Iterable[object] = (),
    plugin_names: Iterable[str] = (),
    *,
    load_entrypoints: bool = True,
) -> pluggy.PluginManager:
    """A plugin manager with Tiffin's hookspecs, the given built-ins, the configured plugin
    modules (`plugins:` in the config, imported by dotted name), and, unless disabled, the
    `tiffin` entry-point group."""
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(specs)
    for plugin in builtins:
        pm.register(plugin, name=f"tiffin.builtin.{type(plugin).__name__}")
    for name in plugin_names:
        check_module_name("plugins", name, "a dotted name of a plugin module")
        check_import_origin("plugins", name, "a plugin module")
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError("plugins", name, f"an importable plugin module ({exc})") from None
        if not _implements_hooks(pm, module):
            raise ConfigError("plugins", name, "a module with at least one @hookimpl function")
        if pm.get_plugin(name) is None:
            pm.register(module, name=name)
    if load_entrypoints:
        pm.load_setuptools_entrypoints(PROJECT)
    pm.check_pending()
    return pm


def _implements_hooks(pm: pluggy.PluginManager, module: object) -> bool:
    return any(
        pm.parse_hookimpl_opts(module, attr) is not None
        for attr in dir(module)
        if not attr.startswith("_")
    )


async def resolve(value: Any) -> Any:
    """Await `value` if it is awaitable (hooks may return either), else return it."""
    if inspect.isawaitable(value):
        return await value
    return value


async def resolve_all(values: Iterable[Any]) -> list[Any]:
    """Resolve every result of a non-firstresult hook, in order."""
    return [await resolve(v) for v in values]
