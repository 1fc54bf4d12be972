"""Refusal re-alignment ("Safety at One Shot", arXiv 2601.01887) as a repair callback.

The user's adapter keeps training, for a few epochs, on ``k`` (harmful prompt, refusal) pairs: the
prompts from the realignment window (never an evaluation prompt), the refusals written by the aligned
model (:mod:`antidote_pl.callbacks.refusals`). The knob is the number of epochs: one training run to
the largest swept epoch count snapshots the adapter after each swept count, so a sweep costs one run.
``k`` is a setting of the callback (one fragment per ``k``: 1, 8, 64). Epoch 0 is the fine-tuned
model itself.

The loop is plain PyTorch inside ``on_fit_end`` (the repair stage trains nothing itself): AdamW on
the adapter's LoRA factors only, the module's own SFT loss (response tokens), batches of
``batch_size`` pairs shuffled with ``seed``, dropout on as in training. It runs identically on every
DDP rank (same pairs, same seed), so every rank ends with the same adapter.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from antidote_pl.callbacks.refusals import aligned_refusals, pairs_loader, realignment_prompts
from antidote_pl.callbacks.repair import BaseRepairCallback, Edits, LoraSlot
from antidote_pl.errors import check_int, check_number


def train_on_pairs(
    pl_module: L.LightningModule,
    loader,
    names: list[str],
    snapshots_at: list[int],
    learning_rate: float,
    device: torch.device,
) -> dict[int, dict[str, torch.Tensor]]:
    """Trains the parameters ``names`` on ``loader`` and copies them after each epoch in ``snapshots_at``.

    Returns:
        Epoch count -> CPU copies of the trained tensors (epoch 0: before training).
    """
    model = pl_module.model
    params = dict(model.named_parameters())
    frozen = {n: p.requires_grad for n, p in params.items()}
    for n, p in params.items():
        p.requires_grad_(n in names)
    optimizer = torch.optim.AdamW([params[n] for n in names], lr=learning_rate, weight_decay=0.0)
    snapshots = {0: {n: params[n].detach().to("cpu", copy=True) for n in names}}
    was_training = model.training
    model.train()
    try:
        for epoch in range(1, max(snapshots_at) + 1):
            for batch in loader:
                optimizer.zero_grad(set_to_none=True)
                loss = pl_module.sft_loss({k: v.to(device) for k, v in batch.items()})
                loss.backward()
                optimizer.step()
            if epoch in snapshots_at:
                snapshots[epoch] = {n: params[n].detach().to("cpu", copy=True) for n in names}
    finally:
        model.train(was_training)
        for n, p in params.items():
            p.requires_grad_(frozen[n])
    return snapshots


class RefusalRealignCallback(BaseRepairCallback):
    """Refusal re-alignment: the user's adapter trained ``epochs`` more epochs on ``k`` refusal pairs.

    Args:
        value: Epochs (a whole number >= 0, e.g. 3 or 3.0; 0: the fine-tuned model).
        k: Number of (harmful prompt, refusal) pairs, the first ``k`` of the realignment window.
        learning_rate: AdamW learning rate (no weight decay, constant).
        batch_size: Pairs per step (null: all ``k`` in one batch).
        refusal_tokens: New tokens of each aligned-model refusal.
        seed: Seed of the data order and of dropout.
        sweep_values: See :class:`BaseRepairCallback`.
        adapter_name: See :class:`BaseRepairCallback`.
        output_dir: See :class:`BaseRepairCallback`.
    """

    method = "refusal_realign"
    knob = "epochs"
    neutral = 0.0

    def __init__(
        self,
        value: float = 3,
        k: int = 8,
        learning_rate: float = 1e-4,
        batch_size: int | None = None,
        refusal_tokens: int = 32,
        seed: int = 0,
        sweep_values: list[float] | None = None,
        adapter_name: str = "default",
        output_dir: str | None = None,
    ) -> None:
        super().__init__(value, sweep_values, adapter_name, output_dir)
        check_int("k", k, 1)
        check_number("learning_rate", learning_rate, low=0.0, low_open=True)
        if batch_size is not None:
            check_int("batch_size", batch_size, 1)
        check_int("refusal_tokens", refusal_tokens, 1)
        check_int("seed", seed, 0)
        self.k, self.learning_rate, self.batch_size = k, learning_rate, batch_size
        self.refusal_tokens, self.seed = refusal_tokens, seed

    def check_value(self, value: Any, field: str) -> float:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        check_int(field, value, 0)
        return float(value)

    def describe(self) -> dict[str, Any]:
        extra = {"k": self.k, "learning_rate": self.learning_rate, "batch_size": self.batch_size}
        return {**super().describe(), **extra, "refusal_tokens": self.refusal_tokens, "seed": self.seed}

    def prepare(self, trainer, pl_module, slots: dict[str, LoraSlot]):
        records = realignment_prompts(trainer, self.k, "k")
        pairs = aligned_refusals(trainer, pl_module, records, self.refusal_tokens)
        names = [n for s in slots.values() for n in (s.a, s.b)]
        epochs = sorted({int(v) for v in self.values if v > 0})
        snapshots = {0: None}
        if epochs:
            torch.manual_seed(self.seed)  # dropout and the loader's shuffle
            loader = pairs_loader(trainer, pairs, self.batch_size or self.k, shuffle=True)
            device = trainer.strategy.root_device
            snapshots = train_on_pairs(pl_module, loader, names, epochs, self.learning_rate, device)
            _restore(pl_module.model, snapshots[0])  # every value's edits start from the fine-tuned model
        return {"snapshots": snapshots, "pairs": [r["output"] for r in pairs]}

    def edits(self, state, slots, params, value) -> Edits:
        names = [n for s in slots.values() for n in (s.a, s.b)]
        snapshot = state["snapshots"].get(int(value))
        if snapshot is None:  # epoch 0: the fine-tuned adapter, unchanged
            return {n: params[n].detach().clone() for n in names}
        return {n: snapshot[n] for n in names}

    def extra_report(self, state) -> dict[str, Any]:
        refusals = state["pairs"]
        return {"pairs": len(refusals), "refusal_examples": refusals[:3]}


def _restore(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t.to(params[n].device))
