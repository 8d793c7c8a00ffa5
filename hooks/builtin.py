"""Tiffin's built-in hook implementations, registered `trylast` so any plugin can override them."""

from __future__ import annotations

from collections.abc import Mapping
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


def builtin_plugins() -> list[object]:
    return [CostFromConfig()]
