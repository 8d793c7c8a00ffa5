"""ollama: an Ollama server's models as `ollama/<name>` (`ollama_integration.py`), each served
by an Engine that calls Ollama's API (`ollama_engine.py`)."""

from runtime.integrations.ollama.ollama_integration import (
    DEFAULT_OLLAMAINTEGRATION_CONFIG,
    OllamaIntegration,
    OllamaSettings,
)

__all__ = ["DEFAULT_OLLAMAINTEGRATION_CONFIG", "OllamaIntegration", "OllamaSettings"]
