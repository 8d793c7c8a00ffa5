"""`python -m runtime apply [overrides...] --to URL [--dry-run]` and
`python -m runtime plan --diff --to URL [overrides...]`.

The config is composed exactly as `serve` composes it, then sent (unresolved: `${oc.env:...}`
values stay references, which the server resolves from its own environment) to a running
server's `POST /admin/config`, which answers with the change plan and whether it was applied.
The admin key comes from `--key` or TIFFIN_ADMIN_KEY.

Exit codes: 0 applied (or planned), 1 refused or failed (nothing changed), 2 the config is
invalid, 3 the server could not be reached.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

import httpx
from omegaconf import OmegaConf

from runtime.config import compose
from runtime.config_changes import plan_lines
from runtime.errors import ConfigError


def apply_main(args: Sequence[str], *, plan_only: bool = False) -> int:
    verb = "plan --diff" if plan_only else "apply"
    parser = argparse.ArgumentParser(prog=f"python -m runtime {verb}")
    parser.add_argument("--to", required=True, help="the running server, e.g. http://host:3000")
    parser.add_argument("--key", help="an admin API key (default: TIFFIN_ADMIN_KEY)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for it")
    if not plan_only:
        parser.add_argument("--dry-run", action="store_true", help="print the plan only")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for serve")
    parsed = parser.parse_args([a for a in args if a != "--diff"])
    try:
        cfg = compose(parsed.overrides)
    except ConfigError as error:
        print(f"tiffin: config error: {error}", file=sys.stderr)
        return 2
    body = {
        "config": OmegaConf.to_container(cfg, resolve=False, enum_to_str=True),
        "dry_run": plan_only or parsed.dry_run,
    }
    key = parsed.key or os.environ.get("TIFFIN_ADMIN_KEY", "")
    headers = {"authorization": f"Bearer {key}"} if key else {}
    url = parsed.to.rstrip("/") + "/admin/config"
    try:
        response = httpx.post(url, json=body, headers=headers, timeout=parsed.timeout)
    except httpx.HTTPError as error:
        print(f"tiffin: cannot reach {parsed.to}: {error}", file=sys.stderr)
        return 3
    answer: dict[str, Any] = response.json() if _is_json(response) else {}
    if response.status_code != 200:
        message = (answer.get("error") or {}).get("message") or response.text[:500]
        print(f"tiffin: {verb} refused ({response.status_code}): {message}", file=sys.stderr)
        return 2 if response.status_code == 400 else 1
    print(describe(answer))
    return 0


def describe(answer: dict[str, Any]) -> str:
    """The server's plan answer as lines for a terminal."""
    lines = plan_lines(answer) or ["  no changes"]
    lines += [f"  warning: {warning}" for warning in answer.get("warnings") or []]
    state = "applied" if answer.get("applied") else "not applied (plan only)"
    if answer.get("applied"):
        state += f" in {answer.get('seconds', 0):.2f}s"
    return "\n".join([f"config {answer.get('hash', '')}: {state}", *lines])


def _is_json(response: httpx.Response) -> bool:
    return str(response.headers.get("content-type", "")).startswith("application/json")
