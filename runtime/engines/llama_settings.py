"""A llama.cpp model's `engine_settings`, read and checked once: the batching knobs Tiffin owns
(`parallel`, `batch_tokens`, `n_ctx`, `prompt_cache`, threads) and the rest, which go to
llama-cpp-python's `Llama` as they are.

- `parallel`: sequences decoded together (slots); default 4 on the CPU.
- `batch_tokens`: tokens per `llama_decode` step, decoding tokens and prompt chunks together
  (`n_batch` is read as its old name); default 512.
- `n_ctx`: KV cache cells shared by all slots; default `context_length` * `parallel`, so every
  slot can hold a whole context. A slot's context (the per-request limit) is
  min(context_length, n_ctx // parallel).
- `n_threads` / `n_threads_batch`: unset, each step runs on the cores the rest of the machine
  leaves free, at least one (runtime/engines/llama_threads.py); set, always that many.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from runtime.config import ModelConfig
from runtime.engines.base import parallel_setting
from runtime.errors import ConfigError

DEFAULT_PARALLEL = 4
DEFAULT_BATCH_TOKENS = 512
MIN_SLOT_CONTEXT = 256


@dataclass(frozen=True)
class LlamaSettings:
    parallel: int
    batch_tokens: int
    n_ctx: int
    slot_context: int
    n_threads: int
    n_threads_batch: int
    adaptive_threads: bool  # n_threads unset: ThreadChooser gives llama.cpp the free cores
    prompt_cache: bool
    llama_args: dict[str, Any]  # everything else, for `Llama(...)`


def llama_settings(config: ModelConfig, key: str = "engine_settings") -> LlamaSettings:
    """The settings of `config`, or a ConfigError naming `key`.<setting> and what it needs."""
    settings = dict(config.engine_settings)
    parallel = parallel_setting(settings, DEFAULT_PARALLEL, key)
    settings.pop("parallel", None)
    batch_tokens = _integer(
        settings.pop("batch_tokens", settings.pop("n_batch", DEFAULT_BATCH_TOKENS)),
        f"{key}.batch_tokens",
        1,
    )
    if batch_tokens < parallel:
        raise ConfigError(
            f"{key}.batch_tokens",
            batch_tokens,
            f"at least parallel ({parallel}): every decoding sequence needs a token per step",
        )
    n_ctx = _integer(settings.pop("n_ctx", config.context_length * parallel), f"{key}.n_ctx", 1)
    slot_context = min(config.context_length, n_ctx // parallel)
    if slot_context < MIN_SLOT_CONTEXT:
        raise ConfigError(
            f"{key}.n_ctx",
            n_ctx,
            f"at least {MIN_SLOT_CONTEXT} tokens per slot (n_ctx // parallel = {slot_context},"
            f" with parallel {parallel} and context_length {config.context_length}): raise"
            " n_ctx or context_length, or lower parallel",
        )
    cores = os.cpu_count() or 1
    given = settings.pop("n_threads", None)
    threads = _integer(given or cores, f"{key}.n_threads", 1)
    threads_batch = _integer(
        settings.pop("n_threads_batch", 0) or threads, f"{key}.n_threads_batch", 1
    )
    prompt_cache = settings.pop("prompt_cache", True)
    if not isinstance(prompt_cache, bool):
        raise ConfigError(f"{key}.prompt_cache", prompt_cache, "true or false")
    return LlamaSettings(
        parallel=parallel,
        batch_tokens=batch_tokens,
        n_ctx=n_ctx,
        slot_context=slot_context,
        n_threads=threads,
        n_threads_batch=threads_batch,
        adaptive_threads=not given and cores > 1,
        prompt_cache=prompt_cache,
        llama_args=settings,
    )


def _integer(value: Any, key: str, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigError(key, value, f"an integer >= {least}")
    return value
