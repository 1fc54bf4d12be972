"""``report``: the SmolLM2 world's report (``docs/results/smol_report.md``, figures) from a finished run.

::

    python -m antidote_pl report --run outputs/smol/pipeline --out docs/results/smol_report.md

(``scripts/smol_report.sh`` runs the pipeline and this.) See :mod:`antidote_pl.experiment.smol_report`.
"""

from __future__ import annotations

from pathlib import Path

from jsonargparse import ArgumentParser

from antidote_pl.commands.args import command_parser
from antidote_pl.experiment.smol_report import write_smol_report

HELP = "write the SmolLM2 world's report (markdown and figures) from a finished multi-seed run"


def build_parser() -> ArgumentParser:
    """``--run``, ``--out``, ``--notes`` and ``--pipeline_config``."""
    parser = command_parser("report", __doc__.split("\n\n")[0])
    parser.add_argument("--run", type=str, default="outputs/smol/pipeline", help="the pipeline's output_dir")
    parser.add_argument("--out", type=str, default="docs/results/smol_report.md", help="the markdown file")
    parser.add_argument(
        "--notes", type=str, default="docs/results/smol_report_notes.md", help="appended if it exists"
    )
    parser.add_argument(
        "--pipeline_config",
        type=str,
        default="configs/smol/pipeline.yaml",
        help="the run's pipeline YAML, for the configured seeds",
    )
    return parser


def main(argv: list[str]) -> Path:
    """Writes the report; returns the markdown file."""
    cfg = build_parser().parse_args(argv)
    return write_smol_report(cfg.run, cfg.out, cfg.notes, cfg.pipeline_config)
