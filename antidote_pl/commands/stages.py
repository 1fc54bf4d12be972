"""``fit``, ``validate``, ``test``, ``predict``: LightningCLI's subcommands, a stage from ``--config`` files.

::

    python -m antidote_pl fit --config configs/tiny/pretrain.yaml
    python -m antidote_pl test --config configs/tiny/eval.yaml --model.init_args.stage outputs/tiny/repair

Every training stage (pretrain, align, fine-tune, the repair and the defenses) is ``fit`` with its
config; ``test`` evaluates a model stage with an evaluation config. The runner is
:class:`antidote_pl.stages.cli.AntidoteCLI`; ``python -m antidote_pl fit --help`` lists a config's
options.
"""

from __future__ import annotations

import warnings

from antidote_pl.stages.cli import AntidoteCLI

#: The LightningCLI subcommands and their one-line descriptions.
SUBCOMMANDS = {
    "fit": "train one stage (pretrain, align, fine-tune, repair, defenses) from --config files",
    "validate": "run a stage config's validation loop",
    "test": "evaluate a model stage (harmful score, task accuracy, judges) with an evaluation config",
    "predict": "run a stage config's predict loop",
}


def main(argv: list[str]) -> AntidoteCLI:
    """Runs LightningCLI on ``argv`` (a subcommand and its options, or LightningCLI's top-level ones)."""
    # argv is sys.argv minus --debug/-v, so LightningCLI's "args and sys.argv both given" is noise.
    warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python")
    return AntidoteCLI(args=argv)
