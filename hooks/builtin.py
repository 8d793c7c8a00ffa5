"""Tiffin's built-in hook implementations, registered `trylast` so any plugin can override them."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from hooks.specs import hookimpl


class CostFromConfig:
    """Prices a generation from the model's `prices` table: per 1k prompt/completion tokens."""

    @hookimpl(trylast=True)
    def estimate_cost(
        self, model: str, prompt_tokens: int, completion_tokens: int, prices: Any
    ) -> float | None:
        if not isinstance(prices, Mapping):
            return 0.0
        prompt = float(prices.get("prompt_per_1k", 0.0) or 0.0)
        completion = float(prices.get("completion_per_1k", 0.0) or 0.0)
        return (prompt_tokens * prompt + completion_tokens * completion) / 1000.0


class BuiltinEngines:
    """Tiffin's local engines, by the names a model's `engine:` uses. Each engine module imports
    its heavy library (llama_cpp, torch, exllamav2) only when a model is loaded."""

    @hookimpl(trylast=True)
    def register_engines(self, register: Callable[..., None]) -> None:
        from runtime.engines import embeddings, exllamav2, llama_cpp, transformers

        register("llama_cpp", lambda spec: llama_cpp.LlamaCppEngine(spec.path, spec.config))
        register(
            "embeddings",
            lambda spec: embeddings.SentenceTransformerEngine(
                spec.path, dict(spec.config.engine_settings)
            ),
        )
        register(
            "transformers", lambda spec: transformers.TransformersEngine(spec.path, spec.config)
        )
        register("exllamav2", lambda spec: exllamav2.ExLlamaV2Engine(spec.path, spec.config))
