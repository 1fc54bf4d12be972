"""Data-free repairs by weight arithmetic: delta scaling, RESTA and SafeLoRA, as repair callbacks.

They need no calibration data: the user's LoRA update and, for RESTA and SafeLoRA, the alignment
delta ``V = W_aligned - W_pre`` of each adapted layer, read from the repair stage's base weights (the
aligned model) and the model before alignment (``pre_alignment``: ``outputs/tiny/pretrain`` in the
tiny world, the GGUF itself in the SmolLM2 world, whose alignment is a merged LoRA). The math is in
:mod:`antidote_pl.repair`; see :mod:`antidote_pl.callbacks.repair` for how a callback runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from antidote_pl.callbacks.repair import BaseRepairCallback, Edits, LoraSlot, row_layout
from antidote_pl.errors import ConfigError, bad_value, check_choice, check_number
from antidote_pl.models.loading import load_causal_lm
from antidote_pl.repair import (
    PROJECTORS,
    add_safety_vector,
    alignment_delta,
    project_lora_b,
    projection_cosines,
    safelora_projectors,
    scale_lora_b,
    select_layers,
)
from antidote_pl.utils.console import say
from antidote_pl.utils.files import read_stage_metadata


def _factors(slots: Mapping[str, LoraSlot], params: Mapping[str, torch.Tensor], which: str) -> dict:
    """The LoRA factor ``which`` (``"a"`` or ``"b"``) of every slot, keyed like the slots."""
    return {key: params[getattr(s, which)].detach() for key, s in slots.items()}


def check_pre_alignment(pre_alignment: Any) -> str | None:
    """Validates the ``pre_alignment`` model spec (null, or a non-empty string); returns it."""
    if pre_alignment is not None and (not isinstance(pre_alignment, str) or not pre_alignment):
        raise bad_value(
            "pre_alignment",
            pre_alignment,
            "null (found from the aligned stage) or the model the alignment started from",
        )
    return pre_alignment


def find_pre_alignment(pl_module: Any) -> str:
    """The model before alignment, found from how the repair stage built its aligned base.

    With one merged alignment adapter (the SmolLM2 world: GGUF + the align LoRA) it is the model
    the adapter was merged into; with a full-model aligned stage (the tiny world) it is the base that
    stage recorded in its ``antidote_stage.json``.

    Raises:
        ConfigError: when neither applies (name ``pre_alignment`` then).
    """
    hp = pl_module.hparams
    merged = list(getattr(hp, "merge_adapters", None) or [])
    if len(merged) == 1:
        return hp.model_name_or_path
    if merged:
        raise bad_value("pre_alignment", None, f"a model spec: the base merges {len(merged)} adapters")
    meta = read_stage_metadata(hp.model_name_or_path, "model.model_name_or_path")
    base = meta.get("base_model")
    if meta.get("kind") != "full_model" or not isinstance(base, str):
        raise bad_value("pre_alignment", None, "a model spec: the aligned stage records no base model")
    return base


def alignment_vectors(
    pre_alignment: str, slots: Mapping[str, LoraSlot], params: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``V = W_aligned - W_pre`` (row layout, fp32) of every adapted layer.

    Args:
        pre_alignment: The model before alignment (a hub name, a local directory or a GGUF source),
            loaded once on the CPU.
        slots: The fine-tuned model's LoRA layers; their base weights are the aligned weights.
        params: The fine-tuned model's parameters by name.

    Raises:
        ConfigError: if the pre-alignment model lacks a layer or has another shape there.
    """
    pre = dict(load_causal_lm(pre_alignment).named_parameters())
    missing = [k for k in slots if k not in pre]
    if missing:
        raise ConfigError(
            f"pre_alignment={pre_alignment!r} has no weight {missing[0]}: it is not the model the "
            "aligned stage was trained from."
        )
    aligned = {k: row_layout(params[s.base].detach(), s) for k, s in slots.items()}
    before = {k: row_layout(pre[k].detach(), s).to(aligned[k].device) for k, s in slots.items()}
    vectors = alignment_delta(aligned, before)
    norm = sum(float(v.pow(2).sum()) for v in vectors.values()) ** 0.5
    say(f"alignment delta over {len(vectors)} layers: Frobenius norm {norm:.4g}")
    if norm == 0:
        raise ConfigError(
            f"pre_alignment={pre_alignment!r} equals the aligned base on every adapted layer "
            "(no alignment delta): name the model the alignment stage started from."
        )
    return vectors


class DeltaScalingCallback(BaseRepairCallback):
    """Pre/post-tuning merge (arXiv 2412.19512): the user's LoRA update times ``lambda``.

    ``lambda`` 1 is the fine-tuned model, 0 the aligned one; in between interpolates the update
    (``B <- lambda * B``). The cheapest baseline, and the one every repair must beat.

    Args:
        value: ``lambda`` in [0, 1].
        sweep_values: See :class:`BaseRepairCallback`.
        adapter_name: See :class:`BaseRepairCallback`.
        output_dir: See :class:`BaseRepairCallback`.
    """

    method = "delta_scaling"
    knob = "lambda"
    neutral = 1.0

    def __init__(
        self,
        value: float = 0.5,
        sweep_values: list[float] | None = None,
        adapter_name: str = "default",
        output_dir: str | None = None,
    ) -> None:
        super().__init__(value, sweep_values, adapter_name, output_dir)

    def check_value(self, value: Any, field: str) -> float:
        check_number(field, value, low=0.0, high=1.0)
        return float(value)

    def edits(self, state, slots, params, value) -> Edits:
        scaled = scale_lora_b(_factors(slots, params, "b"), value)
        return {slots[k].b: t for k, t in scaled.items()}


