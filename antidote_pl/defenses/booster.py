"""Booster (Huang et al., ICLR 2025): attenuate the harmful perturbation during alignment.

Loss per step::

    CE_align(w) + lam * (CE_harm(w) - CE_harm(w - alpha * g / ||g||)),   g = grad CE_harm(w)

The regulariser is the drop in harmful loss that one normalised harmful gradient step of size
``alpha`` would buy a later attacker; minimising it makes the aligned model a poor starting point for
harmful fine-tuning. ``g`` is treated as a constant (first order, as in the official trainer), so the
gradient of the loss is ``grad CE_align(w) + lam * (grad CE_harm(w) - grad CE_harm(w - alpha * g/||g||))``,
which is the official update; it is obtained here by returning this loss to Lightning, with the
perturbed model evaluated by :func:`torch.func.functional_call` on ``w - alpha * g/||g||`` (no weight
is modified in place).

The harmful set is a separate :class:`~antidote_pl.data.records.Source` (harmful prompts with harmful
answers), cycled inside the defense. Cost: three forward passes (alignment, harmful, perturbed
harmful) and three backward passes per step, as in the official trainer (defense-landscape 1a): the
harmful loss at ``w`` is back-propagated once, for ``g``, which then also serves as its gradient in
the returned loss (see :meth:`Booster.harmful_drop`).

Under DDP each rank draws its own shard of the harmful set and simulates the harmful step with its
local ``g`` (not all-reduced, like a per-rank SAM step); the final gradients are all-reduced as usual.

Modes (``mode``). The update above is the official one in both; they differ in the run's settings.
Booster's official alignment (git-disl/Booster ``script/alignment/smooth_align.sh`` and its trainer)
does not use Antidote's alignment settings: lr 5e-4 with a constant schedule and no warmup, weight
decay 0.1, batch 10 and a harmful batch of 10 (hard-coded in its trainer), 20 epochs.

* ``"parity"`` (the paper configs): the harmful batch is 10 (``batch_size`` must be 10 or ``None``),
  and :meth:`Booster.attach` refuses a run whose learning rate, schedule, weight decay, per-device
  batch or gradient accumulation differ from those values, so a paper-labelled Booster run cannot
  silently inherit another stage's settings.
* ``"project"`` (default): any settings; the harmful batch defaults to the DataModule's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.func import functional_call

from antidote_pl.data.records import Source
from antidote_pl.defenses.base import Defense
from antidote_pl.defenses.blocks import (
    AuxiliaryStream,
    check_mode,
    check_sources,
    global_norm,
    parity_value,
    trainable_parameters,
)
from antidote_pl.errors import ConfigError, bad_value, check_number

EPS = 1e-7
#: Booster's own alignment settings (git-disl/Booster smooth_align.sh and BoosterAlignmentTrainer).
OFFICIAL_HARMFUL_BATCH_SIZE = 10
OFFICIAL_SETTINGS = {
    "model.learning_rate": 5e-4,
    "model.scheduler": "constant",
    "model.weight_decay": 0.1,
    "data.batch_size": 10,
    "trainer.accumulate_grad_batches": 1,
}


class Booster(Defense):
    """Harmful-perturbation attenuation during alignment.

    Args:
        harmful: Harmful prompts with harmful answers (e.g. BeaverTails unsafe; not the attack data).
        lam: Weight of the regulariser (official scripts 5; the maintainer reports 25 in some tables,
            git-disl/Booster#3).
        alpha: Size of the simulated normalised harmful step (official 0.1).
        batch_size: Harmful batch size per device; ``None``: the DataModule's (project mode) or the
            official 10 (parity mode).
        template: Template of the harmful records; ``None``: the DataModule's.
        max_length: Token limit of the harmful records; ``None``: the DataModule's.
        seed: Shuffle seed of the harmful stream.
        mode: ``project`` or ``parity``; see the module docstring.

    Raises:
        ConfigError: on bad values, or a harmful batch other than 10 in parity mode (construction);
            in :meth:`attach`, on an empty harmful source, a model without trainable weights, or (in
            parity mode) settings other than Booster's official ones.
    """

    name = "booster"

    def __init__(
        self,
        harmful: Source,
        lam: float = 5.0,
        alpha: float = 0.1,
        batch_size: int | None = None,
        template: str | None = None,
        max_length: int | None = None,
        seed: int = 42,
        mode: str = "project",
    ) -> None:
        check_mode("Booster", mode)
        sources = check_sources("Booster.harmful", harmful)
        check_number("Booster.lam", lam, low=0.0)
        check_number("Booster.alpha", alpha, low=0.0, low_open=True)
        if mode == "parity":
            batch_size = parity_value(
                "Booster", "batch_size", batch_size, OFFICIAL_HARMFUL_BATCH_SIZE, None, mode
            )
        self.mode = mode
        self.lam = float(lam)
        self.alpha = float(alpha)
        self.stream = AuxiliaryStream(sources, "Booster.harmful", batch_size, template, max_length, seed)
        self._named: list[tuple[str, torch.nn.Parameter]] = []
        self._metrics: dict[str, Any] = {}

    @staticmethod
    def run_settings(module) -> dict[str, Any]:
        """The settings of ``module``'s run that Booster's official alignment fixes (``None``: unknown)."""
        hp = module.hparams
        trainer = getattr(module, "_trainer", None)
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        batcher = getattr(datamodule, "batcher", None)
        return {
            "model.learning_rate": hp.get("learning_rate"),
            "model.scheduler": hp.get("scheduler"),
            "model.weight_decay": hp.get("weight_decay"),
            "data.batch_size": getattr(batcher, "batch_size", None),
            "trainer.accumulate_grad_batches": getattr(trainer, "accumulate_grad_batches", None),
        }

    def check_parity_settings(self, module) -> None:
        """Raises unless ``module``'s run uses Booster's official alignment settings (parity mode).

        Raises:
            ConfigError: naming every setting that differs, its value and the official one.
        """
        actual = self.run_settings(module)
        wrong = [
            f"{field}={actual[field]!r} (official {expected!r})"
            for field, expected in OFFICIAL_SETTINGS.items()
            if actual[field] != expected
        ]
        if wrong:
            raise ConfigError(
                "Booster.mode='parity' needs Booster's own alignment settings (git-disl/Booster "
                f"smooth_align.sh), but the run has {', '.join(wrong)}; fix those values (see "
                "configs/paper/defenses/booster_align.yaml) or set Booster.mode='project'."
            )

    def attach(self, module) -> None:
        """Builds the harmful stream and lists the trainable weights that the simulated step moves.

        In parity mode the run's settings are checked first (:meth:`check_parity_settings`).
        """
        if self.mode == "parity":
            self.check_parity_settings(module)
        self._named = trainable_parameters(module.model)
        if not self._named:
            raise bad_value("model", type(module.model).__name__, "a model with trainable parameters")
        self.stream.build(module)

    def harmful_drop(self, module, harmful: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(CE_harm(w), CE_harm(w - alpha * g/||g||))``, both differentiable in ``w``.

        The gradient ``g`` of the first is already computed to build the perturbation, so instead of a
        second backward pass through the harmful graph, the first term is returned as the linear
        surrogate ``<w, g>`` shifted to the true value: same value, same gradient ``g``, and the
        harmful graph is freed at once (about one backward pass and its activations saved per step).
        """
        before = module.sft_loss(harmful)
        params = [p for _, p in self._named]
        grads = torch.autograd.grad(before, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        scale = self.alpha / (global_norm(grads) + EPS)
        moved = {name: p - (g.float() * scale).to(p.dtype) for (name, p), g in zip(self._named, grads)}
        after = functional_call(
            module.model,
            moved,
            args=(),
            kwargs={
                "input_ids": harmful["input_ids"],
                "attention_mask": harmful["attention_mask"],
                "labels": harmful["labels"],
            },
            strict=False,
        ).loss
        linear = sum((p.float() * g.float()).sum() for p, g in zip(params, grads))
        before_term = linear - linear.detach() + before.detach()
        return before_term, after

    def training_step(self, module, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Alignment CE on the user batch plus the harmful-drop regulariser on the next harmful batch."""
        align_ce = module.sft_loss(batch)
        before, after = self.harmful_drop(module, self.stream.next(module.device))
        drop = before - after
        self._metrics = {
            "align_ce": align_ce.detach(),
            "harmful_ce": before.detach(),
            "harmful_ce_after_step": after.detach(),
            "harmful_drop": drop.detach(),
        }
        return align_ce + self.lam * drop

    def metrics(self) -> dict[str, Any]:
        """``align_ce``, ``harmful_ce``, ``harmful_ce_after_step`` and ``harmful_drop`` of the last step."""
        return dict(self._metrics)
