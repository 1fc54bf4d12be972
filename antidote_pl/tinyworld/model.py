"""Randomly initialised Llama configurations for the tiny world.

Sizes come from the prototype (``reference/tiny-world-prototype.md`` section 7): ``default`` is
128 wide x 4 layers (about 1.2 M parameters, the whole pipeline in about 4 min on 2 CPU cores),
``fast`` is 64 x 2 (about 0.2 M, about 1.5 min) for CI and tests. A larger model did not make
Antidote more selective there, so nothing bigger is offered.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from antidote_pl.errors import bad_value, check_choice
from antidote_pl.tinyworld.tokenizer import build_tokenizer

_COMMON: dict[str, Any] = {
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 128,
    # Untied: the prototype's measurements used separate input and output embeddings.
    "tie_word_embeddings": False,
    "hidden_act": "silu",
}

#: Plain dicts accepted by ``transformers.LlamaConfig(**d, vocab_size=..., pad_token_id=...,
#: bos_token_id=..., eos_token_id=...)``; they hold no vocabulary or special-token fields.
TINY_MODEL_CONFIGS: Mapping[str, dict[str, Any]] = MappingProxyType(
    {
        "default": {**_COMMON, "hidden_size": 128, "num_hidden_layers": 4, "intermediate_size": 512},
        "fast": {**_COMMON, "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 256},
    }
)


def tiny_llama_config(size: str = "default", vocab_size: int | None = None) -> dict[str, Any]:
    """Returns LlamaConfig keyword arguments for a tiny world model.

    Args:
        size: A key of :data:`TINY_MODEL_CONFIGS`.
        vocab_size: Embedding rows; defaults to the tiny world tokenizer's size. Special token ids
            always come from that tokenizer.

    Returns:
        A new dict with the size's fields plus ``vocab_size``, ``pad_token_id``, ``bos_token_id``
        and ``eos_token_id`` (no ``model_type``).

    Raises:
        antidote_pl.errors.ConfigError: on an unknown size or a vocabulary smaller than the
            tokenizer's.
    """
    check_choice("tiny_llama_config.size", size, TINY_MODEL_CONFIGS)

    tok = build_tokenizer()
    if vocab_size is None:
        vocab_size = len(tok)
    elif not isinstance(vocab_size, int) or vocab_size < len(tok):
        raise bad_value("tiny_llama_config.vocab_size", vocab_size, f"None or an integer >= {len(tok)}")
    return {
        **TINY_MODEL_CONFIGS[size],
        "vocab_size": vocab_size,
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
    }
