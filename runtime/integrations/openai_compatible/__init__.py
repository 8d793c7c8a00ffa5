"""openai_compatible: any OpenAI-compatible upstream's models (`openai_compatible_integration.py`),
each served by an Engine that calls the upstream (`openai_upstream.py`) behind a circuit breaker
(`circuit.py`)."""

from runtime.integrations.openai_compatible.openai_compatible_integration import (
    DEFAULT_OPENAICOMPATIBLEINTEGRATION_CONFIG,
    CircuitSettings,
    OpenAICompatibleIntegration,
    OpenAICompatibleSettings,
)

__all__ = [
    "DEFAULT_OPENAICOMPATIBLEINTEGRATION_CONFIG",
    "CircuitSettings",
    "OpenAICompatibleIntegration",
    "OpenAICompatibleSettings",
]
