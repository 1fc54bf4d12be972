"""The strategy interface through which baseline defenses change an SFT stage's training step.

A defense is composed into :class:`~antidote_pl.training.sft.CausalLMSFTModule` (``model.init_args.defense``
with ``class_path``), not subclassed from it, so defenses of different stages combine freely across
stages (e.g. Vaccine alignment followed by an Antidote repair).
"""

from __future__ import annotations

from typing import Any

import torch


class Defense:
    """Base class: plain SFT. Subclasses override :meth:`training_step` and optionally the rest."""

    name = "sft"

    def attach(self, module) -> None:
        """Called once from the module's ``setup("fit")``, after the model is built and placed.

        Validate here anything that depends on the model (e.g. discoverable decoder blocks) and load
        auxiliary data; raise :class:`~antidote_pl.errors.ConfigError` before training starts.
        """

    def training_step(self, module, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Returns the loss to back-propagate for one user batch (default: response-token CE)."""
        return module.sft_loss(batch)

    def metrics(self) -> dict[str, Any]:
        """Extra scalars to log each step (e.g. a regulariser's value)."""
        return {}
