"""Vaccine (Huang et al., NeurIPS 2024): perturbation-aware alignment on the hidden states.

Each step finds the worst-case perturbation of the hidden states within a ball of radius ``rho``
(first-order: along the loss gradient) and trains the weights at that perturbed point, so the aligned
model's representations resist the embedding drift that harmful fine-tuning later causes.

One step, as a :class:`~antidote_pl.defenses.base.Defense` under Lightning's automatic optimisation:

1. forward with hooks that keep every perturbed hidden state ``h_l`` (see below) in the graph;
2. ``g_l = dL/dh_l`` by :func:`torch.autograd.grad` (no parameter gradients accumulate);
3. ``e_l = rho * g_l / (||g|| + 1e-7)`` with ``||g||`` the norm over all layers together;
4. forward again with hooks adding the constant ``e_l`` to each ``h_l``; that loss is
   returned and Lightning back-propagates it, so only the perturbed-point gradient updates the
   weights (as in the official trainer).

Where the perturbation goes (``mode``):

* ``"parity"`` (the paper configs): on each decoder block's self-attention output, before the
  residual add, as the official trainer (reference D: hooks on the attention modules, ``g_l`` the
  gradient of the loss w.r.t. their first output). The attention modules are found generically (the
  block's child whose class name contains "Attention"), so Gemma is perturbed too; the official
  class list had Gemma commented out in some versions, which silently made Vaccine plain SFT there.
* ``"project"`` (default): on every decoder block's output (the residual stream after the block).
  A deliberate variant: it perturbs what later blocks actually read, including the MLP's
  contribution; it is not the paper's Vaccine, so its numbers are not comparable with the paper's.

In both modes gradients come from ``torch.autograd.grad`` instead of deprecated backward hooks, and
the perturbation is added by a forward hook's return value instead of ``.data`` mutation (reference
G.10); the arithmetic is the official one.
"""

from __future__ import annotations

from typing import Any

import torch

from antidote_pl.defenses.base import Defense
from antidote_pl.defenses.blocks import (
    add_to_outputs,
    attention_modules,
    capture_outputs,
    check_mode,
    find_decoder_blocks,
    global_norm,
)
from antidote_pl.errors import check_number

EPS = 1e-7


class Vaccine(Defense):
    """Perturbation-aware alignment on attention outputs (parity) or decoder-block outputs (project).

    Args:
        rho: Radius of the hidden-state perturbation (official default 2). ``0`` is plain SFT at
            twice the cost (used as a test invariant).
        mode: ``project`` (decoder-block outputs) or ``parity`` (attention outputs, official); see
            the module docstring.

    Raises:
        ConfigError: on a negative or non-finite ``rho`` or an unknown mode; in :meth:`attach`, on an
            architecture without discoverable decoder blocks (or, in parity mode, attention modules).
    """

    name = "vaccine"

    def __init__(self, rho: float = 2.0, mode: str = "project") -> None:
        check_mode("Vaccine", mode)
        check_number("Vaccine.rho", rho, low=0.0)
        self.rho = float(rho)
        self.mode = mode
        self._blocks: list[torch.nn.Module] | None = None
        self._metrics: dict[str, Any] = {}

    def attach(self, module) -> None:
        """Finds the perturbed modules of ``module.model``: attention (parity) or decoder blocks."""
        if self.mode == "parity":
            self._blocks = attention_modules(module.model)
        else:
            self._blocks = list(find_decoder_blocks(module.model))

    def perturbation(self, module, batch: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Computes the per-block perturbations ``e_l`` for ``batch`` at the current weights.

        Returns:
            ``(deltas, clean_loss)``: one detached tensor per perturbed module (block or attention),
            shaped like its output, and the unperturbed loss (detached).
        """
        if self._blocks is None:
            self.attach(module)
        with capture_outputs(self._blocks, ensure_grad=True) as hidden:
            clean = module.sft_loss(batch)
        used = [h for h in hidden if h is not None]
        grads = torch.autograd.grad(clean, used, allow_unused=True)
        grads = [torch.zeros_like(h) if g is None else g for h, g in zip(used, grads)]
        norm = global_norm(grads)
        scale = self.rho / (norm + EPS)
        deltas = iter([(g.float() * scale).to(g.dtype) for g in grads])
        # Blocks that did not run (none in a plain causal LM) get no perturbation.
        per_block = [None if h is None else next(deltas) for h in hidden]
        self._metrics = {"clean_loss": clean.detach(), "hidden_grad_norm": norm.detach()}
        return per_block, clean.detach()

    def training_step(self, module, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Loss at the worst-case hidden-state perturbation (see the module docstring)."""
        deltas, _ = self.perturbation(module, batch)
        with add_to_outputs(self._blocks, deltas):
            return module.sft_loss(batch)

    def metrics(self) -> dict[str, Any]:
        """``clean_loss`` (before perturbation) and ``hidden_grad_norm`` (``||g||``)."""
        return dict(self._metrics)
