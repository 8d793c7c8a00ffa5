"""Post-deploy smoke test (.github/workflows/release.yml): wait until `/readyz` answers 200, then
send one chat completion and check that it answers with a message. Standard library only, so a
bare runner's python3 runs it. Exits 0 when both pass, 1 (with the reason) when either fails.

    python3 scripts/smoke_test.py http://127.0.0.1:3000 [--model gemma-3-270m] [--wait 300]

An API key, where the deployment requires one, comes from TIFFIN_API_KEY (sent as a bearer token).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Any


def request(url: str, body: dict[str, Any] | None, timeout: float) -> tuple[int, bytes]:
    headers = {"content-type": "application/json"}
    if key := os.environ.get("TIFFIN_API_KEY"):
        headers["authorization"] = f"Bearer {key}"
    data = None if body is None else json.dumps(body).encode()
    # The URL is the operator's own deployment, given on the command line.
    call = urllib.request.Request(url, data=data, headers=headers)  # noqa: S310
    try:
        with urllib.request.urlopen(call, timeout=timeout) as response:  # noqa: S310  # nosec B310
            return int(response.status), response.read()
    except urllib.error.HTTPError as error:
        return int(error.code), error.read()


def wait_ready(base: str, wait: float) -> None:
    deadline = time.monotonic() + wait
    last = "no answer"
    while True:
        try:
            status, body = request(f"{base}/readyz", None, timeout=10)
            if status == 200:
                return
            last = f"{status} {body[:300].decode(errors='replace')}"
        except OSError as error:
            last = str(error)
        if time.monotonic() >= deadline:
            raise SystemExit(f"smoke: {base}/readyz not ready after {wait:.0f}s (last: {last})")
        time.sleep(2)


def chat(base: str, model: str) -> str:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 8,
    }
    status, raw = request(f"{base}/v1/chat/completions", body, timeout=120)
    text = raw[:500].decode(errors="replace")
    if status != 200:
        raise SystemExit(f"smoke: chat completion answered {status}, expected 200: {text}")
    try:
        reply = json.loads(raw)
        message = reply["choices"][0]["message"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise SystemExit(f"smoke: chat completion has no choices[0].message: {text}") from None
    if message.get("role") != "assistant" or not isinstance(message.get("content"), str):
        raise SystemExit(f"smoke: expected an assistant message with content, got {message}")
    return str(message["content"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base_url", help="the deployment, e.g. https://tiffin.staging.example")
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--wait", type=float, default=300, help="seconds to wait for /readyz")
    args = parser.parse_args(argv)
    base = args.base_url.rstrip("/")
    wait_ready(base, args.wait)
    print(f"smoke: {base}/readyz is ready")
    content = chat(base, args.model)
    print(f"smoke: {args.model} answered {content!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
