"""Delta scaling: merge the pre- and post-fine-tuning models by shrinking the LoRA update.

Pre/post-tuning merging (arXiv 2412.19512) linearly interpolates the base model ``W`` and the
fine-tuned model ``W + dW``: ``(1 − λ)·W + λ·(W + dW) = W + λ·dW``. For a LoRA target
``dW = scale · B @ A``, so the merge is the same adapter with ``B`` replaced by ``λ·B`` (``A`` and
``scale`` unchanged). ``λ = 1`` is the fine-tuned model (no repair), ``λ = 0`` the base model;
``[0, 1]`` is the meaningful range and larger values are allowed (extrapolation).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from antidote_pl.repair._checks import check_coefficient, check_lora_factors, check_nonempty

__all__ = ["scale_lora", "scale_lora_b"]


def scale_lora_b(lora_b: Mapping[str, torch.Tensor], lam: float) -> dict[str, torch.Tensor]:
    """Scales every ``lora_B`` factor by ``λ`` (so each delta ``scale·B@A`` is scaled by ``λ``).

    Args:
        lora_b: ``lora_B`` weights ``[out, r]`` per target.
        lam: Interpolation weight of the fine-tuned model, ``>= 0``.

    Returns:
        ``λ·B`` per target, computed in fp32 and returned in each input's dtype. At ``λ = 1`` the
        input tensors themselves are returned (bit-identical, not copies).

    Raises:
        ConfigError: ``λ`` negative, non-finite or not a number; an empty mapping.
    """
    lam = check_coefficient("lam", lam)
    check_nonempty(lora_b, "lora_b")
    if lam == 1.0:
        # The inputs themselves: no copy, and no fp32 round trip (lossy for a float64 input).
        return dict(lora_b)
    return {name: (b.float() * lam).to(b.dtype) for name, b in lora_b.items()}


def scale_lora(
    lora_a: Mapping[str, torch.Tensor], lora_b: Mapping[str, torch.Tensor], lam: float
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The edited LoRA factors of the ``λ``-merge: ``A`` unchanged, ``B`` scaled by ``λ``.

    Args:
        lora_a: ``lora_A`` weights ``[r, in]`` per target.
        lora_b: ``lora_B`` weights ``[out, r]`` per target, same targets and ranks.
        lam: Interpolation weight of the fine-tuned model, ``>= 0``.

    Returns:
        ``(A, λ·B)``; ``A`` is the input tensors, ``λ·B`` as in :func:`scale_lora_b`.

    Raises:
        ConfigError: A bad ``λ`` (checked first), or factors whose targets or ranks do not match.
    """
    check_coefficient("lam", lam)
    check_lora_factors(lora_a, lora_b)
    return dict(lora_a), scale_lora_b(lora_b, lam)
