"""Checks on the places where a config names Python code, made before anything is imported.

Three config keys name code: an integration's `_target_` (runtime/integrations/registry.py),
`plugins:` (hooks/__init__.py) and a model's `source: pkg:<package>`
(runtime/integrations/custom_models.py). None of them may name the standard library (os,
subprocess, builtins...), nor anything that is not a plain dotted module name.
"""

from __future__ import annotations

import re
import sys

from runtime.errors import ConfigError

_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def check_module_name(
    key: str, value: str, expected: str, *, dotted: bool = True, prefix: str = ""
) -> None:
    """Raise ConfigError unless `value` (less `prefix`) is a (dotted, when allowed) module name
    outside the standard library. Called before `importlib.import_module`."""
    name = value[len(prefix) :] if isinstance(value, str) and value.startswith(prefix) else value
    if not isinstance(name, str) or not _DOTTED.match(name) or (not dotted and "." in name):
        raise ConfigError(key, value, expected)
    parts = name.split(".")
    if any(part.startswith("__") for part in parts):  # __main__, __init__, __builtins__...
        raise ConfigError(key, value, f"{expected}, not a dunder module or attribute")
    top = parts[0]
    if top in sys.stdlib_module_names or top in sys.builtin_module_names or top == "__main__":
        raise ConfigError(key, value, f"{expected}, not a module of the standard library")
