"""Wanda in delta space: the Antidote score on the merged LoRA update instead of its factors.

For a LoRA target the update is ``dW = scale · B @ A`` (row layout ``[out, in]``). Its score is
``S_ij = |dW_ij| · sqrt(stat_j)``, with ``stat_j`` the per-input-feature activation statistic of the
base layer's input (the statistic Antidote's Wanda uses for ``lora_A``). In each row the top ``α``
fraction of scores is reset to zero in ``dW`` (the project's per-row count rule,
:func:`antidote_pl.pruning.select.keep_count`); the edited update is ``dW`` with those entries zeroed,
to be merged into the base weight. ``α = 0`` leaves ``dW`` unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from antidote_pl.errors import ConfigError, bad_value, check_choice, check_number
from antidote_pl.pruning.scores import wanda_scores
from antidote_pl.pruning.select import SCOPES, masks_for_alphas
from antidote_pl.pruning.stats import STATISTICS, ActivationStats
from antidote_pl.pruning.targets import lora_delta_weight
from antidote_pl.repair._checks import check_lora_factors, check_matching, check_nonempty

__all__ = [
    "apply_delta_masks",
    "delta_wanda_masks",
    "delta_wanda_repair",
    "delta_wanda_scores",
    "lora_deltas",
]

Stats = ActivationStats | Mapping[str, torch.Tensor]


def lora_deltas(
    lora_a: Mapping[str, torch.Tensor],
    lora_b: Mapping[str, torch.Tensor],
    scale: float | Mapping[str, float],
) -> dict[str, torch.Tensor]:
    """The merged LoRA updates ``dW = scale · B @ A`` per target, fp32 ``[out, in]``.

    Args:
        lora_a: ``lora_A`` weights ``[r, in]`` per target.
        lora_b: ``lora_B`` weights ``[out, r]`` per target.
        scale: peft's ``scaling`` (``lora_alpha / r``), one number for all targets or one per target.

    Raises:
        ConfigError: A scale that is not a finite number ``> 0`` or is missing for a target, or factors
            whose targets or ranks do not match (named).
    """
    check_lora_factors(lora_a, lora_b)
    scales = {name: _scale_of(scale, name) for name in lora_b}
    return {name: lora_delta_weight(lora_a[name], b, scales[name]) for name, b in lora_b.items()}


def delta_wanda_scores(
    deltas: Mapping[str, torch.Tensor], stats: Stats, statistic: str = "sample_mean"
) -> dict[str, torch.Tensor]:
    """Scores ``|dW_ij| · sqrt(stat_j)`` per target (fp32, shaped like ``dW``).

    Args:
        deltas: Merged updates ``dW [out, in]`` per target.
        stats: :class:`ActivationStats` of the base layers' inputs, or per-feature statistics ``[in]``,
            keyed like ``deltas``.
        statistic: Which statistic of an :class:`ActivationStats` to use.

    Raises:
        ConfigError: An unknown ``statistic``, or a statistic missing or of the wrong length (named).
    """
    per_feature = _per_feature(deltas, stats, statistic)
    return wanda_scores(deltas, per_feature)


def delta_wanda_masks(
    deltas: Mapping[str, torch.Tensor],
    stats: Stats,
    alphas: Iterable[float],
    statistic: str = "sample_mean",
    scope: str = "row",
) -> dict[float, dict[str, torch.Tensor]]:
    """Removal masks (True = reset to zero) for several ``α`` from one scoring.

    Args:
        deltas: Merged updates ``dW [out, in]`` per target.
        stats: As in :func:`delta_wanda_scores`.
        alphas: Fractions removed, each in ``[0, 1)``; 0 gives all-False masks.
        statistic: As in :func:`delta_wanda_scores`.
        scope: Selection group of :func:`antidote_pl.pruning.select.masks_for_alphas` (``"row"``: the
            top fraction of each row).

    Returns:
        ``{alpha: {target: bool mask}}``, masks shaped like ``dW``.

    Raises:
        ConfigError: A bad ``α``, ``scope`` or ``statistic``, or statistics that do not fit (named);
            all checked before scoring.
    """
    alphas = _check_alphas(alphas)
    check_choice("scope", scope, SCOPES)
    per_feature = _per_feature(deltas, stats, statistic)
    nonzero = [a for a in alphas if a > 0]
    by_alpha = masks_for_alphas(wanda_scores(deltas, per_feature), nonzero, scope) if nonzero else {}
    none = {name: torch.zeros(d.shape, dtype=torch.bool, device=d.device) for name, d in deltas.items()}
    return {a: by_alpha[a] if a > 0 else dict(none) for a in alphas}


def apply_delta_masks(
    deltas: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The edited updates ``dW`` with masked entries set to zero (new tensors, ``dW``'s dtype).

    Raises:
        ConfigError: A mask that is not boolean, or targets or shapes that do not match (named).
    """
    check_matching(deltas, masks, "deltas", "masks")
    for name, mask in masks.items():
        if mask.dtype != torch.bool:
            raise ConfigError(f"masks[{name}]: dtype {mask.dtype}, expected torch.bool (True = remove).")
    # masked_fill writes +0.0, where multiplying by ~mask would leave -0.0 for negative entries.
    return {name: d.masked_fill(masks[name].to(d.device), 0.0) for name, d in deltas.items()}


