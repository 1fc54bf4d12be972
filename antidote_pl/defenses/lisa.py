"""Lisa (Huang et al., NeurIPS 2024): bi-state fine-tuning with a proximal term.

Training alternates two states, starting with alignment: ``align_steps`` optimizer steps on the
provider's guide data (``guide`` sources, e.g. harmful prompts with refusals plus benign answers),
then ``finetune_steps`` steps on the user's data, and so on. At each switch the trainable weights are
snapshotted as the anchor of the state being left. Once ``proximal_start`` of the total optimizer
steps have passed, each step adds ``rho/2 * sum ||w - anchor||^2`` towards the other state's anchor
(zero at a switch, growing as the weights move away).

How the official hazards (reference G.10) are handled:

* **Discarded user batches.** Lightning draws the training batch from the user's loader, so in
  alignment steps that batch is not trained on, exactly as in the official code. This is kept (the
  user data budget is part of the method) but made visible: the ``discarded_user_samples`` metric
  counts them. To show every user sample as often as plain SFT does, scale ``max_epochs``/``max_steps``
  by ``(align_steps + finetune_steps) / finetune_steps``.
* **One shared AdamW.** ``optimizer_state="shared"`` (default, the official behaviour the paper's
  numbers come from) keeps one set of Adam moments across both objectives;
  ``optimizer_state="per_state"`` swaps in a separate set of moments for each state at every switch.
  One learning-rate schedule serves both states either way. A checkpoint holds only the active
  state's moments.
* **Proximal start at 10%.** A parameter (``proximal_start``, default 0.1) instead of a constant.

States are keyed by ``trainer.global_step`` (optimizer steps), so gradient accumulation keeps all
micro-batches of one optimizer step in the same state.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from antidote_pl.data.records import Source
from antidote_pl.defenses.base import Defense
from antidote_pl.defenses.blocks import AuxiliaryStream, check_sources, trainable_parameters
from antidote_pl.errors import ConfigError, bad_value, check_choice, check_number

ALIGN, FINETUNE = "align", "finetune"
OPTIMIZER_STATES = ("shared", "per_state")


class Lisa(Defense):
    """Bi-state optimisation between guide (alignment) data and user data.

    Args:
        guide: Alignment data available at fine-tuning time, concatenated (official: BeaverTails safe).
        align_steps: Optimizer steps per alignment phase (official 100).
        finetune_steps: Optimizer steps per fine-tuning phase (official 900).
        rho: Proximal weight (official 1).
        proximal_start: Fraction of the total optimizer steps after which the proximal term is on.
        optimizer_state: ``shared`` (official) or ``per_state`` Adam moments; see the module docstring.
        batch_size: Guide batch size per device; ``None``: the DataModule's.
        template: Template of the guide records; ``None``: the DataModule's.
        max_length: Token limit of the guide records; ``None``: the DataModule's.
        seed: Shuffle seed of the guide stream.

    Raises:
        ConfigError: on bad values (construction); in :meth:`attach`, on an empty guide source.
    """

    name = "lisa"

    def __init__(
        self,
        guide: list[Source],
        align_steps: int = 100,
        finetune_steps: int = 900,
        rho: float = 1.0,
        proximal_start: float = 0.1,
        optimizer_state: str = "shared",
        batch_size: int | None = None,
        template: str | None = None,
        max_length: int | None = None,
        seed: int = 42,
    ) -> None:
        sources = check_sources("Lisa.guide", guide)
        check_number("Lisa.align_steps", align_steps, low=0, integer=True)
        check_number("Lisa.finetune_steps", finetune_steps, low=1, integer=True)
        check_number("Lisa.rho", rho, low=0.0)
        check_number("Lisa.proximal_start", proximal_start, low=0.0, high=1.0)
        check_choice("Lisa.optimizer_state", optimizer_state, OPTIMIZER_STATES)
        self.align_steps = align_steps
        self.finetune_steps = finetune_steps
        self.rho = float(rho)
        self.proximal_start = float(proximal_start)
        self.optimizer_state = optimizer_state
        self.stream = AuxiliaryStream(sources, "Lisa.guide", batch_size, template, max_length, seed)
        self._params: list[torch.nn.Parameter] = []
        self._reset()

    def _reset(self) -> None:
        self._current: str | None = None
        self._anchor: list[torch.Tensor] | None = None
        self._stashed_moments: dict[str, Any] = {}
        self._start_step: int | None = None
        self._discarded = 0
        self._metrics: dict[str, Any] = {}

    def state(self, step: int) -> str:
        """The state (``"align"`` or ``"finetune"``) of optimizer step ``step`` (0-based)."""
        return ALIGN if step % (self.align_steps + self.finetune_steps) < self.align_steps else FINETUNE

    def attach(self, module) -> None:
        """Builds the guide stream and resets the schedule's bookkeeping."""
        self.stream.build(module)
        self._params = [p for _, p in trainable_parameters(module.model)]
        if not self._params:
            raise bad_value("model", type(module.model).__name__, "a model with trainable parameters")
        self._reset()

    def proximal_start_step(self, module) -> int:
        """First optimizer step with the proximal term on (``proximal_start`` of the total steps)."""
        if self._start_step is None:
            total = int(module.trainer.estimated_stepping_batches)
            self._start_step = int(self.proximal_start * total)
        return self._start_step

    def proximal(self) -> torch.Tensor:
        """``rho/2 * sum ||w - anchor||^2`` over the trainable weights (0 before the first switch)."""
        if self._anchor is None or self.rho == 0:
            return self._params[0].new_zeros((), dtype=torch.float32)
        total = sum((p.float() - a).pow(2).sum() for p, a in zip(self._params, self._anchor))
        return 0.5 * self.rho * total

    def _switch(self, module, new: str) -> None:
        if self._current is not None:
            # Snapshot of the state being left: the other state's proximal target from now on.
            self._anchor = [p.detach().float().clone() for p in self._params]
            if self.optimizer_state == "per_state":
                self._swap_moments(module, new)
        self._current = new

    def _swap_moments(self, module, new: str) -> None:
        optimizer = module.optimizers(use_pl_optimizer=False)
        if isinstance(optimizer, list):
            raise ConfigError("Lisa.optimizer_state='per_state' needs a single optimizer.")
        self._stashed_moments[self._current] = optimizer.state
        optimizer.state = self._stashed_moments.pop(new, defaultdict(dict))

    def training_step(self, module, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """CE on guide data (alignment state) or the user batch (fine-tuning state), plus proximal term."""
        step = module.trainer.global_step
        state = self.state(step)
        if state != self._current:
            self._switch(module, state)
        if state == ALIGN:
            self._discarded += int(batch["input_ids"].shape[0])
            ce = module.sft_loss(self.stream.next(module.device))
        else:
            ce = module.sft_loss(batch)
        on = step >= self.proximal_start_step(module)
        prox = self.proximal() if on else ce.new_zeros((), dtype=torch.float32)
        self._metrics = {
            "ce": ce.detach(),
            "proximal": prox.detach(),
            "align_state": float(state == ALIGN),
            "discarded_user_samples": float(self._discarded),
        }
        return ce + prox

    def metrics(self) -> dict[str, Any]:
        """``ce``, ``proximal``, ``align_state`` (1/0) and ``discarded_user_samples`` (cumulative)."""
        return dict(self._metrics)
