"""What applying a new config to a running server would change: computed from the two resolved
configs (plain containers, `OmegaConf.to_container(cfg, resolve=True)`) and the integrations'
dependency graph. Pure, so `plan --diff`, `apply --dry-run` and the apply itself
(runtime/reconfigure.py) share one answer.

    plan = plan_changes(running, proposed)
    plan.restart_required   # keys that only a restart changes: the apply is refused as a whole
    plan.changes            # what the apply does, in the order it does it

Changes name keys, never values: a changed key may be a secret.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from runtime.graph import dependents_of, start_order

# Model fields whose change needs the weights loaded again (a new engine); any other field of a
# model (aliases, prices, defaults, queue, timeouts...) is updated on the loaded one.
RELOAD_FIELDS = frozenset({"source", "engine", "chat_format", "context_length", "engine_settings"})

# Integrations whose models are planned one by one when only `settings.models` changed.
PER_MODEL_TARGETS = frozenset({"runtime.integrations.custom_models.CustomModelsIntegration"})

# Sections that change live as a whole; everything else at the top level needs a restart,
# except the keys in LIVE_KEYS.
LIVE_SECTIONS = ("auth", "limits")
LIVE_KEYS = frozenset(
    {
        "env",
        "logging.level",
        "logging.format",
        "telemetry.tracing",
        "telemetry.exporters",
        "server.drain_timeout_s",
    }
)
# A route's own keys that change live (the transports built their paths at start).
LIVE_ROUTE_KEYS = frozenset({"handler", "scope", "description"})


@dataclass(frozen=True)
class Change:
    """One step of an apply. `kind`: integration, model, auth, limits, route, logging,
    telemetry, server. `action`: add, remove, restart (an integration), reload or update (a
    model), update (the rest). `keys`: the changed keys, relative to the thing."""

    kind: str
    name: str
    action: str
    keys: tuple[str, ...] = ()
    because: str = ""  # why a dependent integration restarts too
    within: str = ""  # a model's: the integration that offers it

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "name": self.name, "action": self.action}
        if self.keys:
            out["keys"] = list(self.keys)
        if self.because:
            out["because"] = self.because
        if self.within:
            out["within"] = self.within
        return out


@dataclass
class ChangePlan:
    changes: list[Change] = field(default_factory=list)
    restart_required: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.changes and not self.restart_required

    def of(self, kind: str, action: str | None = None) -> list[Change]:
        return [c for c in self.changes if c.kind == kind and action in (None, c.action)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "changes": [change.to_dict() for change in self.changes],
            "restart_required": list(self.restart_required),
            "applicable": not self.restart_required,
        }

    def describe(self) -> str:
        """The plan in lines for a terminal."""
        return "\n".join(plan_lines(self.to_dict())) or "no changes"


def plan_lines(plan: Mapping[str, Any]) -> list[str]:
    """A plan (`ChangePlan.to_dict()`, or the server's answer to an apply) as lines for a
    terminal; none when it changes nothing."""
    lines = []
    for change in plan.get("changes") or []:
        keys = f" ({', '.join(change['keys'])})" if change.get("keys") else ""
        because = f" [{change['because']}]" if change.get("because") else ""
        lines.append(f"  {change['action']:<8} {change['kind']} {change['name']}{keys}{because}")
    restart = plan.get("restart_required") or []
    if restart:
        lines.append("  needs a restart, so nothing is applied:")
        lines += [f"    {key}" for key in restart]
    return lines


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths where two containers differ (lists compared whole)."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        found: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in old or key not in new:
                found.append(path)
            else:
                found += changed_keys(old[key], new[key], path)
        return found
    return [] if old == new else [prefix]


def plan_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> ChangePlan:
    """The change plan from the running config `old` to `new` (resolved containers)."""
    plan = ChangePlan()
    sections = set(old) | set(new)
    for section in sorted(sections - {"integrations", "handlers", *LIVE_SECTIONS}):
        for key in changed_keys(old.get(section), new.get(section), section):
            if key in LIVE_KEYS:
                plan.changes.append(Change(section, key, "update"))
            else:
                plan.restart_required.append(key)
    _plan_integrations(plan, old.get("integrations") or {}, new.get("integrations") or {})
    for section in LIVE_SECTIONS:
        keys = changed_keys(old.get(section), new.get(section))
        if section == "auth":
            keys = _auth_keys(old.get("auth") or {}, new.get("auth") or {})
        if keys:
            plan.changes.append(Change(section, section, "update", tuple(keys)))
    _plan_routes(plan, _routes(old), _routes(new))
    return plan


def _routes(cfg: Mapping[str, Any]) -> Mapping[str, Any]:
    return (cfg.get("handlers") or {}).get("routes") or {}


def _auth_keys(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Changed auth keys, with API keys named by their `name` rather than their position."""
    keys = [k for k in changed_keys(old, new) if k != "keys" and not k.startswith("keys.")]
    before = {k.get("name"): k for k in old.get("keys") or []}
    after = {k.get("name"): k for k in new.get("keys") or []}
    for name in sorted(set(before) | set(after), key=str):
        if before.get(name) != after.get(name):
            keys.append(f"keys[{name}]")
    return keys


def _plan_routes(plan: ChangePlan, old: Mapping[str, Any], new: Mapping[str, Any]) -> None:
    for name in sorted(set(old) | set(new)):
        where = f"handlers.routes.{name}"
        if name not in old or name not in new:
            plan.restart_required.append(where)  # a new or gone path in every transport
            continue
        keys = changed_keys(old[name], new[name])
        live = tuple(k for k in keys if k.split(".")[0] in LIVE_ROUTE_KEYS)
        plan.restart_required += [f"{where}.{k}" for k in keys if k not in live]
        if live:
            plan.changes.append(Change("route", name, "update", live))


def _enabled(integrations: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {n: c for n, c in integrations.items() if c.get("enabled", True)}


def _plan_integrations(
    plan: ChangePlan, old_all: Mapping[str, Any], new_all: Mapping[str, Any]
) -> None:
    """Integrations removed (dependents first), then restarted and added in the new start
    order; models of a per-model provider whose only change is its `settings.models`."""
    old, new = _enabled(old_all), _enabled(new_all)
    changed: dict[str, list[str]] = {}
    model_changes: list[Change] = []
    for name in set(old) & set(new):
        keys = [k for k in changed_keys(old[name], new[name]) if k != "because"]
        if not keys:
            continue
        models_only = all(k == "settings.models" or k.startswith("settings.models.") for k in keys)
        if models_only and new[name].get("_target_") in PER_MODEL_TARGETS:
            model_changes += _model_changes(name, old[name], new[name])
        else:
            changed[name] = keys
    old_graph = {n: list(c.get("dependencies") or []) for n, c in old.items()}
    new_graph = {n: list(c.get("dependencies") or []) for n, c in new.items()}
    restarting: dict[str, str] = {}
    for name in changed:
        for dependent in dependents_of(new_graph, name):
            if dependent in old and dependent not in changed:
                restarting.setdefault(dependent, f"depends on {name}")
    removed = [n for n in reversed(_order(old_graph, old)) if n not in new]
    plan.changes += [Change("integration", name, "remove") for name in removed]
    for name in _order(new_graph, new):
        if name not in old:
            plan.changes.append(Change("integration", name, "add"))
        elif name in changed:
            plan.changes.append(Change("integration", name, "restart", tuple(changed[name])))
        elif name in restarting:
            plan.changes.append(Change("integration", name, "restart", because=restarting[name]))
    plan.changes += model_changes


def _order(graph: Mapping[str, list[str]], configs: Mapping[str, Mapping[str, Any]]) -> list[str]:
    return start_order(graph, {n: int(c.get("priority", 100)) for n, c in configs.items()})


def _model_changes(provider: str, old: Mapping[str, Any], new: Mapping[str, Any]) -> list[Change]:
    """Models added, removed, reloaded (weights or engine settings changed) or updated."""
    before = {m.get("id"): m for m in (old.get("settings") or {}).get("models") or []}
    after = {m.get("id"): m for m in (new.get("settings") or {}).get("models") or []}
    changes = [Change("model", str(i), "remove", within=provider) for i in before if i not in after]
    for model_id, model in after.items():
        if model_id not in before:
            changes.append(Change("model", str(model_id), "add", within=provider))
            continue
        keys = changed_keys(before[model_id], model)
        if keys:
            action = "reload" if any(k.split(".")[0] in RELOAD_FIELDS for k in keys) else "update"
            changes.append(Change("model", str(model_id), action, tuple(keys), within=provider))
    return changes