def delta_wanda_repair(
    deltas: Mapping[str, torch.Tensor],
    stats: Stats,
    alpha: float,
    statistic: str = "sample_mean",
    scope: str = "row",
) -> dict[str, torch.Tensor]:
    """Delta-space Wanda for one ``α``: score ``dW``, zero the top fraction per row, return ``dW``.

    Args:
        deltas: Merged updates ``dW [out, in]`` per target.
        stats: As in :func:`delta_wanda_scores`.
        alpha: Fraction removed, in ``[0, 1)``; at 0 the input tensors themselves are returned.
        statistic: As in :func:`delta_wanda_scores`.
        scope: As in :func:`delta_wanda_masks`.

    Raises:
        ConfigError: As :func:`delta_wanda_masks`.
    """
    (alpha,) = _check_alphas([alpha])
    masks = delta_wanda_masks(deltas, stats, [alpha], statistic, scope)[alpha]  # validates at α = 0 too
    if alpha == 0:
        return dict(deltas)  # the inputs themselves, not masked copies
    return apply_delta_masks(deltas, masks)


def _check_alphas(alphas: Iterable[float]) -> list[float]:
    values = list(alphas)
    for alpha in values:
        check_number("alpha", alpha, low=0.0, high=1.0, high_open=True)
    return [float(a) for a in values]


def _scale_of(scale: float | Mapping[str, float], name: str) -> float:
    if isinstance(scale, Mapping):
        if name not in scale:
            raise bad_value(f"scale[{name}]", None, "a LoRA scale for every target")
        value, field = scale[name], f"scale[{name}]"
    else:
        value, field = scale, "scale"
    check_number(field, value, low=0.0, low_open=True)
    return float(value)


def _per_feature(
    deltas: Mapping[str, torch.Tensor], stats: Stats, statistic: str
) -> Mapping[str, torch.Tensor]:
    """Resolves and checks the per-feature statistic of every target before any scoring."""
    check_choice("statistic", statistic, STATISTICS)
    check_nonempty(deltas, "deltas")
    per_feature = stats.statistic(statistic) if isinstance(stats, ActivationStats) else stats
    for name, d in deltas.items():
        stat = per_feature.get(name)
        if d.dim() != 2 or stat is None or stat.shape != (d.shape[1],):
            got = None if stat is None else tuple(stat.shape)
            raise ConfigError(
                f"target {name}: delta shape {tuple(d.shape)} needs a statistic of shape "
                f"({d.shape[1] if d.dim() == 2 else '?'},) (one per input feature), got {got}."
            )
    return per_feature
