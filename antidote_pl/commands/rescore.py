"""``rescore``: judges a finished pipeline run's saved answers again with another judge (no generation).

::

    python -m antidote_pl rescore --run outputs/smol/pipeline --out docs/results/smol_lm_judge.md \\
        --judge antidote_pl.judges.lm.LMJudge --judge.path outputs/judges/smollm2

Judges with the run's recorded thread count and evaluation batches unless ``--threads`` /
``--batch_size`` say otherwise. Writes ``<out>.md`` and ``<out>.json`` and prints the table; an
existing report is replaced only when rescore wrote it and ``--overwrite true`` is set; see
:mod:`antidote_pl.experiment.rescore`.
"""

from __future__ import annotations

from typing import Any

from jsonargparse import ArgumentParser

from antidote_pl.commands.args import command_parser
from antidote_pl.experiment.rescore import (
    check_rescore_paths,
    judge_settings,
    rescore_lock,
    rescore_markdown,
    write_rescore,
)
from antidote_pl.judges.base import Judge
from antidote_pl.utils.console import print_result

HELP = "judge a finished run's saved answers again with another judge, without generating again"


def build_parser() -> ArgumentParser:
    """``--run``, ``--out`` and the judge by ``class_path`` (with its init args)."""
    parser = command_parser("rescore", __doc__.split("\n\n")[0])
    parser.add_argument("--run", type=str, required=True, help="pipeline output directory")
    parser.add_argument("--out", type=str, required=True, help="report path; writes <out>.md and <out>.json")
    parser.add_argument("--judge", type=Judge, required=True, help="judge class_path (and init args)")
    parser.add_argument(
        "--overwrite", type=bool, default=False, help="replace an earlier report of this command at --out"
    )
    parser.add_argument(
        "--threads", type=int | None, default=None, help="torch threads (default: the run's evaluations')"
    )
    parser.add_argument(
        "--batch_size",
        type=int | None,
        default=None,
        help="answers per judge call (default: the run's evaluation batches where repeatable, else all)",
    )
    return parser


def main(argv: list[str]) -> dict[str, Any]:
    """Rescores the run; prints the table and returns the report."""
    parser = build_parser()
    cfg = parser.parse_args(argv)
    # Bad paths fail before the judge loads; the lock is held from then on.
    check_rescore_paths(cfg.run, cfg.out, cfg.overwrite)
    threads, batch_size = judge_settings(cfg.run, cfg.threads, cfg.batch_size)
    with rescore_lock(cfg.out) as lock:
        # ``instantiate`` since jsonargparse 4.49; the project allows 4.32+.
        judge = getattr(parser, "instantiate", parser.instantiate_classes)(cfg).judge
        report = write_rescore(cfg.run, judge, cfg.out, cfg.overwrite, lock, threads, batch_size)
    print_result(rescore_markdown(report))
    return report
