"""The LM judge's linear head: a logistic regression over frozen pooled features, and the threshold.

:func:`train_head` chooses the head's cached layers and L2 strength on validation rows only;
:func:`choose_threshold` picks the decision cut for either kind of head (this one or the tuned head
of :mod:`antidote_pl.judges.lm.tuned`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, get_args

import torch
from torch import nn

from antidote_pl.judges.thresholds import choose_threshold

#: The two kinds of head: ``tuned`` (fine-tuned top layers, :mod:`antidote_pl.judges.lm.tuned`) and
#: ``linear`` (this module).
HeadKind = Literal["tuned", "linear"]
HEADS: tuple[str, ...] = get_args(HeadKind)
L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)


def select_features(feats: torch.Tensor, layer_index: Sequence[int]) -> torch.Tensor:
    """The head's input: the chosen cached layers' pooled features, flattened to ``[N, dim]``."""
    return feats[:, list(layer_index)].reshape(feats.shape[0], -1)


def fit_logistic(
    x: torch.Tensor, y: torch.Tensor, l2: float, steps: int = 100
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-regularised logistic regression by full-batch L-BFGS; returns ``(weight [dim], bias [1])``.

    ``x`` should be standardised; the penalty is ``l2 * |w|^2`` on top of the mean log-loss.
    """
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


class LinearHead:
    """Standardisation plus a logistic regression over the chosen cached layers.

    Attributes:
        layer_index: Positions in the featurizer's ``layers`` that feed the head.
        mean, std, weight, bias: Tensors of the standardisation and the linear model.
    """

    def __init__(self, layer_index, mean, std, weight, bias) -> None:
        self.layer_index = [int(i) for i in layer_index]
        self.mean, self.std, self.weight, self.bias = mean, std, weight, bias

    @classmethod
    def fit(
        cls, feats: torch.Tensor, labels: torch.Tensor, layer_index: Sequence[int], l2: float
    ) -> LinearHead:
        """Fits on ``feats`` (``[N, layers, 2, hidden]``) and 0/1 ``labels``."""
        x = select_features(feats, layer_index)
        mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
        weight, bias = fit_logistic((x - mean) / std, labels.float(), l2)
        return cls(layer_index, mean, std, weight, bias)

    def probabilities(self, feats: torch.Tensor) -> torch.Tensor:
        """Harmfulness probabilities, shape ``[N]``."""
        x = (select_features(feats, self.layer_index) - self.mean) / self.std
        return torch.sigmoid(x @ self.weight + self.bias)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors to save."""
        return {"mean": self.mean, "std": self.std, "weight": self.weight, "bias": self.bias}


def train_head(
    feats: torch.Tensor, labels: Sequence[int], train: torch.Tensor, val: torch.Tensor, n_layers: int
) -> tuple[LinearHead, float, dict[str, Any]]:
    """Chooses the layer set and L2 strength, then the threshold, on validation only.

    Candidates: each cached layer alone and all of them together, times :data:`L2_GRID`. Each is fit
    on the training rows; the best validation agreement wins (ties: lower validation log-loss).

    Returns:
        ``(head, threshold, selection report)``.
    """
    gold = torch.tensor([bool(y) for y in labels])
    sets = [[k] for k in range(n_layers)] + ([list(range(n_layers))] if n_layers > 1 else [])
    grid, best = [], None
    for layer_index in sets:
        for l2 in L2_GRID:
            head = LinearHead.fit(feats[train], gold[train], layer_index, l2)
            probs = head.probabilities(feats[val])
            threshold, accuracy = choose_threshold(probs, gold[val])
            logloss = float(
                nn.functional.binary_cross_entropy(probs.clamp(1e-6, 1 - 1e-6), gold[val].float())
            )
            grid.append(
                {"layer_index": layer_index, "l2": l2, "val_accuracy": accuracy, "val_logloss": logloss}
            )
            if best is None or (accuracy, -logloss) > (best[2], -best[3]):
                best = (head, threshold, accuracy, logloss, layer_index, l2)
    head, threshold, accuracy, logloss, layer_index, l2 = best
    report = {
        "selected": {"layer_index": layer_index, "l2": l2, "threshold": threshold},
        "val_accuracy": accuracy,
        "val_logloss": logloss,
        "grid": grid,
    }
    return head, threshold, report
