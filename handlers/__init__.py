"""Serverless-style handlers: `async def fn(event, ctx)`, shared by every transport.

They are registered by name through the `register_handlers` hook (below, Tiffin's own); the
route table in `conf/handlers/` maps paths to these names.
"""

from __future__ import annotations

from collections.abc import Callable

from handlers import (
    admin,
    admin_config,
    alerts,
    anthropic_api,
    batches_api,
    files_api,
    integrations,
    live_feeds,
    ollama_api,
    ollama_models,
    openai_api,
    responses_api,
    usage,
)
from hooks import hookimpl


class BuiltinHandlers:
    """Registers Tiffin's own handlers; `trylast` so a plugin may replace any of them."""

    @hookimpl(trylast=True)
    def register_handlers(self, register: Callable[..., None]) -> None:
        register("integrations.status", integrations.status)
        register("integrations.health", integrations.health)
        register("integrations.get", integrations.get)
        register("alerts.webhook", alerts.webhook)
        register("openai.list_models", openai_api.list_models)
        register("openai.get_model", openai_api.get_model)
        register("openai.chat_completions", openai_api.chat_completions)
        register("openai.completions", openai_api.completions)
        register("openai.embeddings", openai_api.embeddings)
        register("openai.responses_create", responses_api.create)
        register("openai.responses_get", responses_api.get)
        register("openai.responses_delete", responses_api.delete)
        register("files.create", files_api.create)
        register("files.list", files_api.list_files)
        register("files.get", files_api.get)
        register("files.content", files_api.content)
        register("files.delete", files_api.delete)
        register("batches.create", batches_api.create)
        register("batches.list", batches_api.list_batches)
        register("batches.get", batches_api.get)
        register("batches.cancel", batches_api.cancel)
        register("batches.watch", batches_api.watch)
        register("anthropic.messages", anthropic_api.messages)
        register("anthropic.count_tokens", anthropic_api.count_tokens)
        register("admin.load_model", admin.load_model)
        register("admin.unload_model", admin.unload_model)
        register("admin.pull_model", admin.pull_model)
        register("admin.running_config", admin_config.running_config)
        register("admin.apply_config", admin_config.apply_config)
        register("metrics.snapshot", live_feeds.snapshot)
        register("metrics.watch", live_feeds.watch)
        register("events.watch", live_feeds.events)
        register("requests.recent", live_feeds.recent_requests)
        register("admin.usage", usage.usage)
        for name in ("version", "tags", "ps", "chat", "generate", "embed", "embeddings"):
            register(f"ollama.{name}", getattr(ollama_api, name))
        for name in ("show", "pull", "create", "copy", "delete"):
            register(f"ollama.{name}", getattr(ollama_models, name))


def builtin_plugins() -> list[object]:
    return [BuiltinHandlers()]
