"""Turning scores into removal masks (True = remove), for one or many pruning fractions α.

``alpha`` is the fraction *removed* (the official ``dense_ratio``, reference §B.4). In every selection
group (a row, a matrix, or all targets together) the official rule is followed: sort the scores
ascending with a stable sort, keep the ``floor(n·(1−α))`` lowest, remove the rest. Stable sorting makes
ties deterministic: among equal scores, later positions are removed first, exactly as in the official
code.

``floor(n·(1−α))`` is evaluated exactly on the decimal value of α (``0.1`` means 1/10), so results do
not depend on binary rounding of ``1 − α``. This matches the official float expression on every entry
of the §B.4 table; they differ only when ``n·(1−α)`` is an exact integer that the float product misses
(e.g. n=10, α=0.9: the official float keeps 0 entries, this keeps 1).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fractions import Fraction

import torch

from antidote_pl.errors import ConfigError, bad_value, check_choice
from antidote_pl.pruning.scores import name_generator, random_scores

SCOPES = ("row", "matrix", "layer", "global")
RANDOM_SCOPES = ("row", "tensor")
PROTECT_MODES = ("replace", "subtract")
# The first dotted integer component of a parameter name is its transformer layer (".layers.3.").
_LAYER = re.compile(r"^(.*?\.\d+)(?:\.|$)")


def _exact(alpha: float) -> Fraction:
    # str(float(x)) is the shortest decimal that round-trips, i.e. the value the user wrote.
    return Fraction(str(float(alpha)))


def keep_count(n: int, alpha: float) -> int:
    """Entries kept out of ``n``: ``floor(n·(1−α))``, computed exactly on the decimal α."""
    return math.floor(n * (1 - _exact(alpha)))


def removed_count(n: int, alpha: float) -> int:
    """Entries removed out of ``n`` by the official rule: ``n − floor(n·(1−α))``.

    For example 4096 columns remove 41/82/205/410/820/1024 at α = 0.01/0.02/0.05/0.1/0.2/0.25 and
    256 columns remove 3/6/13/26/52/64 (reference §B.4).
    """
    return n - keep_count(n, alpha)


def layer_of(name: str) -> str:
    """The transformer layer a parameter belongs to: its name up to the first integer component.

    ``base_model.model.model.layers.3.self_attn.q_proj.lora_A.default.weight`` belongs to
    ``base_model.model.model.layers.3``; a name without an integer component (e.g. ``lm_head.weight``)
    is a layer of its own.
    """
    match = _LAYER.match(name)
    return match.group(1) if match else name


def factor_of(name: str) -> str:
    """The LoRA factor a parameter is (``lora_A`` or ``lora_B``, from its dotted name), or ``""``."""
    return next((p for p in name.split(".") if p in ("lora_A", "lora_B")), "")


def check_alpha(alpha: float, field: str = "alpha") -> float:
    """Validates a fraction strictly between 0 and 1 and returns it as float."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 < float(alpha) < 1.0:
        raise bad_value(field, alpha, "a fraction strictly between 0 and 1 (the fraction removed)")
    return float(alpha)


@dataclass
class _Group:
    """One selection group: a ``[rows, cols]`` view whose rows are ranked independently."""

    names: list[str]
    shapes: list[torch.Size]
    devices: list[torch.device]
    order: torch.Tensor  # [rows, cols] indices of a stable ascending sort of the scores


def masks_for_alphas(
    scores: Mapping[str, torch.Tensor],
    alphas: Iterable[float],
    scope: str = "row",
    protect_scores: Mapping[str, torch.Tensor] | None = None,
    protect_fraction: float = 0.0,
    protect_mode: str = "replace",
) -> dict[float, dict[str, torch.Tensor]]:
    """Masks for several α from one ranking (scores are sorted once, then sliced per α).

    Args:
        scores: Row-layout scores ``[out, in]`` per target (larger = removed first).
        alphas: Fractions removed, each in (0, 1).
        scope: ``"row"`` (official: per output row), ``"matrix"`` (top fraction of each tensor),
            ``"layer"`` (top fraction over the targets of each transformer layer together, see
            :func:`layer_of`; LoRA factors apart: a layer's ``lora_A`` scores are ranked together and
            its ``lora_B`` scores together, each factor removing ``alpha`` of its own entries, since
            the two factors' scores live on different scales) or ``"global"`` (top fraction over all
            targets together; sorts every score at once, so memory grows with the total number of
            entries).
        protect_scores: Second score (e.g. Wanda calibrated on benign task data), same keys/shapes.
        protect_fraction: Entries in the top ``protect_fraction`` of ``protect_scores`` (selected with
            the same ``scope``) are never removed. 0 disables protection.
        protect_mode: ``"replace"``: protected entries drop out of the ranking and the next-ranked
            unprotected entries are removed instead, so the removed count per group stays the same
            where possible. ``"subtract"``: the plain mask minus the protected entries (the legacy
            ``clamp(bad − good, 0)`` of the Booster-lineage code, reference §B.6), which removes fewer.

    Returns:
        ``{alpha: {name: bool mask}}``, masks shaped like the scores, True = remove.

    Raises:
        ConfigError: Bad α, scope, protection arguments, NaN scores or mismatched shapes.
    """
    alphas = [check_alpha(a) for a in alphas]
    check_choice("scope", scope, SCOPES)
    _check_scores(scores, "scores", need_2d=scope == "row")
    protected = _protected(scores, scope, protect_scores, protect_fraction, protect_mode)
    ranked = scores
    if protected is not None and protect_mode == "replace":
        ranked = {n: s.float().masked_fill(protected[n], float("-inf")) for n, s in scores.items()}
    groups = _rank(ranked, scope)
    result = {}
    for alpha in alphas:
        masks = _masks_from_groups(groups, alpha)
        if protected is not None:
            # Also covers "replace" when a group has fewer unprotected entries than it must remove.
            masks = {n: m & ~protected[n] for n, m in masks.items()}
        result[alpha] = masks
    return result


