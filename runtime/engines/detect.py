"""Which engine serves a model, decided from its files; and the errors for files we cannot
serve, saying why and what to do instead."""

from __future__ import annotations

import json
from pathlib import Path

from runtime.types import EngineError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
ENGINES = ("llama_cpp", "transformers", "exllamav2", "embeddings")


class ModelFormatError(EngineError):
    """The files are not something Tiffin can serve; the message says what to do."""


def detect_engine(path: Path) -> str:
    """`llama_cpp` for a .gguf file, `embeddings` for a sentence-transformers directory,
    `exllamav2` for an EXL2/GPTQ-quantised HF directory, `transformers` for another HF
    directory with weights. Raises ModelFormatError otherwise."""
    if path.is_file():
        return _detect_file(path)
    if not path.is_dir():
        raise ModelFormatError(f"{path} does not exist")
    if (path / "modules.json").is_file() or (path / "config_sentence_transformers.json").is_file():
        return "embeddings"
    ggufs = sorted(path.glob("*.gguf"))
    if ggufs and not (path / "config.json").is_file():
        return "llama_cpp"
    config_file = path / "config.json"
    weights = [p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES]
    if not config_file.is_file():
        raise ModelFormatError(
            f"{path} has no config.json; a Hugging Face model directory needs config.json, "
            "tokenizer files and weights (.safetensors, .bin, .pt or .pth)"
        )
    if not weights:
        raise ModelFormatError(
            f"{path} has config.json but no weights (.safetensors, .bin, .pt, .pth)"
        )
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelFormatError(f"{config_file} is not valid JSON: {exc}") from None
    quant = (config.get("quantization_config") or {}).get("quant_method")
    if quant in ("exl2", "gptq"):
        return "exllamav2"
    return "transformers"


def _detect_file(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".gguf":
        return "llama_cpp"
    if suffix == ".ggml" or _is_legacy_ggml(path):
        raise ModelFormatError(
            f"{path.name} is a legacy GGML file, which llama.cpp no longer reads; convert it to "
            "GGUF (llama.cpp's convert scripts) or download a .gguf build of the model"
        )
    if suffix in WEIGHT_SUFFIXES:
        raise ModelFormatError(
            f"{path.name} is a lone weights file with no config or tokenizer; put it in a Hugging "
            "Face model directory with config.json and tokenizer files, and point source at it"
        )
    raise ModelFormatError(
        f"{path.name}: unknown model format; expected a .gguf file or a Hugging Face directory"
    )


def _is_legacy_ggml(path: Path) -> bool:
    """GGML/GGMF/GGJT magics (pre-GGUF llama.cpp files), often named .bin."""
    try:
        with path.open("rb") as handle:
            magic = handle.read(4)
    except OSError:
        return False
    return magic in (b"lmgg", b"fmgg", b"tjgg", b"ggml", b"ggmf", b"ggjt")
