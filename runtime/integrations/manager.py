"""IntegrationManager: starts integrations in dependency order, watches their health, keeps the
service serving when an optional one fails, and stops them in reverse.

State changes go through one lock and `_settle()`, which recomputes every status from two facts
per integration (initialized? healthy?) and the dependency graph, and emits an event for each
status that changed. So the rules live in one place:

- initialized and healthy, every dependency active      -> active
- initialized and healthy, some dependency not active   -> degraded
- not initialized, some dependency not up               -> degraded (waiting; started when it is)
- failed to initialize, or health check failing         -> error
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from typing import Any, TypeVar

import structlog
from tenacity import AsyncRetrying, RetryCallState, stop_after_attempt, wait_exponential

from runtime.config_schema import IntegrationConfig
from runtime.errors import StartupError, quoted
from runtime.events import BusEvent, EventBus
from runtime.graph import dependents_of, start_order
from runtime.integrations.base import UP, BaseIntegration, Health, IntegrationStatus
from runtime.integrations.registry import IntegrationRegistry
from runtime.secrets import redact_text

Sleep = Callable[[float], Awaitable[None]]
# Told of every health check (name, result): metrics observe durations through it.
CheckObserver = Callable[[str, Health], Awaitable[object]]

T = TypeVar("T")

# The manager of the runtime serving the current task, for the platform guide's
# `await get_integration_manager()`. Set by `start_all` and by every transport per request.
current_manager: contextvars.ContextVar[IntegrationManager] = contextvars.ContextVar(
    "tiffin_integration_manager"
)


class IntegrationUnavailable(LookupError):
    """`IntegrationManager.require` found no integration of that name and kind that it could
    use; `state` says why in words (`not enabled`, `not running (error)`...), for handlers to
    put in their own error."""

    def __init__(self, name: str, state: str) -> None:
        super().__init__(f"the {name} integration is {state}")
        self.name = name
        self.state = state


class IntegrationManager:
    """Owns every configured integration object and its lifecycle."""

    def __init__(
        self,
        configs: Mapping[str, IntegrationConfig],
        registry: IntegrationRegistry,
        bus: EventBus,
        *,
        sleep: Sleep = asyncio.sleep,
        on_check: CheckObserver | None = None,
    ) -> None:
        self.bus = bus
        self._sleep = sleep
        self._on_check = on_check
        self._log = structlog.get_logger("tiffin.integrations")
        enabled = {name: cfg for name, cfg in configs.items() if cfg.enabled}
        self.configs = dict(configs)
        self.graph = {name: list(cfg.dependencies) for name, cfg in enabled.items()}
        self.order = start_order(self.graph, {n: c.priority for n, c in enabled.items()})
        self._integrations = {name: registry.create(enabled[name], bus) for name in self.order}
        self._lock = asyncio.Lock()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._stopping = False
        self._seen: dict[str, IntegrationStatus] = {}
        self._failed: set[str] = set()  # initialize() gave up; a recovery task is retrying
        self._watching = False  # start_all ran: health checks run until stop_all

    # --- the platform guide's calls ---------------------------------------------------------

    def get_integration(self, name: str) -> BaseIntegration:
        try:
            return self._integrations[name]
        except KeyError:
            known = ", ".join(self._integrations) or "(none)"
            raise KeyError(f"no integration named {quoted(name)}; configured: {known}") from None

    @property
    def integrations(self) -> Mapping[str, BaseIntegration]:
        return self._integrations

    # --- found by type (runtime/integrations/capabilities.py) ---------------------------------

    def providing(self, kind: type[T]) -> list[tuple[str, T]]:
        """Every enabled integration that is a `kind` (a class, or a runtime_checkable Protocol
        such as `ModelProvider`), as (name, integration), in start order; running or not."""
        found = ((name, self._integrations[name]) for name in self.order)
        return [(name, integration) for name, integration in found if isinstance(integration, kind)]

    def require(self, name: str, kind: type[T], *, running: bool = True) -> T:
        """The integration `name` as a `kind`. Raises IntegrationUnavailable when it is not
        enabled, is not a `kind`, or (with `running`) has not initialized or has stopped."""
        integration = self._integrations.get(name)
        if integration is None:
            raise IntegrationUnavailable(name, "not enabled")
        down = running and not integration.initialized
        status = integration.status.value
        if not isinstance(integration, kind):
            raise IntegrationUnavailable(
                name, f"not a {kind.__name__} (it is a {type(integration).__name__})"
            )
        if down:
            raise IntegrationUnavailable(name, f"not running ({status})")
        return integration

    # --- lifecycle ------------------------------------------------------------------------------

    async def start_all(self) -> None:
        """Start every enabled integration in order. Raises StartupError when a required one
        (or a dependency of a required one) cannot start; optional failures degrade instead."""
        current_manager.set(self)
        self._stopping = False
        for name in self.order:
            await self._start(name, startup=True)
        for name in self.order:
            self._spawn(f"health:{name}", self._watch_health, name)
        self._watching = True

    async def stop_all(self) -> None:
        """Cancel background work, then shut integrations down in reverse start order."""
        self._stopping = True
        self._watching = False
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        for name in reversed(self.order):
            integration = self._integrations[name]
            if integration.status is IntegrationStatus.stopped:
                continue
            if integration.initialized:
                try:
                    await asyncio.wait_for(integration.shutdown(), timeout=30)
                except Exception as exc:
                    self._log.warning(
                        "shutdown failed", integration=name, error=redact_text(str(exc))
                    )
            integration.initialized = False
            previous = integration.status
            integration.status = IntegrationStatus.stopped
            self._seen[name] = IntegrationStatus.stopped
            await self._emit("integration.stopped", name, previous=previous.value)

    @property
    def ready(self) -> bool:
        """True when every required integration is up (the service may take traffic)."""
        return all(i.status in UP for i in self._integrations.values() if i.config.required)

    def summary(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for integration in self._integrations.values():
            counts[integration.status.value] = counts.get(integration.status.value, 0) + 1
        return {"ready": self.ready, "total": len(self._integrations), "by_status": counts}

    # --- changing while serving (runtime/reconfigure.py) -----------------------------------------

    async def start_new(self, integration: BaseIntegration) -> None:
        """Initialize an integration built while serving, once, with its dependencies up: an
        apply fails fast (and rolls back) rather than retrying for minutes. Raises the reason."""
        down = [
            d
            for d in integration.config.dependencies
            if d not in self._integrations or self._integrations[d].status not in UP
        ]
        if down:
            raise StartupError(integration.name, f"dependency not available: {', '.join(down)}")
        integration.status = IntegrationStatus.initializing
        try:
            await integration.initialize()
        except Exception as exc:
            integration.status = IntegrationStatus.error
            integration.last_error = redact_text(f"{type(exc).__name__}: {exc}")
            raise StartupError(integration.name, integration.last_error) from exc
        integration.initialized = True
        integration.started_at = time.time()
        integration.last_health = await self._check(integration)
        integration.status = IntegrationStatus.active

    async def install(self, integration: BaseIntegration) -> BaseIntegration | None:
        """Serve `integration` under its name from now on; returns the one it replaces (the
        caller shuts that down once its work in flight is done)."""
        name = integration.name
        previous = self._integrations.get(name)
        self._stop_task(f"health:{name}")
        self._stop_task(f"recover:{name}")
        self._failed.discard(name)
        self.configs[name] = integration.config
        self._integrations[name] = integration
        self._reorder()
        async with self._lock:
            await self._settle()
        # "replaced", not "started": the Runtime resyncs a started platform's models, and the
        # apply has already put a replacement's models in place.
        await self._emit("integration.replaced" if previous else "integration.started", name)
        if self._watching:
            self._spawn(f"health:{name}", self._watch_health, name)
        return previous

    async def uninstall(self, name: str) -> BaseIntegration:
        """Stop serving `name` (the caller shuts it down); returns it."""
        self._stop_task(f"health:{name}")
        self._stop_task(f"recover:{name}")
        self._failed.discard(name)
        integration = self._integrations.pop(name)
        self.configs.pop(name, None)
        self._seen.pop(name, None)
        self._reorder()
        await self.bus.publish(
            BusEvent(type="integration.removed", source="integrations", data={"name": name})
        )
        return integration

    async def retire(self, integration: BaseIntegration) -> None:
        """Shut down an integration taken out of service (replaced or removed)."""
        if integration.initialized:
            try:
                await asyncio.wait_for(integration.shutdown(), timeout=30)
            except Exception as exc:
                self._log.warning(
                    "shutdown failed", integration=integration.name, error=redact_text(str(exc))
                )
        integration.initialized = False
        integration.status = IntegrationStatus.stopped

    def _reorder(self) -> None:
        self.graph = {n: list(i.config.dependencies) for n, i in self._integrations.items()}
        priorities = {n: i.config.priority for n, i in self._integrations.items()}
        self.order = start_order(self.graph, priorities)

    def _stop_task(self, key: str) -> None:
        task = self._tasks.pop(key, None)
        if task is not None:
            task.cancel()

    # --- starting and recovering ------------------------------------------------------------------

    async def _start(self, name: str, *, startup: bool) -> bool:
        integration = self._integrations[name]
        down = [d for d in self.graph[name] if self._integrations[d].status not in UP]
        if down:
            reason = f"waiting for {', '.join(down)}"
            if integration.config.required and startup:
                detail = "; ".join(f"{d}: {self._integrations[d].last_error}" for d in down)
                raise StartupError(name, f"dependency not available ({detail})")
            integration.last_error = reason
            async with self._lock:
                await self._settle()
            return False
        integration.status = IntegrationStatus.initializing
        try:
            await self._initialize_with_retry(integration)
        except Exception as exc:
            reason = redact_text(f"{type(exc).__name__}: {exc}")
            integration.last_error = reason
            integration.status = IntegrationStatus.error
            self._failed.add(name)
            await self._emit("integration.failed", name, reason=reason)
            if integration.config.required and startup:
                raise StartupError(name, reason) from exc
            async with self._lock:
                await self._settle()
            self._spawn(f"recover:{name}", self._recover, name)
            return False
        integration.initialized = True
        integration.started_at = time.time()
        integration.last_error = None
        integration.last_health = await self._check(integration)
        integration.status = IntegrationStatus.active
        await self._emit("integration.started", name)
        async with self._lock:
            await self._settle()
        return True

    async def _initialize_with_retry(self, integration: BaseIntegration) -> None:
        retry = integration.config.retry_config

        def before_sleep(state: RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            self._log.warning(
                "initialize failed, retrying",
                integration=integration.name,
                attempt=state.attempt_number,
                wait_s=state.next_action.sleep if state.next_action else None,
                error=redact_text(str(error)),
            )

        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(retry.max_retries + 1),
            wait=wait_exponential(
                multiplier=retry.initial_delay, exp_base=retry.backoff_factor, max=retry.max_backoff
            ),
            sleep=self._sleep,
            before_sleep=before_sleep,
            reraise=True,
        ):
            with attempt:
                await integration.initialize()

    async def _recover(self, name: str) -> None:
        """Keep retrying a failed optional integration in the background until it comes up."""
        integration = self._integrations[name]
        retry = integration.config.retry_config
        delay = retry.initial_delay
        while not self._stopping and name in self._failed:
            await self._sleep(delay)
            delay = min(delay * retry.backoff_factor, retry.max_backoff)
            try:
                await integration.initialize()
            except Exception as exc:
                integration.last_error = redact_text(f"{type(exc).__name__}: {exc}")
                continue
            integration.initialized = True
            self._failed.discard(name)
            integration.status = IntegrationStatus.active
            integration.started_at = time.time()
            integration.restarts += 1
            integration.last_error = None
            integration.last_health = await self._check(integration)
            await self._emit("integration.recovered", name, restart=True)
            async with self._lock:
                await self._settle()
            await self._start_waiting()

    async def _start_waiting(self) -> None:
        """Start integrations that were waiting for a dependency that is now up."""
        for name in self.order:
            integration = self._integrations[name]
            waiting = not integration.initialized and name not in self._failed
            deps_up = all(self._integrations[d].status in UP for d in self.graph[name])
            pending = integration.status in (IntegrationStatus.degraded, IntegrationStatus.inactive)
            if waiting and deps_up and pending and not self._stopping:
                await self._start(name, startup=False)

    # --- health -----------------------------------------------------------------------------------

    async def _check(self, integration: BaseIntegration) -> Health:
        health = await self._run_check(integration)
        if self._on_check is not None:
            try:
                await self._on_check(integration.name, health)
            except Exception:
                self._log.exception("health check observer failed", integration=integration.name)
        return health

    async def _run_check(self, integration: BaseIntegration) -> Health:
        started = time.perf_counter()
        try:
            health = await asyncio.wait_for(
                integration.health_check(), timeout=integration.config.health_check_timeout
            )
        except TimeoutError:
            return Health(False, "health check timed out", time.perf_counter() - started)
        except Exception as exc:
            return Health(False, f"{type(exc).__name__}: {exc}", time.perf_counter() - started)
        if not health.latency_s:
            health = replace(health, latency_s=time.perf_counter() - started)
        return health

    async def _watch_health(self, name: str) -> None:
        integration = self._integrations[name]
        interval = max(integration.config.health_check_interval, 0.001)
        while not self._stopping:
            await self._sleep(interval)
            if not integration.initialized:
                continue
            was_healthy = integration.last_health is None or integration.last_health.healthy
            health = await self._check(integration)
            integration.last_health = health
            if health.healthy and not was_healthy:
                integration.last_error = None
                await self._emit("integration.recovered", name)
            elif not health.healthy:
                integration.last_error = redact_text(health.detail)
            async with self._lock:
                await self._settle()
            if health.healthy and not was_healthy:
                await self._start_waiting()

    # --- status bookkeeping -----------------------------------------------------------------------

    async def _settle(self) -> None:
        """Recompute statuses in start order (so degradation propagates) and emit changes."""
        for name in self.order:
            integration = self._integrations[name]
            if integration.status in (IntegrationStatus.stopped, IntegrationStatus.initializing):
                continue
            deps_active = all(
                self._integrations[d].status is IntegrationStatus.active for d in self.graph[name]
            )
            deps_up = all(self._integrations[d].status in UP for d in self.graph[name])
            health = integration.last_health
            healthy = health is None or health.healthy
            if integration.initialized:
                if not healthy:
                    status = IntegrationStatus.error
                elif deps_active and not (health and health.degraded):
                    status = IntegrationStatus.active
                else:
                    status = IntegrationStatus.degraded
            elif name in self._failed:
                status = IntegrationStatus.error
            elif not deps_up:
                status = IntegrationStatus.degraded
                down = [d for d in self.graph[name] if self._integrations[d].status not in UP]
                integration.last_error = f"waiting for {', '.join(down)}"
            else:
                status = IntegrationStatus.inactive
                integration.last_error = None
            integration.status = status
            previous = self._seen.get(name, IntegrationStatus.inactive)
            if status is not previous:
                self._seen[name] = status
                await self._emit(
                    "integration.health_changed",
                    name,
                    status=status.value,
                    previous=previous.value,
                    reason=integration.last_error,
                )

    def dependents(self, name: str) -> set[str]:
        return dependents_of(self.graph, name)

    def _spawn(self, key: str, work: Callable[[str], Awaitable[None]], name: str) -> None:
        async def run() -> None:
            try:
                await work(name)
            except asyncio.CancelledError:
                raise
            except Exception:
                self._log.exception("background task failed", task=key)

        self._tasks[key] = asyncio.get_running_loop().create_task(run(), name=f"tiffin:{key}")

    async def _emit(self, event_type: str, name: str, **data: Any) -> None:
        integration = self._integrations[name]
        payload = {"name": name, "status": integration.status.value, **data}
        log = self._log.warning if event_type == "integration.failed" else self._log.info
        log(event_type, **{k: v for k, v in payload.items() if v is not None})
        await self.bus.publish(BusEvent(type=event_type, source="integrations", data=payload))


async def get_integration_manager() -> IntegrationManager:
    """The manager of the runtime serving this task (the platform guide's entry point)."""
    try:
        return current_manager.get()
    except LookupError:
        raise RuntimeError(
            "no integration manager in this context: call it from a handler, plugin or "
            "integration of a started Runtime"
        ) from None
