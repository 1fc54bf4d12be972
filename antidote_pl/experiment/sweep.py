"""Evaluating the pipeline's variants: a stage as it is, or the fine-tuned adapter under each saved mask.

:class:`AdapterSweep` loads the fine-tuned model once and applies, evaluates and undoes every
(method, alpha) mask in memory, so a sweep over many alphas costs one model load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from antidote_pl.pruning import apply_target_masks_
from antidote_pl.stages.cli import build_cli


def _evaluate(evaluator, datamodule, trainer, out_dir: Path) -> dict[str, Any]:
    evaluator.output_dir = str(out_dir)
    evaluator.overwrite = True  # results/<name> is the pipeline's own: a recomputed result replaces it
    trainer.test(evaluator, datamodule=datamodule, verbose=False)
    return dict(evaluator.results)


def evaluate_stage(evaluation: str, stage: str, out_dir: Path) -> dict[str, Any]:
    """Evaluates a stage output directory (adapter merged) with the evaluation config into ``out_dir``."""
    return _evaluate(*_evaluator(evaluation, stage, True), out_dir)


def _evaluator(config: str, stage: str, merge: bool):
    values = {"model.init_args.stage": stage, "model.init_args.merge_adapter": merge}
    cli = build_cli([config], {**values, "model.init_args.output_dir": None})
    return cli.model, cli.datamodule, cli.trainer


class AdapterSweep:
    """The fine-tuned model loaded once for evaluation, with masks applied and undone per variant.

    Args:
        evaluation: The evaluation config.
        stage: The fine-tuned stage (its adapter stays unmerged, so masks apply to it).
    """

    def __init__(self, evaluation: str, stage: str) -> None:
        self.evaluator, self.datamodule, self.trainer = _evaluator(evaluation, stage, merge=False)
        self.model = self.evaluator.model
        self._original = {n: p.detach().clone() for n, p in self.model.named_parameters()}

    def evaluate(self, out_dir: Path) -> dict[str, Any]:
        """Evaluates the model as it is now."""
        return _evaluate(self.evaluator, self.datamodule, self.trainer, out_dir)

    def evaluate_masked(self, targets, masks, out_dir: Path) -> dict[str, Any]:
        """Evaluates with ``masks`` (parameter layout) applied to ``targets``, then restores the weights."""
        apply_target_masks_(targets, masks)
        try:
            return self.evaluate(out_dir)
        finally:
            self._restore()

    def _restore(self) -> None:
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                p.copy_(self._original[n])
