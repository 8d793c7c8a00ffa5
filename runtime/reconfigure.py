"""Applying a new config to a running Runtime (`POST /admin/config`, `python -m runtime apply`,
SIGHUP): the change plan (runtime/config_changes.py) carried out step by step
(runtime/apply_steps.py), nothing in flight dropped, everything undone if a step fails.

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
from typing import TYPE_CHECKING, Any

import structlog
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from runtime.apply_steps import AppliedSteps, ApplySteps
from runtime.auth import Auth
from runtime.config_changes import ChangePlan, plan_changes
from runtime.config_errors import config_error
from runtime.config_schema import TiffinConfig
from runtime.errors import ConfigError, StartupError
from runtime.events import BusEvent
from runtime.integrations.base import BaseIntegration

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
            # Off the event loop: composing and comparing configs takes a tenth of a second of
            # pure Python, which the streams in flight would otherwise wait out.
            settings, plan = await asyncio.to_thread(self._prepare, cfg)
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
            # Built before anything changes: building checks each one's settings (ConfigError).
            built = {name: self._build(name, settings) for name in _to_build(plan)}
            step = AppliedSteps(built=built, unused=list(built.values()))
            try:
                await ApplySteps(self.runtime, step).carry_out(plan, settings)
            except Exception as exc:
                reason = _reason(exc)
                await self._roll_back(step, plan, reason)
                raise ApplyError(f"nothing changed: {reason}", plan) from None
            return await self._commit(cfg, settings, plan, step, started, share=share)
        finally:
            self._lock.release()

    async def _roll_back(self, step: AppliedSteps, plan: ChangePlan, reason: str) -> None:
        self._log.warning("config apply failed, rolling back", reason=reason)
        for undo in reversed(step.undo):
            try:
                await undo()
            except Exception:
                self._log.exception("rollback step failed")
        for integration in step.unused:
            await self.runtime.integrations.retire(integration)
        await self._rejected(plan, reason)

    async def _commit(
        self,
        cfg: DictConfig,
        settings: TiffinConfig,
        plan: ChangePlan,
        step: AppliedSteps,
        started: float,
        *,
        share: bool,
    ) -> dict[str, Any]:
        """Serve `cfg` from now on: retire what it replaced, say so, and share it."""
        runtime = self.runtime
        runtime.cfg, runtime.settings = cfg, settings
        runtime.models.watch_idle()
        self._retire_later(step)
        self.applied_at = time.time()
        answer = self._answer(plan, applied=True, seconds=time.perf_counter() - started)
        runtime.metrics.config_applies.labels("applied").inc()
        self._log.info("config.applied", changes=len(plan.changes), hash=answer["hash"])
        await runtime.events.publish(BusEvent("config.applied", source="config", data=answer))
        if share:  # the Redis bridge carries it to the other workers and replicas
            config = OmegaConf.to_container(cfg, enum_to_str=True)
            shared = {"config": config, "hash": answer["hash"]}
            await runtime.events.publish(BusEvent("reconfigure.share", "config", shared))
        return answer

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
            cfg = await asyncio.to_thread(config_from_data, event.data.get("config"))
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

    def _prepare(self, cfg: DictConfig) -> tuple[TiffinConfig, ChangePlan]:
        return self._validate(cfg), self.plan(cfg)

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

    def _build(self, name: str, settings: TiffinConfig) -> BaseIntegration:
        runtime = self.runtime
        integration = runtime.registry.create(settings.integrations[name], runtime.events)
        integration.tracing = runtime.tracing
        return integration

    def _answer(self, plan: ChangePlan, *, applied: bool, seconds: float) -> dict[str, Any]:
        answer = {
            **plan.to_dict(),
            "applied": applied,
            "hash": config_hash(self.runtime.cfg),
            "seconds": round(seconds, 3),
        }
        if self.runtime.settings.server.workers > 1 and not self._shared():
            answer["warnings"] = [
                "only the worker that took this request applies it: with server.workers > 1,"
                " select integrations=redis (every worker then applies it) or send SIGHUP to"
                " python -m runtime after editing its config file"
            ]
        return answer

    def _shared(self) -> bool:
        """Whether an applied config reaches the other workers (the Redis bridge is up)."""
        from runtime.integrations.redis import RedisIntegration

        bridges = self.runtime.integrations.providing(RedisIntegration)
        return any(redis.initialized for _, redis in bridges)

    async def _rejected(self, plan: ChangePlan, reason: str) -> None:
        self.runtime.metrics.config_applies.labels("rejected").inc()
        self._log.warning("config.rejected", reason=reason, restart_required=plan.restart_required)
        data = {**plan.to_dict(), "reason": reason, "hash": config_hash(self.runtime.cfg)}
        await self.runtime.events.publish(BusEvent("config.rejected", source="config", data=data))

    # --- after ------------------------------------------------------------------------------

    def _retire_later(self, step: AppliedSteps) -> None:
        """Shut down what the apply took out of service once its work in flight is done."""
        runtime = self.runtime
        drain_s = runtime.settings.server.drain_timeout_s

        async def retire() -> None:
            models = step.retire_models
            await asyncio.gather(
                *(runtime.models.retire(m, m.spec.config.timeout_s, self._hurry) for m in models)
            )
            if step.retire_integrations or step.close_later:
                await _until_done(runtime, drain_s, self._hurry)
            for integration in step.retire_integrations:
                await runtime.integrations.retire(integration)
            for close in step.close_later:
                await close()

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


def _to_build(plan: ChangePlan) -> list[str]:
    """The integrations an apply starts: added, restarted, or with models changed."""
    names = [c.name for c in plan.of("integration") if c.action in ("add", "restart")]
    return list(dict.fromkeys([*names, *(c.within for c in plan.of("model"))]))


def _reason(exc: BaseException) -> str:
    from runtime.secrets import redact_text

    if isinstance(exc, ConfigError | StartupError):
        return redact_text(str(exc))
    return redact_text(f"{type(exc).__name__}: {exc}")
