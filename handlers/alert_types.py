"""Wire types of Alertmanager's webhook (payload version 4): validation (pydantic) and nothing
else. Field names are Alertmanager's (camelCase on the wire), documented at
https://prometheus.io/docs/alerting/latest/configuration/#webhook_config."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

AlertStatus = Literal["firing", "resolved"]
# Alertmanager's "no end yet" (Go's zero time) in endsAt of a firing alert.
_NO_END_YEAR = 1


class WebhookModel(BaseModel):
    # Fields Alertmanager adds in later versions are ignored, not refused.
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class WebhookAlert(WebhookModel):
    """One alert of a notification."""

    status: AlertStatus
    labels: dict[str, str]
    annotations: dict[str, str] = Field(default_factory=dict)
    starts_at: AwareDatetime = Field(alias="startsAt")
    ends_at: AwareDatetime | None = Field(default=None, alias="endsAt")
    generator_url: str = Field(default="", alias="generatorURL")
    fingerprint: str = Field(min_length=1)

    @property
    def alertname(self) -> str:
        return self.labels.get("alertname", "")

    @property
    def severity(self) -> str:
        return self.labels.get("severity", "")

    @property
    def ended(self) -> datetime | None:
        """endsAt, or None while Alertmanager knows no end (a firing alert's zero time)."""
        if self.ends_at is None or self.ends_at.year == _NO_END_YEAR:
            return None
        return self.ends_at


class WebhookPayload(WebhookModel):
    """One notification: a group of alerts sent to one receiver."""

    version: Literal["4"]
    receiver: str
    status: AlertStatus
    alerts: list[WebhookAlert]
    group_key: str = Field(default="", alias="groupKey")
    truncated_alerts: int = Field(default=0, ge=0, alias="truncatedAlerts")
    group_labels: dict[str, str] = Field(default_factory=dict, alias="groupLabels")
    common_labels: dict[str, str] = Field(default_factory=dict, alias="commonLabels")
    common_annotations: dict[str, str] = Field(default_factory=dict, alias="commonAnnotations")
    external_url: str = Field(default="", alias="externalURL")
