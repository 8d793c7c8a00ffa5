"""The in-process event bus."""

from __future__ import annotations

import asyncio

from runtime.events import BusEvent, EventBus


async def test_patterns_sync_and_async_subscribers_and_unsubscribe() -> None:
    bus = EventBus()
    seen: list[str] = []

    async def async_sub(event: BusEvent) -> None:
        seen.append(f"async:{event.type}")

    unsubscribe = bus.subscribe("integration.*", lambda e: seen.append(f"sync:{e.type}"))
    bus.subscribe("model.loaded", async_sub)
    await bus.publish(BusEvent("integration.started", "t"))
    await bus.publish(BusEvent("model.loaded", "t"))
    unsubscribe()
    await bus.publish(BusEvent("integration.stopped", "t"))
    assert seen == ["sync:integration.started", "async:model.loaded"]
    assert [e.type for e in bus.recent] == [
        "integration.started",
        "model.loaded",
        "integration.stopped",
    ]


async def test_a_failing_subscriber_does_not_break_the_publisher() -> None:
    bus = EventBus()
    seen: list[str] = []

    def broken(event: BusEvent) -> None:
        raise ValueError("boom")

    bus.subscribe("*", broken)
    bus.subscribe("*", lambda e: seen.append(e.type))
    await bus.publish(BusEvent("x", "t"))
    assert seen == ["x"]


async def test_streams_deliver_in_order_and_drop_the_oldest_when_full() -> None:
    bus = EventBus()
    async with bus.stream("a.*", maxsize=2) as events:
        for n in range(3):
            await bus.publish(BusEvent(f"a.{n}", "t"))
        await bus.publish(BusEvent("b.0", "t"))
        received = [(await asyncio.wait_for(anext(events), 1)).type for _ in range(2)]
    assert received == ["a.1", "a.2"]
    await bus.publish(BusEvent("a.9", "t"))  # no subscriber left; nothing raises
