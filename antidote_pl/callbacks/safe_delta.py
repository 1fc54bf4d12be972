"""Safe Delta (arXiv 2505.12038) as a repair callback: keep the update's entries under a safety budget.

Per adapted layer, the Hessian ``H`` of the *aligned* model's inputs on (harmful prompt, refusal)
pairs (:mod:`antidote_pl.callbacks.refusals`) prices each entry of the user's update ``dW = s·B@A``
by the loss of safety it costs (an OBS cost); the cheapest entries are kept under the ``budget``
and the rest compensated column by column (:func:`antidote_pl.repair.safe_delta`). The repaired layer
is ``W_aligned + dW'``: the new update is merged into the base weight and the adapter's ``lora_B``
zeroed, so the model keeps its peft structure and the stage is saved merged.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch

from antidote_pl.callbacks.refusals import aligned_refusals, pairs_loader, realignment_prompts
from antidote_pl.callbacks.repair import BaseRepairCallback, Edits, LoraSlot, row_layout
from antidote_pl.errors import bad_value, check_int, check_number
from antidote_pl.pruning.targets import lora_delta_weight
from antidote_pl.repair import HessianAccumulator, safe_delta_layers
from antidote_pl.utils.threads import pinned_threads


def safety_hessians(
    trainer: L.Trainer, pl_module: L.LightningModule, slots: dict[str, LoraSlot], loader
) -> dict[str, torch.Tensor]:
    """``H`` of every adapted layer: its base layer's inputs in the aligned model (adapter off),
    over every real token of every (prompt, refusal) pair, as the official code does."""
    device = trainer.strategy.root_device
    params = dict(pl_module.model.named_parameters())
    # lora_A is [r, in]: its columns are the base layer's input features.
    accumulators = {k: HessianAccumulator(params[s.a].shape[1]) for k, s in slots.items()}
    handles = [
        s.layer.get_base_layer().register_forward_hook(accumulators[k].forward_hook) for k, s in slots.items()
    ]
    model = pl_module.model
    try:
        with torch.no_grad(), model.disable_adapter():
            for batch in loader:
                mask = batch["attention_mask"].to(device).bool()
                for acc in accumulators.values():
                    acc.set_token_mask(mask)
                model(
                    input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
                )
    finally:
        for h in handles:
            h.remove()
    return {k: acc.finish() for k, acc in accumulators.items()}


class SafeDeltaCallback(BaseRepairCallback):
    """Safe Delta: the user's update kept entry by entry under a safety-cost budget, the rest compensated.

    Args:
        value: The budget ``s`` (> 0; ``.inf`` keeps the whole update: the fine-tuned model). The
            official code's 0.11 is scaled for 7B layers; small models need their own sweep.
        calibration_size: Realignment prompts used for the Hessian (null: all of them).
        refusal_tokens: New tokens of each aligned-model refusal.
        percdamp: Damping of ``H`` (fraction of its mean diagonal), as the official code.
        protect_fraction: Fraction of each group's most sensitive entries never kept (official 0.15).
        batch_size: Calibration batch size (null: the data module's).
        sweep_values: See :class:`BaseRepairCallback`.
        adapter_name: See :class:`BaseRepairCallback`.
        output_dir: See :class:`BaseRepairCallback`.
    """

    method = "safe_delta"
    knob = "budget"
    neutral = math.inf

    def __init__(
        self,
        value: float = 1.0,
        calibration_size: int | None = None,
        refusal_tokens: int = 32,
        percdamp: float = 0.01,
        protect_fraction: float = 0.15,
        batch_size: int | None = None,
        sweep_values: list[float] | None = None,
        adapter_name: str = "default",
        output_dir: str | None = None,
    ) -> None:
        super().__init__(value, sweep_values, adapter_name, output_dir)
        if calibration_size is not None:
            check_int("calibration_size", calibration_size, 1)
        check_int("refusal_tokens", refusal_tokens, 1)
        check_number("percdamp", percdamp, low=0.0, low_open=True)
        check_number("protect_fraction", protect_fraction, low=0.0, high=1.0, high_open=True)
        if batch_size is not None:
            check_int("batch_size", batch_size, 1)
        self.calibration_size, self.refusal_tokens = calibration_size, refusal_tokens
        self.percdamp, self.protect_fraction, self.batch_size = percdamp, protect_fraction, batch_size

    def check_value(self, value: Any, field: str) -> float:
        if value == math.inf:
            return math.inf
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise bad_value(field, value, "a budget > 0 (.inf keeps the whole update)")
        check_number(field, value, low=0.0, low_open=True)
        return float(value)

    def describe(self) -> dict[str, Any]:
        extra = {"calibration_size": self.calibration_size, "refusal_tokens": self.refusal_tokens}
        return {
            **super().describe(),
            **extra,
            "percdamp": self.percdamp,
            "protect_fraction": self.protect_fraction,
        }

    def prepare(self, trainer, pl_module, slots):
        records = realignment_prompts(trainer, self.calibration_size, "calibration_size")
        pairs = aligned_refusals(trainer, pl_module, records, self.refusal_tokens)
        hessians = safety_hessians(trainer, pl_module, slots, pairs_loader(trainer, pairs, self.batch_size))
        params = dict(pl_module.model.named_parameters())
        deltas = {
            k: lora_delta_weight(params[s.a].detach(), params[s.b].detach(), s.scale)
            for k, s in slots.items()
        }
        aligned = {k: row_layout(params[s.base].detach(), s) for k, s in slots.items()}
        return {"hessians": hessians, "deltas": deltas, "aligned": aligned, "n_pairs": len(pairs), "kept": {}}

    def edits(self, state, slots, params, value) -> Edits:
        options = {"percdamp": self.percdamp, "protect_fraction": self.protect_fraction}
        # The compensation walks the columns one by one with small tensor ops, where thread start-up
        # costs more than the work (a SmolLM2 layer: 0.27 s on one thread, 8.5 s on two busy ones);
        # one thread always, so the result does not depend on the stage's thread count either.
        with pinned_threads(1):
            new, infos = safe_delta_layers(
                state["aligned"], state["deltas"], state["hessians"], value, **options
            )
        kept = sum(i.get("kept", 0) for i in infos.values())
        entries = sum(i.get("entries", 0) for i in infos.values())
        state["kept"][repr(float(value))] = kept / entries if entries else 1.0
        out: Edits = {}
        if value == math.inf:
            # The neutral budget is the fine-tuned model itself, bit for bit: nothing is merged.
            return {n: params[n].detach().clone() for s in slots.values() for n in (s.base, s.b)}
        for k, s in slots.items():
            weight = state["aligned"][k].float() + new[k].float()
            out[s.base] = row_layout(weight, s).to(params[s.base].dtype)
            out[s.b] = torch.zeros_like(params[s.b])
        return out

    def extra_report(self, state) -> dict[str, Any]:
        return {"calibration_pairs": state["n_pairs"], "kept_fraction": state["kept"]}
