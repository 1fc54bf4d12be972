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
silently switches the regulariser off when drift is large). Here that guard is explicit:
``max_layer_distance`` drops such terms and the number dropped is logged as ``dropped_layers``.

Modes (``mode``):

* ``"parity"`` (the paper configs): the official implementation (reference D): MLP outputs, the
  ``"sum"`` scale over *every* position of the batch, padding included (the official distance is the
  Frobenius norm of the whole ``[B, T, d]`` difference), and the per-layer guard at 0.1. Options left
  ``None`` take these values; any other value is an error. The official code also clipped gradients
  at 5 before the trainer's clip at 1.0, which is the same as the clip at 1.0 alone.
* ``"project"`` (default): decoder-block outputs, the ``"mean"`` scale over real tokens, and no
  guard. This is deliberate: with the guard, the regulariser vanishes exactly where the model drifts
  most (at rho 1e-4 a layer's term passes 0.1 once its features have moved by about 45 in L2 over
  the whole batch, i.e. ``d_l >= 2000``), so the official LDIFS is much weaker than its loss
  suggests, and the project variant is not comparable with the paper's numbers.
"""

from __future__ import annotations

from typing import Any

import torch

from antidote_pl.defenses.base import Defense
from antidote_pl.defenses.blocks import (
    REPRESENTATIONS,
    capture_outputs,
    check_mode,
    parity_value,
    representation_modules,
)
from antidote_pl.errors import bad_value, check_choice, check_number

REDUCTIONS = ("mean", "sum")
#: The official per-layer guard: terms ``rho/2 * d_l`` at or above it are dropped (reference D).
OFFICIAL_MAX_LAYER_DISTANCE = 0.1


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
        representation: ``block`` (decoder-block outputs) or ``mlp`` (their MLP outputs, official);
            ``None``: the mode's (project ``block``, parity ``mlp``).
        reduction: ``mean`` or ``sum``; see the module docstring. ``None``: the mode's (project
            ``mean``, parity ``sum``).
        max_layer_distance: Explicit guard: layer terms ``rho/2 * d_l`` at or above it are dropped.
            ``None``: no guard in project mode, the official 0.1 in parity mode.
        mode: ``project`` or ``parity``; see the module docstring.

    Raises:
        ConfigError: on bad values, or a value other than the official one in parity mode
            (construction); in :meth:`attach`, on a model that is not a fresh LoRA or an architecture
            without the representation modules.
    """

    name = "ldifs"

    def __init__(
        self,
        rho: float = 1e-4,
        representation: str | None = None,
        reduction: str | None = None,
        max_layer_distance: float | None = None,
        mode: str = "project",
    ) -> None:
        check_mode("LDIFS", mode)
        check_number("LDIFS.rho", rho, low=0.0)
        if representation is not None:
            check_choice("LDIFS.representation", representation, REPRESENTATIONS)
        if reduction is not None:
            check_choice("LDIFS.reduction", reduction, REDUCTIONS)
        if max_layer_distance is not None:
            check_number("LDIFS.max_layer_distance", max_layer_distance, low=0.0, low_open=True)
        self.mode = mode
        self.rho = float(rho)
        self.representation = parity_value("LDIFS", "representation", representation, "mlp", "block", mode)
        self.reduction = parity_value("LDIFS", "reduction", reduction, "sum", "mean", mode)
        self.max_layer_distance = parity_value(
            "LDIFS", "max_layer_distance", max_layer_distance, OFFICIAL_MAX_LAYER_DISTANCE, None, mode
        )
        # The official distance runs over every position of the batch, padding included.
        self.include_padding = mode == "parity"
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
        """Per-layer distances ``d_l`` (see :func:`layer_distance`); padding counts in parity mode."""
        if self.include_padding:
            mask = torch.ones_like(mask)
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
