"""Evaluating the pipeline's variants: a stage as it is, or the fine-tuned adapter under each saved repair.

:class:`AdapterSweep` loads the fine-tuned model once and applies, evaluates and undoes every
variant in memory, so a sweep over many knob values costs one model load. A method's saved sweep is
read by :func:`read_sweep` into one of two shapes with the same interface: :class:`MaskSweep`
(pruning: ``sweep_masks.safetensors``, one mask per alpha) or :class:`EditSweep` (every other repair
family: ``sweep_edits.safetensors``, the new parameter values per knob value).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from antidote_pl.errors import ConfigError
from antidote_pl.pruning import apply_target_masks_, find_targets, overall_fraction
from antidote_pl.pruning.artifacts import RepairArtifacts
from antidote_pl.repair.artifacts import EditArtifacts, apply_edits_, has_edit_artifacts, value_key
from antidote_pl.stages.cli import build_cli


def _evaluate(evaluator, datamodule, trainer, out_dir: Path) -> dict[str, Any]:
    evaluator.output_dir = str(out_dir)
    evaluator.overwrite = True  # results/<name> is the pipeline's own: a recomputed result replaces it
    trainer.test(evaluator, datamodule=datamodule, verbose=False)
    return dict(evaluator.results)


def evaluate_stage(evaluation: str | list[str], stage: str, out_dir: Path) -> dict[str, Any]:
    """Evaluates a stage output directory (adapter merged) with the evaluation config (one file, or
    several composed in order) into ``out_dir``."""
    return _evaluate(*_evaluator(evaluation, stage, True), out_dir)


def _evaluator(config: str | list[str], stage: str, merge: bool):
    values = {"model.init_args.stage": stage, "model.init_args.merge_adapter": merge}
    configs = [config] if isinstance(config, str) else list(config)
    cli = build_cli(configs, {**values, "model.init_args.output_dir": None})
    return cli.model, cli.datamodule, cli.trainer


class AdapterSweep:
    """The fine-tuned model loaded once for evaluation, with masks applied and undone per variant.

    Args:
        evaluation: The evaluation config (or its files, composed in order).
        stage: The fine-tuned stage (its adapter stays unmerged, so masks apply to it).
    """

    def __init__(self, evaluation: str | list[str], stage: str) -> None:
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

    def evaluate_edited(self, edits, out_dir: Path) -> dict[str, Any]:
        """Evaluates with ``edits`` (parameter name -> new value) copied in, then restores the weights."""
        apply_edits_(dict(self.model.named_parameters()), edits)
        try:
            return self.evaluate(out_dir)
        finally:
            self._restore()

    def _restore(self) -> None:
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                p.copy_(self._original[n])


class MaskSweep:
    """A pruning method's saved sweep: one mask per alpha, on the targets of the evaluated model.

    Args:
        directory: The scoring run's output (``mask.json``, ``sweep_masks.safetensors``, scores).
        model: The evaluated fine-tuned model (unmerged); the saved scores are checked against it.
    """

    kind = "prune"

    def __init__(self, directory: Path, model: torch.nn.Module) -> None:
        self.art = RepairArtifacts.read(directory)
        meta = self.art.report
        self.targets = find_targets(model, meta["target"], meta["adapter_name"], meta["include"])
        # The saved scores check that the run scored this very adapter (fingerprint, names, shapes).
        self.art.scores({n: t.param for n, t in self.targets.items()})
        self.fingerprint, self.values, self.report = self.art.fingerprint, self.art.alphas, meta

    def tensors(self, value: float) -> dict[str, torch.Tensor]:
        """The masks of ``value`` (parameter layout, True = removed)."""
        return self.art.masks(value)

    def row(self, value: float, tensors) -> dict[str, Any]:
        """The report row's method-specific entries."""
        return {"removed_fraction": overall_fraction(tensors)}

    def evaluate(self, sweep: AdapterSweep, tensors, out_dir: Path) -> dict[str, Any]:
        return sweep.evaluate_masked(self.targets, tensors, out_dir)


class EditSweep:
    """A weight-editing method's saved sweep: the new parameter values per knob value.

    Args:
        directory: The repair run's output (``repair.json``, ``sweep_edits.safetensors``).
        model: The evaluated fine-tuned model (unmerged); the edits are checked to belong to it.
    """

    kind = "edit"

    def __init__(self, directory: Path, model: torch.nn.Module) -> None:
        self.art = EditArtifacts.read(directory)
        self.art.check_source(dict(model.named_parameters()))
        self.fingerprint, self.values, self.report = self.art.fingerprint, self.art.values, self.art.report

    def tensors(self, value: float) -> dict[str, torch.Tensor]:
        """The edits of ``value`` (parameter name -> new value)."""
        return self.art.edits(value)

    def row(self, value: float, tensors) -> dict[str, Any]:
        """The report row's method-specific entries: the knob, its neutral value and how far it moved
        the edited weights (no weights are removed, so ``removed_fraction`` is None)."""
        report = self.report
        change = (report.get("relative_change") or {}).get(value_key(value))
        return {
            "knob": report["knob"],
            "neutral": report["neutral"],
            "removed_fraction": None,
            "relative_change": change,
        }

    def evaluate(self, sweep: AdapterSweep, tensors, out_dir: Path) -> dict[str, Any]:
        return sweep.evaluate_edited(tensors, out_dir)


def read_sweep(
    directory: Path, model: torch.nn.Module, values: list[float], field: str
) -> MaskSweep | EditSweep:
    """The saved sweep of one method (masks or edits, by what its run wrote), checked to hold ``values``.

    Raises:
        ConfigError: naming ``field`` when a value has no saved result.
    """
    sweep = EditSweep(directory, model) if has_edit_artifacts(directory) else MaskSweep(directory, model)
    missing = sorted(set(values) - set(sweep.values))
    if missing:
        raise ConfigError(f"{field}: the run in {directory} saved no result for values {missing}.")
    return sweep
