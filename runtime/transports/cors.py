"""CORS for the HTTP app: closed unless `server.cors.allow_origins` lists origins.

Starlette's middleware does the header work; this subclass only changes what a refused
preflight looks like: a 403 in OpenAI's error shape (no allow-origin header), not plain text.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp

from runtime.errors import quoted
from runtime.types import HandlerError

if TYPE_CHECKING:
    from fastapi import FastAPI
    from starlette.datastructures import Headers

    from runtime.config_schema import CorsConfig


class ClosedCorsMiddleware(CORSMiddleware):
    """CORSMiddleware whose refused preflights answer in the API's own error shape."""

    def __init__(self, app: ASGIApp, cors: CorsConfig) -> None:
        super().__init__(
            app,
            allow_origins=list(cors.allow_origins),
            allow_methods=[m.upper() for m in cors.allow_methods],
            allow_headers=list(cors.allow_headers),
            allow_credentials=cors.allow_credentials,
            max_age=cors.max_age_s,
        )

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code < 400:
            return response
        origin = request_headers.get("origin", "")
        if not self.is_allowed_origin(origin):
            reason = f"origin {quoted(origin)} is not in server.cors.allow_origins"
        else:
            reason = "the requested method or headers are not in server.cors.allow_methods/headers"
        error = HandlerError(403, f"CORS preflight refused: {reason}", type="permission_error")
        return JSONResponse(error.to_dict(), status_code=403, headers={"vary": "Origin"})


def install_cors(app: FastAPI, cors: CorsConfig) -> None:
    """Add the CORS middleware only when origins are configured: otherwise no CORS header is
    ever sent (a preflight is just an OPTIONS request, answered 405 like any other)."""
    if cors.allow_origins:
        app.add_middleware(ClosedCorsMiddleware, cors=cors)
