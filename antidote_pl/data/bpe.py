"""Trains a byte-level BPE tokenizer on local records: the tokenizer of a model built from scratch.

The ``tokenizer`` stage (:mod:`antidote_pl.stages.tokenizer`, ``python -m antidote_pl tokenizer
--config configs/offline/tokenizer.yaml``) runs it from a config.

The offline real-data world (``configs/offline/``) has no hub to download a tokenizer from, so it
trains one on the same local files its model is pretrained on. Each record is rendered with the
stages' prompt template (:func:`antidote_pl.data.templates.render`), so the template's fixed text
("### Instruction:" ...) gets merged into few tokens.

The corpus is given either as ``sources`` (record sources, as in a DataModule) or as
``corpus_config``: a ``fit`` config whose ``data.init_args.sources`` (and ``template``) are used, so
the tokenizer is trained on exactly the pretraining stage's data without repeating its list.

The result is a ``PreTrainedTokenizerFast`` directory (``tokenizer.json`` + config) that
:func:`antidote_pl.models.loading.load_tokenizer` and ``from_pretrained`` read like any other, plus
``tokenizer_build.json`` recording how it was made. Byte-level BPE has no unknown token: every
string encodes. Like Llama, encoding with special tokens prepends ``<bos>`` and adds no ``<eos>``
(the collators append it).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from antidote_pl.data.records import Source, source_paths
from antidote_pl.data.templates import get_template, render
from antidote_pl.errors import bad_value, check_int
from antidote_pl.utils.io import OutputLock, atomic_dir, atomic_write_json, check_output_dir

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
#: Special tokens in id order (``<pad>`` = 0, ``<bos>`` = 1, ``<eos>`` = 2); random-init model
#: configs for this tokenizer use these ids.
SPECIAL_TOKENS = (PAD, BOS, EOS)
BUILD_FILE = "tokenizer_build.json"
#: 256 byte symbols plus the special tokens: the smallest vocabulary that can merge anything.
_MIN_VOCAB = 256 + len(SPECIAL_TOKENS) + 1
_MAX_VOCAB = 1_000_000


def check_bpe_args(vocab_size: int, min_frequency: int, model_max_length: int) -> None:
    """Validates the trainer's numbers (called before any data is read).

    Raises:
        ConfigError: naming the bad argument.
    """
    check_int("vocab_size", vocab_size, _MIN_VOCAB, _MAX_VOCAB)
    check_int("min_frequency", min_frequency, 1)
    check_int("model_max_length", model_max_length, 1)


def corpus_texts(sources: Sequence[Source], template: str) -> Iterator[str]:
    """Yields each record of each source as the text a model sees: prompt + response.

    Args:
        sources: Record sources, read in order.
        template: A key of :data:`antidote_pl.data.templates.TEMPLATES` (``raw`` for plain text).
    """
    for source in sources:
        for record in source.load():
            prompt, response = render(record, template)
            yield prompt + response


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int, min_frequency: int = 2, model_max_length: int = 512
):
    """Trains a byte-level BPE tokenizer.

    Args:
        texts: Training texts.
        vocab_size: Final vocabulary size, special tokens and the 256 byte symbols included.
        min_frequency: Pairs seen fewer times are never merged.
        model_max_length: Recorded as the tokenizer's maximum sequence length.

    Returns:
        A ``PreTrainedTokenizerFast`` with ``<pad>``/``<bos>``/``<eos>`` at ids 0/1/2, right padding.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    check_bpe_args(vocab_size, min_frequency, model_max_length)
    core = Tokenizer(models.BPE())
    # No prefix space: prompt and response are encoded separately and must concatenate exactly.
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    return llama_style_tokenizer(core, pad=PAD, bos=BOS, eos=EOS, model_max_length=model_max_length)


def llama_style_tokenizer(core, pad: str, bos: str, eos: str, model_max_length: int, unk: str | None = None):
    """Wraps a ``tokenizers.Tokenizer`` as a Hugging Face fast tokenizer that behaves like Llama's.

    Encoding with special tokens prepends ``bos`` and adds no ``eos`` (the collators append it);
    padding is on the right; decoding does no clean-up, so generated text round-trips exactly.

    Args:
        core: The trained or built ``tokenizers.Tokenizer``; its post-processor is replaced.
        pad: Padding token (must be in ``core``'s vocabulary), likewise ``bos``, ``eos``, ``unk``.
        bos: Beginning-of-sequence token.
        eos: End-of-sequence token.
        model_max_length: The tokenizer's recorded maximum sequence length.
        unk: Unknown token, for vocabularies that have one.
    """
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    core.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, core.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token=unk,
        padding_side="right",
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


