"""Antidote pruning math as pure tensor functions: targets, Wanda statistics, scores, masks, application.

Typical flow (the Lightning callback is thin glue over it)::

    targets = find_targets(model, "lora")
    with collect(model, targets) as stats:
        run_calibration(model, realignment_batches, stats)
    stats.all_reduce_()  # no-op outside DDP
    scores = wanda_scores(target_weights(targets), stats, "sample_mean")
    by_alpha = masks_for_alphas(scores, [0.05, 0.1], scope="row")  # rank once, sweep many
    masks = to_param_layout(by_alpha[0.1], targets)  # keyed like model.named_parameters()
    save_tensors(out_dir / "masks.safetensors", masks)
    apply_target_masks_(targets, masks)  # apply one alpha per model copy

A prune callback with ``sweep_alphas`` saves the masks of every alpha beside the pruned stage;
:class:`RepairArtifacts` reads them back, checked::

    art = RepairArtifacts.read(stage_dir)
    apply_masks_(dict(model.named_parameters()), art.masks(0.05))
"""

from antidote_pl.pruning.apply import (
    apply_masks_,
    apply_target_masks_,
    check_mask_shapes,
    load_tensors,
    masked_delta_merge_,
    overall_fraction,
    realised_fractions,
    save_tensors,
)
from antidote_pl.pruning.artifacts import RepairArtifacts
from antidote_pl.pruning.scores import (
    contrast_statistic,
    contrastive_scores,
    magnitude_scores,
    random_scores,
    wanda_scores,
)
from antidote_pl.pruning.select import (
    SCOPES,
    keep_count,
    layer_of,
    masks_for_alphas,
    random_masks,
    removed_count,
    select_masks,
)
from antidote_pl.pruning.stats import (
    STATISTICS,
    ActivationStats,
    batch_token_mask,
    collect,
    run_calibration,
)
from antidote_pl.pruning.targets import (
    TARGET_KINDS,
    TargetInfo,
    default_lora_target_modules,
    find_targets,
    lora_delta_weight,
    target_weights,
    to_param_layout,
)

__all__ = [
    "SCOPES",
    "STATISTICS",
    "TARGET_KINDS",
    "ActivationStats",
    "RepairArtifacts",
    "TargetInfo",
    "apply_masks_",
    "apply_target_masks_",
    "batch_token_mask",
    "check_mask_shapes",
    "collect",
    "contrast_statistic",
    "contrastive_scores",
    "default_lora_target_modules",
    "find_targets",
    "keep_count",
    "layer_of",
    "load_tensors",
    "lora_delta_weight",
    "magnitude_scores",
    "masked_delta_merge_",
    "masks_for_alphas",
    "overall_fraction",
    "random_masks",
    "random_scores",
    "realised_fractions",
    "removed_count",
    "run_calibration",
    "save_tensors",
    "select_masks",
    "target_weights",
    "to_param_layout",
    "wanda_scores",
]
