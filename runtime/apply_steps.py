"""The steps of an apply (runtime/reconfigure.py carries out a change plan through these):
each changes one part of a running Runtime and records how to undo it, and what it took out of
service, in an `AppliedSteps`. Integrations and models are replaced beside the old ones; keys,
limits, routes, logging and tracing are swapped in place."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from runtime.auth import Auth
from runtime.config_changes import ChangePlan
from runtime.config_schema import TiffinConfig
from runtime.integrations.base import BaseIntegration
from runtime.integrations.capabilities import ModelProvider
from runtime.models import ServedModel
from runtime.telemetry.logging import configure_logging
from runtime.telemetry.tracing import Tracing

if TYPE_CHECKING:
    from runtime.app import Runtime

Undo = Callable[[], Awaitable[None]]


@dataclass
class AppliedSteps:
    """What one apply has done so far, to undo in reverse, and what it leaves to retire."""

    built: dict[str, BaseIntegration] = field(default_factory=dict)  # by name, to start
    undo: list[Undo] = field(default_factory=list)
    unused: list[BaseIntegration] = field(default_factory=list)  # built, not yet serving
    retire_models: list[ServedModel] = field(default_factory=list)
    retire_integrations: list[BaseIntegration] = field(default_factory=list)
    # Run once the requests in flight at the apply are done: the old tracer's flush, the old
    # cache of stored keys' last writes.
    close_later: list[Undo] = field(default_factory=list)


class ApplySteps:
    """Carries out one plan on `runtime`, recording into `record`."""

    def __init__(self, runtime: Runtime, record: AppliedSteps) -> None:
        self.runtime = runtime
        self.record = record

    async def carry_out(self, plan: ChangePlan, settings: TiffinConfig) -> None:
        """Every change of `plan`, in order: integrations, models, then the rest."""
        for change in plan.of("integration"):
            if change.action == "remove":
                await self._remove_integration(change.name)
            else:
                await self._start_integration(change.name)
        for provider in dict.fromkeys(c.within for c in plan.of("model")):
            await self._change_models(provider, plan)
        if plan.of("auth") or plan.of("route"):
            self._swap_auth(settings)
        if plan.of("route"):
            self._swap_routes(settings)
        if plan.of("limits"):
            self._swap_limits(settings)
        if plan.of("logging"):
            self._swap_logging(settings)
        await self._swap_tracing(settings)

    async def _start_integration(self, name: str) -> None:
        """Add `name`, or restart it with its new settings: the new one starts beside the old,
        its models are put in place (loaded first where the old ones were loaded), then it
        serves; the old one retires."""
        runtime = self.runtime
        new = self.record.built[name]
        await runtime.integrations.start_new(new)
        old = runtime.integrations.integrations.get(name)
        if isinstance(new, ModelProvider):
            await self._move_models(name, new.models())
        elif isinstance(old, ModelProvider):
            await self._move_models(name, [])
        replaced = await runtime.integrations.install(new)
        self.record.unused.remove(new)

        async def undo() -> None:
            if replaced is not None:
                await runtime.integrations.install(replaced)
            else:
                await runtime.integrations.uninstall(name)
            await runtime.integrations.retire(new)
            runtime.rewire()

        self.record.undo.append(undo)
        if replaced is not None:
            self.record.retire_integrations.append(replaced)
        runtime.rewire()

    async def _remove_integration(self, name: str) -> None:
        runtime = self.runtime
        old = runtime.integrations.integrations[name]
        if isinstance(old, ModelProvider):
            await self._move_models(name, [])
        await runtime.integrations.uninstall(name)

        async def undo() -> None:
            await runtime.integrations.install(old)
            runtime.rewire()

        self.record.undo.append(undo)
        self.record.retire_integrations.append(old)
        runtime.rewire()

    async def _move_models(self, provider: str, specs: list[Any]) -> None:
        """Make `provider`'s routed models `specs`: each in a new ServedModel (loaded first
        when the one it replaces was loaded, or it preloads); the replaced and vanished ones
        keep what they admitted and retire."""
        router = self.runtime.models
        current = {m.id: m for m in router.models.values() if m.spec.provider == provider}
        offered = {spec.config.id: spec for spec in specs}
        for model_id, spec in offered.items():
            old = current.get(model_id)
            model = router.prepare(spec)
            if spec.config.preload or (old is not None and old.engine is not None):
                await model.ensure_loaded()
            self._put(model, old)
        for model_id, old in current.items():
            if model_id not in offered:
                self._take_out(old)

    def _put(self, model: ServedModel, old: ServedModel | None) -> None:
        router = self.runtime.models
        router.put(model)

        async def undo() -> None:
            router.take_out(model.id)
            if old is not None:
                router.put(old)
            await model.unload()

        self.record.undo.append(undo)
        if old is not None:
            self.record.retire_models.append(old)

    def _take_out(self, old: ServedModel) -> None:
        router = self.runtime.models
        router.take_out(old.id)

        async def undo() -> None:
            router.put(old)

        self.record.undo.append(undo)
        self.record.retire_models.append(old)

    async def _change_models(self, provider: str, plan: ChangePlan) -> None:
        """A model platform whose only change is its models: each model added, removed,
        reloaded or updated on its own."""
        runtime = self.runtime
        new = self.record.built[provider]
        await runtime.integrations.start_new(new)
        assert isinstance(new, ModelProvider)
        specs = {spec.config.id: spec for spec in new.models()}
        router = runtime.models
        for change in plan.of("model"):
            if change.within != provider:
                continue
            old = router.models.get(change.name)
            if change.action == "remove":
                if old is not None:
                    self._take_out(old)
            elif change.action == "update" and old is not None:
                previous = old.spec
                router.update(specs[change.name])

                async def undo(spec: Any = previous) -> None:
                    router.update(spec)

                self.record.undo.append(undo)
            else:  # add, reload
                model = router.prepare(specs[change.name])
                loaded = old is not None and old.engine is not None
                if model.spec.config.preload or loaded:
                    await model.ensure_loaded()
                self._put(model, old)
        replaced = await runtime.integrations.install(new)
        self.record.unused.remove(new)

        async def undo_install() -> None:
            if replaced is not None:
                await runtime.integrations.install(replaced)
            await runtime.integrations.retire(new)

        self.record.undo.append(undo_install)
        if replaced is not None:
            self.record.retire_integrations.append(replaced)

    def _swap_auth(self, settings: TiffinConfig) -> None:
        """Keys, scopes, rate limits and OIDC, swapped into the registered auth plugin."""
        runtime = self.runtime
        auth, plugin = runtime.auth, runtime.auth.plugin
        fresh = Auth.from_settings(settings, limiter=auth.limiter)
        before = (auth.keys, auth.unset_keys, plugin.keys, plugin.route_scopes, plugin.enforced)
        oidc, stored = plugin.oidc, plugin.stored
        auth.keys, auth.unset_keys = fresh.keys, fresh.unset_keys
        plugin.keys, plugin.route_scopes = fresh.plugin.keys, fresh.plugin.route_scopes
        plugin.enforced, plugin.oidc = fresh.plugin.enforced, fresh.plugin.oidc
        key_store = runtime.key_store
        if key_store is not None:  # the database's keys, with the new defaults and cache time
            auth.use_store(key_store.api_keys, settings)
            if stored is not None:
                self.record.close_later.append(stored.close)

        async def undo() -> None:
            replaced = plugin.stored
            auth.keys, auth.unset_keys, plugin.keys, plugin.route_scopes, plugin.enforced = before
            plugin.oidc, plugin.stored = oidc, stored
            if replaced is not None and replaced is not stored:
                await replaced.close()

        self.record.undo.append(undo)

    def _swap_routes(self, settings: TiffinConfig) -> None:
        dispatcher = self.runtime.dispatcher
        before = dict(dispatcher.routes)
        dispatcher.routes = {name: r.handler for name, r in settings.handlers.routes.items()}

        async def undo() -> None:
            dispatcher.routes = before

        self.record.undo.append(undo)

    def _swap_limits(self, settings: TiffinConfig) -> None:
        limits = self.runtime.request_limits
        responses = self.runtime.memory_responses
        before = (limits.limits, responses.capacity)
        limits.limits = settings.limits
        responses.capacity = settings.limits.stored_responses

        async def undo() -> None:
            limits.limits, responses.capacity = before

        self.record.undo.append(undo)

    def _swap_logging(self, settings: TiffinConfig) -> None:
        before = self.runtime.settings.logging
        configure_logging(settings.logging)

        async def undo() -> None:
            configure_logging(before)

        self.record.undo.append(undo)

    async def _swap_tracing(self, settings: TiffinConfig) -> None:
        """A new tracer when the tracing settings changed (turned on or off, exporters,
        sampling): new requests and integrations use it; the old one flushes and stops once
        the requests that hold it are done."""
        from runtime.integrations.opentelemetry import tracing_settings

        runtime = self.runtime
        wanted = tracing_settings(settings)
        if wanted == runtime.tracing.settings:
            return
        old, new = runtime.tracing, Tracing(wanted)
        new.start()
        runtime.use_tracing(new)

        async def undo() -> None:
            runtime.use_tracing(old)
            await new.shutdown()

        self.record.undo.append(undo)
        self.record.close_later.append(old.shutdown)
