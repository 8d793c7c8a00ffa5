"""Serverless-style handlers: `async def fn(event, ctx)`, shared by every transport.

They are registered by name through the `register_handlers` hook (below, Tiffin's own); the
route table in `conf/handlers/` maps paths to these names.
"""

from __future__ import annotations

from collections.abc import Callable

from handlers import admin, alerts, integrations, live, ollama, openai, usage
from hooks import hookimpl


class BuiltinHandlers:
    """Registers Tiffin's own handlers; `trylast` so a plugin may replace any of them."""

    @hookimpl(trylast=True)
    def register_handlers(self, register: Callable[..., None]) -> None:
        register("integrations.status", integrations.status)
        register("integrations.health", integrations.health)
        register("integrations.get", integrations.get)
        register("alerts.webhook", alerts.webhook)
        register("openai.list_models", openai.list_models)
        register("openai.get_model", openai.get_model)
        register("openai.chat_completions", openai.chat_completions)
        register("openai.completions", openai.completions)
        register("openai.embeddings", openai.embeddings)
        register("admin.load_model", admin.load_model)
        register("admin.unload_model", admin.unload_model)
        register("admin.pull_model", admin.pull_model)
        register("metrics.snapshot", live.snapshot)
        register("metrics.watch", live.watch)
        register("events.watch", live.events)
        register("requests.recent", live.recent_requests)
        register("admin.usage", usage.usage)
        for name in ("version", "tags", "ps", "chat", "generate", "embed"):
            register(f"ollama.{name}", getattr(ollama, name))


def builtin_plugins() -> list[object]:
    return [BuiltinHandlers()]
