"""ModelRouter: model id -> the model that serves it, with aliases, on-demand loading, idle
unloading, a bounded queue per model, and per-request timeouts.

Handlers only ever talk to the router (`ctx.models`); it is the one owner of engines.
Model-platform integrations (custom_models now; Ollama and OpenAI-compatible upstreams later)
offer `ModelSpec`s through a `models()` method, and the router registers them at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from enum import StrEnum
from typing import Any

import structlog

from runtime.engines.engine import Engine, ModelSpec
from runtime.events import BusEvent, EventBus
from runtime.types import (
    Chunk,
    ContextLengthExceeded,
    Embeddings,
    EngineError,
    GenerationRequest,
    GenerationTimeout,
    ModelNotFound,
    ProviderError,
    QueueFull,
    UnsupportedRequest,
    close,
)

EngineFactory = Callable[[ModelSpec], Engine]


class ModelState(StrEnum):
    unloaded = "unloaded"
    loading = "loading"
    loaded = "loaded"
    failed = "failed"


def _worth_a_fallback(exc: Exception) -> bool:
    """Provider trouble (down, overloaded, failing) is; a request it rightly refused is not."""
    if isinstance(exc, ContextLengthExceeded | UnsupportedRequest | ModelNotFound):
        return False
    if isinstance(exc, ProviderError):
        return exc.retryable
    return isinstance(exc, EngineError | QueueFull)


class ServedModel:
    """One servable model, local (an engine in this process) or remote (a platform's client):
    its engine once loaded, its state and its queue."""

    def __init__(self, spec: ModelSpec, factory: EngineFactory, bus: EventBus) -> None:
        self.spec = spec
        self.id = spec.config.id
        self._factory = factory
        self._bus = bus
        self._lock = asyncio.Lock()
        self.engine: Engine | None = None
        self.state = ModelState.unloaded
        self.error: str | None = None
        self.in_flight = 0  # admitted requests: running or waiting for the engine
        self.background = 0  # of those, batch work (GenerationRequest.background)
        self.live_at = -math.inf  # when a live request was last admitted or released
        self.last_used = time.monotonic()
        self.loads = 0
        self.created = int(time.time())

    @property
    def capabilities(self) -> frozenset[str]:
        if self.engine is not None:
            return self.engine.capabilities
        if self.spec.capabilities is not None:
            return self.spec.capabilities
        from runtime.types import CHAT, COMPLETION, EMBEDDINGS

        return frozenset({EMBEDDINGS} if self.spec.engine == "embeddings" else {CHAT, COMPLETION})

    @property
    def tool_syntax(self) -> str | None:
        """The tool-call syntax the loaded model's chat template teaches (runtime/tool_syntax.py);
        None when it knows none, when the engine does not say (only llama.cpp reads templates
        for it), or before it is loaded."""
        syntax = getattr(self.engine, "tool_syntax", None)
        return syntax if isinstance(syntax, str) else None

    async def ensure_loaded(self) -> Engine:
        if self.engine is not None:
            return self.engine
        async with self._lock:
            if self.engine is not None:
                return self.engine
            self.state = ModelState.loading
            started = time.perf_counter()
            engine = self._factory(self.spec)
            try:
                await engine.load()
            except Exception as exc:
                self.state, self.error = ModelState.failed, f"{type(exc).__name__}: {exc}"
                await self._emit("model.load_failed", error=self.error)
                raise EngineError(f"model {self.id} failed to load: {exc}") from exc
            self.engine, self.state, self.error = engine, ModelState.loaded, None
            self.loads += 1
            self.last_used = time.monotonic()
            await self._emit("model.loaded", seconds=round(time.perf_counter() - started, 3))
            return engine

    async def unload(self) -> bool:
        async with self._lock:
            if self.engine is None:
                return False
            engine, self.engine = self.engine, None
            self.state = ModelState.unloaded
            await engine.unload()
            await self._emit("model.unloaded")
            return True

    @property
    def servable(self) -> bool:
        """Loaded, or loaded once and unloaded (or reloading) since: it loads on demand."""
        if self.state is ModelState.loaded:
            return True
        return self.loads > 0 and self.state in (ModelState.unloaded, ModelState.loading)

    @property
    def slots(self) -> int:
        """Requests its engine runs at once: a batching engine's `parallel` (its stats say,
        a runner's model in the runner's stats), else one."""
        stats = self.engine.stats() if self.engine is not None else {}
        parallel = stats.get("parallel") or (stats.get("runner") or {}).get("parallel") or 1
        return max(1, int(parallel))

    def admit(self, *, background: bool = False) -> None:
        limit = self.spec.config.max_queue
        if self.in_flight >= limit + self.slots:  # `slots` running plus `max_queue` waiting
            raise QueueFull(
                self.id, limit, retry_after=max(1, int(self.spec.config.timeout_s // 60))
            )
        self.in_flight += 1
        self._count(background, 1)

    def release(self, *, background: bool = False) -> None:
        self.in_flight -= 1
        self.last_used = time.monotonic()
        self._count(background, -1)

    def _count(self, background: bool, change: int) -> None:
        if background:
            self.background += change
        else:
            self.live_at = time.monotonic()

    def describe(self) -> dict[str, Any]:
        cfg = self.spec.config
        return {
            "id": self.id,
            "provider": self.spec.provider,
            "engine": self.spec.engine,
            "state": self.state.value,
            "capabilities": sorted(self.capabilities),
            "aliases": list(cfg.aliases),
            "context_length": cfg.context_length,
            "in_flight": self.in_flight,
            "error": self.error,
            "stats": self.engine.stats() if self.engine is not None else None,
        }

    async def _emit(self, event_type: str, **data: Any) -> None:
        payload = {
            "model": self.id,
            "provider": self.spec.provider,
            "engine": self.spec.engine,
            "state": self.state.value,
            **data,
        }
        await self._bus.publish(BusEvent(event_type, source="models", data=payload))


class ModelRouter:
    """Every servable model, by id and alias."""

    def __init__(self, bus: EventBus, factories: Mapping[str, EngineFactory]) -> None:
        self._bus = bus
        self._factories = factories
        self._models: dict[str, ServedModel] = {}
        self._aliases: dict[str, str] = {}
        self._idle_task: asyncio.Task[None] | None = None
        self._log = structlog.get_logger("tiffin.models")

    # --- registration -------------------------------------------------------------------------

    def register(self, spec: ModelSpec) -> ServedModel:
        model = self.prepare(spec)
        self.put(model)
        return model

    def prepare(self, spec: ModelSpec) -> ServedModel:
        """A ServedModel for `spec`, not yet routed to (`register` or `put` routes it)."""
        factory = spec.factory or self._factories.get(spec.engine)
        if factory is None:
            raise EngineError(
                f"no engine {spec.engine!r} for model {spec.config.id}; "
                f"available: {', '.join(sorted(self._factories)) or '(none)'}"
            )
        return ServedModel(spec, factory, self._bus)

    def register_all(self, specs: Iterable[ModelSpec]) -> None:
        for spec in specs:
            self.register(spec)

    async def sync(self, provider: str, specs: Iterable[ModelSpec]) -> None:
        """Make `provider`'s models exactly `specs` (a platform's list changes while serving):
        new ones are registered, vanished ones unloaded and dropped, the rest kept as they are."""
        offered = {spec.config.id: spec for spec in specs}
        for model_id, model in list(self._models.items()):
            if model.spec.provider == provider and model_id not in offered:
                await model.unload()
                self._models.pop(model_id, None)  # a concurrent sync may have dropped it
                self._aliases = {a: m for a, m in self._aliases.items() if m != model_id}
        for model_id, spec in offered.items():
            if model_id not in self._models:
                self.register(spec)

    # --- changing while serving (runtime/reconfigure.py) -------------------------------------

    def update(self, spec: ModelSpec) -> ServedModel:
        """Give a served model a new config that needs no reload (aliases, prices, defaults,
        queue and timeouts): requests from now on see it."""
        model = self._models[spec.config.id]
        self._replace_aliases(model.id, model.spec.config.aliases, spec.config.aliases)
        model.spec = spec
        return model

    def put(self, model: ServedModel) -> ServedModel | None:
        """Route `model`'s id to it from now on (a new one from `prepare`, or one an apply took
        out and now puts back); returns the one it replaces, which keeps serving what it
        admitted."""
        previous = self._models.get(model.id)
        old_aliases = previous.spec.config.aliases if previous is not None else []
        self._replace_aliases(model.id, old_aliases, model.spec.config.aliases)
        self._models[model.id] = model
        return previous

    def take_out(self, model_id: str) -> ServedModel | None:
        """Stop routing to `model_id` (new requests get 404); returns it, still serving what
        it admitted."""
        self._aliases = {a: m for a, m in self._aliases.items() if m != model_id}
        return self._models.pop(model_id, None)

    async def retire(
        self, model: ServedModel, timeout_s: float, hurry: asyncio.Event | None = None
    ) -> None:
        """Unload a model taken out of routing once what it admitted is done (at most
        `timeout_s`, by then its generations have timed out; at once when `hurry` is set),
        unless it is back in routing."""
        deadline = time.monotonic() + timeout_s
        while model.in_flight > 0 and time.monotonic() < deadline:
            if hurry is not None and hurry.is_set():
                break
            await asyncio.sleep(0.05)
        if self._models.get(model.id) is not model:
            await model.unload()

    def _replace_aliases(self, model_id: str, old: Iterable[str], new: Iterable[str]) -> None:
        """Swap a model's configured aliases; those given while serving (/api/copy) stay."""
        for alias in old:
            if self._aliases.get(alias) == model_id:
                del self._aliases[alias]
        for alias in new:
            self._aliases[alias] = model_id

    def add_alias(self, alias: str, model_id: str) -> ServedModel:
        """Name `model_id` (an id or alias) `alias` too, while this process runs (Ollama's
        `/api/copy`). An existing model's id cannot become an alias."""
        model = self.get(model_id)
        if alias in self._models:
            raise ValueError(f"{alias} is a model already")
        self._aliases[alias] = model.id
        return model

    def remove_alias(self, alias: str) -> bool:
        """Forget `alias`; False when it is no alias."""
        return self._aliases.pop(alias, None) is not None

    def aliases_of(self, model_id: str) -> list[str]:
        return [alias for alias, target in self._aliases.items() if target == model_id]

    # --- lookup -------------------------------------------------------------------------------

    def get(self, model_id: str) -> ServedModel:
        model = self._models.get(self._aliases.get(model_id, model_id))
        if model is None:
            raise ModelNotFound(model_id, [*self._models, *self._aliases])
        return model

    def _known(self, model_ids: Iterable[str]) -> list[str]:
        """The ids (or aliases) that name a model now; a platform's model may have gone away."""
        known = []
        for model_id in model_ids:
            resolved = self._aliases.get(model_id, model_id)
            if resolved in self._models:
                known.append(resolved)
            else:
                self._log.warning("fallback model not found", model=model_id)
        return known

    @property
    def models(self) -> Mapping[str, ServedModel]:
        return self._models

    def describe_all(self) -> list[dict[str, Any]]:
        return [model.describe() for model in self._models.values()]

    @property
    def ready(self) -> bool:
        """Every model marked `preload` can serve: loaded, or loaded before and unloaded since
        (idle, or by an operator), so the next request loads it again. One that never loaded,
        or whose last load failed, cannot: readiness must not send traffic to it."""
        return all(m.servable for m in self._models.values() if m.spec.config.preload)

    # --- work ---------------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        """Stream chunks for `request`, each stamped with the model that answered. Raises
        ModelNotFound, QueueFull, EngineError (and ContextLengthExceeded) before the first
        chunk; GenerationTimeout when the model's `timeout_s` runs out. When the model fails
        before its first chunk for a reason that is not the request's fault, its `fallbacks`
        are tried in order. Closing the iterator stops the generation."""
        chosen = self.get(request.model)
        candidates = [chosen.id, *self._known(chosen.spec.config.fallbacks)]
        for position, model_id in enumerate(candidates):
            attempt = replace(request, model=model_id)
            stream = self._generate_on(attempt)
            try:
                first = await anext(stream)
            except StopAsyncIteration:
                return
            except Exception as exc:
                await close(stream)
                if position == len(candidates) - 1 or not _worth_a_fallback(exc):
                    raise
                self._log.warning(
                    "falling back", model=model_id, to=candidates[position + 1], error=str(exc)
                )
                continue
            try:
                yield first
                async for chunk in stream:
                    yield chunk
            finally:
                await close(stream)
            return

    async def _generate_on(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        model = self.get(request.model)
        model.admit(background=request.background)
        try:
            engine = await model.ensure_loaded()
            deadline = asyncio.get_running_loop().time() + model.spec.config.timeout_s
            stream = engine.generate(request)
            try:
                while True:
                    try:
                        async with asyncio.timeout_at(deadline):
                            chunk = await anext(stream)
                    except StopAsyncIteration:
                        return
                    except TimeoutError:
                        limit = model.spec.config.timeout_s
                        message = f"generation on {model.id} took longer than {limit}s"
                        raise GenerationTimeout(message) from None
                    chunk.model = model.id
                    yield chunk
            finally:
                await close(stream)
        finally:
            model.release(background=request.background)

    async def embed(
        self, model_id: str, texts: Sequence[str], *, background: bool = False
    ) -> Embeddings:
        model = self.get(model_id)
        model.admit(background=background)
        try:
            engine = await model.ensure_loaded()
            try:
                async with asyncio.timeout(model.spec.config.timeout_s):
                    return await engine.embed(texts)
            except TimeoutError:
                limit = model.spec.config.timeout_s
                raise GenerationTimeout(
                    f"embedding on {model.id} took longer than {limit}s"
                ) from None
        finally:
            model.release(background=background)

    def tokenize(self, model_id: str, text: str) -> list[int]:
        engine = self.get(model_id).engine
        if engine is None:
            raise EngineError(f"model {model_id} is not loaded")
        return engine.tokenize(text)

    async def load(self, model_id: str) -> ServedModel:
        model = self.get(model_id)
        await model.ensure_loaded()
        return model

    async def unload(self, model_id: str) -> ServedModel:
        model = self.get(model_id)
        await model.unload()
        return model

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the `preload` models (a failure is logged and leaves the service unready),
        then watch for idle ones."""
        for model in self._models.values():
            if model.spec.config.preload:
                try:
                    await model.ensure_loaded()
                except EngineError as exc:
                    self._log.error("preload failed", model=model.id, error=str(exc))
        self.watch_idle()

    def watch_idle(self) -> None:
        """Unload idle models from now on when any asks for it (`idle_unload_s`): at start, and
        after an apply gave one the setting."""
        wanted = any(m.spec.config.idle_unload_s > 0 for m in self._models.values())
        if wanted and self._idle_task is None:
            self._idle_task = asyncio.get_running_loop().create_task(self._unload_idle())

    async def stop(self) -> None:
        if self._idle_task is not None:
            self._idle_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._idle_task
            self._idle_task = None
        for model in self._models.values():
            await model.unload()

    async def _unload_idle(self) -> None:
        while True:
            # Again each time: an apply may have changed the limits.
            limits = [m.spec.config.idle_unload_s for m in self._models.values()]
            await asyncio.sleep(max(0.05, min((t for t in limits if t > 0), default=60) / 4))
            now = time.monotonic()
            for model in self._models.values():
                limit = model.spec.config.idle_unload_s
                idle = now - model.last_used
                if limit > 0 and model.engine is not None and model.in_flight == 0 and idle > limit:
                    self._log.info("unloading idle model", model=model.id, idle_s=round(idle, 1))
                    await model.unload()