class RestaCallback(BaseRepairCallback):
    """RESTA (arXiv 2402.11746): the alignment delta added back, ``W <- W + beta * V``, on every
    layer the user's LoRA adapts (the update itself is kept).

    Args:
        value: ``beta`` >= 0 (0: the fine-tuned model).
        pre_alignment: The model before alignment (null: :func:`find_pre_alignment`).
        sweep_values: See :class:`BaseRepairCallback`.
        adapter_name: See :class:`BaseRepairCallback`.
        output_dir: See :class:`BaseRepairCallback`.
    """

    method = "resta"
    knob = "beta"
    neutral = 0.0

    def __init__(
        self,
        value: float = 1.0,
        pre_alignment: str | None = None,
        sweep_values: list[float] | None = None,
        adapter_name: str = "default",
        output_dir: str | None = None,
    ) -> None:
        super().__init__(value, sweep_values, adapter_name, output_dir)
        self.pre_alignment = check_pre_alignment(pre_alignment)

    def check_value(self, value: Any, field: str) -> float:
        check_number(field, value, low=0.0)
        return float(value)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "pre_alignment": self.pre_alignment}

    def prepare(self, trainer, pl_module, slots):
        pre = self.pre_alignment or find_pre_alignment(pl_module)
        return alignment_vectors(pre, slots, dict(pl_module.model.named_parameters()))

    def edits(self, state, slots, params, value) -> Edits:
        weights = {k: row_layout(params[s.base].detach(), s) for k, s in slots.items()}
        added = add_safety_vector(weights, state, value)
        return {s.base: row_layout(added[k], s) for k, s in slots.items()}


class SafeLoRACallback(BaseRepairCallback):
    """SafeLoRA (arXiv 2405.16833): project the update of dissimilar layers onto the alignment subspace.

    Per adapted layer, the projector ``C`` of its alignment delta (the official ``V V^T / ||V||_F``,
    or the exact projector onto V's top singular directions) and the cosine between ``C dW`` and
    ``dW``; layers with a cosine below ``threshold`` get ``B <- C B``. Threshold 0 projects nothing.

    Args:
        value: ``threshold`` in [0, 1].
        pre_alignment: The model before alignment (null: :func:`find_pre_alignment`).
        projector: ``official`` or ``exact``.
        rank: Rank of the exact projector (null: chosen by ``energy``).
        energy: Fraction of V's squared singular values the exact projector keeps (null: ``rank``).
        sweep_values: See :class:`BaseRepairCallback`.
        adapter_name: See :class:`BaseRepairCallback`.
        output_dir: See :class:`BaseRepairCallback`.
    """

    method = "safelora"
    knob = "threshold"
    neutral = 0.0

    def __init__(
        self,
        value: float = 0.5,
        pre_alignment: str | None = None,
        projector: str = "official",
        rank: int | None = None,
        energy: float | None = None,
        sweep_values: list[float] | None = None,
        adapter_name: str = "default",
        output_dir: str | None = None,
    ) -> None:
        super().__init__(value, sweep_values, adapter_name, output_dir)
        check_choice("projector", projector, PROJECTORS)
        self.pre_alignment = check_pre_alignment(pre_alignment)
        self.projector, self.rank, self.energy = projector, rank, energy

    def check_value(self, value: Any, field: str) -> float:
        check_number(field, value, low=0.0, high=1.0)
        return float(value)

    def describe(self) -> dict[str, Any]:
        extra = {"projector": self.projector, "rank": self.rank, "energy": self.energy}
        return {**super().describe(), "pre_alignment": self.pre_alignment, **extra}

    def prepare(self, trainer, pl_module, slots):
        params = dict(pl_module.model.named_parameters())
        vectors = alignment_vectors(self.pre_alignment or find_pre_alignment(pl_module), slots, params)
        projectors = safelora_projectors(vectors, self.projector, rank=self.rank, energy=self.energy)
        cosines = projection_cosines(projectors, _factors(slots, params, "a"), _factors(slots, params, "b"))
        return projectors, cosines

    def edits(self, state, slots, params, value) -> Edits:
        projectors, cosines = state
        selected = select_layers(cosines, threshold=value)
        projected = project_lora_b(projectors, _factors(slots, params, "b"), selected)
        return {slots[k].b: t for k, t in projected.items()}

    def extra_report(self, state) -> dict[str, Any]:
        _, cosines = state
        projected = {repr(v): len(select_layers(cosines, threshold=v)) for v in self.values}
        return {"cosines": cosines, "projected_layers": projected}
