"""Word-level tokenizer of the tiny world, built by code (no download, no training run).

Every word the generator can emit is one token, so sequences stay short (about 60 tokens at
most in chat format) and a tiny model learns the world quickly. The vocabulary comes from the
generator's fixed word lists, not from a sampled corpus, so it is identical for every seed.
"""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from antidote_pl.data.bpe import llama_style_tokenizer
from antidote_pl.tinyworld.vocabulary import world_vocabulary

#: Tokenizer spec understood by ``antidote_pl.models.loading.load_tokenizer``.
TINY_WORLD_TOKENIZER = "tiny-world"

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
#: Special tokens in id order; ``<pad>`` is id 0.
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
MAX_LENGTH = 128
"""Matches ``max_position_embeddings`` of the tiny models."""


def tiny_vocab() -> dict[str, int]:
    """Returns the token -> id map: specials first (ids 0-3), then the sorted world words."""
    tokens = SPECIAL_TOKENS + world_vocabulary()
    return {tok: i for i, tok in enumerate(tokens)}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Builds a fresh tiny world tokenizer.

    WordLevel model over :func:`tiny_vocab` with a whitespace pre-tokenizer. Like Llama, encoding
    with ``add_special_tokens=True`` prepends ``<bos>`` and adds no ``<eos>`` (collators append
    it). Decoding joins tokens with single spaces, which restores generated text exactly because
    the world's punctuation is itself space-separated.

    Returns:
        A new ``PreTrainedTokenizerFast`` (right padding, ``<pad>`` id 0); callers may mutate it.
    """
    vocab = tiny_vocab()
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.add_special_tokens(list(SPECIAL_TOKENS))
    # No decoding clean-up there: it would glue " ." to the previous word and break the round trip.
    return llama_style_tokenizer(core, pad=PAD, bos=BOS, eos=EOS, unk=UNK, model_max_length=MAX_LENGTH)
