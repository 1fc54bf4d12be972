"""Weight-editing repair callbacks: the slot every post-fine-tuning repair family shares with Antidote.

A pruning callback removes weights (:mod:`antidote_pl.callbacks.prune`); the callbacks built on
:class:`BaseRepairCallback` change them: scale the user's LoRA update, add the alignment delta back,
project the update, keep part of it under a safety budget, or continue training it on refusals. Each
one sits in the repair stage's ``pruner:`` slot, so one extra ``--config callbacks/<method>.yaml``
swaps it in, and runs when ``fit`` ends (``trainer.max_epochs: 0``)::

    python -m antidote_pl fit --config configs/tiny/repair.yaml --config callbacks/delta_scaling.yaml

Every method has one *knob* (``value``) with a neutral setting that returns the fine-tuned model
exactly. The expensive part (projections, Hessians, a training run) is prepared once; with
``sweep_values`` the edits of every value are computed from it and saved
(:mod:`antidote_pl.repair.artifacts`), so the pipeline evaluates a whole sweep from one run, as it
does with pruning's ``sweep_alphas``. The math lives in :mod:`antidote_pl.repair`; this module is
glue: finding the LoRA layers, the data a method needs, applying, reporting and handing the
artefacts to the module, which alone writes the stage (the merged model when base weights changed).

Ranks: the data-free methods compute the same edits on every rank; data-driven ones run their
(small) calibration or training on every rank over the same records, so every rank holds the same
edits without communication.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from antidote_pl.errors import ConfigError, bad_value
from antidote_pl.pruning.targets import find_targets, merged_param_name
from antidote_pl.repair.artifacts import apply_edits_, edits_fingerprint, value_key, write_edit_artifacts
from antidote_pl.utils.console import say

Edits = dict[str, torch.Tensor]


@dataclass(frozen=True)
class LoraSlot:
    """One LoRA-adapted linear layer of the fine-tuned model, by parameter name.

    Attributes:
        key: The layer's weight name in the merged model (``model.layers.0.self_attn.q_proj.weight``),
            which is how other models (the pre-alignment one) name the same weight.
        base: Name of the frozen base weight in the peft model.
        a: Name of ``lora_A``'s weight (``[r, in]``).
        b: Name of ``lora_B``'s weight (``[out, r]``).
        scale: peft's ``scaling`` of the adapter (``lora_alpha / r``).
        transposed: Whether the base weight is stored ``[in, out]`` (``fan_in_fan_out``).
        layer: The peft ``LoraLayer`` (its input is the base layer's input).
    """

    key: str
    base: str
    a: str
    b: str
    scale: float
    transposed: bool
    layer: torch.nn.Module


def lora_slots(model: torch.nn.Module, adapter: str = "default") -> dict[str, LoraSlot]:
    """Every plain-LoRA linear of ``adapter`` in ``model``, keyed by :attr:`LoraSlot.key`.

    Raises:
        ConfigError: if the model has no such adapter (see :func:`find_targets`).
    """
    names = {id(p): n for n, p in model.named_parameters()}
    slots = {}
    for info in find_targets(model, "lora_delta", adapter).values():
        layer = info.lora_layer
        slots[merged_param_name(info.name)] = LoraSlot(
            key=merged_param_name(info.name),
            base=info.name,
            a=names[id(layer.lora_A[adapter].weight)],
            b=names[id(layer.lora_B[adapter].weight)],
            scale=float(layer.scaling[adapter]),
            transposed=info.transposed,
            layer=layer,
        )
    return slots


def row_layout(weight: torch.Tensor, slot: LoraSlot) -> torch.Tensor:
    """A base weight in row layout ``[out, in]`` (transposed back for ``fan_in_fan_out`` layers)."""
    return weight.t() if slot.transposed else weight


class BaseRepairCallback(Callback):
    """Prepares a repair once when fit ends, edits the weights for its knob value and saves the result.

    Subclasses set :attr:`method`, :attr:`knob` and :attr:`neutral`, validate a knob value in
    :meth:`check_value`, and implement :meth:`prepare` (the expensive, knob-independent part) and
    :meth:`edits` (the new tensors for one value, keyed by parameter name).

    Args:
        value: The knob value applied to the saved model.
        sweep_values: Also compute and save the edits of these values from the same preparation
            (``sweep_edits.safetensors``); the pipeline evaluates exactly those.
        adapter_name: The peft adapter to repair (the user's fine-tuning LoRA).
        output_dir: Where the repaired stage goes; defaults to the model's ``output_dir``.
    """

    method = "base"
    knob = "value"
    neutral = 0.0

    def __init__(
        self,
        value: float,
        sweep_values: list[float] | None = None,
        adapter_name: str = "default",
        output_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.value = self.check_value(value, self.knob)
        if sweep_values is not None and (not isinstance(sweep_values, list | tuple) or not sweep_values):
            raise bad_value("sweep_values", sweep_values, f"null or a non-empty list of {self.knob} values")
        self.sweep_values = (
            None
            if sweep_values is None
            else sorted({self.check_value(v, f"sweep_values[{i}]") for i, v in enumerate(sweep_values)})
        )
        self.adapter_name = adapter_name
        self.output_dir = output_dir
        self.report: dict[str, Any] | None = None

    # ------------------------------------------------------------------ extension points
    def check_value(self, value: Any, field: str) -> float:
        """Validates one knob value; returns it as a float."""
        raise NotImplementedError

    def prepare(self, trainer: L.Trainer, pl_module: L.LightningModule, slots: dict[str, LoraSlot]) -> Any:
        """The knob-independent part of the repair, computed once (default: nothing)."""
        return None

    def edits(
        self, state: Any, slots: dict[str, LoraSlot], params: Mapping[str, torch.Tensor], value: float
    ) -> Edits:
        """The new value of every parameter the repair changes at ``value`` (parameter layout)."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Settings recorded in ``repair.json``."""
        return {
            "method": self.method,
            "knob": self.knob,
            "value": self.value,
            "neutral": self.neutral,
            "adapter_name": self.adapter_name,
            "sweep_values": self.sweep_values,
        }

    def extra_report(self, state: Any) -> dict[str, Any]:
        """Method-specific entries for ``repair.json`` (e.g. which layers were projected)."""
        return {}

    @property
    def values(self) -> list[float]:
        """The knob values whose edits are computed: the callback's own and its ``sweep_values``."""
        return sorted({self.value, *(self.sweep_values or [])})

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not (hasattr(pl_module, "model") and hasattr(pl_module, "add_to_stage")):
            raise ConfigError(
                f"{type(self).__name__} needs a module with `.model` and `add_to_stage` (e.g. "
                f"CausalLMSFTModule), got {type(pl_module).__name__}."
            )
        if self.output_dir is None and getattr(pl_module.hparams, "output_dir", None) is None:
            raise bad_value(
                f"{type(self).__name__}.output_dir", None, "a directory (or set model.output_dir)"
            )
        lora_slots(pl_module.model, self.adapter_name)  # fails now, not after the preparation
        if self.output_dir is not None and hasattr(pl_module, "claim_output"):
            field = f"{type(self).__name__}.output_dir"
            pl_module.claim_output(self.output_dir, field, take_lock=trainer.is_global_zero)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.to(trainer.strategy.root_device)
        model = pl_module.model
        slots = lora_slots(model, self.adapter_name)
        start = time.perf_counter()
        state = self.prepare(trainer, pl_module, slots)
        params = dict(model.named_parameters())
        by_value = {v: self.edits(state, slots, params, v) for v in self.values}
        seconds = time.perf_counter() - start
        names = sorted({n for e in by_value.values() for n in e})
        if any(sorted(e) != names for e in by_value.values()):
            raise ConfigError(f"{type(self).__name__}: every knob value must edit the same tensors.")
        originals = {n: params[n].detach().clone() for n in names}
        apply_edits_(params, by_value[self.value])
        self.report = {
            **self.describe(),
            "num_layers": len(slots),
            "edited_shapes": {n: list(params[n].shape) for n in names},
            "source_fingerprint": edits_fingerprint(originals),
            "repaired_fingerprint": edits_fingerprint({n: params[n] for n in names}),
            "relative_change": {value_key(v): relative_change(e, originals) for v, e in by_value.items()},
            "repair_seconds": seconds,
            **self.extra_report(state),
        }
        self._hand_over(pl_module, slots, names, by_value)
        say(
            f"{type(self).__name__}: {self.knob}={self.value:g} edited {len(names)} tensors in {seconds:.2f}s"
        )

    def _hand_over(self, pl_module, slots: dict[str, LoraSlot], names: list[str], by_value) -> None:
        """Gives the report and the artefact writer to the module, which alone saves the stage."""
        factors = {s.a for s in slots.values()} | {s.b for s in slots.values()}
        # Base weights changed: an adapter-only save would drop them, so the merged model is saved.
        merge = any(n not in factors for n in names)
        self.report["merged_adapter"] = merge
        report, sweep = self.report, (by_value if self.sweep_values else None)
        pl_module.add_to_stage(
            metadata={"repair": {k: v for k, v in report.items() if k != "edited_shapes"}},
            files=lambda tmp: write_edit_artifacts(tmp, report, sweep),
            output_dir=self.output_dir,
            merge_adapter=merge,
        )


def relative_change(edits: Edits, originals: Mapping[str, torch.Tensor]) -> float:
    """``||edited - original|| / ||original||`` over all edited tensors (0 at the neutral value).

    Recorded per knob value, so a report shows how far each setting moved the weights.
    """
    diff = sum(float((e.float() - originals[n].float()).pow(2).sum()) for n, e in edits.items())
    norm = sum(float(originals[n].float().pow(2).sum()) for n in edits)
    return (diff / norm) ** 0.5 if norm > 0 else float(diff > 0)
