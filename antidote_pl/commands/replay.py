"""``replay check`` and ``replay replay``: check a run's manifest against this checkout, rerun the run.

::

    python -m antidote_pl replay check outputs/tiny/pipeline/manifest.json
    python -m antidote_pl replay replay outputs/tiny/pipeline/manifest.json --output_dir DIR \\
        [--check_only true] [--force true] [--retrain true]

Exit code 1 when the checkout differs (``check``) or the rerun's report differs (``replay``).

What a replay reproduces: without ``--retrain`` it reuses the recorded stage outputs (trained
models) and computes scoring, sweep, evaluation and report again into ``--output_dir``; with
``--retrain true`` (or ``--force true`` over a checkout that differs) it also trains every stage
again, under ``<output_dir>/stages/``, never in the recorded run's directories. It reports "same"
when the new report equals the recorded one, timings excepted. See
:mod:`antidote_pl.experiment.replay`.
"""

from __future__ import annotations

from jsonargparse import ArgumentParser

from antidote_pl.commands.args import command_parser, subcommand_parser
from antidote_pl.experiment.replay import check, replay

HELP = "check a run's manifest against this checkout (check), or rerun the recorded run (replay)"


def build_parser() -> ArgumentParser:
    """``replay`` with its ``check`` and ``replay`` subcommands."""
    parser = command_parser("replay", __doc__.split("\n\n")[0])
    sub = parser.add_subcommands()
    checking = subcommand_parser("Compares a manifest with this checkout and its data.")
    checking.add_argument("manifest", type=str, help="manifest.json or its directory")
    sub.add_subcommand("check", checking, help="compare a manifest with this checkout and data")
    rerun = subcommand_parser("Reruns the recorded pipeline into --output_dir and compares its report.")
    rerun.add_argument("manifest", type=str, help="manifest.json or its directory")
    rerun.add_argument("--output_dir", type=str, required=True, help="where the rerun goes")
    rerun.add_argument("--check_only", type=bool, default=False, help="check and validate only, run nothing")
    rerun.add_argument("--force", type=bool, default=False, help="run even when the check finds differences")
    rerun.add_argument(
        "--retrain", type=bool, default=False, help="train every stage again, under <output_dir>/stages"
    )
    sub.add_subcommand("replay", rerun, help="rerun the recorded pipeline and compare its report")
    return parser


def main(argv: list[str]) -> int:
    """Checks or replays; returns the exit code (0 same, 1 different)."""
    cfg = build_parser().parse_args(argv)
    if cfg.subcommand == "check":
        return check(cfg.check.manifest)
    args = cfg.replay
    return replay(
        args.manifest, args.output_dir, check_only=args.check_only, force=args.force, retrain=args.retrain
    )
