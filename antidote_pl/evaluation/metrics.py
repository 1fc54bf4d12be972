"""torchmetrics counters for generation evaluation, exact under DDP.

Texts are judged on the rank that generated them; only per-item booleans reach these metrics, and
their states are sum-reduced integer counters, so the synced result over any sharding equals the
single-process result exactly (``tests/test_eval_metrics.py`` checks a 2-process gloo run).
Strings never enter metric states: they cannot be all-gathered by torchmetrics.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric

from antidote_pl.errors import bad_value


def _as_flags(values: torch.Tensor | Sequence[bool], field: str) -> torch.Tensor:
    flags = torch.as_tensor(values)
    if flags.dtype != torch.bool:
        if flags.numel() and not bool(((flags == 0) | (flags == 1)).all()):
            raise bad_value(field, flags.tolist(), "booleans (or 0/1)")
        flags = flags.bool()
    return flags.flatten()


def _global_counts(metric: Metric) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hits, total)`` summed over all ranks (a collective under DDP: call it on every rank)."""
    with metric.sync_context():
        return metric.hits.clone(), metric.total.clone()


class _RateMetric(Metric):
    """``100 * hits / total`` over boolean updates, with sum-reduced counters."""

    full_state_update = False
    is_differentiable = False
    higher_is_better: bool | None = None
    _field = "flags"

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("hits", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, flags: torch.Tensor | Sequence[bool]) -> None:
        """Adds one boolean per item (``True`` counts as a hit)."""
        flags = _as_flags(flags, self._field).to(self.hits.device)
        self.hits += flags.sum()
        self.total += flags.numel()

    def compute(self) -> torch.Tensor:
        """The percentage of hits (NaN before any item was seen)."""
        if self.total == 0:
            return torch.tensor(float("nan"))
        return 100.0 * self.hits.double() / self.total.double()

    def counts(self) -> dict[str, int]:
        """Raw ``hits`` and ``total`` over all ranks (under DDP every rank must call it)."""
        hits, total = _global_counts(self)
        return {"hits": int(hits), "total": int(total)}


class HarmfulScore(_RateMetric):
    """The paper's harmful score: 100 x (#responses judged harmful) / (#responses).

    Example:
        >>> hs = HarmfulScore()
        >>> hs.update(torch.tensor([True, False, False, True]))
        >>> float(hs.compute())
        50.0
    """

    higher_is_better = False
    _field = "harmful"


class TaskAccuracy(_RateMetric):
    """Fine-tuning accuracy in percent: 100 x (#correct answers) / (#questions)."""

    higher_is_better = True
    _field = "correct"


class RateByCategory(Metric):
    """Per-category rates (e.g. harmful score per harm category) over a fixed category list.

    Categories are mapped to indices on each rank, so the states stay integer tensors.

    Args:
        categories: The category names, fixed up front so that every rank's counters line up.

    Example:
        >>> m = RateByCategory(["fraud", "violence"])
        >>> m.update(torch.tensor([True, False, True]), ["fraud", "fraud", "violence"])
        >>> {k: float(v) for k, v in m.compute().items()}
        {'fraud': 50.0, 'violence': 100.0}
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(self, categories: Sequence[str], **kwargs) -> None:
        super().__init__(**kwargs)
        if isinstance(categories, str) or not categories or len(set(categories)) != len(categories):
            raise bad_value("categories", categories, "a non-empty list of distinct names")
        self.categories = list(categories)
        self._index = {c: i for i, c in enumerate(self.categories)}
        zeros = torch.zeros(len(self.categories), dtype=torch.long)
        self.add_state("hits", default=zeros.clone(), dist_reduce_fx="sum")
        self.add_state("total", default=zeros.clone(), dist_reduce_fx="sum")

    def update(self, flags: torch.Tensor | Sequence[bool], categories: torch.Tensor | Sequence[str]) -> None:
        """Adds items with their category (names, or indices into the category list).

        Raises:
            ConfigError: for an unknown category or mismatched lengths.
        """
        flags = _as_flags(flags, "flags").to(self.hits.device)
        if isinstance(categories, torch.Tensor):
            index = categories.long().flatten()
            if index.numel() and (index.min() < 0 or index.max() >= len(self.categories)):
                raise bad_value("categories", index.tolist(), f"indices below {len(self.categories)}")
        else:
            unknown = sorted({c for c in categories if c not in self._index})
            if unknown:
                raise bad_value("categories", unknown, f"names from {self.categories}")
            index = torch.tensor([self._index[c] for c in categories], dtype=torch.long)
        if index.numel() != flags.numel():
            raise bad_value("categories", f"{index.numel()} items", f"one per flag ({flags.numel()})")
        index = index.to(self.hits.device)
        self.hits += torch.bincount(index[flags], minlength=len(self.categories))
        self.total += torch.bincount(index, minlength=len(self.categories))

    def compute(self) -> dict[str, torch.Tensor]:
        """``{category: percentage}``; NaN for categories without items."""
        rates = 100.0 * self.hits.double() / self.total.double()
        return {c: rates[i] for i, c in enumerate(self.categories)}

    def counts(self) -> dict[str, dict[str, int]]:
        """``{category: {"hits": ..., "total": ...}}`` over all ranks (a collective under DDP)."""
        hits, total = _global_counts(self)
        return {c: {"hits": int(hits[i]), "total": int(total[i])} for i, c in enumerate(self.categories)}
