"""The dependency graph functions shared by composition and the manager."""

from __future__ import annotations

import pytest

from runtime.errors import ConfigError
from runtime.graph import close_dependencies, dependents_of, find_cycle, start_order

GRAPH = {"grafana": ["prometheus"], "prometheus": [], "alerts": ["prometheus", "grafana"], "db": []}


def test_closure_records_why() -> None:
    because = close_dependencies(["alerts"], GRAPH.get)
    assert because == {
        "alerts": None,
        "prometheus": "dependency of alerts",
        "grafana": "dependency of alerts",
    }


def test_closure_names_who_asked_for_an_unknown_dependency() -> None:
    with pytest.raises(ConfigError) as raised:
        close_dependencies(["x"], {"x": ["ghost"]}.get)
    assert raised.value.key == "integrations.x.dependencies"
    assert raised.value.value == "ghost"


def test_order_and_cycles() -> None:
    assert start_order(GRAPH, {"db": 200}) == ["prometheus", "grafana", "alerts", "db"]
    assert start_order(GRAPH, {"db": 1}) == ["db", "prometheus", "grafana", "alerts"]
    assert find_cycle({"a": ["b"], "b": ["c"], "c": ["a"]}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": ["a"]}) == ["a", "a"]
    assert find_cycle(GRAPH) is None
    with pytest.raises(ConfigError, match="a -> b -> a"):
        start_order({"a": ["b"], "b": ["a"]}, {})


def test_dependents() -> None:
    assert dependents_of(GRAPH, "prometheus") == {"grafana", "alerts"}
    assert dependents_of(GRAPH, "db") == set()
