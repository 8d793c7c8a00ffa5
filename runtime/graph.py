"""Dependency graph of integrations: closing a selection over its dependencies, cycle detection,
and the start order (topological, priority breaking ties). Pure functions over names, so the
config layer and the integration manager share one implementation."""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Mapping, Sequence

from runtime.errors import ConfigError


def close_dependencies(
    selected: Sequence[str],
    dependencies_of: Callable[[str], Sequence[str] | None],
) -> dict[str, str | None]:
    """Return every integration needed by `selected`, in discovery order.

    The value is None for a selected one, else the reason it was pulled in
    ("dependency of grafana"). `dependencies_of(name)` returns None for an unknown name,
    which is an error naming the integration that asked for it.
    """
    because: dict[str, str | None] = {}
    queue: list[tuple[str, str | None]] = [(name, None) for name in selected]
    while queue:
        name, needed_by = queue.pop(0)
        if name in because:
            continue
        deps = dependencies_of(name)
        if deps is None:
            key = f"integrations.{needed_by}.dependencies" if needed_by else "integrations"
            raise ConfigError(key, name, "the name of a configured integration")
        because[name] = f"dependency of {needed_by}" if needed_by else None
        queue.extend((dep, name) for dep in deps)
    return because


def find_cycle(graph: Mapping[str, Sequence[str]]) -> list[str] | None:
    """Return one dependency cycle as a path (first name repeated at the end), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in graph.get(node, ()):
            if state.get(dep) == 1:
                return [*path[path.index(dep) :], dep]
            if dep not in state and (cycle := visit(dep)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def start_order(graph: Mapping[str, Sequence[str]], priority: Mapping[str, int]) -> list[str]:
    """Topological order: dependencies first; among the ready ones, lower priority value first,
    then name. Raises ConfigError naming the cycle if there is one."""
    cycle = find_cycle(graph)
    if cycle is not None:
        raise ConfigError(
            f"integrations.{cycle[0]}.dependencies",
            " -> ".join(cycle),
            "dependencies without a cycle",
        )
    waiting = {name: set(deps) for name, deps in graph.items()}
    dependents: dict[str, list[str]] = {name: [] for name in graph}
    for name, deps in graph.items():
        for dep in deps:
            dependents.setdefault(dep, []).append(name)
    ready = [(priority.get(n, 100), n) for n, deps in waiting.items() if not deps]
    heapq.heapify(ready)
    order: list[str] = []
    while ready:
        _, name = heapq.heappop(ready)
        order.append(name)
        for dependent in dependents.get(name, ()):
            waiting[dependent].discard(name)
            if not waiting[dependent]:
                heapq.heappush(ready, (priority.get(dependent, 100), dependent))
    return order


def dependents_of(graph: Mapping[str, Iterable[str]], name: str) -> set[str]:
    """Every integration that depends on `name`, directly or through others."""
    found: set[str] = set()
    frontier = [name]
    while frontier:
        current = frontier.pop()
        for other, deps in graph.items():
            if current in deps and other not in found:
                found.add(other)
                frontier.append(other)
    return found
