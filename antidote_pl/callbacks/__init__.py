"""Lightning callbacks: Antidote's Wanda pruning and its ablations (random, magnitude, none).

They live inside the package so ``class_path: antidote_pl.callbacks.WandaPruneCallback`` resolves
after install; the YAML fragments that swap them are in the top-level ``callbacks/`` folder.
"""

from antidote_pl.callbacks.prune import (
    BasePruneCallback,
    MagnitudePruneCallback,
    NoPruneCallback,
    RandomPruneCallback,
    WandaPruneCallback,
)

__all__ = [
    "BasePruneCallback",
    "MagnitudePruneCallback",
    "NoPruneCallback",
    "RandomPruneCallback",
    "WandaPruneCallback",
]
