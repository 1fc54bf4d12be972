"""The ``pipeline`` command: one run of :mod:`antidote_pl.experiment.pipeline`, or one per seed.

Several seeds go through :mod:`antidote_pl.experiment.seeds`.

::

    python -m antidote_pl pipeline --config configs/tiny/pipeline.yaml [--force true]
    python -m antidote_pl pipeline --config configs/smol/pipeline.yaml   # seeds: [0, 1, 2]

It sits above both modules (the seeds runner calls the pipeline), so neither imports the other's
caller and the import graph stays free of circles.
"""

from __future__ import annotations

from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser

from antidote_pl.experiment import pipeline
from antidote_pl.experiment.pipeline import BaselineSpec, DurabilitySpec, RepairSpec, StageSpec, run_pipeline
from antidote_pl.experiment.seeds import check_no_placeholder, run_seeds


def build_parser():
    """The pipeline's argument parser (``--config`` YAML plus overrides)."""
    parser = ArgumentParser(prog="antidote_pl pipeline", description=pipeline.__doc__)
    parser.add_argument("--config", action=ActionConfigFile, help="pipeline YAML")
    parser.add_argument("--stages", type=list[StageSpec], required=True)
    parser.add_argument("--repair", type=RepairSpec, required=True)
    parser.add_argument("--evaluation", type=str, required=True)
    parser.add_argument("--output_dir", type=str, required=True)
    parser.add_argument("--references", type=list[str] | None, default=None)
    parser.add_argument("--baselines", type=list[BaselineSpec] | None, default=None)
    parser.add_argument(
        "--durability",
        type=DurabilitySpec | None,
        default=None,
        help="re-attack the unrepaired model and some repairs (checkpoints, alpha, methods)",
    )
    parser.add_argument("--force", type=bool, default=False)
    parser.add_argument(
        "--seeds",
        type=list[int] | None,
        default=None,
        help="run the pipeline once per seed and aggregate (see antidote_pl.experiment.seeds)",
    )
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``python -m antidote_pl pipeline --config configs/tiny/pipeline.yaml [--force true]``."""
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
