"""huggingface_hub: models from the Hugging Face Hub (`huggingface_hub_integration.py`); what a
`hf://` source names and which of a repository's files are chosen (`hub_files.py`)."""

from runtime.integrations.huggingface_hub.huggingface_hub_integration import (
    DEFAULT_HUGGINGFACEHUBINTEGRATION_CONFIG,
    HuggingFaceHubIntegration,
    HuggingFaceHubSettings,
)

__all__ = [
    "DEFAULT_HUGGINGFACEHUBINTEGRATION_CONFIG",
    "HuggingFaceHubIntegration",
    "HuggingFaceHubSettings",
]
