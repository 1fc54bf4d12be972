"""Importance scores for row-layout ``[out, in]`` weights: Wanda, magnitude and seeded random.

All scores are fp32 and have the weight's shape; larger means more important for the calibration
data, i.e. more likely to be removed by Antidote (reference §B.2).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping

import torch

from antidote_pl.errors import ConfigError, bad_value, check_number
from antidote_pl.pruning.stats import ActivationStats
from antidote_pl.pruning.targets import lora_delta_weight

__all__ = [
    "contrast_statistic",
    "contrastive_scores",
    "lora_delta_weight",
    "magnitude_scores",
    "name_generator",
    "random_scores",
    "wanda_scores",
]


def wanda_scores(
    weights: Mapping[str, torch.Tensor],
    stats: ActivationStats | Mapping[str, torch.Tensor],
    statistic: str = "sample_mean",
) -> dict[str, torch.Tensor]:
    """Wanda scores ``S_ij = |W_ij| * sqrt(stat_j)``, the statistic broadcast over rows.

    Args:
        weights: Row-layout weights ``[out, in]`` per target.
        stats: Accumulated :class:`ActivationStats`, or precomputed per-feature statistics ``[in]``.
        statistic: Normalisation to use when ``stats`` is an :class:`ActivationStats`.

    Raises:
        ConfigError: A weight without a statistic, or a feature-count mismatch.
    """
    per_feature = stats.statistic(statistic) if isinstance(stats, ActivationStats) else stats
    scores = {}
    for name, w in weights.items():
        if name not in per_feature:
            raise bad_value("stats", f"no statistic for {name}", "a statistic for every weight")
        stat = per_feature[name]
        if w.dim() != 2 or stat.shape != (w.shape[1],):
            raise ConfigError(
                f"target {name}: weight shape {tuple(w.shape)} does not fit statistic shape "
                f"{tuple(stat.shape)}."
            )
        scores[name] = w.detach().float().abs() * stat.to(w.device, torch.float32).sqrt().unsqueeze(0)
    return scores


def contrastive_scores(
    harm: Mapping[str, torch.Tensor], benign: Mapping[str, torch.Tensor], weight: float
) -> dict[str, torch.Tensor]:
    """Harm-minus-utility scores ``S = S_harm − λ·S_benign`` (subtractive contrast).

    Both are Wanda scores of the same targets, one calibrated on the harmful realignment set, one on
    benign task data; weights important for the task are pushed down the ranking, so the removed set
    is more specific to the harmful behaviour. Scores may turn negative; ranking is unaffected.

    Args:
        harm: Scores on the harmful calibration set (larger = removed first).
        benign: Scores on benign data, same keys and shapes.
        weight: ``λ >= 0``; 0 returns the harm scores (as fp32 copies).

    Raises:
        ConfigError: A negative or non-finite ``λ``, or a benign score missing or of another shape.
    """
    check_number("contrast_lambda", weight, low=0.0)
    out = {}
    for name, h in harm.items():
        b = benign.get(name)
        if b is None or b.shape != h.shape:
            got = None if b is None else tuple(b.shape)
            raise ConfigError(
                f"benign scores[{name}]: shape {got} does not match harm scores {tuple(h.shape)}."
            )
        out[name] = h.float() - float(weight) * b.to(h.device, torch.float32)
    return out


def contrast_statistic(statistic: str) -> str:
    """The per-token statistic a contrast between two calibration sets compares.

    ``sample_mean`` (``Σ x²`` per sample) grows with the set's mean tokens per sample ``T``, so a
    Wanda score ``sqrt(stat)`` scales with ``sqrt(T)``: on two sets of 108 and 60 tokens per sample,
    ``λ = 1`` would weigh a benign token about 0.75 of a harmful one, and ``λ`` would mean something
    else on every pair of sets. Dividing each set's ``sample_mean`` by its ``T`` gives exactly
    ``token_mean``; ``token_mean`` and ``sample_token_mean`` are per-token already. The contrast
    ``W(harm) − λ·W(benign)`` built on it is unchanged when, e.g., every benign sample is repeated
    twice in length.
    """
    return "token_mean" if statistic == "sample_mean" else statistic


def magnitude_scores(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Data-free scores ``|W|`` (the official ``--sample_num 0`` fallback)."""
    return {name: w.detach().float().abs() for name, w in weights.items()}


def name_generator(seed: int, name: str) -> torch.Generator:
    """CPU generator seeded from ``seed`` and the tensor name.

    Deriving the stream from the name (with a stable CRC, not Python's salted ``hash``) makes each
    tensor's random draw independent of which other tensors are present or their order.
    """
    return torch.Generator(device="cpu").manual_seed(
        (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % 2**63
    )


def random_scores(weights: Mapping[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Seeded uniform random scores, deterministic across runs and devices (drawn on CPU)."""
    return {
        name: torch.rand(w.shape, generator=name_generator(seed, name)).to(w.device)
        for name, w in weights.items()
    }
