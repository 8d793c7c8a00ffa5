"""Applying a new config to a running Runtime (`POST /admin/config`, `python -m runtime apply`,
SIGHUP): the change plan (runtime/config_changes.py) carried out step by step, nothing in
flight dropped, everything undone if a step fails.

- An integration restarted or added is built and initialized beside the running one; requests
  move to it once it is up, and the one it replaced is shut down when its work in flight is done
  (at most `server.drain_timeout_s`). Its models move with it.
- A model reloaded is loaded beside the old one (when the old one was loaded, or preloads), then
  takes the new requests; the old one unloads when its last generation ends. A model removed
  answers what it admitted, then 404s. One only updated (aliases, prices, defaults, queue,
  timeouts) keeps its engine.
- Keys, scopes, rate limits, request limits, route handlers, the log level and tracing are
  swapped in place.

What cannot change live (ports, workers, transports...) makes the whole apply a refusal.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from runtime.auth import Auth
from runtime.config_changes import ChangePlan, plan_changes
from runtime.config_errors import config_error
from runtime.config_schema import TiffinConfig
from runtime.errors import ConfigError, StartupError
from runtime.events import BusEvent
from runtime.integrations.base import BaseIntegration
from runtime.integrations.capabilities import ModelProvider
from runtime.models import ServedModel
from runtime.telemetry.logging import configure_logging
from runtime.telemetry.tracing import Tracing

if TYPE_CHECKING:
    from runtime.app import Runtime

Undo = Callable[[], Awaitable[None]]


class ApplyError(Exception):
    """An apply that changed nothing: `status` is the HTTP status to answer with."""

    status = 422
    kind = "apply_failed"

    def __init__(self, message: str, plan: ChangePlan | None = None) -> None:
        super().__init__(message)
        self.plan = plan


class ApplyBusy(ApplyError):
    status = 409
    kind = "apply_in_progress"


class RestartRequired(ApplyError):
    kind = "restart_required"


def resolved(cfg: DictConfig) -> dict[str, Any]:
    """A config as plain data, interpolations resolved (what plans compare)."""
    container = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    assert isinstance(container, dict)
    return {str(k): v for k, v in container.items()}


def config_hash(cfg: DictConfig) -> str:
    """A short digest of a resolved config: the same on every worker that applied it."""
    text = json.dumps(resolved(cfg), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class _Step:
    """What one apply has done so far, to undo in reverse, and what it leaves to retire."""

    undo: list[Undo] = field(default_factory=list)
    unused: list[BaseIntegration] = field(default_factory=list)  # built, not yet serving
    retire_models: list[ServedModel] = field(default_factory=list)
    retire_integrations: list[BaseIntegration] = field(default_factory=list)
    retire_tracing: list[Tracing] = field(default_factory=list)


class Reconfigurer:
    """Applies configs to one Runtime, one apply at a time."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._lock = asyncio.Lock()
        self._retiring: set[asyncio.Task[None]] = set()
        self._hurry = asyncio.Event()  # stopping: retire now, without waiting
        self._log = structlog.get_logger("tiffin.config")
        self.applied_at: float | None = None
        # Other workers and replicas (through the Redis bridge): origin -> their last apply.
        self.peers: dict[str, dict[str, Any]] = {}
        runtime.events.subscribe("reconfigure.share", self._on_share)
        runtime.events.subscribe("config.*", self._on_peer)

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    def plan(self, cfg: DictConfig) -> ChangePlan:
        return plan_changes(resolved(self.runtime.cfg), resolved(cfg))

    async def apply(
        self, cfg: DictConfig, *, dry_run: bool = False, wait_s: float = 0.0, share: bool = True
    ) -> dict[str, Any]:
        """Apply `cfg` (or only plan it). Raises ConfigError for a config that would not run,
        ApplyBusy when another apply holds on past `wait_s`, RestartRequired, or ApplyError
        when a step failed (everything undone). With `share`, an applied config is published
        for the other workers and replicas too (`reconfigure.share`, which the Redis bridge
        carries)."""
        try:
            await asyncio.wait_for(self._lock.acquire(), timeout=wait_s or 0.001)
        except TimeoutError:
            raise ApplyBusy("another config apply is running; try again when it ends") from None
        started = time.perf_counter()
        try:
            settings = self._validate(cfg)
            plan = self.plan(cfg)
            if dry_run:
                return self._answer(plan, applied=False, seconds=time.perf_counter() - started)
            if plan.restart_required:
                await self._rejected(plan, "restart required")
                raise RestartRequired(
                    f"these keys only change with a restart: {', '.join(plan.restart_required)}",
                    plan,
                )
            if plan.empty:
                return self._answer(plan, applied=False, seconds=time.perf_counter() - started)
            step = _Step()
            try:
                await self._carry_out(plan, cfg, settings, step)
            except Exception as exc:
                reason = _reason(exc)
                self._log.warning("config apply failed, rolling back", reason=reason)
                for undo in reversed(step.undo):
                    try:
                        await undo()
                    except Exception:
                        self._log.exception("rollback step failed")
                for integration in step.unused:
                    await self.runtime.integrations.retire(integration)
                await self._rejected(plan, reason)
                raise ApplyError(f"nothing changed: {reason}", plan) from None
            self.runtime.cfg, self.runtime.settings = cfg, settings
            self._retire_later(step)
            seconds = time.perf_counter() - started
            self.applied_at = time.time()
            answer = self._answer(plan, applied=True, seconds=seconds)
            self.runtime.metrics.config_applies.labels("applied").inc()
            self._log.info("config.applied", changes=len(plan.changes), hash=answer["hash"])
            await self.runtime.events.publish(
                BusEvent("config.applied", source="config", data=answer)
            )
            if share:
                shared = {"config": OmegaConf.to_container(cfg, enum_to_str=True)}
                shared["hash"] = answer["hash"]
                await self.runtime.events.publish(
                    BusEvent("reconfigure.share", source="config", data=shared)
                )
            return answer
        finally:
            self._lock.release()

    async def wait_retired(self, *, hurry: bool = False) -> None:
        """Until what applies took out of service has been shut down; with `hurry` (the
        Runtime stops), without waiting for its work in flight."""
        if hurry:
            self._hurry.set()
        while self._retiring:
            await asyncio.gather(*list(self._retiring), return_exceptions=True)

    # --- the other workers and replicas -------------------------------------------------------

    def _on_share(self, event: BusEvent) -> None:
        """Another process applied a config: apply it here too (not shared again), unless this
        worker serves it already."""
        if not event.remote or event.data.get("hash") == config_hash(self.runtime.cfg):
            return
        task = asyncio.get_running_loop().create_task(self._apply_shared(event))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _apply_shared(self, event: BusEvent) -> None:
        from runtime.config import config_from_data

        try:
            cfg = config_from_data(event.data.get("config"))
            await self.apply(cfg, wait_s=60, share=False)
        except (ConfigError, ApplyError) as error:  # logged and published as config.rejected
            self._log.error(
                "a shared config was not applied", origin=event.origin, reason=str(error)
            )

    def _on_peer(self, event: BusEvent) -> None:
        if event.remote and event.type in ("config.applied", "config.rejected"):
            self.peers[event.origin] = {
                "hash": event.data.get("hash"),
                "result": event.type.split(".")[1],
                "at": event.time,
            }

    # --- before anything changes --------------------------------------------------------------

    def _validate(self, cfg: DictConfig) -> TiffinConfig:
        """The typed settings of `cfg`, checked as `Runtime()` checks them; ConfigError."""
        from runtime.app import check_server_settings, to_settings
        from runtime.integrations.opentelemetry import tracing_settings

        try:
            settings = to_settings(cfg)
            Auth.from_settings(to_settings(cfg))  # key digests, scopes (a copy: it blanks keys)
        except OmegaConfBaseException as exc:  # an interpolation that does not resolve...
            raise config_error(exc) from None
        check_server_settings(settings)
        tracing_settings(settings)
        for name, route in settings.handlers.routes.items():
            if route.handler not in self.runtime.handlers:
                known = ", ".join(sorted(self.runtime.handlers))
                raise ConfigError(
                    f"handlers.routes.{name}.handler",
                    route.handler,
                    f"a registered handler: {known}",
                )
        return settings

    def _answer(self, plan: ChangePlan, *, applied: bool, seconds: float) -> dict[str, Any]:
        return {
            **plan.to_dict(),
            "applied": applied,
            "hash": config_hash(self.runtime.cfg),
            "seconds": round(seconds, 3),
        }

    async def _rejected(self, plan: ChangePlan, reason: str) -> None:
        self.runtime.metrics.config_applies.labels("rejected").inc()
        self._log.warning("config.rejected", reason=reason, restart_required=plan.restart_required)
        data = {**plan.to_dict(), "reason": reason, "hash": config_hash(self.runtime.cfg)}
        await self.runtime.events.publish(BusEvent("config.rejected", source="config", data=data))

    # --- the steps ------------------------------------------------------------------------------

    async def _carry_out(
        self, plan: ChangePlan, cfg: DictConfig, settings: TiffinConfig, step: _Step
    ) -> None:
        for change in plan.of("integration"):
            config = settings.integrations.get(change.name)
            if change.action == "remove":
                await self._remove_integration(change.name, step)
            elif config is not None:
                await self._start_integration(config.name, settings, step)
        for provider in dict.fromkeys(c.within for c in plan.of("model")):
            await self._change_models(provider, plan, settings, step)
        if plan.of("auth") or plan.of("route"):
            self._swap_auth(settings, step)
        if plan.of("route"):
            self._swap_routes(settings, step)
        if plan.of("limits"):
            self._swap_limits(settings, step)
        if plan.of("logging"):
            self._swap_logging(settings, step)
        await self._swap_tracing(settings, step)

    def _build(self, name: str, settings: TiffinConfig) -> BaseIntegration:
        runtime = self.runtime
        integration = runtime.registry.create(settings.integrations[name], runtime.events)
        integration.tracing = runtime.tracing
        return integration

    async def _start_integration(self, name: str, settings: TiffinConfig, step: _Step) -> None:
        """Add `name`, or restart it with its new settings: the new one starts beside the old,
        its models are put in place (loaded first where the old ones were loaded), then it
        serves; the old one retires."""
        runtime = self.runtime
        new = self._build(name, settings)
        step.unused.append(new)
        await runtime.integrations.start_new(new)
        old = runtime.integrations.integrations.get(name)
        if isinstance(new, ModelProvider):
            await self._move_models(name, new.models(), step)
        elif isinstance(old, ModelProvider):
            await self._move_models(name, [], step)
        replaced = await runtime.integrations.install(new)
        step.unused.remove(new)

        async def undo() -> None:
            if replaced is not None:
                await runtime.integrations.install(replaced)
            else:
                await runtime.integrations.uninstall(name)
            await runtime.integrations.retire(new)
            runtime.rewire()

        step.undo.append(undo)
        if replaced is not None:
            step.retire_integrations.append(replaced)
        runtime.rewire()

    async def _remove_integration(self, name: str, step: _Step) -> None:
        runtime = self.runtime
        old = runtime.integrations.integrations[name]
        if isinstance(old, ModelProvider):
            await self._move_models(name, [], step)
        await runtime.integrations.uninstall(name)

        async def undo() -> None:
            await runtime.integrations.install(old)
            runtime.rewire()

        step.undo.append(undo)
        step.retire_integrations.append(old)
        runtime.rewire()

    async def _move_models(self, provider: str, specs: list[Any], step: _Step) -> None:
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
            self._put(model, old, step)
        for model_id, old in current.items():
            if model_id not in offered:
                self._take_out(old, step)

    def _put(self, model: ServedModel, old: ServedModel | None, step: _Step) -> None:
        router = self.runtime.models
        router.put(model)

        async def undo() -> None:
            router.take_out(model.id)
            if old is not None:
                router.restore(old)
            await model.unload()

        step.undo.append(undo)
        if old is not None:
            step.retire_models.append(old)

    def _take_out(self, old: ServedModel, step: _Step) -> None:
        router = self.runtime.models
        router.take_out(old.id)

        async def undo() -> None:
            router.restore(old)

        step.undo.append(undo)
        step.retire_models.append(old)

    async def _change_models(
        self, provider: str, plan: ChangePlan, settings: TiffinConfig, step: _Step
    ) -> None:
        """A model platform whose only change is its models: each model added, removed,
        reloaded or updated on its own."""
        runtime = self.runtime
        new = self._build(provider, settings)
        step.unused.append(new)
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
                    self._take_out(old, step)
            elif change.action == "update" and old is not None:
                previous = old.spec
                router.update(specs[change.name])

                async def undo(spec: Any = previous) -> None:
                    router.update(spec)

                step.undo.append(undo)
            else:  # add, reload
                model = router.prepare(specs[change.name])
                loaded = old is not None and old.engine is not None
                if model.spec.config.preload or loaded:
                    await model.ensure_loaded()
                self._put(model, old, step)
        replaced = await runtime.integrations.install(new)
        step.unused.remove(new)

        async def undo_install() -> None:
            if replaced is not None:
                await runtime.integrations.install(replaced)
            await runtime.integrations.retire(new)

        step.undo.append(undo_install)
        if replaced is not None:
            step.retire_integrations.append(replaced)

    def _swap_auth(self, settings: TiffinConfig, step: _Step) -> None:
        """Keys, scopes, rate limits and OIDC, swapped into the registered auth plugin."""
        runtime = self.runtime
        auth, plugin = runtime.auth, runtime.auth.plugin
        fresh = Auth.from_settings(settings, limiter=auth.limiter)
        before = (auth.keys, auth.unset_keys, plugin.keys, plugin.route_scopes, plugin.enforced)
        oidc = plugin.oidc
        auth.keys, auth.unset_keys = fresh.keys, fresh.unset_keys
        plugin.keys, plugin.route_scopes = fresh.plugin.keys, fresh.plugin.route_scopes
        plugin.enforced, plugin.oidc = fresh.plugin.enforced, fresh.plugin.oidc

        async def undo() -> None:
            auth.keys, auth.unset_keys, plugin.keys, plugin.route_scopes, plugin.enforced = before
            plugin.oidc = oidc

        step.undo.append(undo)

    def _swap_routes(self, settings: TiffinConfig, step: _Step) -> None:
        dispatcher = self.runtime.dispatcher
        before = dict(dispatcher.routes)
        dispatcher.routes = {name: r.handler for name, r in settings.handlers.routes.items()}

        async def undo() -> None:
            dispatcher.routes = before

        step.undo.append(undo)

    def _swap_limits(self, settings: TiffinConfig, step: _Step) -> None:
        limits = self.runtime.request_limits
        responses = self.runtime.memory_responses
        before = (limits.limits, responses.capacity)
        limits.limits = settings.limits
        responses.capacity = settings.limits.stored_responses

        async def undo() -> None:
            limits.limits, responses.capacity = before

        step.undo.append(undo)

    def _swap_logging(self, settings: TiffinConfig, step: _Step) -> None:
        before = self.runtime.settings.logging
        configure_logging(settings.logging)

        async def undo() -> None:
            configure_logging(before)

        step.undo.append(undo)

    async def _swap_tracing(self, settings: TiffinConfig, step: _Step) -> None:
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

        step.undo.append(undo)
        step.retire_tracing.append(old)

    # --- after ------------------------------------------------------------------------------

    def _retire_later(self, step: _Step) -> None:
        """Shut down what the apply took out of service once its work in flight is done."""
        runtime = self.runtime
        drain_s = runtime.settings.server.drain_timeout_s

        async def retire() -> None:
            models = step.retire_models
            await asyncio.gather(
                *(runtime.models.retire(m, m.spec.config.timeout_s, self._hurry) for m in models)
            )
            if step.retire_integrations or step.retire_tracing:
                await _until_done(runtime, drain_s, self._hurry)
            for integration in step.retire_integrations:
                await runtime.integrations.retire(integration)
            for tracing in step.retire_tracing:
                await tracing.shutdown()

        task = asyncio.get_running_loop().create_task(retire(), name="tiffin:retire")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)


async def _until_done(runtime: Runtime, limit_s: float, hurry: asyncio.Event) -> None:
    """Until the requests in flight now have finished (feeds never do: at most `limit_s`)."""
    waiting = set(runtime.dispatcher.in_flight)
    deadline = time.monotonic() + limit_s
    while waiting & runtime.dispatcher.in_flight and time.monotonic() < deadline:
        if hurry.is_set():
            return
        await asyncio.sleep(0.05)


def _reason(exc: BaseException) -> str:
    from runtime.secrets import redact_text

    if isinstance(exc, ConfigError | StartupError):
        return redact_text(str(exc))
    return redact_text(f"{type(exc).__name__}: {exc}")
