"""A llama.cpp model's `engine_settings`, read and checked once: the batching knobs Tiffin owns
(`parallel`, `batch_tokens`, `n_ctx`, `prompt_cache`, threads) and the rest, which go to
llama-cpp-python's `Llama` as they are.

- `parallel`: sequences decoded together (slots); default 4 on the CPU.
- `batch_tokens`: tokens per `llama_decode` step, decoding tokens and prompt chunks together
  (`n_batch` is read as its old name); default 512.
- `n_ctx`: KV cache cells shared by all slots; default `context_length` * `parallel`, so every
  slot can hold a whole context. A slot's context (the per-request limit) is
  min(context_length, n_ctx // parallel).
- `swa_full`: false (llama.cpp's server default), a sliding-window model (Gemma 3) keeps only
  the window's cells per sequence in its sliding-window layers, not `n_ctx` of them: for Gemma 3
  270M at 4 x 4096 cells about 90 MB of KV cache instead of 290 MB, and attention that spans
  fewer cells. A cached prefix is then reused only while its window's cells are still there.
- `poll`: how hard the thread pool's workers poll for the next step before they sleep, 0-100
  (llama.cpp's `--poll`); default 0, see runtime/engines/llama_threadpool.py.
- `n_threads` / `n_threads_batch`: unset, each step runs on the cores the rest of the machine
  leaves free, at least one (runtime/engines/llama_threads.py); set, always that many.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from runtime.config_schema import ModelConfig
from runtime.engines.engine import parallel_setting
from runtime.errors import ConfigError

DEFAULT_PARALLEL = 4
DEFAULT_BATCH_TOKENS = 512
MIN_SLOT_CONTEXT = 256
DEFAULT_POLL = 0  # workers sleep between steps (llama.cpp's server polls at 50: see --poll)
MAX_POLL = 100


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
    swa_full: bool
    poll: int
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
    prompt_cache = _flag(settings.pop("prompt_cache", True), f"{key}.prompt_cache")
    swa_full = _flag(settings.pop("swa_full", False), f"{key}.swa_full")
    poll = _integer(settings.pop("poll", DEFAULT_POLL), f"{key}.poll", 0)
    if poll > MAX_POLL:
        raise ConfigError(f"{key}.poll", poll, f"an integer from 0 to {MAX_POLL}")
    return LlamaSettings(
        parallel=parallel,
        batch_tokens=batch_tokens,
        n_ctx=n_ctx,
        slot_context=slot_context,
        n_threads=threads,
        n_threads_batch=threads_batch,
        adaptive_threads=not given and cores > 1,
        prompt_cache=prompt_cache,
        swa_full=swa_full,
        poll=poll,
        llama_args=settings,
    )


def _integer(value: Any, key: str, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigError(key, value, f"an integer >= {least}")
    return value


def _flag(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, value, "true or false")
    return value
