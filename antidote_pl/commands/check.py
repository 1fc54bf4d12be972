"""``check``: greedy-generation check of tiny-world stages (refusal, harmful and sentiment rates).

::

    python -m antidote_pl check outputs/tiny/align outputs/tiny/finetune

The world's own ground truth judges the answers; prints one row per stage and writes nothing (see
:mod:`antidote_pl.evaluation.tiny_check`).
"""

from __future__ import annotations

import json
from typing import Any

from jsonargparse import ArgumentParser

from antidote_pl.commands.args import command_parser
from antidote_pl.evaluation.tiny_check import check_stage
from antidote_pl.utils.console import print_result
from antidote_pl.utils.tables import markdown_table

HELP = "quick check of tiny-world stages: harmful, refusal and sentiment rates by the world's own truth"
COLUMNS = {
    "stage": "stage",
    "harmful": "harmful %",
    "refused": "refused %",
    "benign_refused": "benign refused %",
    "sentiment_accuracy": "sentiment acc %",
}


def build_parser() -> ArgumentParser:
    """Stage directories, ``--seed`` and ``--json``."""
    parser = command_parser("check", __doc__.split("\n\n")[0])
    parser.add_argument("stages", nargs="+", type=str, help="stage output directories")
    parser.add_argument("--seed", type=int, default=0, help="tiny world seed")
    parser.add_argument("--json", type=bool, default=False, help="print JSON instead of a table")
    return parser


def main(argv: list[str]) -> list[dict[str, Any]]:
    """Checks each stage; prints a table (or JSON) and returns the rows."""
    cfg = build_parser().parse_args(argv)
    rows = [check_stage(s, cfg.seed) for s in cfg.stages]
    if cfg.json:
        print_result(json.dumps(rows, indent=2))
        return rows
    cells = [[r["stage"], *(f"{r[k]:.1f}" for k in list(COLUMNS)[1:])] for r in rows]
    print_result(markdown_table(list(COLUMNS.values()), cells).rstrip("\n"))
    return rows
