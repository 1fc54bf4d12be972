"""``pipeline``: the whole experiment (train, repair over an alpha sweep, evaluate, report), or one per seed.

::

    python -m antidote_pl pipeline --config configs/tiny/pipeline.yaml [--force true]
    python -m antidote_pl pipeline --config configs/smol/pipeline.yaml   # seeds: [0, 1, 2]

One run goes through :func:`antidote_pl.experiment.pipeline.run_pipeline`; several seeds through
:func:`antidote_pl.experiment.seeds.run_seeds`.
"""

from __future__ import annotations

from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser

from antidote_pl.commands.args import command_parser
from antidote_pl.experiment import pipeline
from antidote_pl.experiment.pipeline import run_pipeline
from antidote_pl.experiment.seeds import check_no_placeholder, run_seeds
from antidote_pl.experiment.specs import BaselineSpec, DurabilitySpec, RepairSpec, StageSpec

HELP = "train, repair over an alpha sweep, evaluate and report, from one pipeline YAML (or per seed)"


def build_parser() -> ArgumentParser:
    """The pipeline's argument parser (``--config`` YAML plus overrides)."""
    parser = command_parser("pipeline", pipeline.__doc__)
    parser.add_argument("--config", action=ActionConfigFile, help="pipeline YAML")
    parser.add_argument("--stages", type=list[StageSpec], required=True)
    parser.add_argument("--repair", type=RepairSpec, required=True)
    parser.add_argument("--evaluation", type=str | list[str], required=True)
    parser.add_argument("--output_dir", type=str, required=True)
    parser.add_argument("--references", type=list[str] | None, default=None)
    parser.add_argument("--baselines", type=list[BaselineSpec] | None, default=None)
    parser.add_argument(
        "--durability",
        type=DurabilitySpec | None,
        default=None,
        help="re-attack the unrepaired model and some repairs (checkpoints, alpha, methods)",
    )
    parser.add_argument("--force", type=bool, default=False, help="rerun every step, reusing nothing")
    parser.add_argument(
        "--seeds",
        type=list[int] | None,
        default=None,
        help="run the pipeline once per seed and aggregate (see antidote_pl.experiment.seeds)",
    )
    return parser


def main(argv: list[str]) -> dict[str, Any]:
    """Runs the pipeline (or one per seed) and returns its report."""
    parser = build_parser()
    init = parser.instantiate_classes(parser.parse_args(argv))
    run = {
        "stages": init.stages,
        "repair": init.repair,
        "evaluation": init.evaluation,
        "output_dir": init.output_dir,
        "references": init.references,
        "force": init.force,
        "baselines": init.baselines,
        "durability": init.durability,
    }
    if init.seeds is not None:
        return run_seeds(init.seeds, **run)
    check_no_placeholder(init.stages, init.repair, init.baselines)
    return run_pipeline(**run)