def build_tokenizer(
    sources: Sequence[Source],
    output_dir: str,
    vocab_size: int = 4096,
    min_frequency: int = 2,
    template: str = "raw",
    model_max_length: int = 512,
    overwrite: bool = False,
    inputs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Trains a tokenizer on ``sources`` and writes it to ``output_dir`` atomically.

    Args:
        sources: Record sources whose rendered text is the training corpus.
        output_dir: Directory to write: new, empty, or (with ``overwrite``) an earlier tokenizer
            output of this project, replaced as a whole on success.
        vocab_size: See :func:`train_bpe_tokenizer`.
        min_frequency: See :func:`train_bpe_tokenizer`.
        template: Prompt template used to render each record.
        model_max_length: See :func:`train_bpe_tokenizer`.
        overwrite: Replace an earlier output (one carrying ``antidote_output.json``).
        inputs: Further input files (``field -> path``, e.g. the corpus config) that ``output_dir``
            must stay apart from, like the sources' files.

    Returns:
        The build record also written to ``tokenizer_build.json``.

    Raises:
        ConfigError: on a bad argument or output directory (before any data is read) or an empty
            corpus.
    """
    if not sources:
        raise bad_value("sources", sources, "at least one record source")
    if not isinstance(output_dir, str) or not output_dir:
        raise bad_value("output_dir", output_dir, "a directory path")
    get_template(template)
    check_bpe_args(vocab_size, min_frequency, model_max_length)
    rules = {
        "field": "output_dir",
        "overwrite": overwrite,
        "inputs": {**source_paths("sources", list(sources)), **(inputs or {})},
    }
    check_output_dir(output_dir, **rules)
    # Locked for the whole build, so a second build into the same directory is refused up front.
    with OutputLock(output_dir, "output_dir") as lock:
        tokenizer, counts = _train_counted(sources, template, vocab_size, min_frequency, model_max_length)
        build = _build_record(tokenizer, sources, vocab_size, min_frequency, template, counts)
        with atomic_dir(output_dir, kind="tokenizer", lock=lock, **rules) as tmp:
            tokenizer.save_pretrained(tmp)
            atomic_write_json(Path(tmp) / BUILD_FILE, build)
    return build


def _train_counted(
    sources: Sequence[Source], template: str, vocab_size: int, min_frequency: int, model_max_length: int
) -> tuple[Any, dict[str, int]]:
    """Trains the tokenizer on the rendered corpus, counting its records and characters on the way.

    Raises:
        ConfigError: when the sources yield no record.
    """
    counts = {"records": 0, "characters": 0}

    def counted(texts: Iterable[str]) -> Iterator[str]:
        for text in texts:
            counts["records"] += 1
            counts["characters"] += len(text)
            yield text

    tokenizer = train_bpe_tokenizer(
        counted(corpus_texts(sources, template)), vocab_size, min_frequency, model_max_length
    )
    if counts["records"] == 0:
        raise bad_value("sources", [getattr(s, "path", s) for s in sources], "sources with records")
    return tokenizer, counts


def _build_record(
    tokenizer: Any,
    sources: Sequence[Source],
    vocab_size: int,
    min_frequency: int,
    template: str,
    counts: dict[str, int],
) -> dict[str, Any]:
    """What ``tokenizer_build.json`` records: sizes, settings, special-token ids, sources, counts."""
    return {
        "vocab_size": len(tokenizer),
        "requested_vocab_size": vocab_size,
        "min_frequency": min_frequency,
        "template": template,
        "special_tokens": dict(zip(SPECIAL_TOKENS, tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)))),
        "sources": [str(getattr(s, "path", type(s).__name__)) for s in sources],
        **counts,
    }


def corpus_from_config(path: str, field: str = "corpus_config") -> tuple[list[dict[str, Any]], str | None]:
    """The ``data.init_args.sources`` (unparsed) and ``template`` of a ``fit`` config file.

    Raises:
        ConfigError: when the file is missing or has no ``data.init_args.sources`` list.
    """

    file = Path(path)
    if not file.is_file():
        raise bad_value(field, path, "an existing fit config file")
    data = ((yaml.safe_load(file.read_text()) or {}).get("data") or {}).get("init_args") or {}
    sources = data.get("sources")
    if not isinstance(sources, list) or not sources:
        raise bad_value(field, path, "a fit config with a non-empty data.init_args.sources list")
    return sources, data.get("template")
