"""LDIFS (Mukhoti et al., TMLR): keep the fine-tuned model's features close to the starting model's.

Loss per step: ``CE + rho/2 * D`` with ``D`` built from per-layer feature distances between the
current model and the starting model on the same batch.

The starting model is the current model with its (fresh) LoRA adapter disabled: the reference forward
runs ``with module.model.disable_adapter()`` under ``torch.no_grad()``, so there is no deep copy (the
official code keeps a second full model on the GPU and runs it with gradients, reference G.10), and the
reference can never change during training because the base weights are frozen. This equals the
starting model only for a fresh LoRA (``B = 0``); loading a trained ``adapter_path`` or full
fine-tuning is rejected in :meth:`LDIFS.attach`.

Normalisation (``reduction``):

* ``"mean"`` (default): per layer, the squared L2 distance over the hidden dimension averaged over
  real tokens (``attention_mask``); ``D`` is the mean over layers. Independent of batch size,
  sequence length and depth, so ``rho`` transfers across models.
* ``"sum"``: the official scale, ``D = sum over layers and real tokens of ||h - h_ref||^2``
  (the official code also sums padding positions; here they are masked).

The official code drops a layer's term whenever ``rho/2 * d_l >= 0.1`` (a NaN/overflow guard that
silently switches the regulariser off when drift is large). Here that guard is explicit and off by
default: ``max_layer_distance`` (e.g. ``0.1`` for parity) drops such terms and the number dropped is
logged as ``dropped_layers``.
"""

from __future__ import annotations

from typing import Any

import torch

from antidote_pl.defenses.base import Defense
from antidote_pl.defenses.blocks import REPRESENTATIONS, capture_outputs, check_number, representation_modules
from antidote_pl.errors import bad_value

REDUCTIONS = ("mean", "sum")


def layer_distance(
    hidden: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor, reduction: str
) -> torch.Tensor:
    """Squared L2 feature distance of one layer over real tokens, in fp32.

    Args:
        hidden: Current features ``[B, T, d]``.
        reference: Starting-model features ``[B, T, d]`` (no grad).
        mask: ``attention_mask`` ``[B, T]``; padding positions are left out.
        reduction: ``"mean"`` (per-token squared distance averaged over real tokens) or ``"sum"``.
    """
    per_token = (hidden.float() - reference.float()).pow(2).sum(-1)
    weights = mask.to(per_token.dtype)
    total = (per_token * weights).sum()
    return total / weights.sum().clamp_min(1.0) if reduction == "mean" else total


class LDIFS(Defense):
    """Feature-space distance to the starting model during (LoRA) fine-tuning.

    Args:
        rho: Weight of the distance (official 1e-4 with the ``"sum"`` scale).
        representation: ``block`` (decoder-block outputs) or ``mlp`` (their MLP outputs, official).
        reduction: ``mean`` or ``sum``; see the module docstring.
        max_layer_distance: Optional explicit guard: layer terms ``rho/2 * d_l`` at or above it are
            dropped (official 0.1); ``None`` keeps every term.

    Raises:
        ConfigError: on bad values (construction); in :meth:`attach`, on a model that is not a fresh
            LoRA or an architecture without the representation modules.
    """

    name = "ldifs"

    def __init__(
        self,
        rho: float = 1e-4,
        representation: str = "block",
        reduction: str = "mean",
        max_layer_distance: float | None = None,
    ) -> None:
        check_number("LDIFS.rho", rho, low=0.0)
        if representation not in REPRESENTATIONS:
            raise bad_value("LDIFS.representation", representation, f"one of {list(REPRESENTATIONS)}")
        if reduction not in REDUCTIONS:
            raise bad_value("LDIFS.reduction", reduction, f"one of {list(REDUCTIONS)}")
        if max_layer_distance is not None:
            check_number("LDIFS.max_layer_distance", max_layer_distance, low=0.0, low_open=True)
        self.rho = float(rho)
        self.representation = representation
        self.reduction = reduction
        self.max_layer_distance = max_layer_distance
        self._modules: list[torch.nn.Module] | None = None
        self._metrics: dict[str, Any] = {}

    def attach(self, module) -> None:
        """Checks that the adapter-disabled model is the starting model and finds the feature modules."""
        if not module.is_peft:
            raise bad_value(
                "model.finetuning",
                module.hparams.finetuning,
                "'lora' with LDIFS: its reference is the model with the adapter disabled",
            )
        if module.hparams.get("adapter_path") is not None:
            raise bad_value(
                "model.adapter_path",
                module.hparams.adapter_path,
                "null with LDIFS: with a trained adapter loaded, disabling it is not the starting model",
            )
        self._modules = representation_modules(module.model, self.representation)

    def reference_features(self, module, batch: dict[str, torch.Tensor]) -> list[torch.Tensor | None]:
        """Features of the starting model (adapter disabled, no grad) on ``batch``."""
        with torch.no_grad(), module.model.disable_adapter(), capture_outputs(self._modules) as ref:
            module(batch["input_ids"], batch["attention_mask"])
        return list(ref)

    def distances(self, hidden: list, reference: list, mask: torch.Tensor) -> list[torch.Tensor]:
        """Per-layer distances ``d_l`` (see :func:`layer_distance`)."""
        return [
            layer_distance(h, r, mask, self.reduction) for h, r in zip(hidden, reference) if h is not None
        ]

    def training_step(self, module, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """CE plus the feature distance to the starting model."""
        if self._modules is None:
            self.attach(module)
        reference = self.reference_features(module, batch)
        with capture_outputs(self._modules) as hidden:
            ce = module.sft_loss(batch)
        dists = self.distances(list(hidden), reference, batch["attention_mask"])
        terms = [0.5 * self.rho * d for d in dists]
        if self.max_layer_distance is not None:
            # A dropped term counts as zero; the mean still divides by every layer.
            kept = [t for t in terms if t.detach() < self.max_layer_distance]
        else:
            kept = terms
        penalty = sum(kept, ce.new_zeros((), dtype=torch.float32))
        if self.reduction == "mean" and terms:
            penalty = penalty / len(terms)
        self._metrics = {
            "ce": ce.detach(),
            "distance": torch.stack(dists).detach().mean() if dists else 0.0,
            "penalty": penalty.detach(),
            "dropped_layers": float(len(terms) - len(kept)),
        }
        return ce + penalty

    def metrics(self) -> dict[str, Any]:
        """``ce``, ``distance`` (mean ``d_l``, unweighted), ``penalty`` and ``dropped_layers``."""
        return dict(self._metrics)
