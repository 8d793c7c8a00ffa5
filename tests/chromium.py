"""Headless Chromium driven over the Chrome DevTools Protocol (a websocket), for tests of pages
Tiffin serves: open a URL, evaluate JavaScript in it, wait for a condition on the page."""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import websockets

from tests.binaries import require_binary


class Page:
    """One browser tab: `evaluate` runs an expression and returns its (JSON) value."""

    def __init__(self, socket: websockets.ClientConnection) -> None:
        self._socket = socket
        self._ids = itertools.count(1)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self._ids)
        await self._socket.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads(await self._socket.recv())
            if message.get("id") == call_id:
                if "error" in message:
                    raise AssertionError(f"{method}: {message['error']}")
                return dict(message.get("result") or {})

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, within: float = 30) -> Any:
        """Evaluate `expression` until it is truthy; returns that value."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            value = await self.evaluate(expression)
            if value:
                return value
            await asyncio.sleep(0.2)
        html = await self.evaluate("document.documentElement.outerHTML.slice(0, 3000)")
        raise AssertionError(f"{expression} never held; the page: {html}")


@asynccontextmanager
async def chromium_page(workdir: Path, url: str) -> AsyncIterator[Page]:
    """Headless Chromium showing `url` (a skip without chromium, a failure under CI=true)."""
    binary = require_binary("chromium")
    profile = workdir / "chromium-profile"
    process = subprocess.Popen(  # noqa: ASYNC220 (started once; the test waits on it anyway)
        [
            binary,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            f"--user-data-dir={profile}",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(workdir / "chromium.log").open("wb"),
    )
    try:
        port = await _debugging_port(profile / "DevToolsActivePort", process)
        async with httpx.AsyncClient() as http:
            targets = (await http.get(f"http://127.0.0.1:{port}/json/list")).json()
        page_url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        async with websockets.connect(page_url, max_size=None) as socket:
            page = Page(socket)
            await page.call("Page.navigate", url=url)
            yield page
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def _debugging_port(path: Path, process: subprocess.Popen[bytes]) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"chromium exited with {process.returncode}")
        written = await asyncio.to_thread(_read, path)
        if written:
            return int(written.splitlines()[0])
        await asyncio.sleep(0.1)
    raise AssertionError("chromium never opened its debugging port")


def _read(path: Path) -> str:
    return path.read_text().strip() if path.exists() else ""
