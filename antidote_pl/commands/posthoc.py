"""``posthoc``: mask analytics and judge agreement of a finished pipeline run, from its saved files.

::

    python -m antidote_pl posthoc --run outputs/smol/pipeline --out docs/results/smol_analysis.md \\
        --eval_config configs/smol/eval.yaml

No model loads; see :mod:`antidote_pl.experiment.posthoc`.
"""

from __future__ import annotations

from pathlib import Path

from jsonargparse import ArgumentParser

from antidote_pl.commands.args import command_parser
from antidote_pl.experiment.posthoc import write_posthoc

HELP = "mask overlaps and judge agreement of a finished run, from its saved files (no model runs)"


def build_parser() -> ArgumentParser:
    """``--run``, ``--out``, ``--eval_config`` and ``--notes``."""
    parser = command_parser("posthoc", __doc__.split("\n\n")[0])
    parser.add_argument(
        "--run", type=str, required=True, help="the pipeline's output_dir (single or multi-seed)"
    )
    parser.add_argument("--out", type=str, required=True, help="the markdown file; PNGs go beside it")
    parser.add_argument(
        "--eval_config", type=str | None, default=None, help="the run's evaluation config (names the judge)"
    )
    parser.add_argument(
        "--notes", type=str | None, default=None, help="appended if it exists (default <out stem>_notes.md)"
    )
    return parser


def main(argv: list[str]) -> Path:
    """Writes the analysis; returns the markdown file."""
    cfg = build_parser().parse_args(argv)
    return write_posthoc(cfg.run, cfg.out, cfg.eval_config, cfg.notes)
