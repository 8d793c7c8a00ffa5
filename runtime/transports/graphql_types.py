"""GraphQL's wire types (strawberry) and the functions that build them from the handlers' dicts
(OpenAI shapes, integration and bus-event dicts). No logic beyond renaming and picking fields:
the handler decides what is true, this module only says it in GraphQL."""

from __future__ import annotations

from typing import Any

import strawberry
from strawberry.scalars import JSON


@strawberry.type(description="A servable model (the `/v1/models` entry).")
class Model:
    id: str
    name: str
    provider: str
    status: str = strawberry.field(description="unloaded, loading, loaded or error")
    capabilities: list[str]
    engine: str | None = None
    aliases: list[str] = strawberry.field(default_factory=list)
    context_length: int | None = None
    slots_busy: int | None = strawberry.field(
        default=None,
        description="Slots of a batching engine decoding a sequence now; null when the model's "
        "engine does not batch or is not loaded.",
    )
    slots_free: int | None = strawberry.field(
        default=None,
        description="Slots of a batching engine free for a new request; null as for slotsBusy.",
    )


@strawberry.type(description="One configured integration and its state.")
class Integration:
    name: str
    type: str
    status: str
    enabled: bool
    required: bool
    priority: int
    dependencies: list[str]
    healthy: bool | None = None
    last_error: str | None = None
    started_at: float | None = None
    restarts: int = 0


@strawberry.type(description="Token counts of one generation.")
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@strawberry.type(description="A function call the model made.")
class ToolCall:
    id: str
    name: str
    arguments: str = strawberry.field(description="The arguments, as JSON text.")


@strawberry.input(description="A function the model may call (docs/api/tools.md).")
class ToolInput:
    name: str
    description: str | None = None
    parameters: JSON | None = strawberry.field(
        default=None, description="The JSON Schema (type object) of its arguments."
    )


@strawberry.type(description="The answer of `generateText`: a chat completion with one choice.")
class Generation:
    id: str
    model: str
    text: str
    tokens: int = strawberry.field(description="Tokens generated (usage.completion_tokens).")
    cost: float | None = strawberry.field(
        description="The generation's cost, from the model's prices (x-tiffin-cost)."
    )
    finish_reason: str | None
    usage: Usage
    tool_calls: list[ToolCall] = strawberry.field(
        default_factory=list, description="The calls made (finishReason tool_calls)."
    )


@strawberry.type(description="A model's status after `loadModel` / `unloadModel`.")
class ModelStatus:
    id: str
    status: str
    provider: str | None = None
    engine: str | None = None


@strawberry.type(description="A model's status change, as it happens (a `model.*` bus event).")
class ModelStatusUpdate:
    id: str
    status: str
    event: str = strawberry.field(description="The bus event: model.loaded, model.unloaded, ...")
    provider: str | None = None
    time: float | None = None


def model(card: dict[str, Any]) -> Model:
    return Model(
        id=card["id"],
        name=card.get("name") or card["id"],
        provider=card.get("provider") or card.get("owned_by") or "",
        status=card.get("state") or card.get("status") or "",
        capabilities=sorted(card.get("capabilities") or []),
        engine=card.get("engine"),
        aliases=list(card.get("aliases") or []),
        context_length=card.get("context_length"),
        slots_busy=card.get("slots_busy"),
        slots_free=card.get("slots_free"),
    )


def models(listing: dict[str, Any]) -> list[Model]:
    return [model(card) for card in listing.get("data", [])]


def integrations(status: dict[str, Any]) -> list[Integration]:
    found = []
    for name, entry in (status.get("integrations") or {}).items():
        health = entry.get("health") or {}
        found.append(
            Integration(
                name=entry.get("name") or name,
                type=entry.get("type") or "",
                status=entry.get("status") or "",
                enabled=bool(entry.get("enabled")),
                required=bool(entry.get("required")),
                priority=int(entry.get("priority") or 0),
                dependencies=list(entry.get("dependencies") or []),
                healthy=health.get("healthy"),
                last_error=entry.get("last_error"),
                started_at=entry.get("started_at"),
                restarts=int(entry.get("restarts") or 0),
            )
        )
    return found


def generation(completion: dict[str, Any]) -> Generation:
    choice = (completion.get("choices") or [{}])[0]
    usage = completion.get("usage") or {}
    cost = usage.get("cost", completion.get("cost"))
    return Generation(
        id=completion.get("id", ""),
        model=completion.get("model", ""),
        text=(choice.get("message") or {}).get("content") or "",
        tokens=int(usage.get("completion_tokens") or 0),
        cost=None if cost is None else float(cost),
        finish_reason=choice.get("finish_reason"),
        usage=Usage(
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            total_tokens=int(usage.get("total_tokens") or 0),
        ),
        tool_calls=[
            ToolCall(id=c["id"], name=c["function"]["name"], arguments=c["function"]["arguments"])
            for c in (choice.get("message") or {}).get("tool_calls") or []
        ],
    )


def model_status(described: dict[str, Any]) -> ModelStatus:
    return ModelStatus(
        id=described["id"],
        status=described.get("state") or described.get("status") or "",
        provider=described.get("provider"),
        engine=described.get("engine"),
    )


def model_status_update(event: dict[str, Any]) -> ModelStatusUpdate | None:
    """A bus-event dict {type, source, data, time} as a status update; None when it is not
    about one model."""
    data = event.get("data") or {}
    model_id = data.get("model")
    if not isinstance(model_id, str):
        return None
    return ModelStatusUpdate(
        id=model_id,
        status=data.get("state") or "",
        event=event.get("type", ""),
        provider=data.get("provider"),
        time=event.get("time"),
    )
