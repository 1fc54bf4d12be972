"""RESTA (arXiv 2402.11746): restore safety by re-adding the alignment delta to fine-tuned weights.

The *safety vector* of a target is ``V = W_aligned − W_pre``, what safety alignment changed in it.
RESTA adds it back to the (merged) fine-tuned weight: ``W' = W + β·V``. The harm-vector variant
subtracts what harmful fine-tuning added instead: ``H = W_harmful − W_aligned`` and
``W' = W − γ·H`` (task-vector negation). DARE's optional drop-and-rescale of ``V`` is not provided.

Deltas are returned in fp32: the difference of two bf16/fp16 weights is generally not representable
in their dtype, and the deltas feed further fp32 math (e.g. SafeLoRA's projectors). Edited weights
are computed in fp32 and returned in the dtype of the weight they edit.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from antidote_pl.repair._checks import check_coefficient, check_matching

__all__ = ["add_safety_vector", "alignment_delta", "harm_delta", "subtract_harm_vector"]


def alignment_delta(
    aligned: Mapping[str, torch.Tensor], pre: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The safety vector ``V = aligned − pre`` per target, in fp32.

    Args:
        aligned: Weights of the safety-aligned model per target.
        pre: Weights of the same targets before alignment (same names and shapes).

    Returns:
        ``V`` per target (fp32, on the device of ``aligned``).

    Raises:
        ConfigError: A target missing from either mapping or with another shape (named).
    """
    return _difference(aligned, pre, "aligned", "pre")


def harm_delta(
    harmful: Mapping[str, torch.Tensor], aligned: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The harm vector ``H = harmful − aligned`` per target, in fp32 (what fine-tuning added).

    Raises:
        ConfigError: A target missing from either mapping or with another shape (named).
    """
    return _difference(harmful, aligned, "harmful", "aligned")


def add_safety_vector(
    weights: Mapping[str, torch.Tensor], vectors: Mapping[str, torch.Tensor], beta: float
) -> dict[str, torch.Tensor]:
    """RESTA's edit ``W' = W + β·V`` per target.

    Args:
        weights: Fine-tuned (merged) weights per target.
        vectors: Safety vectors ``V`` (see :func:`alignment_delta`), same targets and shapes.
        beta: Strength ``β >= 0``.

    Returns:
        Edited weights in each weight's dtype. At ``β = 0`` the input tensors themselves.

    Raises:
        ConfigError: A bad ``β`` (checked first), or targets or shapes that do not match (named).
    """
    beta = check_coefficient("beta", beta)
    return _add_scaled(weights, vectors, beta, "vectors")


def subtract_harm_vector(
    weights: Mapping[str, torch.Tensor], harm_vectors: Mapping[str, torch.Tensor], gamma: float
) -> dict[str, torch.Tensor]:
    """The harm-vector negation ``W' = W − γ·H`` per target.

    Args:
        weights: Fine-tuned (merged) weights per target.
        harm_vectors: Harm vectors ``H`` (see :func:`harm_delta`), same targets and shapes.
        gamma: Strength ``γ >= 0``.

    Returns:
        Edited weights in each weight's dtype. At ``γ = 0`` the input tensors themselves.

    Raises:
        ConfigError: A bad ``γ`` (checked first), or targets or shapes that do not match (named).
    """
    gamma = check_coefficient("gamma", gamma)
    return _add_scaled(weights, harm_vectors, -gamma, "harm_vectors")


def _difference(
    after: Mapping[str, torch.Tensor], before: Mapping[str, torch.Tensor], after_field: str, before_field: str
) -> dict[str, torch.Tensor]:
    check_matching(after, before, after_field, before_field)
    return {name: a.float() - before[name].to(a.device, torch.float32) for name, a in after.items()}


def _add_scaled(
    weights: Mapping[str, torch.Tensor],
    vectors: Mapping[str, torch.Tensor],
    coefficient: float,
    vectors_field: str,
) -> dict[str, torch.Tensor]:
    check_matching(weights, vectors, "weights", vectors_field)
    if coefficient == 0.0:
        # The inputs themselves: 0·V would still round-trip through fp32 (lossy for float64) and
        # 0·inf is NaN.
        return dict(weights)
    return {
        name: (w.float() + coefficient * vectors[name].to(w.device, torch.float32)).to(w.dtype)
        for name, w in weights.items()
    }
