"""``compare``: two finished multi-seed runs of one pipeline, cell by cell (e.g. fp32 against bf16).

::

    python -m antidote_pl compare --base outputs/smol/pipeline --other outputs/smol_bf16/pipeline \\
        --labels '[fp32,bf16]' --out docs/results/smol_precision.md

Writes the markdown, its ``.json`` and ``.png`` beside it; no model loads. The agreement rule is
:mod:`antidote_pl.experiment.compare`'s.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from jsonargparse import ArgumentParser

from antidote_pl.commands.args import command_parser
from antidote_pl.experiment.compare import write_comparison

HELP = "compare two finished multi-seed runs cell by cell (e.g. fp32 against bf16), from their reports"


def build_parser() -> ArgumentParser:
    """``--base``, ``--other``, ``--labels`` and ``--out``."""
    parser = command_parser("compare", __doc__.split("\n\n")[0])
    parser.add_argument("--base", type=str, required=True, help="the reference run's output_dir")
    parser.add_argument("--other", type=str, required=True, help="the compared run's output_dir")
    parser.add_argument(
        "--labels", type=list[str], default=["base", "other"], help="the two runs' names, base first"
    )
    parser.add_argument(
        "--out", type=str, required=True, help="the markdown file; .json and .png go beside it"
    )
    return parser


def main(argv: list[str]) -> Path:
    """Writes the comparison; returns the markdown file."""
    cfg = build_parser().parse_args(argv)
    command = shlex.join(["python", "-m", "antidote_pl", "compare", *argv])
    return write_comparison(cfg.base, cfg.other, cfg.out, cfg.labels, command)
