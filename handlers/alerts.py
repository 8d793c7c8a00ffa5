"""The Alertmanager webhook (`POST /integrations/alertmanager/webhook`): each alert of a
notification becomes one event on the bus, `alert.firing` or `alert.resolved` (source
`alertmanager`), and one log line (warning when firing, info when resolved).

Subscribers (`runtime.events.subscribe("alert.*", ...)`, plugins' `on_event`) act on them; the
alertmanager integration, when selected, keeps the latest for its status page.
"""

from __future__ import annotations

from typing import Any

from handlers.alert_types import WebhookAlert, WebhookPayload
from handlers.parsing import parse
from runtime.dispatch import Context, request_body
from runtime.events import BusEvent
from runtime.types import Event

SOURCE = "alertmanager"


def event_data(alert: WebhookAlert, payload: WebhookPayload) -> dict[str, Any]:
    """What an `alert.*` event carries: the alert as Alertmanager described it."""
    ended = alert.ended
    return {
        "alertname": alert.alertname,
        "severity": alert.severity,
        "status": alert.status,
        "labels": dict(alert.labels),
        "annotations": dict(alert.annotations),
        "fingerprint": alert.fingerprint,
        "startsAt": alert.starts_at.isoformat(),
        "endsAt": ended.isoformat() if ended is not None else None,
        "generatorURL": alert.generator_url,
        "receiver": payload.receiver,
        "groupKey": payload.group_key,
        "externalURL": payload.external_url,
    }


@request_body(WebhookPayload)
async def webhook(event: Event, ctx: Context) -> dict[str, Any]:
    """Receive one Alertmanager notification (webhook payload version 4); answers how many
    alerts it carried. A payload that is not one is a 400 naming the field."""
    payload = parse(WebhookPayload, event.body)
    if payload.truncated_alerts:
        ctx.log.warning(
            "alertmanager truncated a notification",
            receiver=payload.receiver,
            truncated_alerts=payload.truncated_alerts,
            hint="raise max_alerts in the webhook_config",
        )
    counts = {"firing": 0, "resolved": 0}
    for alert in payload.alerts:
        data = event_data(alert, payload)
        log = ctx.log.warning if alert.status == "firing" else ctx.log.info
        log(
            f"alert {alert.status}",
            alertname=alert.alertname,
            severity=alert.severity,
            summary=alert.annotations.get("summary", ""),
            fingerprint=alert.fingerprint,
            receiver=payload.receiver,
        )
        await ctx.events.publish(BusEvent(type=f"alert.{alert.status}", source=SOURCE, data=data))
        counts[alert.status] += 1
    return {"received": len(payload.alerts), **counts}
