"""Checks on the places where a config names Python code, made before anything is imported.

Three config keys name code: an integration's `_target_` (runtime/integrations/registry.py),
`plugins:` (hooks/__init__.py) and a model's `source: pkg:<package>`
(runtime/integrations/custom_models.py). None of them may name the standard library (os,
subprocess, builtins...), nor anything that is not a plain dotted module name.

Where the module would come from is checked too (`check_import_origin`), before it is imported:
a package of this project, an installed distribution (site-packages, or the source folder of an
editable install), or a module a `tiffin` entry point names. A stray file in the working
directory (which `python -m` puts first on sys.path) is none of these, so it is never run.
"""

from __future__ import annotations

import importlib.util
import json
import re
import site
import sys
import sysconfig
from importlib import metadata
from importlib.machinery import ModuleSpec
from pathlib import Path
from urllib.parse import unquote, urlsplit

from runtime.errors import ConfigError

# The folder holding runtime/, handlers/, hooks/..., whose packages are the project's own.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
ENTRY_POINT_GROUP = "tiffin"
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


def check_import_origin(key: str, value: str, expected: str, *, prefix: str = "") -> None:
    """Raise ConfigError if the top-level package of `value` (less `prefix`) would be imported
    from anywhere but this project's packages, an installed distribution or a `tiffin` entry
    point. It is only looked up, not imported; a module that is not found at all passes (the
    import that follows says so in its caller's words)."""
    name = value[len(prefix) :] if value.startswith(prefix) else value
    top = name.split(".", 1)[0]
    try:
        spec = importlib.util.find_spec(top)  # a top-level name: nothing is imported
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return
    homes = _homes(spec)
    if _is_project_package(spec, homes) or _is_installed(top, homes) or _is_entry_point(name):
        return
    where = spec.origin or ", ".join(str(home) for home in homes) or "an unknown place"
    raise ConfigError(
        key,
        value,
        f"{expected} from this project, an installed distribution or a `{ENTRY_POINT_GROUP}` "
        f"entry point (it would be imported from {where})",
    )


def _homes(spec: ModuleSpec) -> list[Path]:
    """The sys.path folders the module would be loaded from."""
    if spec.submodule_search_locations:  # a package (regular or namespace)
        return [Path(location).resolve().parent for location in spec.submodule_search_locations]
    if spec.origin and spec.has_location:
        return [Path(spec.origin).resolve().parent]
    return []


def _is_project_package(spec: ModuleSpec, homes: list[Path]) -> bool:
    # A regular package (its __init__.py) in the project's folder: not a lone file there.
    package = bool(spec.submodule_search_locations) and spec.origin is not None
    return package and homes == [PROJECT_ROOT]


def _is_installed(top: str, homes: list[Path]) -> bool:
    if not homes:
        return False
    folders = {*site.getsitepackages(), site.getusersitepackages()}
    folders |= {sysconfig.get_paths()[kind] for kind in ("purelib", "platlib")}
    installed = {Path(folder).resolve() for folder in folders}
    if all(home in installed for home in homes):
        return True
    # An editable install: its distribution's source folder (direct_url.json says where).
    for distribution in metadata.packages_distributions().get(top, []):
        try:
            direct = json.loads(
                metadata.distribution(distribution).read_text("direct_url.json") or "{}"
            )
        except (metadata.PackageNotFoundError, ValueError):
            continue
        if direct.get("dir_info", {}).get("editable") and direct.get("url", "").startswith("file:"):
            source = Path(unquote(urlsplit(direct["url"]).path)).resolve()
            if all(home.is_relative_to(source) for home in homes):
                return True
    return False


def _is_entry_point(name: str) -> bool:
    return any(entry.module == name for entry in metadata.entry_points(group=ENTRY_POINT_GROUP))
