"""Integration framework: the base class, the registry of allowed classes, the manager, and the
Protocols the Runtime finds integrations by (capabilities.py). Integrations of more than one
module are packages (ollama/, openai_compatible/, redis/, huggingface_hub/, grafana/)."""

from runtime.integrations.base import BaseIntegration, Health, IntegrationStatus
from runtime.integrations.capabilities import (
    KeyStore,
    ModelProvider,
    RateStoreProvider,
    RequestLogSink,
)
from runtime.integrations.manager import (
    IntegrationManager,
    IntegrationUnavailable,
    get_integration_manager,
)
from runtime.integrations.registry import IntegrationRegistry

__all__ = [
    "BaseIntegration",
    "Health",
    "IntegrationManager",
    "IntegrationRegistry",
    "IntegrationStatus",
    "IntegrationUnavailable",
    "KeyStore",
    "ModelProvider",
    "RateStoreProvider",
    "RequestLogSink",
    "get_integration_manager",
]
