"""Lightning callbacks of the repair slot: Antidote's Wanda pruning, its ablations, and every other
post-fine-tuning repair family (weight edits: delta scaling, RESTA, SafeLoRA, Safe Delta, refusal
re-alignment).

They live inside the package so ``class_path: antidote_pl.callbacks.WandaPruneCallback`` resolves
after install; the YAML fragments that swap them are in the top-level ``callbacks/`` folder.
"""

from antidote_pl.callbacks.arithmetic import DeltaScalingCallback, RestaCallback, SafeLoRACallback
from antidote_pl.callbacks.prune import (
    BasePruneCallback,
    MagnitudePruneCallback,
    NoPruneCallback,
    RandomPruneCallback,
    WandaPruneCallback,
)
from antidote_pl.callbacks.refusal_realign import RefusalRealignCallback
from antidote_pl.callbacks.repair import BaseRepairCallback
from antidote_pl.callbacks.safe_delta import SafeDeltaCallback

__all__ = [
    "BasePruneCallback",
    "BaseRepairCallback",
    "DeltaScalingCallback",
    "MagnitudePruneCallback",
    "NoPruneCallback",
    "RandomPruneCallback",
    "RefusalRealignCallback",
    "RestaCallback",
    "SafeDeltaCallback",
    "SafeLoRACallback",
    "WandaPruneCallback",
]
