"""The OpenAPI description of the HTTP app's routes built from the route table.

The endpoints read the raw request (the handlers validate it), so FastAPI cannot infer their
bodies or parameters. This module adds them: each path parameter, the body a handler declared
with `runtime.dispatch.request_body` (its pydantic model's JSON Schema), and the error every
route may answer. Description only: the handlers' validation decides what is accepted.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from fastapi.openapi.utils import get_openapi

if TYPE_CHECKING:
    from fastapi import FastAPI

_PATH_PARAM = re.compile(r"{(\w+)(?::\w+)?}")
_COMPONENTS = "#/components/schemas/"

# OpenAI's error object; the Ollama-compatible routes answer `{"error": "message"}`.
ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "anyOf": [
                {"type": "string"},
                {
                    "type": "object",
                    "required": ["message", "type"],
                    "properties": {
                        "message": {"type": "string"},
                        "type": {"type": "string"},
                        "param": {"type": ["string", "null"]},
                        "code": {"type": ["string", "null"]},
                    },
                },
            ]
        }
    },
}


def route_openapi(path: str, body: Any, schemas: dict[str, Any]) -> dict[str, Any]:
    """The `openapi_extra` of one route; schemas it refers to are added to `schemas`."""
    extra: dict[str, Any] = {
        "responses": {
            "200": {
                "description": "The handler's answer: JSON, or a stream of server-sent events "
                "(`stream: true`) or NDJSON (the Ollama routes)",
                "content": {
                    "application/json": {"schema": {}},
                    "text/event-stream": {"schema": {"type": "string"}},
                    "application/x-ndjson": {"schema": {"type": "string"}},
                },
            },
            "default": {
                "description": "An error",
                "content": {"application/json": {"schema": {"$ref": f"{_COMPONENTS}Error"}}},
            },
        }
    }
    params = _PATH_PARAM.findall(path)
    if params:
        extra["parameters"] = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in params
        ]
    if body is not None:
        extra["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _body_schema(body, schemas)}},
        }
    return extra


def _body_schema(body: Any, schemas: dict[str, Any]) -> dict[str, Any]:
    if isinstance(body, dict):
        return body
    name = f"{body.__module__.rsplit('.', 1)[-1]}.{body.__name__}"
    schema = body.model_json_schema(ref_template=f"{_COMPONENTS}{name}.{{model}}")
    for ref, definition in schema.pop("$defs", {}).items():
        schemas[f"{name}.{ref}"] = definition
    schemas[name] = schema
    return {"$ref": f"{_COMPONENTS}{name}"}


def install_openapi(app: FastAPI, schemas: dict[str, Any]) -> None:
    """Serve `/openapi.json` with the request schemas and the error shape as components."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = get_openapi(
                title=app.title, version=app.version, routes=app.routes, openapi_version="3.1.0"
            )
            components = spec.setdefault("components", {}).setdefault("schemas", {})
            components.update(schemas)
            components["Error"] = ERROR_SCHEMA
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
