"""Test integrations: scriptable stand-ins for the real ones that arrive in later issues.

Registered through the `register_integrations` hook (this module is a plugin: tests add
`plugins=[tests.fakes]`), which also exercises the registry's rule that only registered
classes may be named by `_target_`. Behaviour comes from `settings`, so the same classes work
in-process and in a served process:

  fail_initialize: N   fail the first N initialize() calls (-1: always)
  healthy: bool        what health_check() reports
"""

from __future__ import annotations

from collections.abc import Callable

from hooks import hookimpl
from runtime.integrations import BaseIntegration, Health


class Scripted(BaseIntegration):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.initialize_calls = 0
        self.shutdown_calls = 0
        self.healthy = bool(self.settings.get("healthy", True))

    async def initialize(self) -> None:
        self.initialize_calls += 1
        failures = int(self.settings.get("fail_initialize", 0))
        if failures < 0 or self.initialize_calls <= failures:
            where = self.settings.get("url", "upstream")
            raise ConnectionError(f"cannot reach {where} (attempt {self.initialize_calls})")

    async def health_check(self) -> Health:
        return Health(self.healthy, "ok" if self.healthy else "upstream not answering")

    async def shutdown(self) -> None:
        self.shutdown_calls += 1


class NotAnIntegration:
    """Named by a `_target_` in a test to prove the registry refuses it."""


@hookimpl
def register_integrations(register: Callable[..., None]) -> None:
    register(Scripted, alias="scripted")
