"""What handlers share when they translate a request: validating a JSON body against its
pydantic model (a 400 naming the parameter) and filling sampling parameters from the model's
configured defaults."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from runtime.models import ServedModel
from runtime.types import HandlerError

M = TypeVar("M", bound=BaseModel)


SAMPLING = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repeat_penalty",
    "presence_penalty",
    "frequency_penalty",
    "max_tokens",
    "seed",
)


NEUTRAL: dict[str, Any] = {
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 0.0,
    "repeat_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
}


def parse(model: type[M], body: Any) -> M:
    """Validate a JSON body; any problem is a 400 naming the parameter."""
    if not isinstance(body, dict):
        raise HandlerError(400, "the request body must be a JSON object", code="invalid_body")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        message = str(first["msg"]).removeprefix("Value error, ")
        where = f"{param}: " if param else ""
        raise HandlerError(400, f"{where}{message}", param=param, code="invalid_value") from None


def model_defaults(model: ServedModel) -> dict[str, Any]:
    """The model's configured defaults, as GenerationRequest fields. Its `max_tokens` is a
    default cap (`default_max_tokens`): fitted to the room the prompt leaves, where a client's
    max_tokens that does not fit is refused."""
    values = dict(model.spec.config.defaults)
    cap = values.pop("max_tokens", None)
    if cap is not None:
        values["default_max_tokens"] = int(cap)
    return values


def sampling(model: ServedModel, fields: BaseModel) -> dict[str, Any]:
    """The model's configured defaults (`model_defaults`), then whatever the request set."""
    wanted = {*SAMPLING, "default_max_tokens"}
    values = {**NEUTRAL, **{k: v for k, v in model_defaults(model).items() if k in wanted}}
    for name in SAMPLING:
        value = getattr(fields, name, None)
        if value is not None:
            values[name] = value
    return values
