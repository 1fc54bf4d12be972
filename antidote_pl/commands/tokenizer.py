"""``tokenizer``: trains a byte-level BPE tokenizer on local records (the offline world's tokenizer).

::

    python -m antidote_pl tokenizer --config configs/offline/tokenizer.yaml

The stage itself (its parser, also used by the pipeline's tokenizer stages) is
:mod:`antidote_pl.stages.tokenizer`.
"""

from __future__ import annotations

from typing import Any

from antidote_pl.stages.tokenizer import run_tokenizer_args

HELP = "train a byte-level BPE tokenizer on local records, from a tokenizer YAML"


def main(argv: list[str]) -> dict[str, Any]:
    """Trains the tokenizer; returns its build record."""
    return run_tokenizer_args(argv)
