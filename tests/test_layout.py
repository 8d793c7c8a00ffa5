"""The house rules a reader relies on (docs/architecture.md), checked from the source: module
names are unique across the tree, `runtime/` imports neither the handlers nor the BentoML
service (only the CLI, which assembles them, imports the handlers), handlers reach no transport
and no engine, and the built-in plugins are one tuple."""

from __future__ import annotations

import ast
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig

import handlers
from runtime.app import DEFAULT_PLUGINS, Runtime

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("runtime", "handlers", "hooks", "bentos")
# The engines themselves (runtime/engines/ also holds helpers handlers may use: schema limits,
# the engine a file needs).
ENGINES = ("llama_cpp", "llama_scheduler", "exllamav2", "transformers", "embeddings", "worker")


def modules() -> list[Path]:
    return [
        path
        for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
        if "proto" not in path.relative_to(ROOT).parts
    ]


def imported(path: Path) -> set[str]:
    """Every module `path` imports, at any depth (TYPE_CHECKING blocks and functions too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_every_module_name_is_unique_across_the_tree() -> None:
    names = Counter(p.name for p in modules() if p.name not in ("__init__.py", "__main__.py"))
    assert [name for name, count in names.items() if count > 1] == []


def test_runtime_imports_neither_handlers_nor_the_bentoml_service() -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(
            m for m in imported(path) if m.split(".")[0] in ("handlers", "bentos", "bentoml")
        )
        for path in (ROOT / "runtime").rglob("*.py")
        if "cli" not in path.relative_to(ROOT).parts
    }
    assert {path: found for path, found in offenders.items() if found} == {}


def test_handlers_reach_no_transport_and_no_engine() -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(
            m
            for m in imported(path)
            if m.startswith(("runtime.transports", "llama_cpp", "fastapi", "grpc", "strawberry"))
            or m.removeprefix("runtime.engines.") in ENGINES
        )
        for path in (ROOT / "handlers").rglob("*.py")
    }
    assert {path: found for path, found in offenders.items() if found} == {}


def test_the_built_in_plugins_are_the_default_plugins_tuple(
    compose_test: Callable[..., DictConfig],
) -> None:
    runtime = Runtime(compose_test(), builtins=handlers.builtin_plugins())
    registered = {type(p) for _, p in runtime.plugins.list_name_plugin()}
    built = {type(p) for make in DEFAULT_PLUGINS if (p := make(runtime)) is not None}
    assert built and built <= registered
