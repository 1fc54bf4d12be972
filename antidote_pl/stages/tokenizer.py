"""The ``tokenizer`` stage: a BPE tokenizer trained from a config, as the command and the pipeline run it.

The config's keys are :func:`antidote_pl.data.bpe.build_tokenizer`'s arguments, with ``sources``
(record sources, as in a DataModule) or ``corpus_config`` (a ``fit`` config whose data sources and
template are used) naming the corpus::

    python -m antidote_pl tokenizer --config configs/offline/tokenizer.yaml
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser

from antidote_pl.data.bpe import build_tokenizer, corpus_from_config
from antidote_pl.data.records import Source
from antidote_pl.errors import ConfigError
from antidote_pl.utils.console import say

DESCRIPTION = "Trains a byte-level BPE tokenizer on local records (for a model built from scratch)."


def build_parser():
    """The tokenizer parser (``--config`` YAML plus overrides), of the command and the pipeline."""
    parser = ArgumentParser(prog="antidote_pl tokenizer", description=DESCRIPTION, exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="tokenizer YAML")
    parser.add_argument("--sources", type=list[Source] | None, default=None, help="record sources")
    parser.add_argument(
        "--corpus_config", type=str | None, default=None, help="a fit config whose data sources to use"
    )
    parser.add_argument("--output_dir", type=str, required=True, help="tokenizer directory to write")
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.add_argument("--min_frequency", type=int, default=2)
    parser.add_argument(
        "--template", type=str | None, default=None, help="prompt template (default: corpus config's, or raw)"
    )
    parser.add_argument("--model_max_length", type=int, default=512)
    parser.add_argument(
        "--overwrite", type=bool, default=False, help="replace an earlier tokenizer output in output_dir"
    )
    return parser


def run_tokenizer(
    configs: Sequence[str], args: Sequence[str] = (), overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Trains a tokenizer from config files, as the command would, from Python.

    Args:
        configs: Tokenizer config files, composed in order (like repeated ``--config``).
        args: Command-line style overrides from a user's config (e.g. a pipeline stage's list).
        overrides: Key -> value, set last (e.g. ``{"overwrite": True}``); Python values.

    Returns:
        The build record (vocabulary size, records, characters, ...).
    """
    parser = build_parser()
    cfg = parser.parse_args([*(a for c in configs for a in ("--config", str(c))), *args])
    for key, value in (overrides or {}).items():
        cfg[key] = value
    return _build_from(parser, parser.parse_object(cfg))


def parse_tokenizer_config(configs: Sequence[str], args: Sequence[str] = ()) -> Any:
    """Parses tokenizer config files and overrides without building anything (for validation)."""
    return build_parser().parse_args([*(a for c in configs for a in ("--config", str(c))), *args])


def run_tokenizer_args(argv: Sequence[str]) -> dict[str, Any]:
    """Trains a tokenizer from command-line arguments (``--config`` files and overrides)."""
    parser = build_parser()
    return _build_from(parser, parser.parse_args(list(argv)))


def tokenizer_sources(configs: Sequence[str], args: Sequence[str] = ()) -> list[Source]:
    """The record sources a tokenizer config trains on (its own, or its ``corpus_config``'s), built
    but not loaded: what the pipeline hashes to key a tokenizer stage."""
    parser = build_parser()
    cfg = parser.parse_args([*(a for c in configs for a in ("--config", str(c))), *args])
    _resolve_sources(parser, cfg)
    return list(parser.instantiate_classes(cfg).sources)


def _resolve_sources(parser, cfg) -> str | None:
    """Sets ``cfg.sources`` from ``corpus_config`` when that names the corpus; returns the corpus
    config's template (``None`` without one)."""
    if (cfg.sources is None) == (cfg.corpus_config is None):
        raise ConfigError(
            "exactly one of sources and corpus_config must be set, got "
            f"sources={cfg.sources!r}, corpus_config={cfg.corpus_config!r}."
        )
    if cfg.corpus_config is None:
        return None
    sources, corpus_template = corpus_from_config(cfg.corpus_config)
    # Parsed by the same parser, so the sources are validated as if given inline.
    cfg.sources = parser.parse_object({"sources": sources, "output_dir": cfg.output_dir}).sources
    return corpus_template


def _build_from(parser, cfg) -> dict[str, Any]:
    corpus_template = _resolve_sources(parser, cfg)
    template = cfg.template or corpus_template
    init = parser.instantiate_classes(cfg)
    build = build_tokenizer(
        sources=init.sources,
        output_dir=init.output_dir,
        vocab_size=init.vocab_size,
        min_frequency=init.min_frequency,
        template=template or "raw",
        model_max_length=init.model_max_length,
        overwrite=init.overwrite,
        inputs={"corpus_config": cfg.corpus_config},
    )
    say(
        f"tokenizer: {build['vocab_size']} tokens from {build['records']} records "
        f"({build['characters']:,} characters) -> {init.output_dir}"
    )
    return build
