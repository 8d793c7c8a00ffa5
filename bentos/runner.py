"""The runner service of `serving.topology=split`: the GPU engines' models in a BentoML service
of their own (`resources={"gpu": serving.runner_gpus}`), which the API service reaches through
`bentoml.depends`. The work is RunnerHost's (runtime/runner_client.py); this only exposes it."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, cast

import bentoml

from runtime.app import Runtime
from runtime.runner_client import RunnerHost


class RunnerProxyClient:
    """RunnerClient over the runner's BentoML proxy. Calls go by API name through `call()`:
    the proxy grows one method per API only once BentoML has entered it, which may be after
    the API service's startup hook has used it."""

    def __init__(self, proxy: Any) -> None:
        self.proxy = proxy

    def generate(self, *, request: dict[str, Any]) -> AsyncIterator[str]:
        return cast(AsyncIterator[str], self.proxy.call("generate", request=request))

    async def load_model(self, *, model: str) -> dict[str, Any]:
        return cast(dict[str, Any], await self.proxy.call("load_model", model=model))

    async def unload_model(self, *, model: str) -> dict[str, Any]:
        return cast(dict[str, Any], await self.proxy.call("unload_model", model=model))

    async def embed(self, *, model: str, texts: list[str]) -> dict[str, Any]:
        return cast(dict[str, Any], await self.proxy.call("embed", model=model, texts=texts))


def build_runner(runtime: Runtime) -> Any:
    """A BentoML service class serving the runner-placed models of `runtime`'s config."""
    host = RunnerHost(runtime)
    serving = runtime.settings.serving
    resources = {"gpu": serving.runner_gpus} if serving.runner_gpus else {}

    @bentoml.service(
        name="tiffin-runner",
        workers=serving.runner_workers,
        resources=resources,
        traffic={"timeout": int(runtime.settings.server.request_timeout_s)},
    )
    class TiffinRunner:
        """One process holding the GPU models; each request is one generation job."""

        @bentoml.on_startup
        async def start_models(self) -> None:
            await host.start()

        @bentoml.on_shutdown
        async def stop_models(self) -> None:
            await host.stop()

        async def __is_ready__(self) -> bool:
            return host.models.ready

        @bentoml.api
        async def generate(self, request: dict[str, Any]) -> AsyncGenerator[str, None]:
            async for line in host.generate(request):
                yield line

        @bentoml.api
        async def load_model(self, model: str) -> dict[str, Any]:
            return await host.load_model(model)

        @bentoml.api
        async def unload_model(self, model: str) -> dict[str, Any]:
            return await host.unload_model(model)

        @bentoml.api
        async def embed(self, model: str, texts: list[str]) -> dict[str, Any]:
            return await host.embed(model, texts)

    return TiffinRunner
