"""Integration framework: the base class, the registry of allowed classes, and the manager."""

from runtime.integrations.base import BaseIntegration, Health, IntegrationStatus
from runtime.integrations.manager import IntegrationManager, get_integration_manager
from runtime.integrations.registry import IntegrationRegistry

__all__ = [
    "BaseIntegration",
    "Health",
    "IntegrationManager",
    "IntegrationRegistry",
    "IntegrationStatus",
    "get_integration_manager",
]