def select_masks(
    scores: Mapping[str, torch.Tensor],
    alpha: float,
    scope: str = "row",
    protect_scores: Mapping[str, torch.Tensor] | None = None,
    protect_fraction: float = 0.0,
    protect_mode: str = "replace",
) -> dict[str, torch.Tensor]:
    """Masks (True = remove) for one α; see :func:`masks_for_alphas` for the arguments."""
    alpha = check_alpha(alpha)
    return masks_for_alphas(scores, [alpha], scope, protect_scores, protect_fraction, protect_mode)[alpha]


def random_masks(
    weights: Mapping[str, torch.Tensor], alpha: float, scope: str = "row", seed: int = 0
) -> dict[str, torch.Tensor]:
    """Seeded random removal masks, the ablation baseline.

    Args:
        weights: Tensors to mask (only shapes and devices are used).
        alpha: Fraction removed.
        scope: ``"row"``: the per-row count of :func:`removed_count` at random positions (same budget
            as Wanda). ``"tensor"``: exactly ``floor(numel·α)`` positions uniformly over the whole
            tensor (official ``random_prune``, reference §B.6).
        seed: Seed; each tensor's draw depends only on the seed and its name.
    """
    alpha = check_alpha(alpha)
    check_choice("scope", scope, RANDOM_SCOPES)
    if scope == "row":
        return select_masks(random_scores(weights, seed), alpha, "row")
    masks = {}
    for name, w in weights.items():
        n = w.numel()
        k = math.floor(n * _exact(alpha))
        flat = torch.zeros(n, dtype=torch.bool)
        flat[torch.randperm(n, generator=name_generator(seed, name))[:k]] = True
        masks[name] = flat.view(w.shape).to(w.device)
    return masks


def _check_scores(scores: Mapping[str, torch.Tensor], field: str, need_2d: bool) -> None:
    if not scores:
        raise bad_value(field, {}, "at least one tensor")
    for name, s in scores.items():
        if need_2d and s.dim() != 2:
            raise ConfigError(
                f"{field}[{name}]: row scope needs [out, in] tensors, got shape {tuple(s.shape)}."
            )
        if torch.isnan(s).any():
            raise ConfigError(f"{field}[{name}]: contains NaN; scores must be comparable numbers.")


def _protected(
    scores: Mapping[str, torch.Tensor],
    scope: str,
    protect_scores: Mapping[str, torch.Tensor] | None,
    protect_fraction: float,
    protect_mode: str,
) -> dict[str, torch.Tensor] | None:
    check_choice("protect_mode", protect_mode, PROTECT_MODES)
    if protect_fraction == 0:
        return None
    check_alpha(protect_fraction, "protect_fraction")
    if protect_scores is None:
        raise bad_value("protect_scores", None, "a second score dict when protect_fraction > 0")
    for name, s in scores.items():
        p = protect_scores.get(name)
        if p is None or p.shape != s.shape:
            got = None if p is None else tuple(p.shape)
            raise ConfigError(
                f"protect_scores[{name}]: shape {got} does not match scores shape {tuple(s.shape)}."
            )
    subset = {n: protect_scores[n] for n in scores}
    return select_masks(subset, protect_fraction, scope)


def _joint_group(scores: Mapping[str, torch.Tensor]) -> _Group:
    """One group ranking every entry of several tensors together (concatenated in key order)."""
    device = next(iter(scores.values())).device
    flat = torch.cat([s.detach().float().reshape(-1).to(device) for s in scores.values()])
    shapes = [s.shape for s in scores.values()]
    devices = [s.device for s in scores.values()]
    return _Group(list(scores), shapes, devices, _stable_order(flat.view(1, -1)))


def _rank(scores: Mapping[str, torch.Tensor], scope: str) -> list[_Group]:
    if scope == "global":
        return [_joint_group(scores)]
    if scope == "layer":
        # Per layer and LoRA factor: A and B scores differ in scale (the input statistic of B is the
        # rank-r output of A), so ranked together one factor would take almost all of the budget.
        layers: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
        for name, s in scores.items():
            layers.setdefault((layer_of(name), factor_of(name)), {})[name] = s
        return [_joint_group(group) for group in layers.values()]
    groups = []
    for name, s in scores.items():
        view = s.detach().float()
        view = view if scope == "row" else view.reshape(1, -1)
        groups.append(_Group([name], [s.shape], [s.device], _stable_order(view)))
    return groups


def _stable_order(matrix: torch.Tensor) -> torch.Tensor:
    return torch.sort(matrix, dim=-1, stable=True).indices


def _masks_from_groups(groups: list[_Group], alpha: float) -> dict[str, torch.Tensor]:
    masks: dict[str, torch.Tensor] = {}
    for g in groups:
        keep = keep_count(g.order.shape[1], alpha)
        mask = torch.zeros(g.order.shape, dtype=torch.bool, device=g.order.device)
        mask.scatter_(1, g.order[:, keep:], True)
        flat = mask.reshape(-1)
        offset = 0
        for name, shape, device in zip(g.names, g.shapes, g.devices):
            size = math.prod(shape)
            part = flat[offset : offset + size].view(shape)
            # A global group's masks must not share storage (safetensors and in-place edits).
            masks[name] = part.to(device, copy=len(g.names) > 1)
            offset += size
    return masks
