"""What the model-platform integrations (ollama, openai_compatible) share: the spec of one of
their models, from the platform's own name for it plus the operator's per-model overrides."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

from omegaconf import OmegaConf

from runtime.config_schema import ModelConfig
from runtime.engines.engine import Engine, ModelSpec


def platform_model(
    *,
    provider: str,
    engine: str,
    model_id: str,
    remote_name: str,
    source: str,
    max_queue: int,
    override: Mapping[str, Any] | None,
    factory: Callable[[ModelSpec], Engine],
    capabilities: frozenset[str],
    context_length: int | None = None,
) -> ModelSpec:
    """`model_id` is what clients ask for, `remote_name` what the platform calls it; `override`
    holds ModelConfig fields from `settings.models.<remote_name>` (aliases, fallbacks...), which
    win over what the platform says of the model (`context_length`)."""
    known = {"id": model_id, "source": source, "max_queue": max_queue}
    if context_length:
        known["context_length"] = context_length
    node = OmegaConf.merge(OmegaConf.structured(ModelConfig), known, dict(override or {}))
    config = cast(ModelConfig, OmegaConf.to_object(node))
    return ModelSpec(
        config, Path(remote_name), engine, provider, factory=factory, capabilities=capabilities
    )
