"""The running config (`GET /admin/config`, secrets masked) and applying a new one
(`POST /admin/config`, what `python -m runtime apply` sends): see runtime/reconfigure.py."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from runtime.config import config_from_data
from runtime.dispatch import Context, request_body
from runtime.errors import ConfigError
from runtime.reconfigure import ApplyError, config_hash
from runtime.types import Event, HandlerError


async def running_config(event: Event, ctx: Context) -> dict[str, Any]:
    """The config this worker serves (resolved, secrets masked), its hash, when it was last
    applied, and (with integrations=redis) the hash each other worker and replica reported
    with its last apply."""
    runtime = ctx.runtime
    return {
        "config": runtime.redacted_config(),
        "hash": config_hash(runtime.cfg),
        "applied_at": runtime.reconfigure.applied_at,
        "worker": os.getpid(),
        "peers": runtime.reconfigure.peers,
    }


@request_body(
    {
        "type": "object",
        "properties": {
            "config": {
                "type": "object",
                "description": "A composed config (`python -m runtime --cfg job` as data)",
            },
            "dry_run": {"type": "boolean", "description": "Only plan: change nothing"},
            "wait_s": {
                "type": "number",
                "minimum": 0,
                "maximum": 600,
                "description": "How long to wait for an apply already running (else 409)",
            },
        },
        "required": ["config"],
        "additionalProperties": False,
    }
)
async def apply_config(event: Event, ctx: Context) -> dict[str, Any]:
    """Apply a composed config to the running server: the change plan, carried out with
    nothing in flight dropped, or nothing changed at all (422 with the reason, 409 while
    another apply runs). `dry_run`: the plan only."""
    body = event.body if isinstance(event.body, dict) else {}
    try:
        cfg = await asyncio.to_thread(config_from_data, body.get("config"))  # a tenth of a second
        return await ctx.runtime.reconfigure.apply(
            cfg, dry_run=bool(body.get("dry_run")), wait_s=float(body.get("wait_s") or 0)
        )
    except ConfigError as exc:
        raise HandlerError(
            400, f"config error: {exc}", param=exc.key, code="invalid_config"
        ) from None
    except ApplyError as exc:
        raise HandlerError(exc.status, str(exc), code=exc.kind) from None
