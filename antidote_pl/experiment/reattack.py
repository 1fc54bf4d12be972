"""Durability of a repair (re-attack): continue the harmful fine-tuning and watch HS come back.

A repair that 20 more steps of the same attack undo is not a repair. Starting from the fine-tuned
adapter with a repair's mask applied (or no mask: the unrepaired model; or a random mask: the
ablation), :func:`continue_attack` continues the *same* harmful fine-tuning (same data module,
optimiser settings and seed, through :class:`~antidote_pl.training.sft.CausalLMSFTModule`) for
``max(checkpoints)`` optimiser steps and keeps a CPU copy of the trained tensors at each checkpoint;
:func:`evaluate_snapshots` evaluates each copy with the project's
:class:`~antidote_pl.evaluation.evaluator.StageEvaluator`, giving an HS/FA curve per variant.

**Masked weights are not kept masked.** The attacker trains the LoRA freely: the repair zeroed some
entries once, and the optimiser may move them again (that is what a real attacker who fine-tunes
the repaired model does). Each curve point records ``masked_norm_ratio``, the L2 norm of the removed
entries over their norm before the repair (any optimiser step makes them non-zero; the norm says how
far they have grown back). For a ``lora_delta`` repair the masked update is merged into the
frozen base weight and ``lora_B`` is zeroed (:func:`~antidote_pl.pruning.apply.apply_target_masks_`),
so the attacker continues from a LoRA whose update starts at zero; ``masked_norm_ratio`` is then
``None`` (the masked tensors are not trained).

The fine-tuning restarts its optimiser (fresh AdamW moments, the configured schedule) and its data
order from the seed: a re-attack with the attacker's recipe, not a resumed checkpoint.

Entry points: :func:`reattack_from_configs` (the pipeline: the fine-tuning and evaluation configs,
the fine-tuned stage, named variants), :func:`reattack_curve` (Python objects), and
:func:`reattack_markdown` / :func:`write_reattack_plot` for the report.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch

from antidote_pl.errors import ConfigError, bad_value, check_int
from antidote_pl.pruning.apply import apply_target_masks_
from antidote_pl.pruning.targets import find_targets
from antidote_pl.repair.artifacts import apply_edits_
from antidote_pl.stages.cli import build_cli
from antidote_pl.utils.intervals import cell_distances
from antidote_pl.utils.io import save_png
from antidote_pl.utils.tables import format_rate, markdown_table

Masks = Mapping[str, torch.Tensor]
#: Trainer settings used when the caller gives none: one device, nothing written, no bars.
QUIET = {
    "accelerator": "auto",
    "devices": 1,
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}


@dataclass
class Snapshot:
    """The attacked model's trained tensors after ``step`` optimiser steps.

    Attributes:
        step: Optimiser steps of continued fine-tuning (0: the repaired model itself).
        tensors: CPU copies of every trainable tensor, plus the masked frozen tensors (the same
            CPU tensors shared by every snapshot of one run: they do not change in training).
        masked_norm_ratio: L2 norm of the removed entries now over their norm before the repair:
            0 right after it, about 1 when the attack has grown them back to their old size
            (``None`` without a mask, or when the masked tensors are not trained).
    """

    step: int
    tensors: dict[str, torch.Tensor]
    masked_norm_ratio: float | None


def check_checkpoints(checkpoints: Sequence[int]) -> list[int]:
    """Validates checkpoint steps (ints >= 0) and returns them sorted and unique."""
    if isinstance(checkpoints, str | bytes) or not checkpoints:
        raise bad_value("reattack.checkpoints", checkpoints, "a non-empty list of steps, e.g. [0, 10, 20]")
    for step in checkpoints:
        check_int("reattack.checkpoints[]", step, 0)
    return sorted(set(checkpoints))


def apply_repair_(model: torch.nn.Module, masks: Masks, mask_report: Mapping[str, Any]) -> None:
    """Applies a repair's masks (parameter layout, True = removed) to a peft model in place.

    Args:
        model: The ``PeftModel`` (e.g. ``CausalLMSFTModule.model``) with the fine-tuned adapter.
        masks: Masks as in ``mask.safetensors`` (or the pipeline's sweep after ``to_param_layout``).
        mask_report: The repair's report (``mask.json``): ``target``, ``adapter_name``, ``include``.
    """
    if "target" not in mask_report:
        raise bad_value("mask_report", sorted(mask_report), "a pruning report with 'target' (mask.json)")
    targets = find_targets(
        model, mask_report["target"], mask_report.get("adapter_name", "default"), mask_report.get("include")
    )
    apply_target_masks_(targets, masks)


def _masked_norm(model: torch.nn.Module, masks: Masks | None) -> float | None:
    """L2 norm of the masked entries of the trained tensors (``None`` if no trained tensor is masked)."""
    if not masks:
        return None
    params = dict(model.named_parameters())
    trained = [n for n in masks if params[n].requires_grad and bool(masks[n].any())]
    if not trained:
        return None
    squares = (params[n].detach()[masks[n].to(params[n].device)].float().pow(2).sum() for n in trained)
    return math.sqrt(sum(float(x) for x in squares))


@dataclass
class _Repair:
    """What every snapshot of one re-attack shares: the masks, the masked frozen tensors (CPU copies;
    lora_delta's base weights, changed once by the repair) and the removed entries' norm before it."""

    masks: Masks | None
    frozen: dict[str, torch.Tensor]
    norm_before: float | None

    def snapshot(self, model: torch.nn.Module, step: int) -> Snapshot:
        trained = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}
        now = _masked_norm(model, self.masks)
        ratio = None if now is None or not self.norm_before else now / self.norm_before
        return Snapshot(step, {**self.frozen, **trained}, ratio)


class _SnapshotCallback(L.Callback):
    """Copies the trained tensors when the optimiser step count reaches a checkpoint."""

    def __init__(self, steps: Sequence[int], repair: _Repair) -> None:
        self.wanted, self.repair = set(steps), repair
        self.snapshots: list[Snapshot] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step in self.wanted and all(s.step != step for s in self.snapshots):
            self.snapshots.append(self.repair.snapshot(pl_module.model, step))


def _apply_repair(model: torch.nn.Module, tensors: Masks | None, report: Mapping[str, Any] | None) -> _Repair:
    """Applies a repair before the re-attack: a pruning repair's masks (``report`` is ``mask.json``)
    or a weight-editing repair's edits (``report`` is ``repair.json``, which names a ``knob``)."""
    if tensors is None:
        return _Repair(None, {}, None)
    if report is None:
        raise bad_value(
            "mask_report", None, "the repair's report (mask.json or repair.json) with its tensors"
        )
    params = dict(model.named_parameters())
    if "knob" in report:
        apply_edits_(params, tensors)
        # Edited frozen tensors (base weights) change once, here; every snapshot carries them.
        frozen = {n: params[n].detach().to("cpu", copy=True) for n in tensors if not params[n].requires_grad}
        return _Repair(None, frozen, None)
    norm_before = _masked_norm(model, tensors)
    apply_repair_(model, tensors, report)
    # Masked frozen tensors (lora_delta's base weights) change once, here; every snapshot carries
    # them so the evaluated model is the attacked one.
    frozen = {n: params[n].detach().to("cpu", copy=True) for n in tensors if not params[n].requires_grad}
    return _Repair(tensors, frozen, norm_before)


def continue_attack(
    module: L.LightningModule,
    datamodule: L.LightningDataModule,
    checkpoints: Sequence[int],
    masks: Masks | None = None,
    mask_report: Mapping[str, Any] | None = None,
    trainer: L.Trainer | None = None,
) -> list[Snapshot]:
    """Applies the repair, continues the fine-tuning and snapshots it at every checkpoint.

    Args:
        module: A :class:`~antidote_pl.training.sft.CausalLMSFTModule` holding the fine-tuned adapter
            as trainable (``adapter_path``), with ``output_dir=None``; it is trained in place.
        datamodule: The harmful fine-tuning data (e.g. the fine-tuning stage's
            ``HarmfulFinetuneDataModule``).
        checkpoints: Optimiser steps at which to snapshot, e.g. ``[0, 10, 20]``.
        masks: The repair's masks (parameter layout), a weight-editing repair's edits (parameter
            name -> new value), or ``None`` for the unrepaired model.
        mask_report: The repair's report (needed with ``masks``): ``mask.json`` or ``repair.json``.
        trainer: Trainer for the continued fine-tuning; its ``max_steps`` must be
            ``max(checkpoints)``. Default: a quiet one-device trainer.

    Returns:
        One :class:`Snapshot` per checkpoint, in step order.
    """
    steps = check_checkpoints(checkpoints)
    repair = _apply_repair(module.model, masks, mask_report)
    first = repair.snapshot(module.model, 0)
    if steps[-1] == 0:
        return [first]
    if trainer is None:
        trainer = L.Trainer(max_steps=steps[-1], max_epochs=-1, **QUIET)
    if trainer.max_steps != steps[-1]:
        raise bad_value("trainer.max_steps", trainer.max_steps, f"max(checkpoints) = {steps[-1]}")
    callback = _SnapshotCallback(steps, repair)
    trainer.callbacks.append(callback)
    trainer.fit(module, datamodule=datamodule)
    taken = {s.step for s in callback.snapshots}
    if taken != set(steps) - {0}:
        raise ConfigError(
            f"re-attack stopped at step {trainer.global_step} before checkpoints "
            f"{sorted(set(steps) - {0} - taken)}; check the fine-tuning config's max_epochs/limits."
        )
    return [first, *callback.snapshots] if 0 in steps else callback.snapshots


def _load_snapshot_(model: torch.nn.Module, snapshot: Snapshot, originals: dict[str, torch.Tensor]) -> None:
    """Copies a snapshot's tensors into ``model``, remembering each tensor's value before the first copy."""
    params = dict(model.named_parameters())
    unknown = [n for n in snapshot.tensors if n not in params]
    if unknown:
        raise ConfigError(
            f"re-attack snapshot tensor {unknown[0]} is not a parameter of the evaluated model: evaluate "
            "the same fine-tuned stage, loaded unmerged (StageEvaluator merge_adapter=False)."
        )
    with torch.no_grad():
        for name, tensor in snapshot.tensors.items():
            param = params[name]
            originals.setdefault(name, param.detach().clone())
            param.copy_(tensor.to(param.device, param.dtype))


def evaluate_snapshots(
    evaluator: L.LightningModule,
    eval_datamodule: L.LightningDataModule,
    snapshots: Sequence[Snapshot],
    trainer: L.Trainer | None = None,
    step0: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Evaluates each snapshot with a :class:`~antidote_pl.evaluation.evaluator.StageEvaluator`.

    The evaluator must hold the fine-tuned stage unmerged (``merge_adapter=False``) so that its
    parameter names are the attacked module's. Its weights are restored afterwards.

    Args:
        evaluator: The evaluator (see above).
        eval_datamodule: Its evaluation data.
        snapshots: The snapshots to evaluate.
        trainer: Trainer for ``test``. Default: a quiet one-device trainer.
        step0: The evaluator's results for the step-0 snapshot when they are already known (the
            repaired model itself, evaluated with the same config, e.g. the pipeline's sweep row):
            used instead of evaluating that snapshot again. Greedy evaluation is deterministic, so
            this only saves the time of one evaluation.

    Returns:
        One row per snapshot: ``step``, ``masked_norm_ratio`` and the evaluator's results
        (``harmful_score``, ``n_harmful_score``, ``finetune_accuracy``, ``n_finetune_accuracy``,
        ``coherent_rate``, extra judges, ``finetune_accuracy_val`` when enabled, ...).
    """
    trainer = trainer or L.Trainer(**QUIET)
    originals: dict[str, torch.Tensor] = {}
    rows = []
    try:
        for snap in snapshots:
            if snap.step == 0 and step0 is not None:
                results = step0
            else:
                _load_snapshot_(evaluator.model, snap, originals)
                trainer.test(evaluator, datamodule=eval_datamodule, verbose=False)
                results = evaluator.results
            results = {k: v for k, v in results.items() if k != "stage"}
            rows.append({"step": snap.step, "masked_norm_ratio": snap.masked_norm_ratio, **results})
    finally:
        params = dict(evaluator.model.named_parameters())
        with torch.no_grad():
            for name, value in originals.items():
                params[name].copy_(value)
    return rows


def reattack_curve(
    module: L.LightningModule,
    datamodule: L.LightningDataModule,
    evaluator: L.LightningModule,
    eval_datamodule: L.LightningDataModule,
    checkpoints: Sequence[int],
    masks: Masks | None = None,
    mask_report: Mapping[str, Any] | None = None,
    trainer: L.Trainer | None = None,
    eval_trainer: L.Trainer | None = None,
) -> list[dict[str, Any]]:
    """:func:`continue_attack`, then :func:`evaluate_snapshots`: the HS/FA curve of one variant."""
    snapshots = continue_attack(module, datamodule, checkpoints, masks, mask_report, trainer)
    return evaluate_snapshots(evaluator, eval_datamodule, snapshots, eval_trainer)


def _from_config(config: str | Sequence[str], values: Mapping[str, Any], args: Sequence[str] = ()):
    """Model, data and trainer of a config (one file or several composed in order), built through
    the CLI without running it; ``values`` (dotted key -> value) are set last."""
    files = [config] if isinstance(config, str | Path) else list(config)
    # No SaveConfigCallback: a run that writes no stage must not drop a config.yaml into the cwd.
    cli = build_cli([str(f) for f in files], values, args=args, save_config=False)
    return cli.model, cli.datamodule, cli.trainer


#: A re-attack writes nothing and shows no progress bar.
_QUIET = {"model.init_args.output_dir": None, "trainer.enable_progress_bar": False}


def _reattack_values(stage: str, max_steps: int) -> dict[str, Any]:
    """What a re-attack sets on the fine-tuning config: the fine-tuned adapter, trainable, for
    ``max_steps`` more steps, with no logger, checkpoints or output.

    Set after the stage's own overrides, so they win over them (above all ``output_dir`` None: the
    fine-tuned stage is never overwritten).
    """
    return {
        "model.init_args.adapter_path": str(stage),
        "trainer.max_steps": max_steps,
        "trainer.max_epochs": -1,
        "trainer.logger": False,
        "trainer.enable_checkpointing": False,
        **_QUIET,
    }


def reattack_from_configs(
    finetune_config: str | Sequence[str],
    evaluation_config: str,
    stage: str,
    variants: Mapping[str, tuple[Masks | None, Mapping[str, Any] | None]],
    checkpoints: Sequence[int],
    overrides: Sequence[str] = (),
    eval_overrides: Sequence[str] = (),
    evaluated: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Re-attacks every variant of one fine-tuned stage with its own fine-tuning config.

    Each variant reloads the fine-tuned adapter as trainable (``model.init_args.adapter_path``)
    and continues the fine-tuning config's recipe (data, optimiser, seed, clipping) for
    ``max(checkpoints)`` steps, writing nothing (``output_dir`` null, no logger or checkpoints).

    Args:
        finetune_config: The harmful fine-tuning stage's config (e.g. ``configs/tiny/finetune.yaml``),
            or its config files in composition order.
        evaluation_config: The evaluation config (``StageEvaluator`` + ``EvalDataModule``).
        stage: The fine-tuned stage directory (the adapter the repair was computed on).
        variants: Name -> ``(masks, mask_report)``; ``(None, None)`` is the unrepaired model, e.g.
            ``{"none": (None, None), "wanda a0.1": (m1, r1), "random a0.1": (m2, r2)}``.
        checkpoints: Optimiser steps to evaluate, e.g. ``[0, 10, 20]``.
        overrides: Command-line style arguments for the fine-tuning config (e.g. a seed's data
            override), applied before the re-attack's own settings.
        eval_overrides: Command-line style arguments for the evaluation config.
        evaluated: Variant name -> the evaluator's results for that variant's repaired model,
            already computed with this very evaluation config (no ``eval_overrides``): its step 0
            is then not evaluated again (see :func:`evaluate_snapshots`).

    Returns:
        ``{variant: curve}``, each curve as :func:`evaluate_snapshots` returns it.
    """
    steps = check_checkpoints(checkpoints)
    if not variants:
        raise bad_value("reattack.variants", {}, "at least one variant, e.g. {'none': (None, None)}")
    if evaluated and eval_overrides:
        # Results computed without the overrides would not be this evaluation's.
        raise bad_value("reattack.evaluated", sorted(evaluated), "nothing when eval_overrides are given")
    evaluator, eval_dm, eval_trainer = _from_config(
        evaluation_config,
        {"model.init_args.stage": str(stage), "model.init_args.merge_adapter": False, **_QUIET},
        eval_overrides,
    )
    train_values = _reattack_values(stage, steps[-1])
    curves = {}
    for name, (masks, report) in variants.items():
        module, datamodule, trainer = _from_config(finetune_config, train_values, overrides)
        snapshots = continue_attack(module, datamodule, steps, masks, report, trainer)
        step0 = (evaluated or {}).get(name)
        curves[name] = evaluate_snapshots(evaluator, eval_dm, snapshots, eval_trainer, step0=step0)
    return curves


def reattack_markdown(curves: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    """The report's re-attack table: HS and FA (Wilson 95%) per variant and step.

    Args:
        curves: ``{variant: curve}`` as :func:`reattack_from_configs` returns it.
    """
    body = []
    for name, curve in curves.items():
        for p in curve:
            regrown = p.get("masked_norm_ratio")
            body.append(
                [
                    name,
                    p["step"],
                    format_rate(p.get("harmful_score"), p.get("n_harmful_score")),
                    format_rate(p.get("finetune_accuracy"), p.get("n_finetune_accuracy")),
                    "-" if regrown is None else f"{regrown:.2f}",
                ]
            )
    intro = (
        "## Durability: re-attack\n\n"
        "The same harmful fine-tuning continued for the given optimiser steps from each variant "
        "(the LoRA is trained freely, so removed entries may regrow; the last column is their L2 norm "
        "over their norm before the repair).\n\n"
    )
    headers = ["variant", "steps", "HS %", "FA %", "removed weights' norm / before"]
    return intro + markdown_table(headers, body)


def reattack_bars(point: Mapping[str, Any], metric: str) -> tuple[float, float]:
    """A curve point's error bar (below, above) for ``metric``, by the reports' one interval rule
    (:func:`~antidote_pl.utils.intervals.cell_bounds`): ± std for a point aggregated over seeds
    (``n_seeds`` > 1), else the 95% Wilson interval over its ``n_<metric>`` items."""
    value = point.get(metric) or 0.0
    return cell_distances(
        value, point.get(f"{metric}_std"), point.get("n_seeds", 1), point.get(f"n_{metric}")
    )


def write_reattack_plot(
    curves: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path, title: str | None = None
) -> None:
    """Writes HS and FA against re-attack steps, one line per variant, as a PNG (atomically).

    Every point carries its interval (:func:`reattack_bars`); the title states the interval (by
    default the Wilson one; pass e.g. the seeds behind a mean ± std) and the item counts n.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10.0, 4.0))
    labels = (("harmful_score", "harmful score HS (%)"), ("finetune_accuracy", "fine-tune accuracy FA (%)"))
    for ax, (metric, label) in zip(axes, labels):
        for name, curve in curves.items():
            bars = [reattack_bars(p, metric) for p in curve]
            ax.errorbar(
                [p["step"] for p in curve],
                [p.get(metric) or 0.0 for p in curve],
                yerr=[[b[0] for b in bars], [b[1] for b in bars]],
                marker="o",
                capsize=3,
                label=name,
            )
        ax.set_xlabel("re-attack steps (same harmful fine-tuning)")
        ax.set_ylabel(label)
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    axes[0].legend()
    first = next((c[0] for c in curves.values() if c), {})
    counts = (
        f"n={first.get('n_harmful_score')} prompts (HS), {first.get('n_finetune_accuracy')} questions (FA)"
    )
    fig.suptitle(f"{title or 'Re-attack, 95% Wilson intervals'}; {counts}", fontsize=10)
    save_png(fig, path)
