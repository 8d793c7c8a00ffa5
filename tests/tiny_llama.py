"""A tiny Llama checkpoint made on the spot: a byte-level BPE tokenizer trained on text this
module writes, and randomly initialised weights from a fixed seed. Engine tests serve it
without downloading anything; the weights are nonsense but deterministic, which is all a
test of the serving code needs."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
PLAIN_WORDS = (
    "the a sea ship sails north south under over bright dark cold warm river stone tree bird "
    "sings runs quickly slowly and but then morning evening light wind rain city road house "
    "garden window open closed small large old new one two three four five six seven eight"
)
WORDS = PLAIN_WORDS.split()


@dataclass(frozen=True)
class TinyLlamaShape:
    """Model sizes. The defaults suit CPU tests; ExLlamaV2's kernels want larger multiples."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    max_position_embeddings: int = 256
    vocab_size: int = 512


def corpus(lines: int = 400, seed: int = 0) -> list[str]:
    """Sentences of plain ASCII words, so every learned token decodes to printable text."""
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) + "." for _ in range(lines)
    ]


def build_tokenizer(vocab_size: int, chat_template: str | None = None) -> Any:
    """A Llama-like fast tokenizer: byte-level BPE that prepends BOS to every encoded text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD
    )
    if chat_template is not None:
        wrapped.chat_template = chat_template
    return wrapped


def build_tiny_llama(
    path: Path,
    shape: TinyLlamaShape | None = None,
    *,
    dtype: str = "float32",
    state_dict_file: str | None = None,
    chat_template: str | None = None,
    seed: int = 1234,
) -> Path:
    """Write a checkpoint into `path`: tokenizer files, config.json and either safetensors
    (`save_pretrained`) or, with `state_dict_file`, a bare torch state dict of that name.
    The same seed and shape give the same weights, whichever format is written."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = shape or TinyLlamaShape()
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(shape.vocab_size, chat_template)
    tokenizer.save_pretrained(path)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=shape.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype)).eval()
    if state_dict_file is None:
        model.save_pretrained(path)
    else:
        model.config.save_pretrained(path)
        torch.save(model.state_dict(), path / state_dict_file)
    return path


def write_config(path: Path, **fields: Any) -> None:
    """A minimal config.json (for detection tests that need no weights that load)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", **fields}))
